"""Least privilege in Redis: one ACL user per daemon, allowed only the streams and
keys it reads or writes (SPEC 7; docs/security.md is the contract, tested in
tests/test_acl.py against a real redis-server).

One table (`ACCESS`) says what each daemon touches; `render()` turns it into a
Redis ACL file (hashed passwords, `default` user off) and `ensure_secrets()`
writes one password file per user, mode 0600. The demo's private Redis loads the
file; production loads the same file into its Redis (see docs/security.md).

Every permission sits in a selector that pairs *only* the commands of one purpose
with *only* the keys of that purpose (Redis checks a command against each selector
separately), so a grant never leaks onto another key:

* root: connection commands, `FCALL`/`FCALL_RO` (the runtime's functions, `qe.functions`;
  no `EVAL`, `SCRIPT` or `FUNCTION`), and the state commands (hash, list, `SET`,
  `DEL`, `EXPIRE`) on the daemon's own state keys and heartbeat.
* `(%R~qe:group:<its group> +strlen)`: the marker that says which consumer group it
  owns; the functions check it (`qe.functions`). Nobody has STRLEN on anything else.
* `(%W~<output streams and their delivery copies> +xadd)`: appends only; retention is
  the producer's `XADD MAXLEN ~`/`MINID ~` (no `DEL`, `UNLINK`, `EXPIRE`, `XTRIM` on any
  stream, for anyone).
* `(%W~dedupe:<daemon>:* +set)`: its own dedupe markers, nobody else's.
* `(%RW~<its group's copies> +xreadgroup +xack ... +xtrim)`: the consumer-group commands
  on its own group's delivery copies (`ev.l1@exposure`, qe.topology) and nowhere else,
  so no user reaches another daemon's group, even with direct commands; XTRIM of what
  the group acknowledged. One selector for all of them, because a multi-stream
  XREADGROUP must be allowed by a single selector.
* `(%R~<read patterns> +hget +xrange ...)`: what it only reads.
* `(%R~<streams> +xinfo|stream +xinfo|groups +xlen)`: stream metadata (the alerts
  daemon's lag and dead-letter checks), no entry reads.

`qe-admin` is the administrative user: it loads the function library
(`python -m qe.admin load-functions`) and may kill a runaway function; it has no key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from .contracts import DLQ_STREAM, STREAM_TYPES
from .topology import CONSUMES, GROUP_CHECK_COMMAND, GROUP_KEY, delivery_copies, delivery_stream
from .state import BROKER, DECISION, EXPOSURE, ORDERS, PNL, POSITIONS, SESSION

ARCHIVE_FLOOR = "archive:floor"  # qe.archive's retention floor, read by every producer's guarded XADD

USER_PREFIX = "qe-"
ADMIN = "admin"  # qe-admin: loads the function library; not a daemon

# (redis-py also sends CLIENT SETINFO on Redis >= 7.2 and ignores a refusal.)
CONNECTION_COMMANDS = "+ping +hello +client|setname +client|id +acl|whoami +multi +exec +discard"
FUNCTION_COMMANDS = "+fcall +fcall_ro"  # never +eval, +evalsha, +script, +function
# SCAN takes no key (ACLs cannot filter it): it lists key *names*; a daemon rebuilding
# its state finds its own keys with it (prints: state:prints:*). Values stay per selector.
KEYLESS_COMMANDS = "+scan"
ADMIN_COMMANDS = "+function|load +function|delete +function|list +function|stats +function|kill +script|kill +fcall_ro"
CONSUME_COMMANDS = (
    "+xreadgroup +xack +xpending +xautoclaim +xclaim +xgroup|create +xinfo|stream +xinfo|groups "
    "+exists +xlen +xrange +xrevrange +xtrim"  # XTRIM: what its group has acknowledged (qe.streams)
)
PUBLISH_COMMANDS = "+xadd"
DEDUPE_COMMANDS = "+set"  # the SET NX EX marker next to a deduplicated XADD
# Hash, list and string commands on the daemon's own state keys only.
STATE_COMMANDS = "+@hash +@list +set +get +del +expire +exists +type +ttl"
READ_COMMANDS = (
    "+hget +hgetall +hmget +hexists +hlen +hscan +lrange +llen +get +ttl +exists +type +scan "
    "+xrange +xrevrange +xlen +xinfo|stream +xinfo|groups +xpending"
)
METADATA_COMMANDS = "+xinfo|stream +xinfo|groups +xlen"
DEDUPE_PREFIX = "dedupe:{daemon}:"


@dataclass(frozen=True)
class Access:
    group: str | None = None  # the consumer group it owns (the only one it may use)
    publishes: tuple[str, ...] = ()  # streams the daemon appends to
    writes: tuple[str, ...] = ()  # state key patterns it writes (and reads)
    reads: tuple[str, ...] = ()  # key patterns it only reads
    metadata: tuple[str, ...] = ()  # stream patterns whose XINFO/XLEN it reads (not entries)
    extra_write_commands: tuple[tuple[str, str], ...] = field(default=())  # (command, key pattern) grants

    @property
    def consumes(self) -> tuple[str, ...]:
        """Streams read through its group, each from the group's own copy (qe.topology)."""
        return CONSUMES.get(self.group, ()) if self.group else ()


