"""Least privilege in Redis: one ACL user per daemon, allowed only the streams and
keys it reads or writes (SPEC 7; issue: only the Brain writes `ev.intents`, only
execution reads it, only the `qe` tool writes the operator control stream).

One table (`ACCESS`) says what each daemon touches; `render()` turns it into a
Redis ACL file (hashed passwords, `default` user off) and `ensure_secrets()`
writes one password file per user, mode 0600. The demo's private Redis loads the
file; production loads the same file into its Redis (see docs/security.md).

Consumed streams live in one ACL *selector* that allows only the consumer-group
commands (XREADGROUP, XACK, XPENDING, XAUTOCLAIM, ...): a consumer can read and
acknowledge a stream it consumes but never append to it. A multi-stream
XREADGROUP must be allowed by a single permission set, hence one selector.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .contracts import DLQ_STREAM, STREAM_TYPES
from .state import BROKER, DECISION, EXPOSURE, ORDERS, PNL, POSITIONS, SESSION

USER_PREFIX = "qe-"

# (redis-py also sends CLIENT SETINFO on Redis >= 7.2 and ignores a refusal.)
CONNECTION_COMMANDS = "+ping +hello +client|setname +client|id +acl|whoami +multi +exec +discard"
SCRIPT_COMMANDS = "+evalsha +eval +script|load +script|exists"
CONSUME_COMMANDS = (
    "+xreadgroup +xack +xpending +xautoclaim +xclaim +xgroup|create +xinfo|stream +xinfo|groups "
    "+exists +xlen +xrange +xrevrange"
)
PUBLISH_COMMANDS = "+xadd +set"  # SET: the dedupe marker next to each XADD
# Hash and list commands, limited (like everything in the root permissions) to the
# daemon's own key patterns.
STATE_COMMANDS = "+@hash +@list +del +expire +exists +type"
READ_COMMANDS = (
    "+hget +hgetall +hmget +hexists +hlen +hscan +lrange +llen +get +ttl +exists +type +scan "
    "+xrange +xrevrange +xlen +xinfo|stream +xinfo|groups +xpending"
)


@dataclass(frozen=True)
class Access:
    consumes: tuple[str, ...] = ()  # streams read through the daemon's consumer group
    publishes: tuple[str, ...] = ()  # streams the daemon appends to
    writes: tuple[str, ...] = ()  # state key patterns it writes (and reads)
    reads: tuple[str, ...] = ()  # key patterns it only reads
    extra_commands: str = ""
    extra_write_commands: tuple[str, ...] = field(default=())  # (command, key pattern) grants


ACCESS: dict[str, Access] = {
    "session": Access(publishes=("ev.session",), writes=(SESSION,)),
    "market-data": Access(
        publishes=("ev.l1", "ev.prints", "ev.alerts"),
        writes=("state:market_data*",),
        reads=("ev.prints", "ev.orders", SESSION, POSITIONS, ORDERS),
    ),
    "prints": Access(
        consumes=("ev.prints",),
        publishes=("ev.features", "ev.alerts"),
        writes=("state:features:*", "state:prints:*"),
    ),
    "exposure": Access(
        consumes=("ev.positions", "ev.orders", "ev.l1", "ev.features"),
        publishes=("ev.exposure", "ev.alerts"),
        writes=("state:exposure*",),
    ),
    "alerts": Access(
        consumes=("ev.l1", "ev.prints", "ev.exposure", "ev.broker", "ev.session"),
        publishes=("ev.alerts",),
        writes=("state:alerts*",),
        reads=("ev.*", "state:*"),  # lag and DLQ growth of every stream, mode and broker state
    ),
    "decision": Access(
        consumes=(
            "ev.session", "ev.exposure", "ev.l1", "ev.features", "ev.positions",
            "ev.orders", "ev.alerts", "ev.broker", "ev.control",
        ),
        publishes=("ev.intents", "ev.alerts"),
        writes=("state:decision*",),
        reads=(SESSION, EXPOSURE, BROKER),
    ),
    "execution": Access(
        consumes=("ev.intents", "ev.l1", "ev.features", "ev.control", "ev.session"),
        publishes=("ev.orders", "ev.positions", "ev.broker", "ev.alerts"),
        writes=(ORDERS, POSITIONS, BROKER, "state:execution", "state:execution:prices"),
        reads=(DECISION,),
    ),
    # P&L; at the close it reads the day's streams for the end-of-day report.
    "pnl": Access(
        consumes=("ev.orders", "ev.positions", "ev.l1", "ev.features", "ev.session"),
        publishes=("ev.pnl", "ev.alerts"),
        writes=(PNL, "state:pnl:*"),
        reads=("ev.*", EXPOSURE, DECISION),
    ),
    # The operator's tool: reads everything; writes the control stream; requeues dead
    # letters to any stream except ev.intents (an intent is re-issued by the Brain).
    "cli": Access(
        publishes=("ev.control",),
        reads=("*",),
        extra_write_commands=(
            *(("xadd", stream) for stream in STREAM_TYPES if stream not in ("ev.intents", "ev.control")),
            ("xdel", DLQ_STREAM),
        ),
    ),
}


def username(daemon: str) -> str:
    return USER_PREFIX + daemon


def password_file(secrets_dir: Path, daemon: str) -> Path:
    return Path(secrets_dir) / f"{username(daemon)}.pass"


def user_rule(daemon: str, password: str) -> str:
    """One `user ...` line of a Redis ACL file."""
    access = ACCESS[daemon]
    digest = hashlib.sha256(password.encode()).hexdigest()
    parts = [f"user {username(daemon)} on #{digest} resetkeys resetchannels -@all", CONNECTION_COMMANDS, SCRIPT_COMMANDS]
    parts += [PUBLISH_COMMANDS, STATE_COMMANDS, READ_COMMANDS]
    consumer = bool(access.consumes)
    publishes = list(access.publishes) + ([DLQ_STREAM] if consumer else [])
    parts += [f"%W~{stream}" for stream in publishes]
    parts += [f"%W~dedupe:{stream}:*" for stream in publishes]
    parts += [f"%RW~{pattern}" for pattern in access.writes]
    parts += [f"%R~{pattern}" for pattern in access.reads]
    parts.append(f"%RW~state:daemon:{daemon}")
    if access.extra_commands:
        parts.append(access.extra_commands)
    if consumer:
        streams = " ".join(f"%RW~{stream}" for stream in access.consumes)
        parts.append(f"({streams} {CONSUME_COMMANDS} {SCRIPT_COMMANDS})")
    for command, key in access.extra_write_commands:
        parts.append(f"(%RW~{key} +{command})")
    return " ".join(parts)


def ensure_secrets(secrets_dir: Path) -> dict[str, str]:
    """One password file per user (created once, mode 0600); returns daemon -> password."""
    secrets_dir = Path(secrets_dir)
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    passwords = {}
    for daemon in ACCESS:
        path = password_file(secrets_dir, daemon)
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
    return "\n".join(lines) + "\n"


def write_acl_file(path: Path, secrets_dir: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(render(ensure_secrets(secrets_dir)))
    return path
