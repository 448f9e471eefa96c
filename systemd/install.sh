#!/usr/bin/env bash
# Install (or uninstall) quant-engine on a systemd host. Run as root from a checkout:
#
#   make install            # = systemd/install.sh install
#   make uninstall          # = systemd/install.sh uninstall
#
# Idempotent: a second run with the same checkout changes nothing (no file is
# rewritten, no mode or owner changes; the virtualenv is rebuilt only when the
# package's sources change). Walk-through and layout: systemd/README.md.
#
# Every location is a variable (environment or `make install VAR=value`):
#   PREFIX=/opt/quant-engine        the virtualenv (.venv), reference copies of etc/, the README
#   CONFDIR=/etc/quant-engine       qe.env, risk_rules.yaml, universe.csv, secrets/ (operator-owned config)
#   UNITDIR=/etc/systemd/system     qe.target and the qe-*.service units
#   BINDIR=/usr/local/bin           a `qe` symlink for the operator ("" = none)
#   REDIS_ACL_FILE=/etc/redis/qe-users.acl   the Redis ACL users (load with `aclfile` in redis.conf)
#   REDIS_USER=redis                owner of the ACL file (if that user exists; else root)
#   SERVICE_USER=quant-engine       the daemons' user and group (created if missing)
#   PYTHON=/usr/bin/python3         the interpreter of the virtualenv (>= 3.11; not under /root or /home:
#                                   the units' ProtectHome=yes would hide it from the daemons)
#   SYSTEMCTL=systemctl             "" to skip every systemctl call (image builds)
#   KEEP_CONFIG=                    uninstall: 1 keeps CONFDIR (qe.env, rules, passwords)
# pip's own PIP_* variables apply (e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=/srv/wheels offline).
#
# No DESTDIR: a virtualenv is not relocatable (its scripts name its own absolute
# path), so the files are installed where they run; point the variables above
# elsewhere instead.
set -euo pipefail
umask 022

PREFIX=${PREFIX:-/opt/quant-engine}
CONFDIR=${CONFDIR:-/etc/quant-engine}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BINDIR=${BINDIR-/usr/local/bin}
REDIS_ACL_FILE=${REDIS_ACL_FILE:-/etc/redis/qe-users.acl}
REDIS_USER=${REDIS_USER:-redis}
SERVICE_USER=${SERVICE_USER:-quant-engine}
PYTHON=${PYTHON:-/usr/bin/python3}
SYSTEMCTL=${SYSTEMCTL-systemctl}
KEEP_CONFIG=${KEEP_CONFIG:-}

SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=$PREFIX/.venv
STATE=$PREFIX/.install-state        # what this script created (read by uninstall)
SECRETS=$CONFDIR/secrets
ADMIN_SECRETS=$CONFDIR/admin        # qe-admin.pass: root's alone
DAEMONS=(session exposure market-data prints alerts decision execution pnl)
UNITS=(qe.target qe-functions.service)
for d in "${DAEMONS[@]}"; do UNITS+=("qe-$d.service"); done
# Files of the package (what pip builds): a change to any of them reinstalls it.
PACKAGE_PATHS=(pyproject.toml setup.cfg README.md lib daemons sim)

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
changed=0

# put MODE OWNER GROUP SRC DEST: copy only when the content differs, then fix mode and
# owner only where they differ (a second run touches nothing, mtimes included).
put() {
  local mode=$1 owner=$2 group=$3 src=$4 dest=$5
  if [ ! -f "$dest" ] || ! cmp -s "$src" "$dest"; then
    install -m "$mode" -o "$owner" -g "$group" "$src" "$dest.qe-new"
    mv -f "$dest.qe-new" "$dest"
    say "  installed $dest"
    changed=1
  fi
  fix "$mode" "$owner" "$group" "$dest"
}

# fix MODE OWNER GROUP PATH: chmod/chown only if needed.
fix() {
  local mode=$1 owner=$2 group=$3 path=$4
  [ "$(stat -c '%a' "$path")" = "${mode#0}" ] || { chmod "$mode" "$path"; say "  chmod $mode $path"; }
  [ "$(stat -c '%U:%G' "$path")" = "$owner:$group" ] || { chown "$owner:$group" "$path"; say "  chown $owner:$group $path"; }
}

