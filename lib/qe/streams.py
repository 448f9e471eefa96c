"""Redis Streams: the publisher and the consumer runtime every daemon runs on.

Delivery is at-least-once with idempotent, atomic effects (SPEC 5):

* A batch's effects (state writes, outgoing events, dead letters) and its XACKs
  are applied by one call of the Redis function `qe_commit` (`qe.functions`, loaded
  by an administrative step; daemons may FCALL it, never EVAL), which first checks
  that every entry it acks is still pending for this consumer. A crash at any line
  gives all or nothing; an entry claimed meanwhile by another consumer aborts the
  whole commit.
* A commit whose reply is lost is never retried blindly: the consumer reloads
  its state from Redis and re-reads its own pending list. Entries the lost
  commit acknowledged are no longer pending, so they are not handled twice.
* Outgoing events carry deterministic idempotency keys; streams configured with
  `dedupe_ttl_s` skip an XADD whose key was already published (SET NX marker in
  the same atomic step, under the producer's own prefix `dedupe:<daemon>:`), and
  consumers dedupe on the key where it matters.

A daemon supplies a Handler (pure-ish: plain in-memory state rebuilt by `load`
from Redis) and the runtime does the rest: groups, pending drain, batching,
claiming, dead-lettering, outage back-off, heartbeats, graceful SIGTERM.

A group reads each stream from its own delivery copy (`ev.l1@exposure`, qe.topology),
which every producer's commit fans out to; handlers, acks and dead letters speak of
the stream itself (`Entry.stream`), the runtime maps to the copy.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence, cast, overload

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from . import functions, metrics, topology
from .topology import delivery_stream, origin_stream
from .clock import Clock
from .config import Retention, RiskRules, Settings
from .redis_types import HashMapping, PendingReadReply, ReadReply
from .contracts import DLQ_STREAM, MAX_EVENT_BYTES, DecodeError, Envelope, Limits, check_stream_type, decode, encode

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# One hash per daemon: heartbeat fields and the runtime's own bookkeeping.
DAEMON_KEY = "state:daemon:{daemon}"
# Each producer's markers under its own prefix (only it may write them: docs/security.md).
DEDUPE_KEY = "dedupe:{owner}:{stream}:{key}"
# The first id of the oldest day not yet archived (qe.archive keeps it; the XADDG guard
# of the qe_commit function reads it).
ARCHIVE_FLOOR = "archive:floor"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _printable_copy(fields: dict[bytes, bytes]) -> dict[str, str]:
    """The entry as text for the dead letter (invalid UTF-8 replaced); a value larger
    than any valid event is cut, so one hostile entry cannot bloat ev.dlq without bound."""
    copy = {}
    for name, value in list(fields.items())[:64]:
        text = value[:MAX_EVENT_BYTES].decode(errors="replace")
        copy[name[:256].decode(errors="replace")] = text + ("…[cut]" if len(value) > MAX_EVENT_BYTES else "")
    return copy


class CommitAborted(Exception):
    """Another consumer claimed an entry of this batch; nothing was applied."""


def connect(settings: Settings, rules: RiskRules, *, retry_commands: bool, user: str) -> redis.Redis:
    """A bytes-mode client. Consumers pass retry_commands=False: a command whose
    reply was lost must not be re-sent blindly (the runtime re-reads its pending
    list instead). Producers whose appends are deduplicated may retry."""
    retry = (
        Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3)
        if retry_commands
        else Retry(NoBackoff(), 0)
    )
    username, password = settings.redis_credentials(user)
    return redis.Redis.from_url(
        settings.redis_url,
        username=username,
        password=password,
        socket_timeout=rules.runtime.socket_timeout_s,
        socket_connect_timeout=rules.runtime.socket_timeout_s,
        health_check_interval=30,
        retry=retry,
        client_name=None,
    )


def dedupe_owner(r: redis.Redis, daemon: str | None = None) -> str:
    """Whose dedupe markers a client writes: the daemon, else the ACL user's daemon
    (`qe-<daemon>`), else the user name ("default" without credentials)."""
    if daemon:
        return daemon
    user = r.connection_pool.connection_kwargs.get("username") or "default"
    return user.removeprefix("qe-")


class StreamPolicy:
    """Retention and dedupe per stream, from `streams:` in risk_rules.yaml."""

    def __init__(self, retention: dict[str, Retention], owner: str = "default", archive_guard: bool = False) -> None:
        self.retention = retention
        self.owner = owner  # dedupe markers live under dedupe:<owner>:
        # archive.enabled: never trim an entry of a day not yet archived (ARCHIVE_FLOOR).
        self.archive_guard = archive_guard

    def xadd_op(self, stream: str, fields: dict[str, str], idempotency_key: str | None) -> list[Any]:
        rule = self.retention.get(stream)
        if rule is None:
            raise ValueError(f"no retention rule for stream {stream!r}")
        if rule.maxlen is not None:
            kind, threshold = "MAXLEN", str(rule.maxlen)
        else:
            # Stream ids are the Redis server's wall-clock ms (not the simulated clock).
            # Retention holds exactly one rule: no maxlen, so minid_age_s is set.
            kind, threshold = "MINID", f"{int(time.time() * 1000) - cast(int, rule.minid_age_s) * 1000}-0"
        dedupe_key = ""
        if rule.dedupe_ttl_s and idempotency_key:
            dedupe_key = DEDUPE_KEY.format(owner=self.owner, stream=stream, key=idempotency_key)
        if self.archive_guard:
            # qe_commit trims to min(rule, archive:floor) (qe.functions, XADDG).
            op: list[str] = ["XADDG", dedupe_key, str(rule.dedupe_ttl_s or 0), stream, kind, threshold]
        else:
            op = ["XADD?", dedupe_key, str(rule.dedupe_ttl_s or 0), stream, kind, "~", threshold, "*"]
        for name, value in fields.items():
            op += (name, value)
        return op


class Effects:
    """Everything one batch will do, applied atomically with its acks by `commit`."""

    def __init__(self, policy: StreamPolicy) -> None:
        self.policy = policy
        self.ops: list[list[str]] = []
        self.acks: list[tuple[str, str]] = []
        self.published: list[str] = []  # stream of each XADD? op, in order
        self.dead: list[tuple[str, str]] = []  # (origin stream, reason label)
        self.entry: Entry | None = None  # the entry being handled, for handlers that need its id

    # -- state and events --------------------------------------------------------
    def publish(self, stream: str, event: Envelope) -> None:
        check_stream_type(stream, event)
        self.ops.append(self.policy.xadd_op(stream, encode(event), event.idempotency_key))
        self.published.append(stream)

    # Lua's unpack() of one op is limited (~8000 values): big HSETs go in slices.
    HSET_FIELDS_PER_OP = 1000

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        op = ["HSET", key]
        for field, value in mapping.items():
            op += (field, value if value.__class__ is str else str(value))
            if len(op) >= 2 + 2 * self.HSET_FIELDS_PER_OP:
                self.ops.append(op)
                op = ["HSET", key]
        if len(op) > 2:
            self.ops.append(op)

    def hdel(self, key: str, *fields: str) -> None:
        for start in range(0, len(fields), 2 * self.HSET_FIELDS_PER_OP):
            self.ops.append(["HDEL", key, *fields[start:start + 2 * self.HSET_FIELDS_PER_OP]])

    def command(self, *args: Any) -> None:
        """Any other write (SET, DEL, EXPIRE, ZADD ...), applied in order."""
        self.ops.append([arg if arg.__class__ is str else str(arg) for arg in args])

    def dead_letter(
        self, entry: "Entry", reason: str, label: str, consumer: str, group: str, key: str | None = None
    ) -> None:
        fields = {
            "origin_stream": entry.stream,
            "origin_id": entry.entry_id,
            "group": group,
            "consumer": consumer,
            "reason": reason,
            "label": label,
            "deliveries": str(entry.deliveries),
            "dead_ts_ns": str(time.time_ns()),
            "fields": json.dumps(_printable_copy(entry.fields or {})),
        }
        dedupe_key = key or f"{entry.stream}:{group}:{entry.entry_id}"
        self.ops.append(self.policy.xadd_op(DLQ_STREAM, fields, dedupe_key))
        self.published.append(DLQ_STREAM)
        self.dead.append((entry.stream, label))

    def ack(self, entry: "Entry") -> None:
        self.acks.append((entry.stream, entry.entry_id))

    # -- partial rollback of one handler call ---------------------------------------
    def mark(self) -> tuple[int, int, int]:
        return len(self.ops), len(self.published), len(self.dead)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        del self.ops[mark[0]:]
        del self.published[mark[1]:]
        del self.dead[mark[2]:]

    def __bool__(self) -> bool:
        return bool(self.ops or self.acks)


def commit(r: redis.Redis, effects: Effects, group: str = "", consumer: str = "") -> None:
    """Apply effects + acks in one call of the `qe_commit` function. Raises CommitAborted
    if an entry was claimed, NoPermissionError (nothing applied) if an op or the group is
    not the caller's, FunctionsMissing if the library is not loaded."""
    if not effects:
        return
    by_stream: dict[str, list[str]] = {}
    for stream, entry_id in effects.acks:
        # Entries of one stream are acked in the order they were read: ascending.
        by_stream.setdefault(stream, []).append(entry_id)
    argv = [group, consumer, _dumps(list(by_stream.items())), _dumps(effects.ops)]
    try:
        reply = r.fcall("qe_commit", 0, *argv)
    except redis.ResponseError as exc:
        if functions.is_missing(exc):
            raise functions.FunctionsMissing(
                f"{exc}: the Redis function library is not loaded (`python -m qe.admin load-functions`)"
            ) from exc
        raise
    if reply[0] == b"STOLEN":
        metrics.commits_aborted.inc()
        raise CommitAborted(f"{reply[1].decode()} {reply[2].decode()} was claimed by another consumer")
    if isinstance(reply[-1], list) and reply[-1][:1] == [b"FANOUT_FAILED"]:
        # Applied, but a delivery copy took no entry (only a direct append to the copy by a
        # producer's user can cause it): that group misses it, so say so loudly.
        failed = [_text(item) for item in reply[-1][1:]]
        log.error("appended but not copied to every consuming group",
                  extra={"copies": failed[0::2], "errors": failed[1::2]})
    for stream, result in zip(effects.published, reply[1:]):
        (metrics.events_published if result else metrics.events_deduplicated).labels(stream).inc()
    for stream, label in effects.dead:
        metrics.events_dead_lettered.labels(stream, label).inc()


