"""qe-exposure: positions, open orders, marks and equity in; ev.exposure and
state:exposure out, every publish_interval_s (full detail) and on every material
change (changed symbols only), rate-limited to one per min_publish_gap_s.

Restart safety: every input the book needs is written to Redis hashes in the same
atomic commit as the acks of the events that changed it; load() rebuilds the
book from them, so a SIGKILLed worker publishes the same exposure after restart.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import redis

from qe import daemon, metrics, state
from qe.clock import NS_PER_S
from qe.alert_types import RAISED, RESOLVED, AlertType
from qe.contracts import Alert, BucketExposure, Envelope, Exposure, SymbolExposure, idempotency_key, make_event
from qe.streams import Effects

from . import core

STREAMS = ("ev.positions", "ev.orders", "ev.l1", "ev.features")
OUT_STREAM = "ev.exposure"
SOURCE = "exposure"
# What load() needs, written with the acks (field per symbol / order ref).
POSITIONS_KEY = "state:exposure:positions"
ORDERS_KEY = "state:exposure:orders"
TERMINAL_KEY = "state:exposure:orders_terminal"
MARKS_KEY = "state:exposure:marks"
EQUITY_KEY = "state:exposure:equity"
# The last entry id consumed from ev.orders / ev.positions (the snapshot says what it includes).
CONSUMED_KEY = "state:exposure:consumed"
INCLUDED_STREAMS = ("ev.orders", "ev.positions")
PRUNE_INTERVAL_NS = 3600 * NS_PER_S

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def symbol_payload(line: core.SymbolDetail) -> SymbolExposure:
    return SymbolExposure(
        qty=line.qty,
        bucket=line.bucket,  # type: ignore[arg-type]
        mark=line.mark,
        mark_source=line.mark_source,  # type: ignore[arg-type]
        notional=line.notional,
        open_buy_qty=line.open_buy_qty,
        open_sell_qty=line.open_sell_qty,
        potential_notional=line.potential_notional,
        mark_reason=line.mark_reason,
    )


def exposure_payload(
    totals: core.Totals, stale: list[str], lines: list[core.SymbolDetail], detail: str, consumed: dict[str, str] | None = None
) -> Exposure:
    ok = totals.status == "ok"
    equity = totals.equity if totals.equity is not None and math.isfinite(totals.equity) else 0.0
    return Exposure(
        status=totals.status,  # type: ignore[arg-type]
        error=totals.error,
        detail=detail,  # type: ignore[arg-type]
        equity=equity,
        long_notional=totals.long_notional,
        short_notional=totals.short_notional,
        gross_pct=totals.gross_pct,
        net_pct=totals.net_pct,
        potential_gross_pct=totals.potential_gross_pct,
        # Without usable equity no bucket percentage exists: the Brain must read `status`.
        buckets={
            name: BucketExposure(
                current_pct=view.current_pct,  # type: ignore[arg-type]
                potential_pct=view.potential_pct,  # type: ignore[arg-type]
                target_pct=view.target_pct,
                max_pct=view.max_pct,
            )
            for name, view in totals.buckets.items()
        }
        if ok
        else {},
        symbols={line.symbol: symbol_payload(line) for line in lines},
        marks_stale=stale,
        orders_through=(consumed or {}).get("ev.orders"),
        positions_through=(consumed or {}).get("ev.positions"),
    )


class ExposureHandler:
    streams = STREAMS

    def __init__(self, context: daemon.Context) -> None:
        self.rules = context.rules.exposure
        self.plausibility = context.rules.plausibility
        self.clock = context.clock
        self.log = context.log
        self.tick_interval_s = self.rules.min_publish_gap_s
        # The universe's reference prices: the last-resort (fallback) mark of a held symbol.
        self.reference_prices = {symbol: inst.ref_price for symbol, inst in context.universe().items()}
        self.book = core.ExposureBook(self.rules, self.plausibility, self.reference_prices)
        self.consumed: dict[str, str] = {}  # stream -> last entry id handled (ev.orders, ev.positions)
        self.unpriced_alerted: set[str] = set()  # symbols alerted as priced only by a fallback
        self._reset_publication()

    def _reset_publication(self) -> None:
        self._next_full_ns = 0  # publish everything on the first tick
        self._next_mark_check_ns = 0
        self._next_prune_ns = 0
        self._pending = False  # a material change awaits publication
        self._change_key: str | None = None  # what the next change publication is keyed on
        self._change_cause: str | None = None
        self._published_ratios: tuple[float, float] | None = None

    # -- restart: rebuild from Redis ------------------------------------------------------------
    def load(self, r: redis.Redis) -> None:
        now_ns = self.clock.now_ns()
        book = core.ExposureBook(self.rules, self.plausibility, self.reference_prices)
        pipe = r.pipeline(transaction=True)  # one consistent snapshot
        for key in (MARKS_KEY, EQUITY_KEY, POSITIONS_KEY, TERMINAL_KEY, ORDERS_KEY, CONSUMED_KEY):
            pipe.hgetall(key)
        marks, equity, positions, terminal, orders, consumed = pipe.execute()
        self.consumed = {k.decode(): v.decode() for k, v in consumed.items() if k.decode() in INCLUDED_STREAMS}

        def restore_order(order_ref: str, data: dict[str, Any]) -> None:
            order = core.OpenOrder.from_json(order_ref, data)
            book.apply_order(order_ref, order.symbol, order.side, order.bucket, "SUBMITTED", order.open_qty, order.filled_qty, now_ns)

        self._restore(MARKS_KEY, marks, lambda symbol, data: book.restore_mark(symbol, core.SavedPrices.from_json(data), now_ns))
        self._restore(EQUITY_KEY, {k: v for k, v in equity.items() if k == b"net_liquidation"},
                      lambda _field, value: book.set_equity(None if value is None else float(value)))
        self._restore(POSITIONS_KEY, positions, lambda symbol, data: book.set_position(
            symbol, int(data["qty"]), data["bucket"], float(data["avg_cost"]), now_ns))
        self._restore(TERMINAL_KEY, terminal, lambda order_ref, seen_ns: book.terminal.__setitem__(order_ref, int(seen_ns)))
        self._restore(ORDERS_KEY, orders, restore_order)
        book.take_changed()
        book.take_stale_changed()
        self.book = book
        self._reset_publication()
        self.log.info(
            "exposure book loaded",
            extra={"positions": len(positions), "open_orders": len(book.orders), "known_symbols": len(book.known),
                   "equity": book.equity, "symbols": len(book.symbols)},
        )

    def _restore(self, key: str, raw: dict[bytes, bytes], restore: Callable[[str, Any], Any]) -> None:
        """Feed each field of one state hash to `restore`. A field that cannot be used
        is skipped and reported: it is our own state, and we never crash-loop on it."""
        for name, value in raw.items():
            try:
                restore(name.decode(), json.loads(value))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                metrics.exposure_events_ignored.labels("corrupt_state").inc()
                self.log.error("unreadable exposure state field skipped", extra={"key": key, "field": repr(name), "error": repr(exc)})

    # -- events ------------------------------------------------------------------------------------
    def handle(self, event: Envelope, effects: Effects) -> None:
        self._apply(event, effects)
        # Only once handled: the snapshot claims to include every entry up to this id.
        entry = effects.entry
        if entry is not None and entry.stream in INCLUDED_STREAMS:
            self.consumed[entry.stream] = entry.entry_id
            effects.hset(CONSUMED_KEY, {entry.stream: entry.entry_id})
            self._pending = True  # a reader waits for a snapshot that includes it

    def _apply(self, event: Envelope, effects: Effects) -> None:
        now_ns = self.clock.now_ns()
        payload: Any = event.payload
        kind = event.type
        book = self.book
        if kind == "l1":
            self._handle_quote(event, payload, effects, now_ns)
        elif kind == "feature":
            tick = payload.truth_tick
            changed = book.set_feature(
                payload.symbol,
                None if tick is None else tick.price,
                0 if tick is None else tick.ts_ns,
                payload.grpan_price,
                payload.last_price,
                now_ns,
            )
            if changed:
                effects.hset(MARKS_KEY, {payload.symbol: _dumps(book.known[payload.symbol].saved_prices().to_json())})
                self._changed(event, always_material=False)
        elif kind == "position":
            try:
                changed = book.set_position(payload.symbol, payload.qty, payload.bucket, payload.avg_cost, now_ns)
            except core.QuantityOutOfRange as exc:
                self._ignore(event, "qty_out_of_range", error=str(exc))
                return
            except core.NotFinite as exc:
                self._ignore(event, "not_finite", error=str(exc))
                return
            if changed:
                if payload.qty == 0:
                    effects.hdel(POSITIONS_KEY, payload.symbol)
                else:
                    position = {"qty": payload.qty, "bucket": payload.bucket, "avg_cost": payload.avg_cost}
                    effects.hset(POSITIONS_KEY, {payload.symbol: _dumps(position)})
                self._changed(event, always_material=True)
        elif kind == "account":
            equity = payload.net_liquidation
            if book.set_equity(equity):
                # A NaN/inf equity is kept as "unknown" (status error), saved as null, never as NaN.
                saved = _dumps(equity if core.finite(equity) else None)
                effects.hset(EQUITY_KEY, {"net_liquidation": saved, "account": _dumps(payload.account), "ts_ns": event.ts_ns})
                if core.equity_error(equity):
                    self.log.error("unusable equity", extra={"account": payload.account, "error": core.equity_error(equity)})
                self._changed(event, always_material=True)
        elif kind == "order":
            self._handle_order(event, payload, effects, now_ns)

    def _handle_quote(self, event: Envelope, quote: Any, effects: Effects, now_ns: int) -> None:
        """Through the quote gate (SPEC 9): an implausible quote never moves a mark."""
        book = self.book
        was = book.quote_problem(quote.symbol)
        changed = book.set_quote(
            quote.symbol, quote.bid, quote.ask, event.ts_ns, now_ns,
            bid_size=quote.bid_size, ask_size=quote.ask_size, flagged=quote.implausible,
        )
        problem = book.quote_problem(quote.symbol)
        if problem is not None:
            metrics.exposure_events_ignored.labels("l1_implausible").inc()
            if was is None:  # once per episode; the alert is market data's
                self.log.warning("implausible quote: the mark stays on the last trusted price",
                                 extra={"symbol": quote.symbol, "problem": problem, "bid": quote.bid, "ask": quote.ask})
        elif was is not None:
            self.log.info("quotes plausible again", extra={"symbol": quote.symbol})
        elif quote.bid is None or quote.ask is None:
            metrics.exposure_events_ignored.labels("l1_one_sided").inc()
        if changed:
            effects.hset(MARKS_KEY, {quote.symbol: _dumps(book.known[quote.symbol].saved_prices().to_json())})
            self._changed(event, always_material=False)

    def _handle_order(self, event: Envelope, order: Any, effects: Effects, now_ns: int) -> None:
        open_qty = core.open_quantity(order.qty, order.filled_qty, order.remaining_qty)
        try:
            outcome = self.book.apply_order(
                order.order_ref, order.symbol, order.side, order.bucket, order.status, open_qty, order.filled_qty, now_ns
            )
        except core.QuantityOutOfRange as exc:
            self._ignore(event, "qty_out_of_range", order_ref=order.order_ref, error=str(exc))
            return
        if outcome in (core.OPENED, core.UPDATED):
            effects.hset(ORDERS_KEY, {order.order_ref: _dumps(self.book.orders[order.order_ref].to_json())})
            self._changed(event, always_material=True)
        elif outcome == core.CLOSED:
            effects.hdel(ORDERS_KEY, order.order_ref)
            effects.hset(TERMINAL_KEY, {order.order_ref: now_ns})
            self._changed(event, always_material=True)
        elif outcome in (core.IGNORED_AFTER_TERMINAL, core.IGNORED_STALE):
            self._ignore(event, outcome, order_ref=order.order_ref, status=order.status)

    def _ignore(self, event: Envelope, reason: str, **details: Any) -> None:
        """Input we cannot use and a retry would not fix: say so, count it, move on."""
        metrics.exposure_events_ignored.labels(reason).inc()
        self.log.warning("event ignored", extra={"reason": reason, "event_id": str(event.event_id), "type": event.type, **details})

    def _changed(self, event: Envelope, always_material: bool) -> None:
        self._change_key = idempotency_key("exposure", "change", event.event_id)
        self._change_cause = str(event.event_id)
        if self._pending:
            return
        if always_material or self.book.stale_changed or self._ratios_moved():
            self._pending = True

    def _ratios_moved(self) -> bool:
        now, then = self.book.ratios(), self._published_ratios
        if now is None or then is None:
            return now is not then
        threshold = self.rules.material_change_pct
        return abs(now[0] - then[0]) > threshold or abs(now[1] - then[1]) > threshold

    # -- the periodic tick ---------------------------------------------------------------------------
    def tick(self, now_ns: int, effects: Effects) -> None:
        book = self.book
        if now_ns >= self._next_mark_check_ns:
            # Marks age with time only: re-resolve them here, never per event.
            book.refresh_marks(now_ns)
            if not self._pending and (book.stale_changed or self._ratios_moved()):
                self._pending = True
                self._change_key = idempotency_key("exposure", "marks", now_ns // 1_000_000)
                self._change_cause = None
            self._next_mark_check_ns = now_ns + int(self.rules.mark_check_interval_s * NS_PER_S)
        if now_ns >= self._next_full_ns:
            self._publish(now_ns, effects, full=True)
            self._next_full_ns = now_ns + int(self.rules.publish_interval_s * NS_PER_S)
        elif self._pending:
            self._publish(now_ns, effects, full=False)
        if now_ns >= self._next_prune_ns:
            forgotten = book.forget_terminal(now_ns - self.rules.terminal_order_memory_s * NS_PER_S)
            effects.hdel(TERMINAL_KEY, *forgotten)
            self._next_prune_ns = now_ns + PRUNE_INTERVAL_NS

    def _publish(self, now_ns: int, effects: Effects, full: bool) -> None:
        book = self.book
        changed = book.take_changed()
        book.take_stale_changed()
        totals = book.totals()
        lines = book.details() if full else book.details(sorted(changed))
        payload = exposure_payload(totals, book.stale_symbols(), lines, "full" if full else "changed", self.consumed)
        key = idempotency_key("exposure", "full", now_ns // NS_PER_S) if full else self._change_key or idempotency_key("exposure", "change", now_ns)
        event = make_event(payload, idempotency_key=key, source=SOURCE, ts_ns=now_ns, causation_id=None if full else self._change_cause)
        effects.publish(OUT_STREAM, event)
        totals_fields, symbol_fields = state.exposure_fields(event)  # the contract's encoding (qe.state)
        effects.hset(state.EXPOSURE, totals_fields)
        if full:
            effects.command("DEL", state.EXPOSURE_SYMBOLS)
            effects.hset(state.EXPOSURE_SYMBOLS, symbol_fields)
        else:
            effects.hset(state.EXPOSURE_SYMBOLS, {s: v for s, v in symbol_fields.items() if s in book.symbols})
            effects.hdel(state.EXPOSURE_SYMBOLS, *(s for s in symbol_fields if s not in book.symbols))
        self._pending = False
        self._change_key = self._change_cause = None
        self._published_ratios = book.ratios()
        self._alert_unpriced(now_ns, effects)
        metrics.exposure_publications.labels(payload.detail).inc()
        metrics.exposure_marks_stale.set(len(payload.marks_stale))
        nan = float("nan")
        metrics.exposure_gross.set(nan if payload.gross_pct is None else payload.gross_pct / 100)
        metrics.exposure_potential_gross.set(nan if payload.potential_gross_pct is None else payload.potential_gross_pct / 100)

    def _alert_unpriced(self, now_ns: int, effects: Effects) -> None:
        """Once per symbol and episode: a held symbol the market has not priced counts at
        its fallback mark (average cost / reference price) and blocks risk increases."""
        unpriced = self.book.unpriced_symbols()
        for symbol in sorted(set(unpriced) - self.unpriced_alerted):
            line = self.book.detail(symbol)
            why = unpriced[symbol]
            self.log.warning("position not priced by the market: counted at its fallback mark",
                             extra={"symbol": symbol, "mark": line.mark, "why": why})
            alert = Alert(
                alert_type=AlertType.UNPRICED_POSITION, state=RAISED, severity="warning", symbol=symbol,
                message=f"{symbol}: {line.qty} shares not priced by the market ({why}); counted at "
                        f"{line.mark if line.mark is not None else 'no price'} in gross and potential; no risk increase",
                data={"qty": line.qty, "mark": line.mark, "mark_source": line.mark_source, "why": why},
            )
            key = idempotency_key("alert", "exposure", "unpriced_position", symbol, now_ns // NS_PER_S)
            effects.publish("ev.alerts", make_event(alert, idempotency_key=key, source=SOURCE, ts_ns=now_ns))
        for symbol in sorted(self.unpriced_alerted - set(unpriced)):
            self.log.info("position priced by the market again", extra={"symbol": symbol})
            resolved = Alert(alert_type=AlertType.UNPRICED_POSITION, state=RESOLVED, severity="info", symbol=symbol,
                             message=f"{symbol}: priced by the market again")
            key = idempotency_key("alert", "exposure", "unpriced_position", "resolved", symbol, now_ns // NS_PER_S)
            effects.publish("ev.alerts", make_event(resolved, idempotency_key=key, source=SOURCE, ts_ns=now_ns))
        self.unpriced_alerted = set(unpriced)


def run() -> int:
    return daemon.run_consumer("exposure", "exposure", ExposureHandler)