dir() {  # dir MODE OWNER GROUP PATH
  [ -d "$4" ] || { mkdir -p "$4"; say "  created $4"; }
  fix "$1" "$2" "$3" "$4"
}

# Units as shipped name /opt/quant-engine, /etc/quant-engine and the quant-engine user;
# render them for the configured locations.
render_unit() {
  sed -e "s#/opt/quant-engine#$PREFIX#g" \
      -e "s#/etc/quant-engine#$CONFDIR#g" \
      -e "s#^User=quant-engine\$#User=$SERVICE_USER#" \
      -e "s#^Group=quant-engine\$#Group=$SERVICE_USER#" "$1"
}

# qe.env from etc/qe.env.example, with this installation's paths filled in.
render_env() {
  sed -e "s#^QE_HOME=.*#QE_HOME=$PREFIX#" \
      -e "s#^\# *QE_CONFIG=.*#QE_CONFIG=$CONFDIR/risk_rules.yaml#" \
      -e "s#^\# *QE_UNIVERSE=.*#QE_UNIVERSE=$CONFDIR/universe.csv#" \
      -e "s#^QE_REDIS_SECRETS_DIR=.*#QE_REDIS_SECRETS_DIR=$SECRETS#" \
      -e "s#/etc/quant-engine/secrets#$SECRETS#g" "$SRC/etc/qe.env.example"
}

# risk_rules.yaml for a host: the end-of-day reports go to qe-pnl's StateDirectory= (the
# shipped run/reports is under the read-only $PREFIX).
REPORT_DIR=/var/lib/quant-engine/reports
render_rules() {
  sed -e "s#^  directory: run/reports\$#  directory: $REPORT_DIR#" "$SRC/etc/risk_rules.yaml"
}

