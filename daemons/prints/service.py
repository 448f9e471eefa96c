"""The prints/features worker on the stream runtime (group `prints`).

Shell only: maps `ev.prints` events to `core.SymbolPrints`, and records the
effects of each batch, committed atomically with its acks:

* every new print is appended to `state:prints:buffer:{symbol}` (a Redis list
  capped like the in-memory buffer), so `load()` rebuilds exactly the buffers
  that were committed: restart-safe without replaying the stream;
* one `ev.features` event per symbol per batch (and only when the feature
  changed), key `feature:<symbol>:<key of the last print added>` (+ `:stale:<windows>`
  when time windows went stale), and `state:features:{symbol}` kept current.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from prometheus_client import Counter

from qe import daemon as qe_daemon
from qe import metrics
from qe.alert_types import RAISED, RESOLVED, AlertType
from qe.contracts import Alert, Envelope, Feature, GrpanWindow, Print, TruthTick, idempotency_key, make_event
from qe.state import snapshot_fields
from qe.streams import Effects

from .core import (
    FeatureValues, PrintRecord, PrintScreen, Rules, Screening, SymbolPrints, WindowResult, make_record, plausible_stored,
    screen_print,
)

log = logging.getLogger(__name__)

DAEMON = "prints"
GROUP = "prints"
SOURCE = "prints"
BUFFER_KEY = "state:prints:buffer:{symbol}"
FEATURES_KEY = "state:features:{symbol}"
SCREEN_KEY = "state:prints:gate"  # hash: symbol -> PrintScreen JSON (the print gate's memory)

prints_excluded = metrics.owned_by(DAEMON)(Counter(
    "qe_prints_excluded_total",
    "Prints kept out of truth ticks and GRPAN by the print gate (or dropped from saved state), by reason",
    ["reason"],
    registry=None,
))

def _window(result: WindowResult) -> GrpanWindow:
    return GrpanWindow(
        grpan_price=result.grpan_price,
        concentration_pct=result.concentration_pct,
        print_count=result.print_count,
        deviation=result.deviation,
        stale=result.stale,
        truncated=result.truncated,
    )


def feature_payload(symbol: str, values: FeatureValues) -> Feature:
    headline = values.headline
    truth = values.truth_tick
    return Feature(
        symbol=symbol,
        grpan_price=headline.grpan_price,
        concentration_pct=headline.concentration_pct,
        print_count=headline.print_count,
        last_price=values.last_price,
        deviation=headline.deviation,
        windows={name: _window(result) for name, result in values.windows.items()},
        truth_tick=None if truth is None else TruthTick(price=truth.price, size=truth.size, venue=truth.venue, ts_ns=truth.ts_ns),
    )


def _encode_print(record: PrintRecord) -> str:
    return json.dumps([record.key, record.price, record.size, record.venue, record.ts_ns], separators=(",", ":"))


class PrintsHandler:
    streams = ("ev.prints",)

    def __init__(self, context: qe_daemon.Context) -> None:
        self.clock = context.clock
        self.config = context.rules.prints
        self.batch_size = self.config.batch_size  # read bigger batches than the default (see PrintsRules)
        self.rules = Rules.from_config(self.config)
        self.plausibility = context.rules.plausibility
        self.screens: dict[str, PrintScreen] = {}
        self.tick_interval_s = self.config.stale_check_interval_s
        self.symbols: dict[str, SymbolPrints] = {}
        self.published: dict[str, Feature] = {}
        self.dirty: dict[str, str | None] = {}  # symbol -> event_id of the last print handled
        self.warned_venues: set[str] = set()

    # -- state ---------------------------------------------------------------------------
    def load(self, r: redis.Redis) -> None:
        self.symbols, self.published, self.dirty, self.screens = {}, {}, {}, {}
        now_ns = self.clock.now_ns()
        dropped = 0
        prefix = BUFFER_KEY.format(symbol="")
        for raw_key in r.scan_iter(match=prefix + "*", count=1000):
            symbol = raw_key.decode()[len(prefix):]
            prints = SymbolPrints(self.rules)
            for seq, item in enumerate(r.lrange(raw_key, 0, -1)):
                record = self._stored_record(item, seq, now_ns)
                if record is None:
                    dropped += 1
                    continue
                prints.add(record)
            self.symbols[symbol] = prints
        features_prefix = FEATURES_KEY.format(symbol="")
        for raw_key in r.scan_iter(match=features_prefix + "*", count=1000):
            symbol = raw_key.decode()[len(features_prefix):]
            try:
                fields = {k.decode(): json.loads(v) for k, v in r.hgetall(raw_key).items()}
                payload = Feature.model_validate({name: fields[name] for name in Feature.model_fields if name in fields})
            except ValueError as exc:  # unreadable: recomputed from the buffer at the next print
                log.error("saved feature unreadable; ignored", extra={"symbol": symbol, "error": str(exc)[:200]})
                continue
            self.published[symbol] = payload
            prints = self.symbols.get(symbol)
            truth = payload.truth_tick
            if truth is not None and not plausible_stored(truth.price, truth.size, truth.ts_ns, now_ns, self.plausibility):
                log.error("saved truth tick is not a plausible print; ignored", extra={"symbol": symbol})
                dropped += 1
                continue
            if prints is not None and truth is not None and (
                prints.truth_tick is None or truth.ts_ns > prints.truth_tick.ts_ns
            ):
                # The truth tick outlives its print's place in the buffer.
                prints.truth_tick = make_record("", truth.price, truth.size, truth.venue, truth.ts_ns, -1, self.rules)
        keep = self.plausibility.prints.confirm_prints
        for raw_symbol, raw in r.hgetall(SCREEN_KEY).items():
            symbol = raw_symbol.decode(errors="replace")
            try:
                self.screens[symbol] = PrintScreen.from_json(raw, keep)
            except (ValueError, TypeError, AttributeError) as exc:
                log.error("saved print gate state unreadable; starting it empty", extra={"symbol": symbol, "error": str(exc)[:200]})
        if dropped:
            prints_excluded.labels("bad_state").inc(dropped)
            log.error("implausible prints in saved state dropped", extra={"dropped": dropped})
        log.info(
            "state loaded",
            extra={"symbols": len(self.symbols), "prints": sum(len(p) for p in self.symbols.values()), "screens": len(self.screens)},
        )

    def _stored_record(self, item: bytes, seq: int, now_ns: int) -> PrintRecord | None:
        try:
            key, price, size, venue, ts_ns = json.loads(item)
            if not (isinstance(key, str) and isinstance(venue, str)):
                return None
        except (ValueError, TypeError):
            return None
        if not plausible_stored(price, size, ts_ns, now_ns, self.plausibility):
            return None
        return make_record(key, float(price), size, venue[:16], ts_ns, seq, self.rules)

    # -- events ----------------------------------------------------------------------------
    def handle(self, event: Envelope, effects: Effects) -> None:
        payload: Print = event.payload  # type: ignore[assignment]
        symbol = payload.symbol
        prints = self.symbols.get(symbol)
        if prints is None:
            prints = self.symbols[symbol] = SymbolPrints(self.rules)
        record = prints.record(event.idempotency_key, payload.price, payload.size, payload.venue, payload.trade_ts_ns)
        if not self.rules.is_known_venue(record.venue):
            metrics.prints_unknown_venue.labels(record.venue).inc()
            if record.venue not in self.warned_venues:
                self.warned_venues.add(record.venue)
                log.warning("print on an unknown venue", extra={"venue": record.venue, "symbol": symbol})
        if record.key in prints.keys:
            metrics.prints_duplicate.inc()
            return
        if not self._passes_gate(symbol, prints, record, event, effects):
            return
        added, evicted = prints.add(record)
        if not added:
            metrics.prints_too_old.inc()
            return
        if record.truth:
            metrics.truth_ticks.inc()
        buffer_key = BUFFER_KEY.format(symbol=symbol)
        effects.command("RPUSH", buffer_key, _encode_print(record))
        if evicted is not None:
            effects.command("LTRIM", buffer_key, -self.rules.buffer_cap, -1)
        self.dirty[symbol] = str(event.event_id)

    def _passes_gate(self, symbol: str, prints: SymbolPrints, record: PrintRecord, event: Envelope, effects: Effects) -> bool:
        """The print gate (SPEC 9): a refused print is counted and never reaches the
        buffer, the truth tick or a GRPAN window; one alert per episode per symbol."""
        screen = self.screens.get(symbol)
        if screen is None:
            screen = self.screens[symbol] = PrintScreen()
        had_memory = bool(screen.excluded) or screen.since_ns is not None
        screening = screen_print(symbol, prints, screen, record, event.ts_ns, self.clock.now_ns(), self.plausibility)
        if screening.problem is not None or had_memory:
            effects.hset(SCREEN_KEY, {symbol: screen.to_json()})
        if screening.episode is not None:
            self._episode_alert(symbol, record, screening, event, effects)
        if screening.problem is None:
            return True
        prints_excluded.labels(screening.problem).inc()
        log.debug(
            "print excluded",
            extra={"symbol": symbol, "problem": screening.problem, "price": record.price, "size": record.size},
        )
        return False

    def _episode_alert(
        self, symbol: str, record: PrintRecord, screening: Screening, event: Envelope, effects: Effects
    ) -> None:
        assert screening.episode is not None and screening.since_ns is not None
        since_ns = screening.since_ns
        if screening.episode.started:
            severity, state = "warning", "warning"
            message = (
                f"{symbol}: print {record.price:g} x {record.size} on {record.venue} excluded from truth ticks and "
                f"GRPAN ({screening.problem}; reference {screening.reference})"
            )
            data = {
                "state": "firing", "problem": screening.problem, "price": record.price, "size": record.size,
                "venue": record.venue, "trade_ts_ns": record.ts_ns, "reference": screening.reference, "since_ns": since_ns,
            }
            log.warning("implausible print excluded", extra={"symbol": symbol, **data})
        else:
            severity, state = "info", "resolved"
            message = f"resolved: {symbol} prints plausible again ({screening.excluded_in_episode} excluded)"
            data = {"state": "resolved", "since_ns": since_ns, "excluded": screening.excluded_in_episode}
            log.info("prints plausible again", extra={"symbol": symbol, "excluded": screening.excluded_in_episode})
        alert = Alert(alert_type=AlertType.PRINT_IMPLAUSIBLE, state=RAISED if screening.episode.started else RESOLVED,
                      severity=severity, symbol=symbol, message=message[:500], data=data)
        key = idempotency_key("alert", DAEMON, "print_implausible", symbol, since_ns, state)
        effects.publish(
            "ev.alerts",
            make_event(alert, idempotency_key=key, source=SOURCE, ts_ns=self.clock.now_ns(), causation_id=str(event.event_id)),
        )

    def end_batch(self, effects: Effects) -> None:
        now_ns = self.clock.now_ns()
        for symbol, causation_id in self.dirty.items():
            self._publish_if_changed(symbol, now_ns, effects, causation_id)
        self.dirty.clear()

    def tick(self, now_ns: int, effects: Effects) -> None:
        """Windows go stale with the clock, not only with prints."""
        for symbol in self.symbols:
            self._publish_if_changed(symbol, now_ns, effects, None)

    def _publish_if_changed(self, symbol: str, now_ns: int, effects: Effects, causation_id: str | None) -> None:
        prints = self.symbols[symbol]
        values = prints.evaluate(now_ns)
        payload = feature_payload(symbol, values)
        if payload == self.published.get(symbol):
            return
        stale = sorted(name for name, result in values.windows.items() if result.stale)
        parts: list[Any] = [symbol, prints.last_key]
        if stale:
            parts += ["stale", ",".join(stale)]
        event = make_event(
            payload,
            idempotency_key=idempotency_key("feature", *parts),
            source=SOURCE,
            ts_ns=now_ns,
            causation_id=causation_id,
        )
        effects.publish("ev.features", event)
        effects.hset(FEATURES_KEY.format(symbol=symbol), snapshot_fields(event))
        self.published[symbol] = payload


def main() -> int:
    return qe_daemon.run_consumer(DAEMON, GROUP, PrintsHandler)