class Publisher:
    """Appends events outside a consumer batch (feeds, broker callbacks)."""

    def __init__(self, r: redis.Redis, rules: RiskRules, daemon: str | None = None) -> None:
        self.redis = r
        self.policy = StreamPolicy(rules.streams, dedupe_owner(r, daemon), rules.archive.enabled)

    def effects(self) -> Effects:
        return Effects(self.policy)

    def publish(self, stream: str, *events: Envelope) -> None:
        effects = self.effects()
        for event in events:
            effects.publish(stream, event)
        self.commit(effects)

    def commit(self, effects: Effects) -> None:
        commit(self.redis, effects)


@dataclass(slots=True)
class Entry:
    stream: str
    entry_id: str
    fields: dict[bytes, bytes] | None  # None: the entry was trimmed/deleted while pending
    deliveries: int


class Handler(Protocol):
    """What a daemon plugs into the runtime. In-memory state is a cache of Redis."""

    streams: Sequence[str]
    tick_interval_s: float | None  # clock seconds between `tick` calls; None: never

    def load(self, r: redis.Redis) -> None:
        """(Re)build in-memory state from Redis: at start and after any failed commit."""

    def handle(self, event: Envelope, effects: Effects) -> None:
        """Handle one event; record every effect on `effects`. Raise to retry it later."""

    def tick(self, now_ns: int, effects: Effects) -> None:
        """Periodic work (publish on a cadence, expiries)."""

    # Optional: `after_commit(self) -> None`, called once a batch's effects are durable
    # (e.g. execution sends an order only after its PENDING_SUBMIT record is committed).
    # Optional: `batch_size: int`, entries read per batch instead of runtime.batch_size.
    # Optional: `before_commit(effects)`, called last before every commit of handled
    # entries and ticks (after `tick`): what it records is committed atomically with
    # them (the Brain's decision journal: the order and clock of what it just did).
    # Optional: `end_batch(effects)`, called once after a batch's events were
    # handled and before its commit (e.g. to publish one coalesced result per
    # key). If it raises, nothing of the batch is committed and it is retried.


