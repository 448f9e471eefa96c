"""The Brain's stream handler: the imperative shell around `engine.decide`.

It maps every event to the plain `BrainView`, calls the pure core on a cadence, and
records what the core decided as effects (intents, alerts, state hashes) that the
stream runtime commits atomically with the batch's acks. In-memory state is a cache
of the Redis hashes (layout and codecs: `codecs.py`); `load()` rebuilds it after a
start or a failed commit.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import redis

from qe import daemon, metrics, operator_ack
from qe import state as qe_state
from qe.alert_types import (
    FEED_PRINTS_STALE,
    FEED_QUOTES_STALE,
    RAISED,
    RESOLVED,
    SYMBOL_PRINTS_STALE,
    SYMBOL_QUOTES_STALE,
    AlertState,
    AlertType,
)
from qe.contracts import (
    MODES,
    Alert,
    DecisionJournal,
    Envelope,
    JournalStep,
    idempotency_key,
    make_event,
    order_ref_for,
)
from qe.streams import Effects
from qe.universe import liquidity_cap

from . import guards
from .codecs import (
    GENERATIONS,
    INPUTS,
    MARKETS,
    OUTSTANDING,
    POSITIONS,
    QUARANTINE,
    REJECTED,
    SETTLING,
    SKIPS,
    STATE,
    WHY,
    WHY_TTL_S,
    decode_position,
    decode_record,
    dumps,
    encode_position,
    encode_record,
    decode_exposure,
    decode_market,
    decode_session,
    decode_state,
    decode_value,
    encode_market,
    encode_snap,
    encode_state,
    exposure_snap,
    session_snap,
)
from .engine import BrainView, Decision, EngineRules, decide, skip_field
from .model import NS, Market, PositionView, included
from .modes import MODE_SEVERITY
from .strategies import GrpanMarketMaker

log = logging.getLogger("qe.decision")

SOURCE = "decision"
JOURNAL_STREAM = "ev.decision_journal"
STREAMS = (
    "ev.control",
    "ev.broker",
    "ev.session",
    "ev.exposure",
    "ev.positions",
    "ev.orders",
    "ev.alerts",
    "ev.features",
    "ev.l1",
)


class DecisionHandler:
    streams = STREAMS

    def __init__(self, context: daemon.Context) -> None:
        self.context = context
        self.clock = context.clock
        self.rules = context.rules
        self.engine_rules = EngineRules.from_rules(context.rules)
        self.tick_interval_s = context.rules.decision.tick_interval_s
        instruments = context.universe()
        self.universe = {symbol: inst.bucket_hint for symbol, inst in instruments.items()}
        self.reference_prices = {symbol: inst.ref_price for symbol, inst in instruments.items()}
        limits = context.rules.execution
        self.order_caps = {
            symbol: liquidity_cap(inst.adv, limits.liquidity_adv_divisor, limits.liquidity_min_shares)
            for symbol, inst in instruments.items()
        }
        self.mm = next((s for s in self.engine_rules.strategies if isinstance(s, GrpanMarketMaker)), None)
        self.view = BrainView(universe=dict(self.universe), order_caps=self.order_caps, reference_prices=self.reference_prices)
        self.dirty = True
        self.last_eval_ns = 0
        self.dirty_markets: set[str] = set()
        self.markets_flushed_ns = 0
        self.quick_allowed = False  # last full evaluation: NORMAL and increases allowed
        self.strategy_signature: tuple | None = None
        self.strategy_refresh_ns = 0
        self.strategy_dirty: set[str] = set()  # market moved while the per-symbol path was off
        self.plausibility = context.rules.plausibility
        # Episodes already logged (once per episode, not once per event or evaluation).
        self.logged_inputs: dict[str, str] = {}  # "kind|symbol" -> problem of the rejected input
        self.logged_errors: dict[str, str] = {}  # symbol -> evaluation error
        self.evaluation_failure: str | None = None
        # Feed-wide stale alerts raised and not yet over (type -> alert ts_ns): while any
        # stands no quote is current (SPEC 6 Marks). Over with its resolve or, for those
        # that say no quote can arrive, with a quote vouched for after the raise
        # (guards.feed_episodes_standing). Kept in state:decision:inputs.
        self.stale_feeds: dict[str, int] = {}
        # The clock reading of the step in hand (handle, tick, load): read once per step and
        # used for everything the step does, so the journal's reading reproduces it.
        self.now_ns = 0
        # The decision journal (docs/archive.md): every step since the last commit, in the
        # order run, with its clock reading; `before_commit` writes it atomically with the
        # batch. `qe replay` follows it (and turns recording off).
        self.record_journal = True
        self.journal: list[JournalStep] = []

    # -- state -----------------------------------------------------------------------------
    def load(self, r: redis.Redis) -> None:
        self.now_ns = now = self.clock.now_ns()
        view = BrainView(universe=dict(self.universe), order_caps=self.order_caps, reference_prices=self.reference_prices)
        view.state = decode_state(r.hgetall(STATE))
        for _key, raw in r.hgetall(OUTSTANDING).items():
            view.put_record(decode_record(raw))
        view.generations = {k.decode(): int(v) for k, v in r.hgetall(GENERATIONS).items()}
        inputs = r.hgetall(INPUTS)
        if b"session" in inputs:
            view.session = decode_session(inputs[b"session"])
        # Saved state is re-checked too (it may predate these guards): nothing absurd is reloaded.
        plaus = self.plausibility
        if b"exposure" in inputs:
            view.exposure = decode_exposure(inputs[b"exposure"])
            problem = guards.exposure_problem(view.exposure, plaus)
            if problem is not None and view.exposure.problem is None:
                view.exposure = guards.unknown_exposure(view.exposure, problem)
        if b"exposure_good" in inputs:
            good = decode_exposure(inputs[b"exposure_good"])
            view.good_exposure = good if guards.exposure_problem(good, plaus) is None else None
        elif view.exposure is not None and view.exposure.problem is None:
            view.good_exposure = view.exposure
        self.stale_feeds = decode_value(inputs[b"stale_feeds"]) if b"stale_feeds" in inputs else {}
        if b"account_equity" in inputs:
            equity = decode_value(inputs[b"account_equity"])
            view.account_equity = equity if guards.equity_ok(equity) else None
        view.input_problems = {k.decode(): v.decode() for k, v in r.hgetall(QUARANTINE).items()}
        for key, raw in r.hgetall(POSITIONS).items():
            symbol, (qty, bucket, saved_cost) = key.decode(), decode_position(raw)
            avg_cost = saved_cost if saved_cost is not None and guards.price_ok(saved_cost, plaus) else None
            if guards.qty_ok(qty, plaus, signed=True):
                view.positions[symbol] = PositionView(qty, bucket, avg_cost)
            else:
                view.input_problems[symbol] = "absurd_quantity"
        for key, raw in r.hgetall(MARKETS).items():
            market = decode_market(raw)
            if guards.market_problem(market, plaus) is None:
                view.markets[key.decode()] = market
        stored_markets = dict(view.markets)
        # The market cache is flushed on a cadence; after a failed commit (same process)
        # keep what is newer in memory: it came from events, judged by their own times.
        for symbol, market in self.view.markets.items():
            stored = view.markets.get(symbol)
            if stored is None or max(market.quote_ts_ns, market.feature_ts_ns) >= max(stored.quote_ts_ns, stored.feature_ts_ns):
                view.markets[symbol] = market
        view.settling = {k.decode(): int(v) for k, v in r.hgetall(SETTLING).items()}
        view.rejected = {k.decode(): int(v) for k, v in r.hgetall(REJECTED).items()}
        view.reported_skips = {k.decode() for k in r.hkeys(SKIPS)}
        for record in view.outstanding.values():
            # Our own times, but never ahead of our clock (a clock that went back, a bad record).
            record.issued_ns = min(record.issued_ns, now)
            record.last_change_ns = min(record.last_change_ns, now)
            record.last_order_ts_ns = min(record.last_order_ts_ns, now)
        view.refresh_unseen(now, self.rules.decision.unacked_grace_s)
        self.view = view
        # The loaded state lives as long as the process: keep it out of the cyclic
        # collector's full passes (they would otherwise grow with the universe).
        gc.collect()
        gc.freeze()
        self.dirty = True
        self.dirty_markets = set(view.markets) - set(stored_markets)
        self.last_eval_ns = 0
        self.quick_allowed = False
        self.strategy_signature = None
        self.strategy_dirty = set()
        self._set_mode_metric(view.state.mode)
        # Steps not committed are void (their batch is re-read); the load is a step itself.
        self.journal = [JournalStep(kind="load", now_ns=now)] if self.record_journal else []
        log.info(
            "state loaded",
            extra={"mode": view.state.mode, "outstanding": len(view.outstanding), "halted": view.state.halted,
                   "trading_day": view.state.trading_day},
        )

    # -- events ----------------------------------------------------------------------------
    def handle(self, event: Envelope, effects: Effects) -> None:
        self.now_ns = now = self.clock.now_ns()
        self._handle(event, effects, now)
        # Recorded only once handled: an entry whose handler raised is rolled back and retried.
        if self.record_journal and effects.entry is not None:
            self.journal.append(JournalStep(kind="handle", now_ns=now, stream=effects.entry.stream, id=effects.entry.entry_id))

    def _handle(self, event: Envelope, effects: Effects, now: int) -> None:
        kind = event.type
        payload = event.payload
        view = self.view
        if kind == "l1":
            # The quote is recorded as received (an absurd or flagged one as present but
            # unusable); the engine judges it by the quote gate before any use.
            market = view.markets.setdefault(payload.symbol, Market())
            # Current = vouched for by market data within l1_max_age_s: the envelope's ts_ns
            # (a change or a confirmation), never quote_ts_ns (when it last changed).
            problem = guards.apply_l1(market, payload, event.ts_ns, now, self.plausibility)
            if self.stale_feeds:
                self._feed_vouched(event.ts_ns, now, effects)
            if self.stale_feeds:
                market.quote_ts_ns = 0  # the feed is stale: recorded, but not current
            self._log_input("quote", payload.symbol, problem)
            self._market_moved(payload.symbol, event, effects, now)
            return
        if kind == "feature":
            market = view.markets.setdefault(payload.symbol, Market())
            problem = guards.apply_feature(market, payload, event.ts_ns, now, self.plausibility)
            self._log_input("feature", payload.symbol, problem)
            if problem is None:
                self._market_moved(payload.symbol, event, effects, now)
            return
        if kind == "alert":
            self._handle_alert(event, effects)
            return
        if kind == "session":
            view.session = session_snap(event, now)
            effects.hset(INPUTS, {"session": encode_snap(view.session)})
        elif kind == "exposure":
            self._on_exposure(event, effects, now)
        elif kind == "position":
            if not self._on_position(payload, effects):
                return
        elif kind == "account":
            if not guards.equity_ok(payload.net_liquidation):
                self._log_input("account", "", "absurd net_liquidation")
                return  # unknown, not zero: the last known equity (or none) stands
            view.account_equity = payload.net_liquidation
            effects.hset(INPUTS, {"account_equity": dumps(payload.net_liquidation)})
        elif kind == "order":
            if not self._handle_order(event, effects, effects.entry.entry_id if effects.entry else None):
                return
        elif kind == "broker":
            state = view.state
            state.broker_connected = payload.connected
            state.broker_reason = payload.reason or (f"code {payload.last_code}" if payload.last_code else "")
            state.broker_ts_ns = guards.received_ns(event.ts_ns, now)
            metrics.broker_connected.set(1 if payload.connected else 0)
            effects.hset(STATE, {k: v for k, v in encode_state(state).items() if k.startswith("broker_")})
        elif kind == "control":
            self._handle_control(event, effects)
            self._evaluate(now, effects, event)  # the kill switch acts at once
            operator_ack.acknowledge(effects, "decision", event, halted=self.view.state.halted, mode=self.view.state.mode)
            return
        else:
            return
        self.dirty = True
        if now - self.last_eval_ns >= self.rules.decision.evaluate_min_gap_s * NS:
            self._evaluate(now, effects, event)

    def _handle_order(self, event: Envelope, effects: Effects, entry_id: str | None) -> bool:
        order = event.payload
        record = self.view.outstanding.get(order.intent_key) if order.intent_key else None
        if record is None:
            return False  # not ours (external, or pruned long ago): nothing to follow
        if not guards.qty_ok(order.filled_qty, self.plausibility):
            self._log_input("order", record.symbol, "absurd filled_qty")
            return False
        ts = guards.received_ns(event.ts_ns, self.now_ns)  # execution's time, bounded by ours
        if record.filled_qty < order.filled_qty:
            self.view.settling[record.symbol] = ts
            effects.hset(SETTLING, {record.symbol: ts})
        if order.status == "REJECTED" and record.status != "REJECTED":
            self.view.rejected[record.symbol] = ts
            effects.hset(REJECTED, {record.symbol: ts})
            log.warning("execution rejected an intent; symbol cools down",
                        extra={"intent": record.key, "symbol": record.symbol, "reason": order.reject_reason})
        record.status = order.status
        record.filled_qty = max(record.filled_qty, order.filled_qty)
        record.last_order_ts_ns = max(record.last_order_ts_ns, ts)
        # Which ev.orders entry the Brain read: the exposure snapshot includes it once its
        # `orders_through` reaches this id (stream ids, not clocks).
        if entry_id is not None and not included(entry_id, record.last_order_id):
            record.last_order_id = entry_id
        if order.limit_price is not None and not record.cancel_sent and guards.price_ok(order.limit_price, self.plausibility):
            record.limit_price = order.limit_price
        self.view.put_record(record)
        effects.hset(OUTSTANDING, {record.key: encode_record(record)})
        return True

    def _on_exposure(self, event: Envelope, effects: Effects, now: int) -> None:
        """Unknown is not zero: an unusable snapshot is kept only as "unknown, since when,
        why" (no numbers reach saved state); the last good one stays for de-risk."""
        view = self.view
        snap = exposure_snap(event, now)
        problem = guards.exposure_problem(snap, self.plausibility)
        if problem is not None:
            view.exposure = guards.unknown_exposure(snap, problem)
            effects.hset(INPUTS, {"exposure": encode_snap(view.exposure)})
            self._log_input("exposure", "", problem)
        else:
            view.exposure = view.good_exposure = snap
            encoded = encode_snap(snap)
            effects.hset(INPUTS, {"exposure": encoded, "exposure_good": encoded})
            self._log_input("exposure", "", None)
            metrics.exposure_gross.set(snap.gross_pct / 100)  # type: ignore[operator]
        view.refresh_unseen(now, self.rules.decision.unacked_grace_s)

    def _on_position(self, position: Any, effects: Effects) -> bool:
        """An absurd position never reaches the view or state:decision:positions: the
        symbol is quarantined (skipped, risk increases blocked) until a sane one comes."""
        view, symbol = self.view, position.symbol
        problem = guards.position_problem(position.qty, position.avg_cost, self.plausibility)
        self._log_input("position", symbol, problem)
        if problem is not None:
            if view.input_problems.get(symbol) != problem:
                view.input_problems[symbol] = problem
                effects.hset(QUARANTINE, {symbol: problem})
            return True  # evaluate: the symbol is now unknown
        if view.input_problems.pop(symbol, None) is not None:
            effects.hdel(QUARANTINE, symbol)
        view.positions[symbol] = PositionView(position.qty, position.bucket, position.avg_cost or None)
        effects.hset(POSITIONS, {symbol: encode_position(position.qty, position.bucket, position.avg_cost)})
        if view.settling.pop(symbol, None) is not None:
            effects.hdel(SETTLING, symbol)
        return True

    def _log_input(self, kind: str, symbol: str, problem: str | None) -> None:
        """Log a rejected or implausible input once per episode (start and end)."""
        key = f"{kind}|{symbol}"
        before = self.logged_inputs.get(key)
        if problem == before:
            return
        if problem is None:
            self.logged_inputs.pop(key, None)
            log.info("input plausible again", extra={"input": kind, "symbol": symbol or None, "was": before})
            return
        self.logged_inputs[key] = problem
        log.warning("input rejected or implausible; not used", extra={"input": kind, "symbol": symbol or None,
                                                                        "problem": problem})

    def _handle_control(self, event: Envelope, effects: Effects) -> None:
        control = event.payload
        state = self.view.state
        state.halted = control.command == "halt"
        state.halt_reason = control.reason
        state.halt_operator = control.operator
        log.warning("operator control", extra={"command": control.command, "reason": control.reason, "operator": control.operator})
        effects.hset(STATE, qe_state.halt_fields(state.halted, state.halt_reason, state.halt_operator))

    def _handle_alert(self, event: Envelope, effects: Effects) -> None:
        """Stale-data alerts (qe.alert_types): a raised one makes the data it names not
        current; a resolved one never makes anything current (only newer data does),
        except that it ends a feed-wide episode (so may a newer quote: `_feed_vouched`).
        Every other alert is not the Brain's."""
        alert = event.payload
        if event.source == SOURCE:
            return
        kind = alert.alert_type
        if kind in FEED_QUOTES_STALE:
            self._feed_stale(kind, alert.state, event, effects)
            return
        if alert.state != RAISED:
            return
        if kind in SYMBOL_QUOTES_STALE or kind in SYMBOL_PRINTS_STALE:
            if alert.symbol is None:
                log.warning("per-symbol stale alert without a symbol ignored", extra={"alert_type": kind.value})
                return
            self._make_stale([alert.symbol], kind in SYMBOL_QUOTES_STALE, kind in SYMBOL_PRINTS_STALE, before_ns=event.ts_ns)
        elif kind in FEED_PRINTS_STALE:
            self._make_stale(list(self.view.markets), False, True, before_ns=event.ts_ns)

    def _feed_stale(self, kind: AlertType, state: AlertState, event: Envelope, effects: Effects) -> None:
        if state == RAISED:
            if kind.value not in self.stale_feeds:
                log.warning("feed stale: no quote is current", extra={"alert_type": kind.value})
            self.stale_feeds[kind.value] = event.ts_ns
            self._make_stale(list(self.view.markets), True, False, before_ns=None)
        elif self.stale_feeds.pop(kind.value, None) is not None:
            log.info("feed stale episode resolved", extra={"alert_type": kind.value, "still": sorted(self.stale_feeds)})
        effects.hset(INPUTS, {"stale_feeds": dumps(self.stale_feeds)})

    def _feed_vouched(self, vouched_ns: int, now: int, effects: Effects) -> None:
        """A quote market data vouched for at `vouched_ns` ends the feed-wide episodes it
        proves over (guards.feed_episodes_standing), resolve or not."""
        standing = guards.feed_episodes_standing(self.stale_feeds, vouched_ns, now)
        if standing == self.stale_feeds:
            return
        for kind in sorted(set(self.stale_feeds) - set(standing)):
            log.info("feed stale episode ended by a newer quote",
                     extra={"alert_type": kind, "raised_ns": self.stale_feeds[kind], "vouched_ns": vouched_ns,
                            "still": sorted(standing)})
        self.stale_feeds = standing
        effects.hset(INPUTS, {"stale_feeds": dumps(self.stale_feeds)})

    def _make_stale(self, symbols: list[str], quotes: bool, prints: bool, before_ns: int | None) -> None:
        """Data received up to the alert's time (`before_ns`; None: everything received so
        far) is no longer current: only newer data revives it."""
        for symbol in symbols:
            market = self.view.markets.get(symbol)
            if market is None:
                continue
            if quotes and (before_ns is None or market.quote_ts_ns <= before_ns):
                market.quote_ts_ns = 0
            if prints and (before_ns is None or market.truth_ts_ns <= before_ns):
                market.truth_ts_ns = 0
            self.dirty_markets.add(symbol)
        self.dirty = True

    def _market_moved(self, symbol: str, event: Envelope, effects: Effects, now: int) -> None:
        self.dirty_markets.add(symbol)
        if self.mm is None or not self.mm.quotes_symbol(symbol, self.view.universe):
            return
        if not self.quick_allowed:
            self.strategy_dirty.add(symbol)  # the next full evaluation looks at it
            return
        if not self._quote_would_change(symbol, now):
            return
        decision = self._decide(now, effects, event, full=False, symbols=(symbol,))
        if decision is not None:
            self._run(decision, now, effects, event, "symbol")

    def _quote_would_change(self, symbol: str, now: int) -> bool:
        """Cheap pre-check: is a quote missing, is the market's quote implausible (the
        quotes are pulled), or has GRPAN moved a live quote beyond the re-quote
        threshold? Most market events change nothing."""
        market = self.view.markets.get(symbol)
        if market is None or market.grpan is None:
            return False
        cfg = self.mm.config  # type: ignore[union-attr]
        wanted = {"MM_BID": market.grpan - cfg.edge, "MM_ASK": market.grpan + cfg.edge}
        live = {}
        for key in self.view.by_symbol.get(symbol, ()):
            record = self.view.outstanding[key]
            if record.slot in wanted and record.live(now, self.rules.decision.unacked_grace_s):
                live[record.slot] = record
        if len(live) < 2:
            return True
        if guards.quote_problem(market, self.plausibility) is not None:
            return True  # an implausible quote (wide, stub, crossed ...): the strategy pulls its quotes now
        paced = self.rules.decision.reprice_min_interval_s * NS
        for slot, record in live.items():
            if record.cancel_sent or record.limit_price is None:
                return True
            moved = abs(record.limit_price - wanted[slot]) >= cfg.requote_threshold - 1e-9
            # A re-quote inside the pacing interval could not be sent anyway; a later
            # market event (or the periodic full evaluation) picks it up.
            if moved and now - record.last_change_ns >= paced:
                return True
        return False

    # -- periodic --------------------------------------------------------------------------
    def tick(self, now_ns: int, effects: Effects) -> None:
        self.now_ns = now_ns
        acted = False
        # Market state is a cache of ev.l1/ev.features, judged by its own timestamps:
        # flushed on a cadence (coalescing many events per symbol), not per event.
        if self.dirty_markets and now_ns - self.markets_flushed_ns >= self.rules.decision.market_flush_interval_s * NS:
            effects.hset(MARKETS, {s: encode_market(self.view.markets[s]) for s in self.dirty_markets if s in self.view.markets})
            self.dirty_markets = set()
            self.markets_flushed_ns = now_ns
            acted = True
        interval = self.rules.decision.evaluate_interval_s * NS
        if self.dirty or now_ns - self.last_eval_ns >= interval:
            self._evaluate(now_ns, effects, None)
            acted = True
        # A tick that did nothing changed nothing: it need not be journaled.
        if acted and self.record_journal:
            self.journal.append(JournalStep(kind="tick", now_ns=now_ns))

    def before_commit(self, effects: Effects) -> None:
        """The journal of the steps since the last commit, committed with their effects."""
        if not self.journal:
            return
        steps, self.journal = self.journal, []
        first = steps[0]
        key = idempotency_key("decision-journal", first.now_ns, first.kind, first.id or "", len(steps))
        effects.publish(JOURNAL_STREAM, make_event(DecisionJournal(steps=steps), idempotency_key=key, source=SOURCE,
                                                   ts_ns=steps[-1].now_ns))

    # -- the decision step -----------------------------------------------------------------
    def _evaluate(self, now: int, effects: Effects, trigger: Envelope | None) -> None:
        # Per-symbol strategies (market making) are re-run for every symbol only when
        # what governs them changed, or on the refresh interval; otherwise the
        # per-symbol path has already handled each market move as it came.
        state = self.view.state
        exposure = self.view.exposure
        signature = (state.mode, state.trading_day, state.halted, state.broker_connected,
                     exposure.snapshot_id if exposure else None, self.quick_allowed)
        refresh = self.rules.decision.strategy_refresh_interval_s * NS
        if signature != self.strategy_signature or now - self.strategy_refresh_ns >= refresh:
            symbols = None
            self.strategy_refresh_ns = now
        else:
            symbols = sorted(self.strategy_dirty)
        # The potential book is rebuilt from scratch whenever everything is re-run.
        decision = self._decide(now, effects, trigger, full=True, symbols=symbols, reuse_book=symbols is not None)
        if decision is None:
            # Retried on the evaluation interval; the event that triggered it is handled.
            self.dirty = False
            self.last_eval_ns = now
            self.quick_allowed = False
            return
        self._run(decision, now, effects, trigger, "full")
        self.strategy_dirty = set()
        self.dirty = False
        self.last_eval_ns = now
        self.quick_allowed = decision.state.mode == "NORMAL" and not decision.trace.get("increases_blocked")
        state = decision.state
        self.strategy_signature = (state.mode, state.trading_day, state.halted, state.broker_connected,
                                   exposure.snapshot_id if exposure else None, self.quick_allowed)

    def _decide(self, now: int, effects: Effects, trigger: Envelope | None, **kwargs: Any) -> Decision | None:
        """`decide`, contained: an evaluation error never fails the batch (unrelated good
        events would be retried and dead-lettered). The pure core already contains
        per-symbol errors; this is the last resort, logged and alerted once per episode."""
        try:
            decision = decide(self.view, self.engine_rules, now, **kwargs)
        except Exception as exc:  # noqa: BLE001 - contained: reported, retried on the next evaluation
            text = f"{type(exc).__name__}: {exc}"[:300]
            if text != self.evaluation_failure:
                self.evaluation_failure = text
                log.exception("evaluation failed; nothing decided this time (retried)")
                self._alert(effects, AlertType.DECISION_EVALUATION_FAILED, RAISED, "critical", f"decision evaluation failed: {text}",
                            {"error": text}, idempotency_key("decision-failed", self.view.state.trading_day, now),
                            trigger)
            return None
        if self.evaluation_failure is not None:
            log.info("evaluation works again", extra={"was": self.evaluation_failure})
            self.evaluation_failure = None
        return decision

    def _alert(self, effects: Effects, alert_type: AlertType, state: AlertState, severity: str, message: str,
               data: dict[str, Any], key: str, trigger: Envelope | None, symbol: str | None = None) -> None:
        effects.publish(
            "ev.alerts",
            make_event(
                Alert(alert_type=alert_type, state=state, severity=severity, symbol=symbol,  # type: ignore[arg-type]
                      message=message, data=data),
                idempotency_key=key, source=SOURCE, ts_ns=self.now_ns,
                causation_id=str(trigger.event_id) if trigger is not None else None,
            ),
        )

    def _report_unknowns(self, decision: Decision, effects: Effects, trigger: Envelope | None) -> None:
        """Once per episode: exposure unknown (alert), symbols that could not be evaluated
        (log)."""
        before, after = self.view.state.exposure_unknown, decision.state.exposure_unknown
        day = decision.state.trading_day
        if after != before and (bool(after) != bool(before)):
            snapshot = self.view.exposure.snapshot_id if self.view.exposure else "none"
            if after:
                log.error("exposure unknown: no risk increase; de-risk from the last good snapshot", extra={"why": after})
                self._alert(effects, AlertType.EXPOSURE_UNKNOWN, RAISED, "error",
                            f"exposure unknown ({after}): no risk-increasing intent; de-risk continues from the last "
                            f"good snapshot while it is at most {self.rules.decision.derisk_max_exposure_age_s:g}s old",
                            {"why": after, "mode": decision.state.mode, "trading_day": day},
                            idempotency_key("decision-exposure-unknown", day, snapshot), trigger)
            else:
                log.info("exposure known again", extra={"was": before})
                self._alert(effects, AlertType.EXPOSURE_UNKNOWN, RESOLVED, "info", f"exposure known again (was: {before})",
                            {"was": before, "trading_day": day},
                            idempotency_key("decision-exposure-known", day, snapshot), trigger)
        for symbol, error in decision.symbol_errors.items():
            if self.logged_errors.get(symbol) != error:
                log.error("symbol skipped: evaluating it failed", extra={"symbol": symbol, "error": error})
        if decision.trace.get("evaluation") == "full":
            for symbol in set(self.logged_errors) - set(decision.symbol_errors):
                log.info("symbol evaluated again", extra={"symbol": symbol})
            self.logged_errors = dict(decision.symbol_errors)
        else:
            self.logged_errors.update(decision.symbol_errors)

    def _run(self, decision: Decision, now: int, effects: Effects, trigger: Envelope | None, kind: str) -> None:
        started = time.perf_counter()
        view = self.view
        previous_day = view.state.trading_day
        causation = str(trigger.event_id) if trigger is not None else None
        day = decision.state.trading_day

        for key in decision.removed:
            view.drop_record(key)
        if decision.removed:
            effects.hdel(OUTSTANDING, *decision.removed)
        if decision.records:
            for record in decision.records.values():
                view.put_record(record)
            effects.hset(OUTSTANDING, {key: encode_record(r) for key, r in decision.records.items()})
        if decision.generations:
            view.generations.update(decision.generations)
            effects.hset(GENERATIONS, decision.generations)

        why_key = WHY.format(day=day)
        for issued in decision.intents:
            intent = issued.intent
            effects.publish(
                "ev.intents",
                make_event(intent, idempotency_key=issued.key, source=SOURCE, ts_ns=now, causation_id=causation),
            )
            why = {issued.key: intent.model_dump_json()}
            if intent.action == "NEW":
                why[order_ref_for(issued.key)] = issued.key
            effects.hset(why_key, why)
            metrics.decision_intents.labels(intent.action, intent.intent_type).inc()
        if decision.intents:
            effects.command("EXPIRE", why_key, WHY_TTL_S)
        for suppressed in decision.suppressed:
            metrics.decision_suppressed.labels(suppressed.reason).inc()

        if decision.transition is not None:
            self._publish_transition(decision, effects, now, causation)
        for skip in decision.skips:
            field = skip_field(day, skip)
            view.reported_skips.add(field)
            effects.hset(SKIPS, {field: now})
            metrics.decision_skips.labels(skip.reason).inc()
            log.info("symbol skipped", extra={"symbol": skip.symbol, "slot": skip.slot, "reason": skip.reason,
                                              "numbers": skip.numbers, "trading_day": day})
            effects.publish(
                "ev.alerts",
                make_event(
                    Alert(
                        alert_type=AlertType.DECISION_SYMBOL_SKIPPED,
                        state=RAISED,
                        severity="info",
                        symbol=skip.symbol,
                        message=f"{skip.slot}: {skip.symbol} skipped ({skip.reason})",
                        data={"slot": skip.slot, "reason": skip.reason, "numbers": skip.numbers, "trading_day": day},
                    ),
                    idempotency_key=idempotency_key("decision-skip", day, skip.symbol, skip.slot, skip.reason),
                    source=SOURCE,
                    ts_ns=now,
                    causation_id=causation,
                ),
            )

        if day != previous_day and previous_day is not None:
            self._forget_day(previous_day, effects)
        self._report_unknowns(decision, effects, trigger)
        view.state = decision.state
        if decision.book is not None:
            view.pending_book = decision.book.merge_into_parent()
        if kind == "full":
            state_fields = encode_state(decision.state)
            state_fields["last_evaluation_ns"] = dumps(now)
            state_fields["last_trace"] = dumps(decision.trace)
            effects.hset(STATE, state_fields)

        metrics.decision_evaluations.labels(kind).inc()
        metrics.decision_evaluation_seconds.observe(time.perf_counter() - started)

    def _publish_transition(self, decision: Decision, effects: Effects, now: int, causation: str | None) -> None:
        t = decision.transition
        assert t is not None
        state = decision.state
        message = f"mode {t.from_mode} -> {t.to_mode}: {t.reason}"
        if t.to_mode == "HALTED":
            message += f" (by {state.halt_operator}: {state.halt_reason})"
        elif t.from_mode == "HALTED":
            message += f" (resumed by {state.halt_operator}: {state.halt_reason})"
        log.warning("mode transition", extra={"from": t.from_mode, "to": t.to_mode, "rule": t.rule, "numbers": t.numbers})
        effects.publish(
            "ev.alerts",
            make_event(
                Alert(
                    alert_type=AlertType.MODE_CHANGE,
                    state=RAISED,
                    severity=MODE_SEVERITY[t.to_mode],  # type: ignore[arg-type]
                    message=message,
                    data={"from": t.from_mode, "to": t.to_mode, "rule": t.rule, "reason": t.reason,
                          "numbers": t.numbers, "seq": t.seq, "at_ns": t.at_ns, "trading_day": state.trading_day},
                ),
                idempotency_key=idempotency_key("mode", state.trading_day, t.seq),
                source=SOURCE,
                ts_ns=now,
                causation_id=causation,
            ),
        )
        self._set_mode_metric(t.to_mode)

    def _forget_day(self, day: str, effects: Effects) -> None:
        prefix = f"{day}|"
        old_generations = [f for f in self.view.generations if f.startswith(prefix)]
        for f in old_generations:
            del self.view.generations[f]
        effects.hdel(GENERATIONS, *old_generations)
        old_skips = [f for f in self.view.reported_skips if f.startswith(prefix)]
        self.view.reported_skips.difference_update(old_skips)
        effects.hdel(SKIPS, *old_skips)

    @staticmethod
    def _set_mode_metric(mode: str) -> None:
        for name in MODES:
            metrics.decision_mode.labels(name).set(1 if name == mode else 0)


def run() -> int:
    return daemon.run_consumer("decision", "decision_engine", DecisionHandler)
