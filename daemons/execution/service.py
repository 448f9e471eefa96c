"""The execution service's handler: intents in, broker orders out, broker news back
into Redis. Runs on the stream runtime (group `execution_service`).

The one invariant: a record is durable before the broker hears of it. Every order
message (place, modify, cancel) is decided during a batch, recorded in that batch's
atomic commit, and sent from `after_commit`. After any commit whose outcome is
unknown, `load()` rebuilds from Redis and the service reconciles with the broker
before it sends anything again; orders are re-sent only with their recorded broker
order id, so the broker itself treats a repeat as a modify, never a second order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from qe import failpoints, metrics, operator_ack, state
from qe.alert_types import RAISED, AlertType
from qe.clock import NEW_YORK
from qe.contracts import (
    TERMINAL_ORDER_STATUSES,
    Account,
    Alert,
    BrokerPnL,
    BrokerState,
    Envelope,
    Fill,
    Order,
    Position,
    idempotency_key,
    is_our_order_ref,
    make_event,
    order_ref_for,
)
from qe.daemon import Context
from qe.marks import MarkRules
from qe.streams import Effects
from qe.universe import Instrument

from . import core
from .broker import BrokerLink, OrderDone
from .prices import PriceBook
from .reconcile import BrokerFill, BrokerOrder, reconcile

log = logging.getLogger(__name__)

SOURCE = "execution"
STATE_EXECUTION = "state:execution"  # halted flag, equity, account: what load() needs
PRICES = "state:execution:prices"  # field per symbol: execution's own trusted prices (collar reference)
CONNECTIVITY_LOST, RESTORED_DATA_LOST, RESTORED_DATA_KEPT = 1100, 1101, 1102
FARM_BROKEN = {2103, 2105, 2110}
FARM_OK = {2104, 2106, 2158}
PACING = 162
# A place sent on the current connection is awaited this long before reconciliation may
# resubmit it (the broker may not list it yet; a repeat would reach it as a modify).
ACK_TIMEOUT_S = 5.0
# A symbol gone flat keeps its reqPnLSingle this long (seconds): the broker's update for
# the closing fill (its realized P&L) arrives within IB's one-second cadence.
PNL_FLAT_LINGER_S = 5.0


@dataclass
class BrokerView:
    socket_up: bool = False
    connectivity_ok: bool = True  # 1100 clears it, 1101/1102 restore it
    farm_ok: bool = True
    account: str | None = None
    account_ok: bool = False
    account_reason: str = "not connected"
    last_code: int | None = None

    @property
    def usable(self) -> bool:
        return self.socket_up and self.connectivity_ok


class ExecutionService:
    # ev.l1 and ev.features: execution's own prices (quote gate, collar reference, marks).
    # A batch is handled in this order: an operator halt and the latest prices that came
    # with it apply before the intents of the same batch are checked.
    streams = ("ev.control", "ev.session", "ev.l1", "ev.features", "ev.intents")
    tick_interval_s = 0.0  # every loop iteration: the broker is pumped between reads

    def __init__(self, context: Context, broker: BrokerLink) -> None:
        self.clock = context.clock
        self.settings = context.settings
        self.rules = context.rules.execution
        self.hard_cap_pct = context.rules.exposure.hard_cap_pct
        self.default_bucket = context.rules.exposure.default_bucket
        self.max_quantity = context.rules.plausibility.max_quantity
        self.universe: dict[str, Instrument] = context.universe()
        self.broker = broker
        self.limits = core.Limits(
            hard_cap_pct=self.hard_cap_pct,
            max_order_notional=self.rules.max_order_notional,
            min_order_qty=self.rules.min_order_qty,
            liquidity_adv_divisor=self.rules.liquidity_adv_divisor,
            liquidity_min_shares=self.rules.liquidity_min_shares,
            collar_pct=context.rules.plausibility.collar_pct,
        )
        # Market prices are not execution's state: kept across load() (a rebuild after an
        # unknown commit), learnt again from the streams after a restart.
        self.prices = PriceBook(context.rules.plausibility.quote)
        # Cancels asked for while the rate limit or the link said not now: order ref -> reason.
        self.cancels_wanted: dict[str, core.CancelReason] = {}
        self.mark_rules = MarkRules.from_rules(context.rules)
        self.rate = core.TokenBucket(self.rules.max_messages_per_s, self.rules.message_burst)
        self.redis: redis.Redis | None = None
        self._reset_memory()

    def _reset_memory(self) -> None:
        self.records: dict[str, core.OrderRecord] = {}
        self.by_order_id: dict[int, str] = {}
        self.positions: dict[str, int] = {}
        self.position_buckets: dict[str, str] = {}
        self.position_costs: dict[str, tuple[int, float]] = {}  # last published (qty, avg_cost)
        self.equity: float | None = None
        self.halted = False
        # The Brain's mode and halt as qe.state reads them (unknown: increases refused).
        self.brain: state.Reading[state.DecisionState] = state.Reading(state.DECISION, problem="not read yet")
        self.regime: str | None = None
        self.view = BrokerView()
        self.reconciled = False
        self.published_broker_state: tuple | None = None
        self.outbox: list[tuple] = []  # broker messages, sent after the commit that recorded them
        self.in_flight: dict[str, float] = {}  # orderRef -> monotonic time its place was queued/sent, until acknowledged
        self.confirm_after_s: float | None = None
        self.last_fill_bucket: dict[str, str] = {}
        self.reported_external: set[tuple[int, str]] = set()
        # Open orders at the broker without a record of ours (external, orphans): perm id ->
        # the order. They can fill, so the hard-cap check counts them. Re-learnt on reconcile.
        self.external_open: dict[int, BrokerOrder] = {}
        self.last_account_publish_s = 0.0
        self.last_mode_poll_s = 0.0
        self.last_equity_published: float | None = None
        # The broker's P&L: when each subscribed symbol went flat, the last figures published.
        self.pnl_flat_since: dict[str, float] = {}
        self.published_pnl: dict[str | None, tuple] = {}

    # -- runtime hooks -----------------------------------------------------------------------------
    def load(self, r: redis.Redis) -> None:
        """Rebuild from Redis; the broker's view is re-learnt by reconciliation."""
        socket_up = self.view.socket_up
        self._reset_memory()
        self.redis = r
        self.view.socket_up = socket_up and self.broker.connected
        for ref, raw in r.hgetall(state.ORDERS).items():
            record = core.OrderRecord.from_json(json.loads(raw))
            self.records[ref.decode()] = record
            if record.broker_order_id is not None:
                self.by_order_id[record.broker_order_id] = record.order_ref
        positions = state.read_positions(r)
        for problem in positions.problems.values():
            log.error("unreadable saved position skipped (reconciliation re-learns it)", extra={"problem": problem})
        for symbol, position in positions.values.items():
            self.positions[symbol] = position.qty
            self.position_buckets[symbol] = position.bucket
            self.position_costs[symbol] = (position.qty, round(position.avg_cost, 6))
        for symbol, raw in r.hgetall(PRICES).items():
            try:
                self.prices.restore(symbol.decode(), json.loads(raw))
            except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
                log.error("unreadable saved prices skipped", extra={"symbol": repr(symbol)})
        saved = state.read(r, STATE_EXECUTION)
        self.halted = bool(saved.get("halted", False))
        self.equity = saved.get("equity")
        self._read_brain(r)
        if self.view.socket_up:
            self._check_account()
        log.info("execution state loaded", extra={"orders": len(self.records), "positions": len(self.positions)})

    def handle(self, event: Envelope, effects: Effects) -> None:
        kind = event.type
        if kind == "intent":
            self._on_intent(event, effects)
        elif kind == "l1":
            self._on_quote(event.payload, min(event.ts_ns, self.clock.now_ns()), effects)
        elif kind == "feature":
            feature = event.payload
            tick = feature.truth_tick.price if feature.truth_tick is not None else None
            tick_ts = min(feature.truth_tick.ts_ns, self.clock.now_ns()) if feature.truth_tick is not None else 0
            if self.prices.on_feature(feature.symbol, tick, feature.grpan_price, feature.last_price, tick_ts):
                self._save_prices(effects, feature.symbol)
        elif kind == "control":
            self.halted = event.payload.command == "halt"
            effects.hset(STATE_EXECUTION, state.encode_fields({"halted": self.halted}))
            operator_ack.acknowledge(effects, "execution", event, halted=self.halted)
            log.warning("operator control", extra={"command": event.payload.command, "operator": event.payload.operator})
        elif kind == "session":
            self.regime = event.payload.regime

    def tick(self, now_ns: int, effects: Effects) -> None:
        now_s = time.monotonic()
        if not self.broker.connected:
            if self.view.socket_up:
                self._on_disconnected()
            if self.broker.try_connect(now_s):
                self._on_connected()
        if self.broker.connected:
            self.broker.pump()
        self._drain_inbox(now_ns, effects)
        if self.view.usable and not self.reconciled:
            self._reconcile(now_ns, effects)
        if self.confirm_after_s is not None and now_s >= self.confirm_after_s and self.view.usable:
            self.confirm_after_s = None
            self._reconcile(now_ns, effects)  # confirm local "Cancelled" guesses with the broker
        if now_s - self.last_mode_poll_s >= self.rules.mode_poll_interval_s and self.redis is not None:
            self.last_mode_poll_s = now_s
            self._read_brain(self.redis)
        self._expire_and_cancel(now_ns, effects)
        self._apply_waiting_modifies(now_ns, effects)
        self._send_waiting_orders(now_ns, effects)
        self._publish_broker_state(now_ns, effects)
        self._sync_broker_pnl(now_s)
        if now_s - self.last_account_publish_s >= self.rules.account_publish_interval_s:
            self.last_account_publish_s = now_s
            self._publish_account(now_ns, effects, force=False)
            self._refresh_order_gauges()

    def after_commit(self) -> None:
        """The records behind these messages are durable now: tell the broker."""
        outbox, self.outbox = self.outbox, []
        if outbox:
            failpoints.hit("execution.before_send")
        for message in outbox:
            kind = message[0]
            try:
                if kind == "place":
                    _, record, account = message
                    self.in_flight[record.order_ref] = time.monotonic()
                    self.broker.place(record, account, hidden=record.bucket in self.rules.hidden_buckets)
                    self.broker.flush()
                    failpoints.hit("execution.after_send")
                elif kind == "modify":
                    _, record, account = message
                    self.broker.place(record, account, hidden=record.bucket in self.rules.hidden_buckets)
                elif kind == "cancel":
                    self.broker.cancel(message[1])
            except OrderDone as exc:
                log.info("modify not sent", extra={"broker_message": kind, "reason": str(exc)})
            except Exception:  # noqa: BLE001 - the socket may have dropped; reconciliation repairs
                # (not extra={"message": ...}: logging reserves that name and would raise)
                log.exception("broker message failed", extra={"broker_message": kind})
                self.reconciled = False

    # -- intents ---------------------------------------------------------------------------------------
    def _on_intent(self, event: Envelope, effects: Effects) -> None:
        intent = event.payload
        metrics.intents_received.labels(intent.action).inc()
        if intent.action == "NEW":
            self._new_order(event, effects)
            return
        target = self.records.get(order_ref_for(intent.target_intent_key))
        if target is None:
            log.warning("intent for an unknown order", extra={"intent": event.idempotency_key, "target": intent.target_intent_key})
            return
        if intent.action == "CANCEL":
            self._request_cancel(target, "intent", self.clock.now_ns(), effects)
            return
        if intent.limit_price is None or not target.live:
            return  # nothing to re-price
        modify_ref = order_ref_for(event.idempotency_key)
        if modify_ref in self.records:
            metrics.intents_duplicate.inc()
            return  # this MODIFY was refused already
        rejection = self._check_modify(target, intent.limit_price, intent.qty)
        if rejection is not None:
            self._deny_modify(effects, target, event.idempotency_key, intent.limit_price, rejection)
            return
        self._save(effects, dataclasses.replace(target, desired_price=intent.limit_price, desired_by=event.idempotency_key), publish=False)
        self._apply_waiting_modifies(self.clock.now_ns(), effects)

    def _check_modify(self, target: core.OrderRecord, price: float, qty: int) -> core.Rejection | None:
        return core.check_modify(
            target, price, qty, self.limits, self._gate(), self._adv(target.symbol), reference=self.prices.reference(target.symbol)
        )

    def _deny_modify(self, effects: Effects, target: core.OrderRecord, modify_key: str | None, price: float, rejection: core.Rejection) -> None:
        """A refused MODIFY never reaches the broker; the order keeps working at its price.
        The denial is published as a REJECTED order of the MODIFY intent itself (its own
        orderRef, never sent), so that the live order is not reported terminal."""
        metrics.orders_rejected.labels(rejection.rule).inc()
        log.warning("modify refused", extra={"order_ref": target.order_ref, "price": price, "rule": rejection.rule, "reason": rejection.reason})
        if modify_key is None:
            return  # (a desired price recorded before this version: nothing to publish it under)
        now_ns = self.clock.now_ns()
        denial = core.modify_denial(target, modify_key, order_ref_for(modify_key), price,
                                    f"{rejection.rule}: modify of {target.order_ref} {target.limit_price} -> {price}: {rejection.reason}", now_ns)
        self._save(effects, denial)

    def _new_order(self, event: Envelope, effects: Effects) -> None:
        intent = event.payload
        key = event.idempotency_key
        ref = order_ref_for(key)
        if ref in self.records:
            metrics.intents_duplicate.inc()
            log.info("duplicate intent ignored", extra={"intent": key, "order_ref": ref})
            return
        now_ns = self.clock.now_ns()  # receipt, on execution's own clock: the TTL runs from here
        expires_ns = core.expires_at_ns(intent, self.regime, self.rules.ttl_s_by_category, received_ns=now_ns)
        record = core.record_for_intent(intent, key, ref, expires_ns, received_ns=now_ns)
        if intent.symbol not in self.universe:
            self._save(effects, core.rejected(record, None, f"unknown_symbol: {intent.symbol} is not in the universe"))
            return
        if record.expires_ns <= now_ns:
            self._save(effects, dataclasses.replace(record, status="EXPIRED", reject_reason="ttl: expired before it could be sent"))
            return
        # A price outside the collar is refused at once (checked again before sending).
        priced = core.check_order_price(intent, self.prices.reference(intent.symbol), self.limits)
        if priced is not None:
            metrics.orders_rejected.labels(priced.rule).inc()
            log.warning("pre-trade check refused an order", extra={"order_ref": ref, "rule": priced.rule, "reason": priced.reason})
            self._save(effects, core.rejected(record, None, f"{priced.rule}: {priced.reason}"))
            return
        # Recorded first (PENDING_SUBMIT); checked and sent in this batch when possible.
        self._save(effects, record)
        self._send_waiting_orders(now_ns, effects, only=ref)

    def _read_brain(self, r: redis.Redis) -> None:
        """The Brain's mode and halt, through its contract (qe.state); a change of
        readability is logged once."""
        reading = state.read_decision(r)
        if reading.problem != self.brain.problem and reading.problem is not None:
            log.error("the Brain's mode is unknown: risk-increasing orders refused", extra={"problem": reading.describe()})
        elif reading.ok and not self.brain.ok:
            log.info("the Brain's mode is known", extra={"mode": reading.value.mode if reading.value else None})
        self.brain = reading

    def _gate(self) -> core.Gate:
        brain = self.brain.value
        return core.Gate(
            account_ok=self.view.account_ok,
            account_reason=self.view.account_reason,
            halted=self.halted or (brain is not None and brain.cancels_only),
            # None: the Brain's mode is unknown (missing or invalid): no risk increase.
            mode=brain.mode if brain is not None else None,
        )

    def _on_quote(self, quote: Any, vouched_ns: int, effects: Effects) -> None:
        # vouched_ns: the L1 envelope's ts_ns (a change or a confirmation), not quote_ts_ns.
        outcome = self.prices.on_quote(
            quote.symbol, quote.bid, quote.ask, bid_size=quote.bid_size, ask_size=quote.ask_size, flagged=quote.implausible,
            vouched_ns=vouched_ns,
        )
        if outcome.changed:
            self._save_prices(effects, quote.symbol)
        if outcome.episode_started:  # once per episode; the alert is market data's
            log.warning("implausible quote: not a mark, not a reference", extra={"symbol": quote.symbol, "problem": outcome.problem})
        elif outcome.episode_ended:
            log.info("quotes plausible again", extra={"symbol": quote.symbol})

    def _save_prices(self, effects: Effects, symbol: str) -> None:
        """Saved with the batch: after a restart the collar still has its reference."""
        effects.hset(PRICES, {symbol: json.dumps(self.prices.symbols[symbol].to_json(), separators=(",", ":"))})

    def _risk_view(self, now_ns: int) -> core.RiskView:
        """Every open order at the broker (ours with a broker id, external and orphan ones)
        and every position, at marks by the one rule (qe.marks); execution only gathers
        the inputs: its own trusted prices, the average cost, the universe's reference
        price (else a working order's limit, collar-checked when it was sent)."""
        open_buy: dict[str, int] = {}
        open_sell: dict[str, int] = {}
        limits: dict[str, float] = {}
        working = [(r.symbol, r.side, r.remaining_qty, r.limit_price) for r in self.records.values()
                   if r.live and r.broker_order_id is not None]
        working += [(o.symbol, o.side, max(int(o.qty - o.filled), 0), o.limit_price) for o in self.external_open.values()]
        for symbol, side, qty, limit in working:
            book = open_buy if side == "BUY" else open_sell
            book[symbol] = book.get(symbol, 0) + qty
            if limit:
                limits.setdefault(symbol, limit)
        feed_problem = None if self.view.farm_ok else "a market data farm is broken"
        marks = {}
        for symbol in set(self.positions) | set(open_buy) | set(open_sell):
            instrument = self.universe.get(symbol)
            cost = self.position_costs.get(symbol)
            marks[symbol] = self.prices.mark(
                symbol, now_ns, self.mark_rules,
                avg_cost=cost[1] if cost and cost[0] else None,
                reference=instrument.ref_price if instrument else limits.get(symbol),
                feed_problem=feed_problem,
            )
        return core.risk_view(self.equity, self.positions, open_buy, open_sell, marks)

    def _send_waiting_orders(self, now_ns: int, effects: Effects, only: str | None = None) -> None:
        """PENDING_SUBMIT records without a broker order id: check, number, queue for sending."""
        if not (self.view.usable and self.reconciled):
            return
        waiting = [self.records[only]] if only else [r for r in self.records.values() if r.status == "PENDING_SUBMIT" and r.broker_order_id is None]
        for record in sorted(waiting, key=lambda r: r.created_ns):
            if record.status != "PENDING_SUBMIT" or record.broker_order_id is not None:
                continue
            intent_view = _IntentView.of(record)
            rejection = core.check_new_order(
                intent_view, self._risk_view(now_ns), self.limits, self._gate(), self._adv(record.symbol),
                reference=self.prices.reference(record.symbol),
            )
            if rejection is not None:
                metrics.orders_rejected.labels(rejection.rule).inc()
                log.warning("pre-trade check refused an order", extra={"order_ref": record.order_ref, "rule": rejection.rule, "reason": rejection.reason})
                self._save(effects, core.rejected(record, None, f"{rejection.rule}: {rejection.reason}"))
                continue
            if not self.rate.take(time.monotonic()):
                return  # the order-rate bucket is empty: the rest wait for the next loop
            order_id = self.broker.reserve_order_id(self._max_order_id() + 1)
            numbered = dataclasses.replace(record, broker_order_id=order_id)
            self.by_order_id[order_id] = record.order_ref
            self._save(effects, numbered, publish=False)
            self._queue_place(numbered)
            metrics.orders_sent.inc()

    def _queue_place(self, record: core.OrderRecord) -> None:
        """Place after the commit; until the broker acknowledges it (or ACK_TIMEOUT_S
        passes) reconciliation awaits it instead of sending it again."""
        if self._queued(record.order_ref):
            return  # already queued in this loop
        self.in_flight[record.order_ref] = time.monotonic()
        self.outbox.append(("place", record, self.view.account))

    def _awaited_refs(self, now_s: float) -> frozenset[str]:
        """Places queued or sent on this connection, not yet acknowledged, within the ack timeout."""
        for ref in [ref for ref in self.in_flight if self._acknowledged(ref) or now_s - self.in_flight[ref] >= ACK_TIMEOUT_S]:
            del self.in_flight[ref]
        return frozenset(self.in_flight)

    def _acknowledged(self, ref: str) -> bool:
        record = self.records.get(ref)
        return record is None or record.acknowledged or record.status != "PENDING_SUBMIT"

    def _queued(self, ref: str) -> bool:
        return any(m[0] == "place" and m[1].order_ref == ref for m in self.outbox)

    def _max_order_id(self) -> int:
        return max((r.broker_order_id or 0 for r in self.records.values()), default=0)

    def _adv(self, symbol: str) -> int | None:
        instrument = self.universe.get(symbol)
        return instrument.adv if instrument else None

    # -- lifecycle: cancels, TTL, modifies ---------------------------------------------------------------
    def _request_cancel(self, record: core.OrderRecord, reason: core.CancelReason, now_ns: int, effects: Effects) -> None:
        if not record.live:
            return
        if record.broker_order_id is None:
            # Never sent: nothing to cancel at the broker.
            final = "EXPIRED" if reason == "ttl" else "CANCELLED"
            self._save(effects, dataclasses.replace(record, status=final, cancel_reason=reason))
            return
        if record.status == "PENDING_CANCEL":
            return
        if not self.view.usable or not self.rate.take(time.monotonic()):
            # Not now (rate limit, broker down): remembered and sent by the sweep, never
            # left to the order's TTL (a pulled quote would keep working for a minute).
            self.cancels_wanted[record.order_ref] = reason
            return
        self.cancels_wanted.pop(record.order_ref, None)
        updated = dataclasses.replace(record, status="PENDING_CANCEL", cancel_reason=reason)
        self._save(effects, updated)
        self.outbox.append(("cancel", record.broker_order_id))

    def _expire_and_cancel(self, now_ns: int, effects: Effects) -> None:
        for order_ref, reason in list(self.cancels_wanted.items()):
            record = self.records.get(order_ref)
            if record is None or not record.live or record.status == "PENDING_CANCEL":
                del self.cancels_wanted[order_ref]
                continue
            self._request_cancel(record, reason, now_ns, effects)
        for record in list(self.records.values()):
            if record.live and record.expires_ns <= now_ns and record.status != "PENDING_CANCEL":
                self._request_cancel(record, "ttl", now_ns, effects)

    def _apply_waiting_modifies(self, now_ns: int, effects: Effects) -> None:
        if not (self.view.usable and self.reconciled):
            return
        for record in list(self.records.values()):
            if record.desired_price is None:
                continue
            decision = core.modify_decision(
                record, record.desired_price, now_ns, self.rules.modify_min_price_change, self.rules.modify_min_interval_s
            )
            if decision == "ignore":
                self._save(effects, dataclasses.replace(record, desired_price=None, desired_by=None), publish=False)
                continue
            if decision != "apply" or record.broker_order_id is None:
                continue
            # Checked again when sent: the reference may have moved while the modify waited.
            rejection = self._check_modify(record, record.desired_price, record.qty)
            if rejection is not None:
                self._save(effects, dataclasses.replace(record, desired_price=None, desired_by=None), publish=False)
                self._deny_modify(effects, record, record.desired_by, record.desired_price, rejection)
                continue
            if self.rate.take(time.monotonic()):
                modified = dataclasses.replace(
                    record, limit_price=record.desired_price, desired_price=None, desired_by=None, last_price_change_ns=now_ns
                )
                self._save(effects, modified)
                self.outbox.append(("modify", modified, self.view.account))

    # -- broker news ------------------------------------------------------------------------------------------
    def _drain_inbox(self, now_ns: int, effects: Effects) -> None:
        inbox = self.broker.inbox
        messages = [inbox.popleft() for _ in range(len(inbox))]
        commissions = {m[1]: m[2] for m in messages if m[0] == "commission"}
        for message in messages:
            kind = message[0]
            if kind == "status":
                self._on_status(*message[1:], effects=effects)
            elif kind == "fill":
                self._on_fill(message[1], commissions.get(message[1].exec_id), effects)
            elif kind == "error":
                self._on_error(*message[1:], now_ns=now_ns, effects=effects)
            elif kind == "position":
                self._on_position(*message[1:], now_ns=now_ns, effects=effects)
            elif kind == "account_value":
                self._on_account_value(*message[1:], now_ns=now_ns, effects=effects)
            elif kind == "open_order":
                self._report_external(message[1], now_ns, effects)
            elif kind == "broker_pnl":
                self._on_broker_pnl(*message[1:], now_ns=now_ns, effects=effects)
            elif kind == "disconnected":
                self._on_disconnected()

    def _record_for(self, order_ref: str, order_id: int) -> core.OrderRecord | None:
        ref = order_ref if order_ref in self.records else self.by_order_id.get(order_id)
        return self.records.get(ref) if ref else None

    def _on_status(self, order_ref: str, order_id: int, perm_id: int, ib_status: str, filled: float, local_error: int, effects: Effects) -> None:
        record = self._record_for(order_ref, order_id)
        if record is None:
            if perm_id in self.external_open and not local_error:
                self._track_external(perm_id, self.external_open[perm_id], ib_status, filled)
            return
        if local_error:
            # ib_async's own guess after an error ("Cancelled"): confirm with the broker.
            self.confirm_after_s = time.monotonic() + self.rules.confirm_delay_s
            return
        if perm_id and record.perm_id != perm_id:
            record = dataclasses.replace(record, perm_id=perm_id)
            self._save(effects, record, publish=False)
        new = core.on_broker_status(record, ib_status, filled)
        if new is not None:
            self._save(effects, new)

    def _on_fill(self, fill: BrokerFill, commission: float | None, effects: Effects) -> None:
        record = self._record_for(fill.order_ref, fill.order_id)
        if record is None:
            return
        new = core.on_fill(record, fill.exec_id, fill.qty, fill.price)
        if new is None:
            return  # execId seen before
        failpoints.hit("execution.before_fill_commit")
        self.last_fill_bucket[record.symbol] = record.bucket
        last_fill = Fill(exec_id=fill.exec_id, qty=fill.qty, price=fill.price, ts_ns=fill.ts_ns, commission=commission)
        self._save(effects, new, last_fill=last_fill)
        metrics.fills.inc()
        log.info("fill", extra={"symbol": fill.symbol, "side": fill.side, "qty": fill.qty, "price": fill.price,
                                "exec_id": fill.exec_id, "order_ref": record.order_ref, "commission": commission,
                                "filled_qty": new.filled_qty, "order_qty": new.qty, "status": new.status})

    def _on_error(self, req_id: int, code: int, text: str, now_ns: int, effects: Effects) -> None:
        self.view.last_code = code
        if code == CONNECTIVITY_LOST:
            self.view.connectivity_ok = False
            log.error("broker lost connectivity to IB (1100)", extra={"text": text})
        elif code in (RESTORED_DATA_LOST, RESTORED_DATA_KEPT):
            self.view.connectivity_ok = True
            self.reconciled = False  # orders may have changed while the link was down
            log.warning("broker connectivity restored", extra={"code": code})
        elif code in FARM_BROKEN:
            self.view.farm_ok = False
        elif code in FARM_OK:
            self.view.farm_ok = True
        elif code == PACING:
            log.warning("IB pacing violation", extra={"text": text})
        record_ref = self.by_order_id.get(req_id)
        if record_ref is not None:
            record = self.records[record_ref]
            self._save(effects, core.on_error(record, code, text), publish=False)
            # Logged once, at its level, by BrokerLink ("broker message": 202 after our cancel is info).
            self.confirm_after_s = time.monotonic() + self.rules.confirm_delay_s

    def _on_position(self, account: str, symbol: str, raw_qty: float, avg_cost: float, now_ns: int, effects: Effects) -> None:
        problem = core.broker_position_problem(raw_qty, avg_cost, self.max_quantity)
        if problem is not None:
            # Not saved, not published: the last known position stands (unknown is not zero).
            log.error("absurd position from the broker ignored", extra={"symbol": symbol, "problem": problem})
            # (symbol in the text only: a broker symbol need not fit the contract's Symbol pattern)
            self._alert(effects, now_ns, AlertType.ABSURD_BROKER_VALUE, "error", f"position {symbol[:40]!r}: {problem}; ignored",
                        data={"symbol": symbol[:40]}, key=idempotency_key("alert", "absurd_broker_value", symbol, problem))
            return
        qty = int(raw_qty)
        previous = self.positions.get(symbol, 0)
        known = self.position_costs.get(symbol)
        if known is not None and known == (qty, round(avg_cost, 6)) or (qty == 0 and symbol not in self.positions and known is None):
            return  # the broker repeats positions (connect, reconcile): publish changes only
        self.position_costs[symbol] = (qty, round(avg_cost, 6))
        if qty == 0:
            self.positions.pop(symbol, None)
            bucket = self.position_buckets.pop(symbol, self._bucket_for(symbol))
            effects.hdel(state.POSITIONS, symbol)
        else:
            self.positions[symbol] = qty
            if previous == 0 or symbol not in self.position_buckets or (previous > 0) != (qty > 0):
                # The intent that opened (or flipped) the position gives its bucket.
                self.position_buckets[symbol] = self.last_fill_bucket.get(symbol) or self._bucket_for(symbol)
            bucket = self.position_buckets[symbol]
            stored = state.PositionState(qty=qty, avg_cost=avg_cost, bucket=bucket, account=account)  # type: ignore[arg-type]
            effects.hset(state.POSITIONS, {symbol: state.position_value(stored)})
        payload = Position(account=account, symbol=symbol, qty=qty, avg_cost=round(avg_cost, 6), bucket=bucket)
        effects.publish("ev.positions", self._event(payload, idempotency_key("position", account, symbol, qty, now_ns), now_ns))

    # -- the broker's P&L ------------------------------------------------------------------------------
    def _sync_broker_pnl(self, now_s: float) -> None:
        """reqPnL for the account and reqPnLSingle for each held symbol, once the broker's
        positions are known (after reconciliation, on every connection): new symbols as
        positions appear, cancelled PNL_FLAT_LINGER_S after one goes flat."""
        account = self.view.account
        if not (self.view.usable and self.reconciled and self.view.account_ok and account):
            return
        try:
            self.broker.subscribe_pnl(account)
            held = {symbol for symbol, qty in self.positions.items() if qty}
            for symbol in sorted(held):
                self.pnl_flat_since.pop(symbol, None)
                if symbol not in self.broker.pnl_symbols and not self.broker.subscribe_pnl_single(account, symbol):
                    log.debug("no contract id yet for the broker's P&L", extra={"symbol": symbol})
            for symbol in sorted(set(self.broker.pnl_symbols) - held):
                since = self.pnl_flat_since.setdefault(symbol, now_s)
                if now_s - since >= PNL_FLAT_LINGER_S:
                    self.broker.cancel_pnl_single(account, symbol)
                    self.pnl_flat_since.pop(symbol, None)
        except Exception:  # noqa: BLE001 - the socket may have dropped: subscribed again after reconnecting
            log.exception("broker P&L subscription failed")

    def _on_broker_pnl(self, account: str, symbol: str | None, position: float | None, daily: float | None,
                       unrealized: float | None, realized: float | None, value: float | None, now_ns: int,
                       effects: Effects) -> None:
        """One reqPnL / reqPnLSingle update: published when a figure moved by a cent."""
        if symbol is not None and symbol not in self.universe:
            return  # a symbol outside the universe has no contract Symbol (and no P&L of ours)
        qty = int(position) if position is not None and position == int(position) and abs(position) <= self.max_quantity else None
        if symbol is not None and position is not None and qty is None:
            log.error("absurd position in the broker's P&L ignored", extra={"symbol": symbol, "position": repr(position)})
        figures = (qty, *(None if x is None else round(x, 2) for x in (daily, unrealized, realized, value)))
        if self.published_pnl.get(symbol) == figures:
            return
        self.published_pnl[symbol] = figures
        payload = BrokerPnL(account=account, symbol=symbol, position=qty if symbol is not None else None,
                            daily=daily, unrealized=unrealized, realized=realized, value=value)
        key = idempotency_key("broker_pnl", account, symbol or "account", now_ns)
        effects.publish("ev.broker_pnl", self._event(payload, key, now_ns))

    def _bucket_for(self, symbol: str) -> str:
        instrument = self.universe.get(symbol)
        return instrument.bucket_hint if instrument else self.default_bucket

    def _on_account_value(self, account: str, tag: str, value: float, now_ns: int, effects: Effects) -> None:
        if tag == "NetLiquidation":
            self.equity = core.usable_equity(value)
            if self.equity is None:
                log.error("NetLiquidation is not a finite number: equity unknown, no increases", extra={"value": repr(value)})
            self._publish_account(now_ns, effects, force=False)

    def _publish_account(self, now_ns: int, effects: Effects, force: bool) -> None:
        # Equity goes out only once reconciliation has published the broker's positions
        # (same stream, same commit, positions first): a reader that knows equity knows
        # the whole book, never a partial one that would look like low gross.
        if self.equity is None or not self.view.account or not (self.reconciled or force):
            return
        moved = self.last_equity_published is None or abs(self.equity - self.last_equity_published) >= max(1.0, abs(self.equity) * 1e-4)
        if not (force or moved):
            return
        self.last_equity_published = self.equity
        effects.hset(STATE_EXECUTION, state.encode_fields({"equity": self.equity, "account": self.view.account}))
        payload = Account(account=self.view.account, net_liquidation=self.equity)
        effects.publish("ev.positions", self._event(payload, idempotency_key("account", self.view.account, now_ns), now_ns))

    def _report_external(self, order: BrokerOrder, now_ns: int, effects: Effects) -> None:
        ours = is_our_order_ref(order.order_ref)
        if ours and order.order_ref in self.records:
            return
        self._track_external(order.perm_id, order, order.status, order.filled)
        if (order.perm_id, order.status) in self.reported_external:
            return
        self.reported_external.add((order.perm_id, order.status))
        status = core.IB_STATUS.get(order.status, "SUBMITTED")
        payload = Order(
            order_ref=order.order_ref or f"ext-{order.perm_id}",
            broker_order_id=order.order_id,
            perm_id=order.perm_id,
            symbol=order.symbol,
            side="BUY" if order.side == "BUY" else "SELL",
            qty=int(order.qty),
            limit_price=order.limit_price or None,
            bucket=self._bucket_for(order.symbol),
            status=status,
            filled_qty=int(order.filled),
            remaining_qty=max(int(order.qty - order.filled), 0),
            external=True,
        )
        key = idempotency_key("order", "external", order.perm_id, status)
        effects.publish("ev.orders", self._event(payload, key, now_ns))
        kind = AlertType.ORPHAN_ORDER if ours else AlertType.EXTERNAL_ORDER
        self._alert(effects, now_ns, kind, "warning",
                    f"{'our orderRef without a record' if ours else 'order not placed by quant-engine'}: "
                    f"{order.side} {order.qty:g} {order.symbol} (permId {order.perm_id}, client {order.client_id}); left alone",
                    symbol=order.symbol, data={"perm_id": order.perm_id, "status": order.status},
                    key=idempotency_key("alert", kind, order.perm_id))

    def _track_external(self, perm_id: int, order: BrokerOrder, ib_status: str, filled: float) -> None:
        status = core.IB_STATUS.get(ib_status, "SUBMITTED")
        if not perm_id or status in TERMINAL_ORDER_STATUSES or not order.open:
            self.external_open.pop(perm_id, None)
        else:
            self.external_open[perm_id] = dataclasses.replace(order, status=ib_status, filled=filled)

    # -- connection and reconciliation ---------------------------------------------------------------------
    def _on_connected(self) -> None:
        self.view.socket_up = True
        self.view.connectivity_ok = True
        self.reconciled = False
        self._check_account()
        log.info("broker connected", extra={"account": self.view.account, "account_ok": self.view.account_ok})

    def _check_account(self) -> None:
        account = self.broker.account(self.settings.ib_account)
        ok, reason = core.account_interlock(account, self.settings.ib_mode, frozenset(self.settings.ib_live_accounts))
        self.view.account, self.view.account_ok, self.view.account_reason = account, ok, reason
        if not ok:
            log.error("account interlock: orders refused", extra={"reason": reason})

    def _on_disconnected(self) -> None:
        if self.view.socket_up:
            log.warning("broker disconnected")
        self.view.socket_up = False
        self.reconciled = False
        self.broker.forget_pnl()  # re-subscribed once reconnected and reconciled
        self.pnl_flat_since = {}
        # Sends on the lost connection may never have arrived: reconciliation decides anew.
        self.in_flight = {ref: sent for ref, sent in self.in_flight.items() if self._queued(ref)}

    def _reconcile(self, now_ns: int, effects: Effects) -> None:
        session_start = datetime.fromtimestamp(now_ns / 1e9, tz=NEW_YORK).replace(hour=0, minute=0, second=0, microsecond=0)
        try:
            broker_orders, broker_fills = self.broker.snapshot(session_start)
            positions = self.broker.positions()
            values = self.broker.account_values()
        except Exception:  # noqa: BLE001 - the link dropped mid-way: try again once reconnected
            log.exception("reconciliation failed")
            return
        now_s = time.monotonic()
        awaited = self._awaited_refs(now_s)
        result = reconcile(self.records, broker_orders, broker_fills, now_ns, in_flight=awaited)
        self.external_open = {}  # the broker's full list follows: external and orphan open orders
        if result.awaiting_ack:
            # Look again once their acks are due: resubmitted then only if still unknown.
            due = min(self.in_flight[ref] for ref in result.awaiting_ack) + ACK_TIMEOUT_S
            self.confirm_after_s = due if self.confirm_after_s is None else min(self.confirm_after_s, due)
            log.info("awaiting acknowledgements before any resubmission", extra={"order_refs": result.awaiting_ack})
        # Every change in the order it happened: one event per recovered fill (each execId
        # once: the record keeps the execIds it applied), one per status change.
        for step in result.steps:
            record, fill = step.record, step.fill
            if record.broker_order_id is not None:
                self.by_order_id[record.broker_order_id] = record.order_ref
            if fill is not None:
                self.last_fill_bucket[fill.symbol] = record.bucket
                metrics.fills.inc()
            last_fill = Fill(exec_id=fill.exec_id, qty=fill.qty, price=fill.price, ts_ns=fill.ts_ns) if fill else None
            self._save(effects, record, last_fill=last_fill)
        for ref in result.expired:
            self._save(effects, dataclasses.replace(self.records[ref], status="EXPIRED", reject_reason="ttl: expired before the broker had it"))
        for ref in result.rejected:
            record = self.records[ref]
            self._save(effects, core.rejected(record, record.last_error_code, record.last_error_text or "rejected by the broker"))
        for ref in result.vanished:
            record = self.records[ref]
            self._save(effects, dataclasses.replace(record, status="CANCELLED", reject_reason="not found at the broker on reconciliation"))
            self._alert(effects, now_ns, AlertType.ORDER_VANISHED, "warning", f"{ref} was live but the broker no longer knows it", symbol=record.symbol)
        for ref in result.resubmit:
            record = self.records[ref]
            if record.limit_price is not None:
                # Priced when first sent; the market may have moved since: the collar again.
                refused = core.check_price(record.symbol, record.qty, record.limit_price, self.prices.reference(record.symbol), self.limits)
                if refused is not None:
                    metrics.orders_rejected.labels(refused.rule).inc()
                    self._save(effects, core.rejected(record, None, f"{refused.rule}: not resubmitted: {refused.reason}"))
                    continue
            if record.broker_order_id is not None:
                # Same broker order id: if the first send did reach the broker after all,
                # this is a modify of that order, never a second one.
                self._queue_place(record)
                log.warning("resubmitting an order the broker does not have", extra={"order_ref": ref})
        for order in result.external + result.orphans:
            self._report_external(order, now_ns, effects)
        broker_symbols = set()
        for account, symbol, qty, avg_cost in positions:
            broker_symbols.add(symbol)
            self._on_position(account, symbol, qty, avg_cost, now_ns, effects)
        for symbol in set(self.positions) - broker_symbols:
            self._on_position(self.view.account or "", symbol, 0, 0.0, now_ns, effects)
        for _account, tag, value in values:
            if tag == "NetLiquidation":
                self.equity = core.usable_equity(value)
        self._publish_account(now_ns, effects, force=True)
        self.reconciled = True
        log.info(
            "reconciled with the broker",
            extra={
                "orders_changed": len(result.records), "fills_recovered": len(result.fills), "resubmitted": len(result.resubmit),
                "expired": len(result.expired), "rejected": len(result.rejected), "vanished": len(result.vanished),
                "external": len(result.external), "positions": len(positions),
            },
        )

    def _publish_broker_state(self, now_ns: int, effects: Effects) -> None:
        view = self.view
        snapshot = (view.usable, view.account_ok, view.farm_ok, view.account)
        if snapshot == self.published_broker_state:
            return
        self.published_broker_state = snapshot
        if not view.socket_up:
            reason = f"disconnected ({self.broker.last_error or 'connecting'})"
        elif not view.connectivity_ok:
            reason = "IB lost connectivity (1100)"
        elif not view.account_ok:
            reason = f"account interlock: {view.account_reason}"
        else:
            reason = "connected" + ("" if view.farm_ok else "; a market data farm is broken")
        payload = BrokerState(
            connected=view.usable,
            orders_allowed=view.usable and view.account_ok,
            account=view.account,
            mode=self.settings.ib_mode,
            data_farm_ok=view.farm_ok,
            last_code=view.last_code,
            reason=reason,
        )
        event = self._event(payload, idempotency_key("broker", SOURCE, now_ns), now_ns)
        effects.publish("ev.broker", event)
        effects.hset(state.BROKER, state.snapshot_fields(event))
        metrics.broker_connected.set(1 if view.usable else 0)
        # broker_down / broker_up alerts are qe-alerts' (hold-off, rate limit, resolution).

    # -- records and events ------------------------------------------------------------------------------------
    def _save(self, effects: Effects, record: core.OrderRecord, publish: bool = True, last_fill: Fill | None = None) -> None:
        previous = self.records.get(record.order_ref)
        self.records[record.order_ref] = record
        effects.hset(state.ORDERS, {record.order_ref: state.order_value(record.to_json())})
        if not publish:
            return
        if previous is not None and last_fill is None and _same_public_state(previous, record):
            return
        payload = Order(
            order_ref=record.order_ref,
            broker_order_id=record.broker_order_id,
            perm_id=record.perm_id,
            intent_key=record.intent_key,
            symbol=record.symbol,
            side=record.side,
            qty=record.qty,
            limit_price=record.limit_price,
            bucket=record.bucket,
            status=record.status,
            filled_qty=record.filled_qty,
            remaining_qty=record.remaining_qty,
            avg_fill_price=record.avg_fill_price,
            last_fill=last_fill,
            reject_code=record.reject_code,
            reject_reason=record.reject_reason,
        )
        if last_fill is not None:
            key = idempotency_key("fill", last_fill.exec_id)
        else:
            key = idempotency_key("order", record.order_ref, record.status, record.filled_qty, record.limit_price)
        now_ns = self.clock.now_ns()
        effects.publish("ev.orders", self._event(payload, key, now_ns))
        if record.status == "REJECTED":
            self._alert(effects, now_ns, AlertType.ORDER_REJECTED, "warning",
                        f"{record.order_ref} {record.side} {record.qty} {record.symbol}: {record.reject_reason}",
                        symbol=record.symbol, data={"code": record.reject_code, "intent_key": record.intent_key},
                        key=idempotency_key("alert", "order_rejected", record.order_ref))

    def _alert(self, effects: Effects, now_ns: int, alert_type: AlertType, severity: str, message: str,
               symbol: str | None = None, data: dict | None = None, key: str | None = None) -> None:
        # Execution's alerts are one-off events (raised, never resolved).
        payload = Alert(alert_type=alert_type, state=RAISED, severity=severity, symbol=symbol, message=message, data=data or {})
        effects.publish("ev.alerts", self._event(payload, key or idempotency_key("alert", alert_type, now_ns), now_ns))

    def _event(self, payload: Any, key: str, now_ns: int) -> Envelope:
        return make_event(payload, idempotency_key=key, source=SOURCE, ts_ns=now_ns)

    def _refresh_order_gauges(self) -> None:
        counts: dict[str, int] = {}
        for record in self.records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        for status in ("PENDING_SUBMIT", "SUBMITTED", "PARTIALLY_FILLED", "FILLED", "PENDING_CANCEL", "CANCELLED", "REJECTED", "EXPIRED"):
            metrics.orders_by_status.labels(status).set(counts.get(status, 0))


def _same_public_state(a: core.OrderRecord, b: core.OrderRecord) -> bool:
    return (a.status, a.filled_qty, a.limit_price, a.broker_order_id) == (b.status, b.filled_qty, b.limit_price, b.broker_order_id)


@dataclass(frozen=True)
class _IntentView:
    """The fields of an intent the pre-trade checks read, rebuilt from a record."""

    symbol: str
    side: str
    qty: int
    limit_price: float | None
    classification: str

    @classmethod
    def of(cls, record: core.OrderRecord) -> "_IntentView":
        return cls(record.symbol, record.side, record.qty, record.limit_price, record.classification)