def write_heartbeat(r: redis.Redis, daemon: str, consumer: str, started_ns: int, **extra: str | int | float) -> None:
    """The loop's progress in the daemon's record `state:daemon:{daemon}`: `ts_ns` is
    when the loop last got here (`qe status` calls a daemon `stale` when it is old).
    Whether the process is alive at all is the liveness beat's part (`qe.liveness`)."""
    r.hset(
        DAEMON_KEY.format(daemon=daemon),
        mapping={
            "ts_ns": time.time_ns(),
            "pid": os.getpid(),
            "consumer": consumer,
            "host": socket.gethostname(),
            "started_ns": started_ns,
            **cast(HashMapping, extra),
        },
    )


def default_consumer_name(daemon: str) -> str:
    """Stable across restarts so a restarted process drains its own pending list."""
    return f"{daemon}@{socket.gethostname()}"


class Consumer:
    """The consuming loop of one daemon instance (SPEC 5, rules 1-10)."""

    def __init__(
        self,
        *,
        r: redis.Redis,
        daemon: str,
        group: str,
        handler: Handler,
        rules: RiskRules,
        clock: Clock,
        consumer_name: str | None = None,
        block_ms: int | None = None,
    ) -> None:
        self.redis = r
        self.daemon = daemon
        self.group = group
        self.handler = handler
        self.streams = list(handler.streams)
        # Each stream is read from this group's own delivery copy (qe.topology).
        self.keys = {stream: delivery_stream(stream, group) for stream in self.streams}
        metrics.declare_consumed(self.streams)  # per-stream series at 0 before the first event
        # A daemon that must also drive another event loop (ib_async) reads with a shorter
        # BLOCK; a handler may read bigger batches than the default (`batch_size`).
        overrides = {"block_ms": block_ms, "batch_size": getattr(handler, "batch_size", None)}
        self.config = rules.runtime.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        self._after_commit = getattr(handler, "after_commit", None)
        self._before_commit = getattr(handler, "before_commit", None)
        self.policy = StreamPolicy(rules.streams, dedupe_owner(r, daemon), rules.archive.enabled)
        self.clock = clock
        self.consumer = consumer_name or default_consumer_name(daemon)
        self.stop_requested = threading.Event()
        self._backoff = ExponentialWithJitterBackoff(cap=self.config.backoff_cap_s, base=self.config.backoff_base_s)
        self._redis_failures = 0
        self._groups_ready = False
        self._needs_load = True
        # Streams whose own pending list must be read before new entries (`>`), with the
        # monotonic time from which it may be read: every stream at start and after any
        # error; a stream whose handler raised waits for its retry time, while the other
        # streams keep flowing. Entries of a waiting stream keep their order behind it.
        self._waiting: dict[str, float] = {}
        self._resync()
        # The reader's bounds for every decode: plausibility limits and this daemon's clock.
        self.limits = Limits.from_rules(rules.plausibility)
        self._handler_failures: Counter[str] = Counter()
        self._last_handler_error: dict[str, str] = {}
        self._next_tick = 0.0
        self._next_housekeeping = 0.0
        # Trim-loss accounting (rule 7): new entries handed to this process per stream since
        # the last observation, and each stream's last observation.
        self._delivered: Counter[str] = Counter()
        self._read_bases: dict[str, ReadBase] = {}
        self._reported_lags: dict[str, int] = {}  # lag:<stream> last written to the daemon's record
        self._next_claim = time.monotonic() + self.config.claim_interval_s
        self.daemon_key = DAEMON_KEY.format(daemon=daemon)
        self.started_ns = time.time_ns()

    # -- lifecycle --------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: Any) -> None:
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self) -> int:
        """Loop until SIGTERM/SIGINT; the batch in hand is finished and committed first."""
        log.info("consumer starting", extra={"group": self.group, "consumer": self.consumer, "streams": self.streams})
        while not self.stop_requested.is_set():
            self.run_once()
        log.info("consumer stopped", extra={"group": self.group, "consumer": self.consumer})
        return 0

    def run_once(self) -> None:
        """One iteration: fetch, handle, commit, housekeeping. Never raises for Redis trouble."""
        try:
            self._ensure_ready()
            entries = self._claim_idle() if self.streams and time.monotonic() >= self._next_claim else []
            if not entries:
                entries = self._fetch()
            self._handle_and_commit(entries)
            self._housekeeping()
            if self._redis_failures:
                log.info("redis reachable again", extra={"after_failures": self._redis_failures})
            self._redis_failures = 0
            metrics.redis_up.set(1)
        except REDIS_ERRORS as exc:
            self._after_redis_error(exc)
        except redis.ResponseError as exc:  # FunctionsMissing included: back off until an admin loads them
            if "NOGROUP" in str(exc):
                log.warning("consumer group missing; recreating", extra={"error": str(exc)})
                self._groups_ready = False
                self._resync()
            else:
                self._after_redis_error(exc)
        except CommitAborted as exc:
            log.warning("commit aborted; reloading and re-reading pending", extra={"error": str(exc)})
            self._resync()

    def _resync(self) -> None:
        """Rebuild from Redis: reload the handler, then read every stream's own pending
        list first (a stream already waiting for a handler retry keeps its retry time)."""
        self._needs_load = True
        now = time.monotonic()
        for stream in self.streams:
            self._waiting.setdefault(stream, now)

    def _after_redis_error(self, exc: Exception) -> None:
        metrics.redis_errors.inc()
        metrics.redis_up.set(0)
        self._redis_failures += 1
        delay = self._backoff.compute(self._redis_failures)
        log.warning(
            "redis error; backing off",
            extra={"error": f"{type(exc).__name__}: {exc}", "failures": self._redis_failures, "retry_in_s": round(delay, 3)},
        )
        # Whatever was in flight may or may not have applied: rebuild from Redis.
        self._resync()
        self.stop_requested.wait(delay)

    def _ensure_ready(self) -> None:
        if not self._groups_ready:
            for stream in self.streams:
                self._create_group(stream)
            self._groups_ready = True
            if self.streams:
                # Where each group stands before this process reads anything (rule 7): the
                # base every later trim-loss figure of this process is counted from.
                self._delivered.clear()
                self._read_bases.clear()
                self._observe_groups()
        if self._needs_load:
            self.handler.load(self.redis)
            self._needs_load = False

    def _create_group(self, stream: str) -> None:
        """MKSTREAM; BUSYGROUP is fine. On Redis 7 the group's read counter starts at
        what the stream has already trimmed, so only later trims count as losses."""
        entries_read = None
        key = self.keys[stream]
        if self.config.group_start_id == "0" and self.redis.exists(key):
            info = self.redis.xinfo_stream(key)
            if info.get("entries-added") is not None:
                entries_read = info["entries-added"] - info["length"]
        # Through the function: it refuses a group this daemon's ACL user does not own.
        try:
            self.redis.fcall(
                "qe_group_create", 0, stream, self.group, self.config.group_start_id,
                "" if entries_read is None else str(entries_read),
            )
        except redis.ResponseError as exc:
            if functions.is_missing(exc):
                raise functions.FunctionsMissing(f"{exc}: run `python -m qe.admin load-functions`") from exc
            raise

    # -- reading -----------------------------------------------------------------------
    def _block_ms(self) -> int:
        block = self.config.block_ms
        now = time.monotonic()
        if self.handler.tick_interval_s is not None:
            block = min(block, int((self._next_tick - now) * 1000))
        if self._waiting:
            block = min(block, int((min(self._waiting.values()) - now) * 1000))
        return max(block, 1)  # BLOCK 0 would mean "forever"

    def _fetch(self) -> list[Entry]:
        if not self.streams:
            self.stop_requested.wait(self._block_ms() / 1000)
            return []
        now = time.monotonic()
        for stream in [s for s, due in self._waiting.items() if due <= now]:
            entries = self._read_own_pending(stream)
            if entries:
                return entries
            del self._waiting[stream]  # its pending list is drained: read new entries again
        open_streams = [s for s in self.streams if s not in self._waiting]
        if not open_streams:  # every stream waits for a handler retry
            self.stop_requested.wait(self._block_ms() / 1000)
            return []
        reply = cast(ReadReply | None, self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.keys[stream]: ">" for stream in open_streams},
            count=self.config.batch_size,
            block=self._block_ms(),
        ))
        for name, items in reply or ():
            self._delivered[origin_stream(_text(name))] += len(items)
        return [
            Entry(origin_stream(key.decode()), entry_id.decode(), fields, 1)
            for key, items in reply or ()
            for entry_id, fields in items
        ]

    def _read_own_pending(self, stream: str) -> list[Entry]:
        """The oldest entry of this consumer's pending list of one stream, alone: an entry
        that crashes the process or its handler then raises only its own delivery count,
        never a neighbour's (of the same stream or of another)."""
        reply = cast(PendingReadReply | None, self.redis.xreadgroup(self.group, self.consumer, {self.keys[stream]: "0"}, count=1))
        entries = [
            Entry(origin_stream(_text(name)), _text(cast(bytes, entry_id)), fields or None, 0)  # a pending id is never None
            for name, items in reply or ()
            for entry_id, fields in items
        ]
        self._fill_delivery_counts(entries)
        return entries

    def _fill_delivery_counts(self, entries: list[Entry]) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.xpending_range(self.keys[entry.stream], self.group, entry.entry_id, entry.entry_id, 1, self.consumer)
        for entry, pending in zip(entries, pipe.execute()):
            entry.deliveries = pending[0]["times_delivered"] if pending else 1

    # -- handling ----------------------------------------------------------------------
    def _handle_and_commit(self, entries: list[Entry]) -> None:
        """Handle a batch and commit it. A handler that raises costs only its own entry:
        what was handled before it is committed, the handler's state is reloaded (its
        cache may be half-updated), and the rest of the batch is handled, except later
        entries of the failed entry's stream, which stay pending behind it (order is per
        stream). The failed entry is retried later from the pending list and, after
        `max_deliveries`, dead-lettered alone: a good neighbour never reaches ev.dlq."""
        started = time.perf_counter()
        todo = entries
        while True:
            effects, consumed, failed, todo = self._handle_part(todo)
            if failed is None:
                self._tick(effects)
            if self._before_commit is not None:
                self._before_commit(effects)
            commit(self.redis, effects, self.group, self.consumer)
            if self._after_commit is not None:
                self._after_commit()
            for stream, count in consumed.items():
                metrics.events_consumed.labels(stream).inc(count)
            if failed is None:
                break
            self._after_handler_error(*failed)
            # The handler's cache may be half-updated: rebuild it before handling anything else.
            self._needs_load = True
            todo = [entry for entry in todo if entry.stream not in self._waiting]
            if not todo:
                break
            self.handler.load(self.redis)
            self._needs_load = False
        if entries:
            metrics.batch_seconds.observe(time.perf_counter() - started)

    def _handle_part(
        self, entries: list[Entry]
    ) -> tuple[Effects, Counter[str], tuple[list[Entry], BaseException] | None, list[Entry]]:
        """Handle entries until one raises: (effects, consumed per stream, the failed
        entries and the exception or None, the entries not handled yet)."""
        effects = Effects(self.policy)
        consumed: Counter[str] = Counter()
        failed: tuple[list[Entry], BaseException] | None = None
        handled: list[Entry] = []
        rest: list[Entry] = []
        for index, entry in enumerate(entries):
            if self._dead_letter_if_poison(entry, effects):
                continue
            try:
                event = decode(entry.stream, entry.fields, self.limits, self.clock.now_ns())  # type: ignore[arg-type]
            except DecodeError as exc:
                self._dead_letter(entry, effects, f"invalid payload: {exc.reason}", "invalid")
                continue
            mark = effects.mark()
            effects.entry = entry
            try:
                self.handler.handle(event, effects)
            except Exception as exc:  # noqa: BLE001 - any handler bug must not kill the loop
                effects.rollback(mark)
                failed, rest = ([entry], exc), entries[index + 1:]
                break
            effects.ack(entry)
            handled.append(entry)
            consumed[entry.stream] += 1
            if self._handler_failures:
                self._handler_failures.pop(entry.entry_id, None)
                self._last_handler_error.pop(entry.entry_id, None)
        effects.entry = None
        end_batch = getattr(self.handler, "end_batch", None)
        if end_batch is not None and effects.acks:
            try:
                end_batch(effects)
            except Exception as exc:  # noqa: BLE001 - retried from the pending list like a handler error
                # Nothing of this part is committed. The culprit is unknown: every handled entry
                # waits and is retried alone from the pending list, where the culprit fails alone.
                effects = Effects(self.policy)
                consumed.clear()
                failed = (handled + (failed[0] if failed else []), exc)
        return effects, consumed, failed, rest

    def _dead_letter_if_poison(self, entry: Entry, effects: Effects) -> bool:
        if entry.fields is None:
            self._dead_letter(entry, effects, "payload trimmed from the stream before it was handled", "trimmed")
            return True
        if entry.deliveries > self.config.max_deliveries:
            last_error = self._last_handler_error.get(entry.entry_id, "unknown (process restarted)")
            self._dead_letter(
                entry,
                effects,
                f"delivered {entry.deliveries} times (limit {self.config.max_deliveries}); last error: {last_error}",
                "max_deliveries",
            )
            return True
        return False

    def _dead_letter(self, entry: Entry, effects: Effects, reason: str, label: str) -> None:
        log.warning(
            "dead-lettering entry",
            extra={"stream": entry.stream, "entry_id": entry.entry_id, "reason": reason},
        )
        effects.dead_letter(entry, reason, label, self.consumer, self.group)
        effects.ack(entry)
        self._last_handler_error.pop(entry.entry_id, None)
        self._handler_failures.pop(entry.entry_id, None)

    def _after_handler_error(self, entries: list[Entry], exc: BaseException) -> None:
        """The failed entries stay pending; their streams wait (other streams keep flowing)
        and retry them with a growing pause, one entry at a time."""
        entry = entries[0]
        metrics.handler_errors.labels(entry.stream).inc()
        self._handler_failures[entry.entry_id] += 1
        self._last_handler_error[entry.entry_id] = f"{type(exc).__name__}: {exc}"[:500]
        failures = self._handler_failures[entry.entry_id]
        delay = min(self.config.handler_retry_cap_s, self.config.backoff_base_s * 2 ** (failures - 1))
        log.error(
            "handler raised; will retry from the pending list",
            exc_info=exc,
            extra={"stream": entry.stream, "entry_id": entry.entry_id, "failures": failures, "retry_in_s": delay},
        )
        due = time.monotonic() + delay
        for failed in entries:
            self._waiting[failed.stream] = max(self._waiting.get(failed.stream, 0.0), due)

    def _tick(self, effects: Effects) -> None:
        interval = self.handler.tick_interval_s
        now = time.monotonic()
        if interval is None or now < self._next_tick:
            return
        mark = effects.mark()
        try:
            self.handler.tick(self.clock.now_ns(), effects)
        except Exception:  # noqa: BLE001
            effects.rollback(mark)
            log.exception("tick raised; state reloaded")
            self._needs_load = True
        wall_interval = self.clock.wall_seconds(interval)
        self._next_tick = max(self._next_tick + wall_interval, now) if self._next_tick else now + wall_interval

    # -- housekeeping ---------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        metrics.beat()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.config.housekeeping_interval_s
        write_heartbeat(self.redis, self.daemon, self.consumer, self.started_ns)
        if self.streams:
            self._observe_groups()

    def _claim_idle(self) -> list[Entry]:
        """Take over entries a crashed or stuck peer left pending (rule 5), one entry at
        a time, so a poison entry among them cannot drag its neighbours' delivery
        counts up with it."""
        self._next_claim = time.monotonic() + self.config.claim_interval_s
        min_idle_ms = int(self.config.claim_min_idle_s * 1000)
        effects = Effects(self.policy)
        claimed: list[Entry] = []
        more = False
        for stream in self.streams:
            if claimed:  # one entry per call; the next call comes at once (see below)
                more = True
                break
            cursor, items, *rest = self.redis.xautoclaim(
                self.keys[stream], self.group, self.consumer, min_idle_ms, start_id="0-0", count=1
            )
            more = more or _text(cursor) != "0-0"
            for entry_id, fields in items:
                if entry_id is not None:
                    claimed.append(Entry(stream, _text(entry_id), fields or None, 1))
            for entry_id in rest[0] if rest else ():
                # Redis already dropped these from the PEL; report them, nothing to ack.
                effects.dead_letter(
                    Entry(stream, _text(entry_id), None, 0),
                    "payload trimmed while pending (seen by XAUTOCLAIM)",
                    "trimmed",
                    self.consumer,
                    self.group,
                )
        commit(self.redis, effects)
        if claimed:
            self._fill_delivery_counts(claimed)
            for entry in claimed:
                metrics.entries_claimed.labels(entry.stream).inc()
            log.warning("claimed idle entries", extra={"entries": [f"{e.stream}/{e.entry_id}" for e in claimed]})
        if more or claimed:
            self._next_claim = time.monotonic()  # keep claiming, one at a time, until none is idle
        return claimed

    def _observe_groups(self) -> None:
        """Lag/pending gauges, and the report of entries trimmed before this group read them (rule 7)."""
        pipe = self.redis.pipeline(transaction=True)
        for stream in self.streams:
            pipe.xinfo_groups(self.keys[stream])
            pipe.xinfo_stream(self.keys[stream])
        pipe.hgetall(self.daemon_key)
        replies = pipe.execute()
        saved = {_text(k): _text(v) for k, v in replies[-1].items()}
        effects = Effects(self.policy)
        lags: dict[str, int] = {}
        positions: dict[str, dict[str, Any]] = {}
        for index, stream in enumerate(self.streams):
            groups, info = replies[2 * index], replies[2 * index + 1]
            mine = next((g for g in groups if _text(g.get("name")) == self.group), None)
            delivered = self._delivered.pop(stream, 0)
            if mine is None:
                self._read_bases.pop(stream, None)
                continue
            positions[stream] = mine
            base = self._read_bases.get(stream)
            if base is not None:
                base = dataclasses.replace(base, delivered=base.delivered + delivered)
            saved_base = _parse_mark(saved.get(f"read_base:{stream}"))
            reading, base = observe_group(
                mine, info, count_after(self.redis, self.keys[stream], mine, info), base, saved_base,
                _parse_mark(saved.get(f"trim_lost:{stream}")),
            )
            if base is None:
                self._read_bases.pop(stream, None)
            else:
                self._read_bases[stream] = base
                if base.exact and base.delivered == 0 and base.reported == 0 and (base.last_delivered_id, base.read) != saved_base:
                    effects.hset(self.daemon_key, {f"read_base:{stream}": f"{base.last_delivered_id} {base.read}"})
            if reading.lag is not None:
                metrics.consumer_lag.labels(stream, self.group).set(reading.lag)
                # For whoever may not count this stream's entries itself (the alerts
                # daemon reads stream metadata only: docs/security.md).
                if self._reported_lags.get(stream) != reading.lag:
                    lags[f"lag:{stream}"] = reading.lag
            metrics.consumer_pending.labels(stream, self.group).set(mine.get("pending", 0))
            if reading.newly_lost:
                self._report_trimmed_unread(stream, reading, effects)
        if lags:
            effects.hset(self.daemon_key, lags)
        commit(self.redis, effects)
        self._reported_lags.update({name.removeprefix("lag:"): lag for name, lag in lags.items()})
        self._trim_acknowledged(positions)

    def _trim_acknowledged(self, positions: dict[str, dict[str, Any]]) -> None:
        """Drop from this group's own copies what the group is done with: entries below
        its position, its oldest pending entry and its last trim-loss base (`trim_floor`).
        The entry at the position stays, so a copy never looks trimmed past the group
        (rule 7), and a copy costs little memory beyond what is in flight (the stream
        itself keeps its retention)."""
        with_pending = [stream for stream, group in positions.items() if group.get("pending")]
        pipe = self.redis.pipeline(transaction=False)
        for stream in with_pending:
            pipe.xpending(self.keys[stream], self.group)
        oldest = {stream: summary.get("min") for stream, summary in zip(with_pending, pipe.execute())}
        for stream, group in positions.items():
            base = self._read_bases.get(stream)
            if base is None:  # no observation of the group yet: nothing to trim against
                continue
            position = _text(group.get("last-delivered-id")) or "0-0"
            floor = trim_floor(position, _text(oldest.get(stream)) or None, base.last_delivered_id)
            if floor != "0-0":
                pipe.xtrim(self.keys[stream], minid=floor, approximate=True)
        pipe.execute()

    def _report_trimmed_unread(self, stream: str, reading: "GroupReading", effects: Effects) -> None:
        metrics.trimmed_unprocessed.labels(stream).inc(reading.newly_lost)
        reason = (
            f"{reading.newly_lost} entries of {stream} were trimmed before group {self.group} read them "
            f"(group at {reading.last_delivered_id}); raise the retention of {stream} or find why the group lags"
        )
        log.error("entries trimmed before processing", extra={"stream": stream, "lost": reading.newly_lost})
        marker = Entry(stream, f"trimmed-unread-{reading.last_delivered_id}-{reading.newly_lost}", None, 0)
        effects.dead_letter(marker, reason, "trimmed_unread", self.consumer, self.group)
        if reading.gap_lost:
            effects.hset(self.daemon_key, {f"trim_lost:{stream}": f"{reading.last_delivered_id} {reading.gap_lost}"})


