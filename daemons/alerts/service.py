"""qe-alerts: the alerts no single producer can raise (SPEC 6, Alerts).

Consumes ev.l1, ev.prints, ev.exposure, ev.broker and ev.session (group `alerts`) and
every `check_interval_s` clock seconds reads XINFO for consumer lag and ev.dlq growth.
The handler only maps events and Redis readings to the pure core (`core.py`) and
records effects; everything the core remembers is written through Effects in the
same atomic commit as the alerts it caused, so after SIGKILL + restart `load()`
rebuilds the same state and an active alert is not fired again.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from qe import config, daemon, metrics
from qe.contracts import DLQ_STREAM, STREAM_TYPES, Alert, Envelope, make_event
from qe.streams import Effects, group_lags

from .core import (
    AlertBook,
    AlertOut,
    BrokerWatch,
    DailyRanges,
    DayRange,
    DlqWatch,
    EtfGuard,
    EtfState,
    Finding,
    GroupLag,
    MarketHours,
    exposure_findings,
    iso_to_ns,
    lag_findings,
    new_york_day,
    stale_findings,
)

DAEMON = "alerts"
GROUP = "alerts"
SOURCE = "alerts"
STREAM = "ev.alerts"
INPUT_STREAMS = ("ev.l1", "ev.prints", "ev.exposure", "ev.broker", "ev.session")
# Every stream whose consumer groups are watched for lag.
LAG_STREAMS = tuple(STREAM_TYPES) + (DLQ_STREAM,)

# The worker's own state (all rebuilt by load()).
CONDITIONS = "state:alerts:conditions"  # condition key -> Condition JSON (pending or firing)
RATES = "state:alerts:rates"  # alert type|subject -> RateWindow JSON
DAILY = "state:alerts:daily"  # symbol -> DayRange JSON
ETF = "state:alerts:etf"  # symbol -> EtfState JSON
SEEN = "state:alerts:seen"  # "l1:<symbol>" / "prints:<symbol>" / "l1:*" / "prints:*" -> last event ts_ns
INPUTS = "state:alerts:inputs"  # session, broker, held, dlq -> JSON
FEED = "*"
# Arrival times are persisted at this resolution (one HSET per symbol per second at most).
SEEN_PERSIST_NS = 1_000_000_000

ALERT_TYPES = (
    "exposure_unavailable", "hard_cap_current", "hard_cap_potential", "bucket_max", "broker_down",
    "broker_orders_refused", "l1_stale", "l1_feed_stale", "prints_stale", "prints_feed_stale",
    "etf_move_vs_close", "etf_move_fast", "dlq_growth", "consumer_lag",
)
for _alert_type in ALERT_TYPES:  # at 0 from the start: increase() sees the first suppression
    metrics.alerts_suppressed.labels(_alert_type)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AlertsHandler:
    streams = INPUT_STREAMS

    def __init__(self, context: daemon.Context) -> None:
        self.rules = context.rules.alerts
        self.hard_cap_pct = context.rules.exposure.hard_cap_pct
        self.clock = context.clock
        self.redis = context.redis
        self.log = context.log
        self.tick_interval_s = self.rules.check_interval_s
        self.universe = context.universe()
        missing = [s for s in self.rules.etf_guard.symbols if s not in self.universe]
        if missing:
            config.exit_config_error(
                f"qe-{DAEMON}",
                f"{context.settings.rules_file}:\n  alerts.etf_guard.symbols: {missing} not in the universe "
                f"({context.settings.universe_file}); the guard needs their ref_price",
            )
        self._reset()

    def _reset(self) -> None:
        self.book = AlertBook(self.rules.rate_limit)
        self.ranges = DailyRanges(self.rules.daily_range_min_size, self.rules.daily_range_min_prints)
        refs = {symbol: self.universe[symbol].ref_price for symbol in self.rules.etf_guard.symbols}
        self.guard = EtfGuard(self.rules.etf_guard, refs)
        self.broker = BrokerWatch()
        self.dlq = DlqWatch()
        self.market: MarketHours | None = None
        self.held: set[str] = set()
        self.last_seen: dict[str, dict[str, int]] = {"l1": {}, "prints": {}}
        self.feed_last: dict[str, int | None] = {"l1": None, "prints": None}
        self.persisted_seen: dict[str, int] = {}
        self.persisted_dlq = ""
        self.watching_since_ns: int | None = None  # first start of this worker (persisted)

    # -- restart: everything from Redis -------------------------------------------------------
    def load(self, r: redis.Redis) -> None:
        self._reset()
        pipe = r.pipeline(transaction=True)
        for key in (CONDITIONS, RATES, DAILY, ETF, SEEN, INPUTS):
            pipe.hgetall(key)
        conditions, rates, daily, etf, seen, inputs = (
            {_text(k): v for k, v in reply.items()} for reply in pipe.execute()
        )
        for key in self.book.restore(conditions, rates):
            self._ignored("corrupt_state", f"unreadable alert state {key!r}; dropped")
        for symbol, text in daily.items():
            self._restore(lambda: self.ranges.ranges.__setitem__(symbol, DayRange.from_json(text)), f"{DAILY} {symbol}")
        for symbol, text in etf.items():
            self._restore(lambda: self.guard.states.__setitem__(symbol, EtfState.from_json(text)), f"{ETF} {symbol}")
        for field, value in seen.items():
            kind, _, symbol = field.partition(":")
            if kind not in self.last_seen:
                continue
            try:
                ts = int(value)
            except ValueError:
                self._ignored("corrupt_state", f"unreadable {SEEN} {field}; dropped")
                continue
            self.persisted_seen[field] = ts
            if symbol == FEED:
                self.feed_last[kind] = ts
            else:
                self.last_seen[kind][symbol] = ts
        if "watching_since" in inputs:
            self._restore(lambda: setattr(self, "watching_since_ns", int(inputs["watching_since"])), "watching_since")
        if "session" in inputs:
            self._restore(lambda: self._set_market(MarketHours(**json.loads(inputs["session"]))), "session")
        if "broker" in inputs:
            self._restore(lambda: setattr(self, "broker", BrokerWatch.from_json(inputs["broker"])), "broker")
        if "dlq" in inputs:
            self._restore(lambda: setattr(self, "dlq", DlqWatch.from_json(inputs["dlq"])), "dlq")
            self.persisted_dlq = self.dlq.to_json()
        if "held" in inputs:
            self._restore(lambda: setattr(self, "held", set(json.loads(inputs["held"]))), "held")
        self._update_gauges()
        self.log.info(
            "state loaded",
            extra={"conditions": len(self.book.conditions), "firing": self.book.active(), "daily_ranges": len(self.ranges.ranges)},
        )

    def _restore(self, apply: Any, what: str) -> None:
        try:
            apply()
        except (ValueError, TypeError, KeyError) as exc:
            self._ignored("corrupt_state", f"unreadable {what}: {exc}; dropped")

    def _set_market(self, market: MarketHours) -> None:
        self.market = market

    # -- events ----------------------------------------------------------------------------
    def handle(self, event: Envelope, effects: Effects) -> None:
        now_ns = self.clock.now_ns()
        payload: Any = event.payload
        outs: list[AlertOut] = []
        if event.type == "l1":
            self._seen("l1", payload.symbol, event.ts_ns, effects)
        elif event.type == "print":
            self._seen("prints", payload.symbol, event.ts_ns, effects)
            outs += self._on_print(payload, now_ns)
        elif event.type == "exposure":
            self._update_held(payload, effects)
            if payload.status == "ok" and (payload.gross_pct is None or payload.potential_gross_pct is None):
                # Cannot judge the cap from it; a retry would not help.
                self._ignored("exposure_without_percentages", f"exposure {event.idempotency_key} has status ok but no percentages")
            else:
                outs += self.book.apply(exposure_findings(payload, self.hard_cap_pct, self.rules, event.ts_ns), now_ns)
            for bucket, numbers in payload.buckets.items():
                for measure in ("current", "potential", "max", "target"):
                    metrics.exposure_bucket.labels(bucket, measure).set(getattr(numbers, f"{measure}_pct") / 100)
        elif event.type == "broker":
            self.broker.update(payload.connected, payload.orders_allowed, payload.reason, payload.account,
                               payload.last_code, event.ts_ns)
            effects.hset(INPUTS, {"broker": self.broker.to_json()})
            outs += self.book.apply(self.broker.findings(self._market_open(now_ns), self.rules), now_ns)
        elif event.type == "session":
            self._on_session(payload, effects)
        self._emit(outs, effects, now_ns, str(event.event_id))
        self._flush(effects, now_ns)

    def _seen(self, kind: str, symbol: str, ts_ns: int, effects: Effects) -> None:
        if ts_ns > self.last_seen[kind].get(symbol, 0):
            self.last_seen[kind][symbol] = ts_ns
        if ts_ns > (self.feed_last[kind] or 0):
            self.feed_last[kind] = ts_ns
        writes = {}
        for field, value in ((f"{kind}:{symbol}", self.last_seen[kind][symbol]), (f"{kind}:{FEED}", self.feed_last[kind])):
            if value is not None and value - self.persisted_seen.get(field, 0) >= SEEN_PERSIST_NS:
                writes[field] = value
                self.persisted_seen[field] = value
        effects.hset(SEEN, writes)

    def _on_print(self, payload: Any, now_ns: int) -> list[AlertOut]:
        day = new_york_day(payload.trade_ts_ns)
        outs = []
        for occurrence in self.ranges.on_print(payload.symbol, payload.price, payload.size, day):
            alert = self.book.occur(occurrence, now_ns)
            if alert is not None:
                outs.append(alert)
        if self.guard.guards(payload.symbol):
            outs += self.book.apply(self.guard.on_print(payload.symbol, payload.price, payload.trade_ts_ns, day), now_ns)
        return outs

    def _update_held(self, payload: Any, effects: Effects) -> None:
        before = set(self.held)
        if getattr(payload, "detail", None) == "full":
            self.held = set()
        for symbol, line in payload.symbols.items():
            if line.qty == 0 and line.open_buy_qty == 0 and line.open_sell_qty == 0:
                self.held.discard(symbol)
            else:
                self.held.add(symbol)
        if self.held != before:
            effects.hset(INPUTS, {"held": json.dumps(sorted(self.held))})

    def _on_session(self, payload: Any, effects: Effects) -> None:
        if payload.open_utc is None or payload.close_utc is None:
            self._ignored("session_without_times", "ev.session event without open_utc/close_utc")
            return
        try:
            market = MarketHours(iso_to_ns(payload.open_utc), iso_to_ns(payload.close_utc), payload.trading_day)
        except ValueError as exc:
            self._ignored("session_bad_times", f"ev.session times unreadable: {exc}")
            return
        if market != self.market:
            self.market = market
            effects.hset(INPUTS, {"session": json.dumps(market.__dict__)})

    def _market_open(self, now_ns: int) -> bool:
        # Unknown session: assume open, so a broker outage is never played down.
        return True if self.market is None else self.market.is_open(now_ns)

    # -- the periodic checks -------------------------------------------------------------------
    def tick(self, now_ns: int, effects: Effects) -> None:
        if self.watching_since_ns is None:
            self.watching_since_ns = now_ns
            effects.hset(INPUTS, {"watching_since": now_ns})
        groups, streams = self._read_groups()
        findings: list[Finding] = list(self.broker.findings(self._market_open(now_ns), self.rules))
        complete: dict[str, str] = {}
        symbols = self._watched_symbols()
        for kind, symbol_after, feed_after in (
            ("l1", self.rules.l1_stale_after_s, self.rules.l1_feed_stale_after_s),
            ("prints", self.rules.prints_stale_after_s, self.rules.prints_feed_stale_after_s),
        ):
            found, done = stale_findings(
                kind, self.last_seen[kind], self.feed_last[kind], symbols, now_ns, self.market,
                self._caught_up(f"ev.{kind}", groups, streams), symbol_after, feed_after,
                watching_since_ns=self.watching_since_ns,
            )
            findings += found
            complete.update(done)
        lag, done = lag_findings(groups, self.rules)
        findings += lag
        complete.update(done)
        dlq_info = streams.get(DLQ_STREAM) or {}
        added = dlq_info.get("entries-added", dlq_info.get("length", 0))
        findings += self.dlq.observe(int(added or 0), int(dlq_info.get("length", 0)), now_ns, self.rules)
        dlq_state = self.dlq.to_json()
        if dlq_state != self.persisted_dlq:
            effects.hset(INPUTS, {"dlq": dlq_state})
            self.persisted_dlq = dlq_state
        findings += self.guard.evaluate(now_ns)
        outs = self.book.apply(findings, now_ns, complete)
        self.book.prune_rates(now_ns)
        self._emit(outs, effects, now_ns, None)
        self._flush(effects, now_ns)

    def _read_groups(self) -> tuple[list[GroupLag], dict[str, dict[str, Any]]]:
        """XINFO GROUPS of every stream, XINFO STREAM of the dead-letter stream and of
        this worker's market data inputs. A stream that does not exist has no groups."""
        info_streams = ("ev.l1", "ev.prints", DLQ_STREAM)
        pipe = self.redis.pipeline(transaction=False)
        for stream in info_streams:
            pipe.xinfo_stream(stream)
        replies = pipe.execute(raise_on_error=False)
        groups: list[GroupLag] = []
        # Lag counted from each group's position (XINFO's own figure is wrong after a Redis restart).
        for stream, reply in group_lags(self.redis, LAG_STREAMS).items():
            for group in reply:
                lag = group.get("lag")
                groups.append(
                    GroupLag(
                        stream, _text(group.get("name")), None if lag is None else int(lag),
                        int(group.get("pending") or 0), _text(group.get("last-delivered-id")),
                    )
                )
        streams: dict[str, dict[str, Any]] = {}
        for stream, reply in zip(info_streams, replies):
            if isinstance(reply, Exception):
                if "no such key" not in str(reply).lower():
                    raise reply
                continue
            streams[stream] = reply
        return groups, streams

    def _caught_up(self, stream: str, groups: list[GroupLag], streams: dict[str, dict[str, Any]]) -> bool:
        """Whether this worker has read (nearly) everything on `stream`: staleness
        measured while behind would be our own lag."""
        info = streams.get(stream)
        if info is None:
            return True  # nothing was ever published there: silence is real
        mine = next((g for g in groups if g.stream == stream and g.group == GROUP), None)
        if mine is None:
            return False
        if mine.lag is not None:
            return mine.lag <= self.rules.self_lag_tolerance_entries
        # Redis cannot count the lag (e.g. entries deleted mid-stream): caught up only
        # if the group has been handed the stream's latest entry.
        return mine.last_delivered_id == _text(info.get("last-generated-id"))

    def _watched_symbols(self) -> list[str]:
        if self.rules.stale_symbols == "held":
            return sorted(self.held)
        return sorted(set(self.universe) | set(self.last_seen["l1"]) | set(self.last_seen["prints"]))

    # -- effects ---------------------------------------------------------------------------------
    def _emit(self, outs: list[AlertOut], effects: Effects, now_ns: int, causation_id: str | None) -> None:
        for out in outs:
            payload = Alert(alert_type=out.alert_type, state=out.state, severity=out.severity,  # type: ignore[arg-type]
                            symbol=out.symbol, message=out.message, data=out.data)
            event = make_event(payload, idempotency_key=out.idempotency_key, source=SOURCE, ts_ns=now_ns,
                               causation_id=causation_id)
            effects.publish(STREAM, event)
            state = out.data.get("state", "event")
            metrics.alerts_emitted.labels(out.alert_type, out.severity, state).inc()
            level = self.log.info if out.severity == "info" else self.log.warning
            level("alert", extra={"alert_type": out.alert_type, "severity": out.severity, "symbol": out.symbol,
                                  "state": state, "alert_message": out.message, "idempotency_key": out.idempotency_key})

    def _flush(self, effects: Effects, now_ns: int) -> None:
        cond_set, cond_del, rate_set, rate_del = self.book.take_changes()
        effects.hset(CONDITIONS, cond_set)
        effects.hdel(CONDITIONS, *cond_del)
        effects.hset(RATES, rate_set)
        effects.hdel(RATES, *rate_del)
        if self.ranges.changed:
            effects.hset(DAILY, {s: self.ranges.ranges[s].to_json() for s in sorted(self.ranges.changed)})
            self.ranges.changed.clear()
        if self.guard.changed:
            effects.hset(ETF, {s: self.guard.states[s].to_json() for s in sorted(self.guard.changed)})
            self.guard.changed.clear()
        for alert_type, count in self.book.suppressed.items():
            metrics.alerts_suppressed.labels(alert_type).inc(count)
        self.book.suppressed.clear()
        if cond_set or cond_del:
            self._update_gauges()

    def _update_gauges(self) -> None:
        firing = self.book.active()
        for alert_type in ALERT_TYPES:
            metrics.alerts_active.labels(alert_type).set(firing.get(alert_type, 0))

    def _ignored(self, reason: str, message: str) -> None:
        metrics.alerts_inputs_ignored.labels(reason).inc()
        self.log.error(message, extra={"reason": reason})


def run() -> int:
    return daemon.run_consumer(DAEMON, GROUP, AlertsHandler)