source_digest() {
  (cd "$SRC" && find "${PACKAGE_PATHS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
       ! -path '*.egg-info/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

systemd_running() { [ -n "$SYSTEMCTL" ] && [ -d /run/systemd/system ]; }

# A config file the operator may edit (risk_rules.yaml, universe.csv): installed when
# absent, updated when it still equals the previously shipped copy, otherwise kept
# (with a note) -- the shipped version stays beside it in $PREFIX/etc/.
# conffile NAME SHIPPED: SHIPPED is this install's version of etc/NAME.
conffile() {
  local name=$1 shipped=$2 shipped_old=$PREFIX/etc/$1 dest=$CONFDIR/$1
  if [ ! -e "$dest" ] || { [ -f "$shipped_old" ] && cmp -s "$shipped_old" "$dest"; }; then
    put 0640 root "$SERVICE_USER" "$shipped" "$dest"
  else
    fix 0640 root "$SERVICE_USER" "$dest"
    cmp -s "$shipped" "$dest" || say "  kept $dest (changed locally; the shipped version: $PREFIX/etc/$name)"
  fi
  put 0644 root root "$shipped" "$shipped_old"
}

install_all() {
  [ "$(id -u)" = 0 ] || die "run as root (sudo make install)"
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
  PYTHON=$(command -v "$PYTHON")
  case "$(readlink -f "$PYTHON")" in
    /root/*|/home/*|/run/user/*) die "PYTHON=$PYTHON lives under /root or /home: the units' ProtectHome=yes hides it from the daemons (status=203/EXEC); use the system's python3 (PYTHON=/usr/bin/python3)";;
  esac
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "PYTHON=$PYTHON is older than 3.11"
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON has no venv/ensurepip (Debian: apt-get install python3-venv)"

  say "quant-engine: installing from $SRC"
  # 1. the service user
  if ! getent passwd "$SERVICE_USER" >/dev/null; then
    getent group "$SERVICE_USER" >/dev/null || groupadd --system "$SERVICE_USER"
    useradd --system --gid "$SERVICE_USER" --home-dir "$PREFIX" --no-create-home \
            --shell /usr/sbin/nologin --comment "quant-engine daemons" "$SERVICE_USER"
    say "  created user $SERVICE_USER"
    created_user=1
  fi

  # 2. directories
  dir 0755 root root "$PREFIX"
  dir 0755 root root "$PREFIX/etc"
  dir 0755 root root "$PREFIX/systemd"
  dir 0750 root "$SERVICE_USER" "$CONFDIR"
  dir 0700 "$SERVICE_USER" "$SERVICE_USER" "$SECRETS"
  if [ -n "${created_user:-}" ] || [ ! -f "$STATE" ]; then
    local tmp; tmp=$(mktemp)
    { [ -f "$STATE" ] && cat "$STATE"; [ -n "${created_user:-}" ] && echo "created_user=$SERVICE_USER"; true; } | sort -u >"$tmp"
    put 0644 root root "$tmp" "$STATE"; rm -f "$tmp"
  fi

  # 3. the package in its own virtualenv (rebuilt only when the sources change)
  local digest; digest="$(source_digest) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.qe-source" 2>/dev/null)" != "$digest" ]; then
    [ -x "$VENV/bin/python" ] || { "$PYTHON" -m venv "$VENV"; say "  created $VENV ($PYTHON)"; }
    local build; build=$(mktemp -d)
    # Build from a copy: pip builds in the source tree, the checkout stays untouched.
    (cd "$SRC" && cp -a "${PACKAGE_PATHS[@]}" "$build/")
    find "$build" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    # (--force-reinstall --no-deps: the same version number with new sources is replaced too)
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --quiet "$build" \
      && PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$build" \
      || { rm -rf "$build"; die "pip install failed"; }
    rm -rf "$build"
    printf '%s\n' "$digest" >"$VENV/.qe-source"
    say "  installed the package into $VENV"
    changed=1
  fi

  # 4. etc/: reference copies in $PREFIX/etc, the operator's config in $CONFDIR
  local name
  local rules; rules=$(mktemp)
  render_rules >"$rules"
  grep -q "^  directory: $REPORT_DIR\$" "$rules" || die "etc/risk_rules.yaml: report.directory is not the shipped run/reports"
  conffile risk_rules.yaml "$rules"
  rm -f "$rules"
  conffile universe.csv "$SRC/etc/universe.csv"
  put 0644 root root "$SRC/etc/qe.env.example" "$PREFIX/etc/qe.env.example"
  put 0644 root root "$SRC/systemd/README.md" "$PREFIX/systemd/README.md"
  if [ ! -e "$CONFDIR/qe.env" ]; then
    local envtmp; envtmp=$(mktemp)
    render_env >"$envtmp"
    put 0640 root "$SERVICE_USER" "$envtmp" "$CONFDIR/qe.env"
    rm -f "$envtmp"
    say "  edit $CONFDIR/qe.env (Redis, IB Gateway, account) before starting qe.target"
  else
    fix 0640 root "$SERVICE_USER" "$CONFDIR/qe.env"
  fi

  # 5. Redis ACL users: one password file per daemon (0600, created once, never
  #    overwritten) and the ACL file with their digests (lib/qe/acl.py).
  local acltmp; acltmp=$(mktemp)
  # qe-admin's password (FUNCTION LOAD) is root's, apart from the daemons': only
  # qe-functions.service (run as root, no capabilities) reads it.
  dir 0700 root root "$ADMIN_SECRETS"
  # An earlier install kept it among the daemons' passwords: move it (same password).
  if [ -f "$SECRETS/qe-admin.pass" ]; then
    if [ -e "$ADMIN_SECRETS/qe-admin.pass" ]; then rm -f "$SECRETS/qe-admin.pass"; else mv "$SECRETS/qe-admin.pass" "$ADMIN_SECRETS/"; fi
    say "  moved qe-admin.pass to $ADMIN_SECRETS (no daemon may read it)"
  fi
  "$VENV/bin/python" - "$SECRETS" "$acltmp" "$ADMIN_SECRETS" <<'EOF'
import sys
from qe import acl
acl.write_acl_file(sys.argv[2], sys.argv[1], sys.argv[3])
EOF
  local f
  for f in "$SECRETS"/*.pass; do fix 0600 "$SERVICE_USER" "$SERVICE_USER" "$f"; done
  fix 0600 root root "$ADMIN_SECRETS/qe-admin.pass"
  local acl_owner=root acl_group=root
  if getent passwd "$REDIS_USER" >/dev/null; then acl_owner=$REDIS_USER; acl_group=$(id -gn "$REDIS_USER"); fi
  [ -d "$(dirname "$REDIS_ACL_FILE")" ] || install -d -m 0755 "$(dirname "$REDIS_ACL_FILE")"
  local acl_before=; [ -f "$REDIS_ACL_FILE" ] && acl_before=$(sha256sum <"$REDIS_ACL_FILE")
  put 0600 "$acl_owner" "$acl_group" "$acltmp" "$REDIS_ACL_FILE"
  rm -f "$acltmp"
  [ "$acl_before" = "$(sha256sum <"$REDIS_ACL_FILE")" ] || \
    say "  Redis must load $REDIS_ACL_FILE: 'aclfile $REDIS_ACL_FILE' in redis.conf, then restart Redis (or ACL LOAD)"

  # 6. the operator's qe
  if [ -n "$BINDIR" ]; then
    dir 0755 root root "$BINDIR"
    if [ "$(readlink "$BINDIR/qe" 2>/dev/null)" != "$VENV/bin/qe" ]; then
      ln -sfn "$VENV/bin/qe" "$BINDIR/qe"; say "  linked $BINDIR/qe"
    fi
  fi

  # 7. units
  local unit tmpunit
  changed=0
  dir 0755 root root "$UNITDIR"
  for unit in "${UNITS[@]}"; do
    tmpunit=$(mktemp)
    render_unit "$SRC/systemd/$unit" >"$tmpunit"
    put 0644 root root "$tmpunit" "$UNITDIR/$unit"
    rm -f "$tmpunit"
  done
  if systemd_running; then
    [ $changed = 0 ] || "$SYSTEMCTL" daemon-reload
    "$SYSTEMCTL" is-enabled --quiet qe.target 2>/dev/null || "$SYSTEMCTL" enable --quiet qe.target
  elif [ -n "$SYSTEMCTL" ]; then
    "$SYSTEMCTL" is-enabled --quiet qe.target 2>/dev/null || "$SYSTEMCTL" enable --quiet qe.target || true
  fi
  say "done. Start (after editing $CONFDIR/qe.env): systemctl start qe.target; check: qe status"
}

uninstall_all() {
  [ "$(id -u)" = 0 ] || die "run as root (sudo make uninstall)"
  say "quant-engine: uninstalling"
  local created_user=
  [ -f "$STATE" ] && created_user=$(sed -n 's/^created_user=//p' "$STATE")
  if [ -n "$SYSTEMCTL" ]; then
    if systemd_running; then
      "$SYSTEMCTL" stop qe.target "${UNITS[@]:1}" 2>/dev/null || true
    fi
    "$SYSTEMCTL" disable --quiet qe.target 2>/dev/null || true
  fi
  local unit
  for unit in "${UNITS[@]}"; do
    [ -e "$UNITDIR/$unit" ] && { rm -f "$UNITDIR/$unit"; say "  removed $UNITDIR/$unit"; }
  done
  if systemd_running; then
    "$SYSTEMCTL" daemon-reload
    "$SYSTEMCTL" reset-failed "${UNITS[@]:1}" 2>/dev/null || true
  fi
  if [ -n "$BINDIR" ] && [ "$(readlink "$BINDIR/qe" 2>/dev/null)" = "$VENV/bin/qe" ]; then
    rm -f "$BINDIR/qe"; say "  removed $BINDIR/qe"
  fi
  [ -d "$PREFIX" ] && { rm -rf "$PREFIX"; say "  removed $PREFIX"; }
  if [ -z "$KEEP_CONFIG" ]; then
    [ -d "$CONFDIR" ] && { rm -rf "$CONFDIR"; say "  removed $CONFDIR (config and passwords)"; }
    [ -e "$REDIS_ACL_FILE" ] && { rm -f "$REDIS_ACL_FILE"; say "  removed $REDIS_ACL_FILE"; }
  else
    say "  kept $CONFDIR and $REDIS_ACL_FILE (KEEP_CONFIG=1)"
  fi
  if [ -z "$KEEP_CONFIG" ] && [ -n "$created_user" ] && getent passwd "$created_user" >/dev/null; then
    userdel "$created_user"; say "  removed user $created_user"
    getent group "$created_user" >/dev/null && groupdel "$created_user" 2>/dev/null || true
  fi
  say "done."
}

case "${1:-install}" in
  install) install_all;;
  uninstall) uninstall_all;;
  *) die "usage: $0 [install|uninstall]";;
esac