def trim_floor(last_delivered_id: str, oldest_pending_id: str | None, observed_id: str) -> str:
    """The lowest id a group's own copy must keep (pure): the oldest of its position, its
    oldest pending entry and the position of the trim-loss base (`ReadBase`, rule 7; a
    copy trimmed past it would look like a loss at the next exact observation)."""
    keep = [last_delivered_id, observed_id] + ([oldest_pending_id] if oldest_pending_id is not None else [])
    return min(keep, key=_id_tuple)


# --- lag and trim loss, without trusting a group's entries-read (rule 7) -------------------------
#
# Redis 7.0 does not keep a group's entries-read across a restart: the AOF (and an RDB)
# brings back the value of the XGROUP CREATE (its ENTRIESREAD), not the reads since, and
# XINFO's `lag` is computed from it. So:
# * lag is counted from the group's last-delivered-id (entries present after it);
# * entries after last-delivered-id can only have been trimmed unread when the stream's
#   first entry is beyond it (a gap); how many: entries-added (which Redis does keep)
#   - entries present - entries ever added up to last-delivered-id (`read`);
# * `read` is measured whenever it is exact (no gap: entries-added - lag) and carried
#   forward by the entries this process is delivered (`>` reads), so a gap the group
#   jumped over between two observations is found too: the growth of `read` beyond
#   what was delivered was trimmed unread.