# Where `qe dlq requeue` may append (qe_append): not ev.intents (an intent is re-issued
# by the Brain), not the operator's own control stream, not the Brain's journal.
REQUEUE_STREAMS = tuple(s for s in STREAM_TYPES if s not in ("ev.intents", "ev.control", "ev.decision_journal"))

ACCESS: dict[str, Access] = {
    "session": Access(group="session", publishes=("ev.session",), writes=(SESSION,)),
    "market-data": Access(
        publishes=("ev.l1", "ev.prints", "ev.alerts"),
        writes=("state:market_data*",),
        # ev.prints: its own output, read back to seed its dedupe memory; ev.orders:
        # positions are rebuilt from orders (qe.holdings), read without a group.
        reads=("ev.prints", "ev.orders", SESSION, POSITIONS, ORDERS),
    ),
    "prints": Access(
        group="prints",
        publishes=("ev.features", "ev.alerts"),
        writes=("state:features:*", "state:prints:*"),
    ),
    "exposure": Access(
        group="exposure",
        publishes=("ev.exposure", "ev.alerts"),
        writes=("state:exposure*",),
    ),
    "alerts": Access(
        group="alerts",
        publishes=("ev.alerts",),
        writes=("state:alerts*",),
        reads=("state:*",),  # mode, broker state, every daemon's record (lag reported by its owner)
        metadata=("ev.*",),  # consumer lag and dead-letter growth of every stream
    ),
    "decision": Access(
        group="decision_engine",
        publishes=("ev.intents", "ev.alerts", "ev.decision_journal"),
        writes=("state:decision*",),
        reads=(SESSION, EXPOSURE, BROKER),
    ),
    "execution": Access(
        group="execution_service",
        publishes=("ev.orders", "ev.positions", "ev.broker", "ev.broker_pnl", "ev.alerts"),
        writes=(ORDERS, POSITIONS, BROKER, "state:execution", "state:execution:prices"),
        reads=(DECISION,),
    ),
    # P&L; at the close it reads the day's streams for the end-of-day report.
    "pnl": Access(
        group="pnl",
        publishes=("ev.pnl", "ev.alerts"),
        writes=(PNL, "state:pnl:*"),
        # The end-of-day report it writes after the close reads these streams (qe.report);
        # its group reads ev.orders and ev.l1 from its own copies, the report the streams.
        reads=("ev.exposure", "ev.alerts", "ev.pnl", "ev.orders", "ev.l1", EXPOSURE, DECISION),
    ),
    # The operator's tool: reads everything; writes the control stream; requeues dead
    # letters to any stream except ev.intents (an intent is re-issued by the Brain) and
    # deletes the requeued dead letter (XDEL of that entry, never DEL of the stream).
    "cli": Access(
        publishes=("ev.control",),
        reads=("*",),
        extra_write_commands=(
            *(("xadd", stream) for stream in REQUEUE_STREAMS),
            *(("xadd", copy) for copy in delivery_copies(REQUEUE_STREAMS)),
            ("xdel", DLQ_STREAM),
            # qe archive: the archived days and the retention floor (qe.archive).
            ("hset", "state:archive"),
            ("set", "archive:floor"),
        ),
    ),
}


