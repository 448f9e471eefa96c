"""Is a daemon alive? Its record in `state:daemon:<daemon>` and the verdict `qe status`
draws from it.

Two writers share the record (a Redis hash the daemon owns):
- the liveness beat (`Beat`, a thread started by `qe.daemon.start`): every
  `INTERVAL_S` it writes `alive_ns`, `expires_ns` (= alive_ns + `EXPIRY_S`), `pid`,
  `host`, `started_ns` and `state=running`. Missed beats make the record expire.
- the daemon's loop (`streams.write_heartbeat`, every housekeeping interval):
  `ts_ns`, the last time the loop made progress, plus its own fields.
On a clean exit (`stop`) the daemon writes `state=stopped` and `stopped_ns`.

The verdict (`verdict`, pure) in order: `stopped` (clean exit marker), `down` (the
beat expired, or the PID is on this host and not alive), `stale` (alive but the loop
has not made progress for longer than the threshold), else `ok`. A daemon that never
wrote a record is `absent`. Times are wall-clock epoch nanoseconds (never the
simulated clock).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import redis

from .redis_types import HashMapping

DAEMON_KEY = "state:daemon:{daemon}"
INTERVAL_S = 1.0
EXPIRY_S = 5.0  # a record not renewed within this is down (several missed beats)
NS = 1_000_000_000

# The daemons a complete system runs (each writes state:daemon:<name>).
EXPECTED_DAEMONS = ("session", "market-data", "prints", "exposure", "alerts", "decision", "execution", "pnl")

HEALTHY = "ok"

log = logging.getLogger("qe.liveness")


def beat_fields(now_ns: int, started_ns: int, pid: int, host: str, expiry_s: float = EXPIRY_S) -> HashMapping:
    return {
        "state": "running",
        "alive_ns": now_ns,
        "expires_ns": now_ns + int(expiry_s * NS),
        "pid": pid,
        "host": host,
        "started_ns": started_ns,
    }


def stopped_fields(now_ns: int) -> HashMapping:
    return {"state": "stopped", "stopped_ns": now_ns}


@dataclass(frozen=True)
class Verdict:
    health: str  # ok | stale | down | stopped | absent
    reason: str


def verdict(
    record: dict[str, Any] | None,
    now_ns: int,
    stale_after_s: float,
    pid_alive: Callable[[int], bool | None] = lambda _pid: None,
) -> Verdict:
    """The health of one daemon from its record (decoded to str/int values). `pid_alive`
    answers for a PID on this host (True/False) or None when it cannot tell."""
    if not record:
        return Verdict("absent", "no record: never started against this Redis")
    state = record.get("state")
    if state == "stopped":
        return Verdict("stopped", "exited cleanly")
    expires_ns = _int(record.get("expires_ns"))
    if expires_ns is None:
        # A record from before liveness beats existed (or a loop heartbeat only).
        return Verdict("down", "no liveness beat")
    if now_ns > expires_ns:
        return Verdict("down", f"no liveness beat for {(now_ns - expires_ns) / NS + EXPIRY_S:.1f} s")
    pid = _int(record.get("pid"))
    if pid is not None and pid_alive(pid) is False:
        return Verdict("down", f"process {pid} is not running on this host")
    loop_ns = _int(record.get("ts_ns"))
    reference = loop_ns if loop_ns is not None else _int(record.get("started_ns"))
    if reference is not None and (now_ns - reference) / NS > stale_after_s:
        return Verdict("stale", f"alive, but its loop made no progress for {(now_ns - reference) / NS:.0f} s")
    return Verdict(HEALTHY, "")


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def pid_alive_here(record_host: str | None) -> Callable[[int], bool | None]:
    """A PID check for records written on this host; None (cannot tell) elsewhere."""
    if record_host != socket.gethostname():
        return lambda _pid: None
    return process_alive


def process_alive(pid: int) -> bool:
    """Alive and not a zombie (a killed child not yet reaped is dead for us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class Beat:
    """The liveness thread of one daemon process: writes the beat every INTERVAL_S
    until `stop()`, which writes the stopped marker. Redis errors are logged once per
    outage and retried on the next beat (the record then expires: `down`)."""

    def __init__(self, r: redis.Redis, daemon: str, *, interval_s: float = INTERVAL_S, expiry_s: float = EXPIRY_S) -> None:
        self.redis = r
        self.daemon = daemon
        self.key = DAEMON_KEY.format(daemon=daemon)
        self.interval_s = interval_s
        self.expiry_s = expiry_s
        self.started_ns = time.time_ns()
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"liveness-{daemon}", daemon=True)
        self._failing = False
        self._stopped = False

    def start(self) -> "Beat":
        self.beat()  # before start() returns: `qe status` sees the daemon at once
        self._thread.start()
        return self

    def beat(self) -> None:
        fields = beat_fields(time.time_ns(), self.started_ns, self.pid, self.host, self.expiry_s)
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.key, mapping=fields)
            pipe.hdel(self.key, "stopped_ns")
            pipe.execute()
            if self._failing:
                log.info("liveness beat written again", extra={"daemon": self.daemon})
            self._failing = False
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("liveness beat failed", extra={"daemon": self.daemon, "error": f"{type(exc).__name__}: {exc}"})
            self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self) -> None:
        """Stop beating and mark the record stopped (a clean exit)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        try:
            self.redis.hset(self.key, mapping=stopped_fields(time.time_ns()))
        except redis.RedisError as exc:
            log.warning("could not write the stopped marker", extra={"daemon": self.daemon, "error": str(exc)})

    def stop_at_exit(self) -> "Beat":
        """Write the stopped marker when the interpreter exits normally (main returned
        or SystemExit), not after an uncaught exception (then the record expires: down)."""
        crashed: list[BaseException] = []
        previous_hook = sys.excepthook

        def record_crash(kind: type[BaseException], value: BaseException, tb: Any) -> None:
            crashed.append(value)
            previous_hook(kind, value, tb)

        sys.excepthook = record_crash

        def at_exit() -> None:
            if crashed:
                self._stop.set()  # no more beats: the record expires and reads down
                return
            self.stop()

        atexit.register(at_exit)
        return self