LAG_COUNT_BOUND = 1000  # entries counted one by one past the group's position; beyond it, an estimate


@dataclass(frozen=True)
class ReadBase:
    """Where a group stood at an exact observation, and what happened since (per process)."""

    last_delivered_id: str
    read: int  # entries ever added up to last_delivered_id (with those trimmed before the group existed)
    delivered: int = 0  # new entries this process was handed since
    reported: int = 0  # losses reported since
    exact: bool = True  # False: `read` is a lower bound (a gap seen first thing after a start)


@dataclass(frozen=True)
class GroupReading:
    last_delivered_id: str
    lag: int | None  # entries present and not yet delivered to the group
    newly_lost: int = 0  # entries trimmed unread, not reported before
    gap_lost: int = 0  # entries after last_delivered_id trimmed unread (while a gap is seen)


def count_after(r: redis.Redis, stream: str, group: dict[str, Any], info: dict[str, Any], bound: int = LAG_COUNT_BOUND) -> int | None:
    """Entries present after the group's last-delivered-id, counted up to `bound` inside
    Redis (nothing is transferred); None when the figure follows from XINFO alone."""
    last_delivered = _text(group.get("last-delivered-id")) or "0-0"
    first = info.get("first-entry")
    if _id_tuple(last_delivered) >= _id_tuple(_text(info.get("last-generated-id")) or "0-0"):
        return None
    if not first or _id_tuple(_text(first[0])) > _id_tuple(last_delivered):
        return None
    return int(r.fcall_ro("qe_count_after", 0, stream, last_delivered, bound))