def group_owner(group: str) -> str | None:
    """The daemon that owns a consumer group, from ACCESS."""
    return next((daemon for daemon, access in ACCESS.items() if access.group == group), None)


def username(daemon: str) -> str:
    return USER_PREFIX + daemon


def password_file(secrets_dir: Path, daemon: str) -> Path:
    return Path(secrets_dir) / f"{username(daemon)}.pass"


def user_rule(daemon: str, password: str) -> str:
    """One `user ...` line of a Redis ACL file."""
    access = ACCESS[daemon]
    digest = hashlib.sha256(password.encode()).hexdigest()
    parts = [f"user {username(daemon)} on #{digest} resetkeys resetchannels -@all", CONNECTION_COMMANDS, FUNCTION_COMMANDS,
             KEYLESS_COMMANDS]
    # Root: state commands on its own state keys and heartbeat only.
    parts.append(STATE_COMMANDS)
    parts += [f"%RW~{pattern}" for pattern in access.writes]
    parts.append(f"%RW~state:daemon:{daemon}")
    if access.group:  # checked by the functions (acl_check_cmd), never a real key
        parts.append(f"(%R~{GROUP_KEY.format(group=access.group)} +{GROUP_CHECK_COMMAND})")
    consumer = bool(access.consumes)
    publishes = list(access.publishes) + ([DLQ_STREAM] if consumer else [])
    if publishes:
        # The stream and its delivery copies, one per consuming group (qe.topology).
        appends = [*publishes, *delivery_copies(publishes)]
        parts.append("(" + " ".join(f"%W~{stream}" for stream in appends) + f" {PUBLISH_COMMANDS})")
        parts.append(f"(%W~{DEDUPE_PREFIX.format(daemon=daemon)}* {DEDUPE_COMMANDS})")
        # The archive guard (qe_commit's XADDG): the length of what it appends to, and the floor.
        parts.append("(" + " ".join(f"%R~{stream}" for stream in appends) + " +xlen)")
        parts.append(f"(%R~{ARCHIVE_FLOOR} +get)")
    if consumer:
        # Only its own group's copies: no other group lives on these keys.
        copies = " ".join(f"%RW~{delivery_stream(stream, cast(str, access.group))}" for stream in access.consumes)
        parts.append(f"({copies} {CONSUME_COMMANDS})")
    if access.reads:
        parts.append("(" + " ".join(f"%R~{pattern}" for pattern in access.reads) + f" {READ_COMMANDS})")
    if access.metadata:
        parts.append("(" + " ".join(f"%R~{pattern}" for pattern in access.metadata) + f" {METADATA_COMMANDS})")
    for command, key in access.extra_write_commands:
        parts.append(f"(%RW~{key} +{command})")
    return " ".join(parts)


def admin_rule(password: str) -> str:
    """`qe-admin`: loads the function library, may stop a runaway function; no keys."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user {username(ADMIN)} on #{digest} resetkeys resetchannels -@all {CONNECTION_COMMANDS} {ADMIN_COMMANDS}"


def ensure_secrets(secrets_dir: Path, admin_dir: Path | None = None) -> dict[str, str]:
    """One password file per user (created once, mode 0600, in a 0700 folder); qe-admin's
    in `admin_dir` (default: `secrets_dir`; a host keeps it apart, root's alone, so no
    daemon can read it). Returns daemon (or "admin") -> password."""
    folders = {daemon: Path(secrets_dir) for daemon in ACCESS}
    folders[ADMIN] = Path(admin_dir) if admin_dir is not None else Path(secrets_dir)
    for folder in set(folders.values()):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    passwords = {}
    for daemon, folder in folders.items():
        path = password_file(folder, daemon)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32) + "\n")
        passwords[daemon] = path.read_text().strip()
    return passwords


def render(passwords: dict[str, str]) -> str:
    # Redis ACL files take no comments. The default user is off: every client
    # authenticates as its own user.
    lines = ["user default off resetkeys -@all"]
    lines += [user_rule(daemon, passwords[daemon]) for daemon in ACCESS]
    lines.append(admin_rule(passwords[ADMIN]))
    return "\n".join(lines) + "\n"


def write_acl_file(path: Path, secrets_dir: Path, admin_dir: Path | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(render(ensure_secrets(secrets_dir, admin_dir)))
    return path