def group_lag(group: dict[str, Any], info: dict[str, Any], counted_after: int | None, bound: int = LAG_COUNT_BOUND) -> tuple[int, bool, bool]:
    """(entries present after the group's position, exact?, gap?) (pure)."""
    position = _id_tuple(_text(group.get("last-delivered-id")) or "0-0")
    first = info.get("first-entry")
    length = int(info.get("length", 0))
    if position >= _id_tuple(_text(info.get("last-generated-id")) or "0-0"):
        return 0, True, False
    if not first or _id_tuple(_text(first[0])) > position:
        return length, True, True  # everything present is after it: what was in between is gone
    if counted_after is not None and counted_after < bound:
        return counted_after, True, False
    # More than `bound` behind: Redis's figure (never below the truth), at most the length.
    redis_lag = group.get("lag")
    return (max(bound, min(int(redis_lag), length)) if redis_lag is not None else bound), False, False


def _trimmed_past(info: dict[str, Any], position: str) -> bool:
    """Whether trimming reached past `position`: only then can entries after it have been
    lost. Trimming removes the oldest entries first, so while the stream's first entry is
    at or before `position` every entry after it still exists (and a count that says
    otherwise is a delivery racing the observation, not a loss)."""
    first = info.get("first-entry")
    if not first:
        return False
    return _id_tuple(_text(first[0])) > _id_tuple(position)


def observe_group(
    group: dict[str, Any],
    info: dict[str, Any],
    counted_after: int | None,
    base: ReadBase | None,
    saved_base: tuple[str, int] | None = None,
    reported_gap: tuple[str, int] | None = None,
    bound: int = LAG_COUNT_BOUND,
) -> tuple[GroupReading, ReadBase | None]:
    """Lag and trim loss of one group (pure). `base`: this process's last observation
    (None after a start); `saved_base`: (position, read) of the last exact observation of
    any process, and `reported_gap`: (position, count) of the last gap reported, both
    saved in the daemon hash, so a restarted daemon counts right and reports nothing twice."""
    last_delivered = _text(group.get("last-delivered-id")) or "0-0"
    lag, exact, gap = group_lag(group, info, counted_after, bound)
    added = info.get("entries-added")
    if added is None:  # Redis < 7: no counters, no loss figure
        return GroupReading(last_delivered, lag), None
    added = int(added)
    if not gap:
        if not exact:
            return GroupReading(last_delivered, lag), base
        read = added - lag
        newly = 0
        if base is not None and _trimmed_past(info, base.last_delivered_id):
            # Entries added up to here that were neither delivered nor reported: trimmed unread.
            newly = max(read - base.read - base.delivered - base.reported, 0)
        return GroupReading(last_delivered, lag, newly), ReadBase(last_delivered, read)
    # A gap: every entry after last_delivered that is not present was trimmed unread.
    if base is not None:
        read, reported = base.read + base.delivered, base.reported
    else:
        # First look since this process started: lower bounds only (never above the truth);
        # the saved observation is exact when the group has not moved since.
        known = [int(group["entries-read"])] if group.get("entries-read") is not None else []
        if saved_base is not None and _id_tuple(saved_base[0] or "0-0") <= _id_tuple(last_delivered):
            known.append(saved_base[1])
        read = max(known, default=0)
        reported = reported_gap[1] if reported_gap is not None and reported_gap[0] == last_delivered else 0
        base = ReadBase(last_delivered, read, exact=False)
    gap_lost = max(added - lag - read, 0)
    newly = max(gap_lost - reported, 0)
    return GroupReading(last_delivered, lag, newly, gap_lost), dataclasses.replace(base, reported=reported + newly)


def group_lags(
    r: redis.Redis, streams: Iterable[str], consumes: dict[str, tuple[str, ...]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """XINFO GROUPS of every consuming group of each stream, read on the group's own
    copy (qe.topology; `consumes`: another table), with every group's `lag` counted as
    above (lag alerts, `qe status`: XINFO's own figure is wrong after a Redis restart).
    A stream none of whose copies exists is left out.

    A caller allowed only a stream's metadata (the alerts daemon on a stream it does not
    consume) cannot count its entries: where XINFO alone does not settle the figure, it
    takes the lag the group's owner last counted (`lag:<stream>` in
    `state:daemon:<owner>`), or None (unknown) when there is none."""
    table = topology.fanout(consumes)
    result: dict[str, list[dict[str, Any]]] = {}
    for stream in streams:
        for group_name in table.get(stream, ()):
            key = delivery_stream(stream, group_name)
            try:
                groups, info = r.xinfo_groups(key), r.xinfo_stream(key)
            except redis.ResponseError as exc:
                if "no such key" in str(exc).lower():
                    continue
                raise
            rows = result.setdefault(stream, [])
            # Only the copy's own group counts (nobody else may create one there).
            rows += [{**g, "lag": _lag_of(r, stream, key, g, info)} for g in groups if _text(g.get("name")) == group_name]
    return result


def _lag_of(r: redis.Redis, stream: str, key: str, group: dict[str, Any], info: dict[str, Any]) -> int | None:
    try:
        counted = count_after(r, key, group, info)
    except redis.ResponseError as exc:
        if not _refused(exc):
            raise
        return reported_lag(r, stream, _text(group.get("name")) or "")
    return group_lag(group, info, counted)[0]


def _refused(exc: redis.ResponseError) -> bool:
    text = str(exc)
    return isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in text or "can't access" in text


def reported_lag(r: redis.Redis, stream: str, group: str) -> int | None:
    """The lag of `group` on `stream` as its owning daemon last counted it, or None."""
    from .acl import group_owner  # acl imports nothing of the runtime

    owner = group_owner(group)
    if owner is None:
        return None
    value = r.hget(DAEMON_KEY.format(daemon=owner), f"lag:{stream}")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _parse_mark(value: str | None) -> tuple[str, int] | None:
    """'<entry id> <count>' as saved in the daemon hash (an older plain count has no id)."""
    if not value:
        return None
    entry_id, _, count = value.partition(" ")
    try:
        return (entry_id, int(count)) if count else ("", int(entry_id))
    except ValueError:
        return None


@overload
def _text(value: bytes | str) -> str: ...
@overload
def _text(value: None) -> None: ...
@overload
def _text(value: Any) -> str | None: ...
def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def stream_entries(reply: Iterable[Any]) -> list[tuple[str, str, dict[bytes, bytes]]]:
    """Flatten an XREAD/XREADGROUP reply into (stream, id, fields)."""
    return [
        (_text(stream), _text(entry_id), fields)
        for stream, items in reply or ()
        for entry_id, fields in items
    ]
