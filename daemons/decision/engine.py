"""The pure decision step: `decide(view, rules, now_ns) -> Decision`.

The daemon keeps a `BrainView` (plain data rebuilt from Redis), calls `decide`,
and commits what it returns: the new state, the transition (if any), the
intents, the bookkeeping records and the skips to report. Nothing here reads a
clock, Redis or the environment.

One evaluation:
  1. new trading day? reset the latches and the day's counters;
  2. data health: broker, exposure (unknown is not zero: a missing, errored or
     absurd snapshot blocks increases; de-risk goes on from the last good one
     within `derisk_max_exposure_age_s`), session age, market open;
  3. the Brain's potential gross (snapshot + intents not yet seen by it);
  4. the mode (modes.derive_mode) and its transition;
  5. candidates: the de-risk planner of the mode, the MM overnight leftover,
     every enabled strategy;
  6. arbitration, then the hard-cap filter;
  7. reconciliation against the live intents: NEW for a free slot, MODIFY to
     re-price a live order, CANCEL for an order that is no longer wanted (every
     live order when HALTED). Every NEW/MODIFY price is put inside the collar
     around the symbol's trusted reference; no reference, no order.

Bad data never becomes a price: every quote is judged by the quote gate
(guards.judged) before a mark or a price is taken from it, and an error while
evaluating one symbol is contained to that symbol (skipped, reported in
`Decision.symbol_errors`; risk increases are blocked while any symbol is unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from qe.config import RiskRules
from qe.contracts import Intent, idempotency_key, intent_id_for

from qe.marks import Mark, MarkRules, MarkSource, resolve
from qe.plausibility import clamp_to_collar, within_collar

from . import guards
from . import rules as rule_access
from .arbitration import ArbitrationContext, PotentialBook, Suppressed, arbitrate, cap_filter, increase_ceiling_pct
from .derisk import Holding, LiveOrder, excess_notional, hard_chunk_notional, plan_reduction
from .model import (
    DERISK_SLOTS,
    MM_SLOTS,
    NS,
    BrainState,
    Candidate,
    ExposureSnap,
    Market,
    Outstanding,
    PositionView,
    SessionSnap,
    Skip,
)
from .modes import Latches, ModeInputs, Thresholds, blocked_buckets, derive_mode
from .rules import RegimeRule
from .strategies import IncreaseRoom, Strategy, StrategyContext, build_strategies


@dataclass(frozen=True)
class EngineRules:
    """Everything `decide` needs from risk_rules.yaml, resolved once."""

    rules: RiskRules
    thresholds: Thresholds
    regimes: dict[str, RegimeRule]
    hard_cap_pct: float
    cap_recovery_target_pct: float
    default_buckets: dict[str, tuple[float, float]]
    strategies: tuple[Strategy, ...]

    @classmethod
    def from_rules(cls, rules: RiskRules) -> "EngineRules":
        thresholds = Thresholds(
            hard_cap_pct=rule_access.hard_cap_pct(rules),
            cap_recovery_target_pct=rule_access.cap_recovery_target_pct(rules),
            derisk_target_pct=rules.derisk.target_gross_pct,
            window_exit_band_pct=rules.decision.window_exit_band_pct,
            tolerance_exit_band_pct=rules.decision.tolerance_exit_band_pct,
        )
        return cls(
            rules=rules,
            thresholds=thresholds,
            regimes=rule_access.regime_table(rules),
            hard_cap_pct=thresholds.hard_cap_pct,
            cap_recovery_target_pct=thresholds.cap_recovery_target_pct,
            default_buckets=rule_access.bucket_limits(rules),
            strategies=tuple(build_strategies(rules)),
        )


@dataclass
class BrainView:
    state: BrainState = field(default_factory=BrainState)
    session: SessionSnap | None = None
    exposure: ExposureSnap | None = None  # the latest snapshot received (possibly unusable: `problem`)
    good_exposure: ExposureSnap | None = None  # the last usable one: de-risk goes on from it
    positions: dict[str, PositionView] = field(default_factory=dict)
    account_equity: float | None = None
    markets: dict[str, Market] = field(default_factory=dict)
    outstanding: dict[str, Outstanding] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    universe: dict[str, str] = field(default_factory=dict)  # symbol -> bucket hint
    reference_prices: dict[str, float] = field(default_factory=dict)  # symbol -> universe ref price (a fallback mark)
    order_caps: dict[str, int] = field(default_factory=dict)  # symbol -> liquidity cap (shares per order)
    rejected: dict[str, int] = field(default_factory=dict)  # symbol -> ns of execution's last reject
    settling: dict[str, int] = field(default_factory=dict)  # symbol -> ns of a fill awaiting its position
    input_problems: dict[str, str] = field(default_factory=dict)  # symbol -> why its last position was rejected
    reported_skips: set[str] = field(default_factory=set)
    # Indexes over `outstanding`, kept by put_record/drop_record.
    by_symbol: dict[str, set[str]] = field(default_factory=dict)
    unseen: set[str] = field(default_factory=set)  # records the exposure snapshot may not include yet
    # The Brain's potential book as of the last evaluation (+ what it issued since):
    # lets a per-symbol evaluation skip the O(unseen) rebuild. None: rebuild.
    pending_book: PotentialBook | None = None

    def put_record(self, record: Outstanding) -> None:
        self.outstanding[record.key] = record
        self.by_symbol.setdefault(record.symbol, set()).add(record.key)
        self.unseen.add(record.key)

    def drop_record(self, key: str) -> None:
        self.pending_book = None
        record = self.outstanding.pop(key, None)
        self.unseen.discard(key)
        if record is not None:
            keys = self.by_symbol.get(record.symbol)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_symbol[record.symbol]

    def refresh_unseen(self, now_ns: int, grace_s: float) -> None:
        """After a new exposure snapshot: drop what it has seen from the unseen set."""
        self.pending_book = None
        # An unusable snapshot has seen nothing: judge by the last good one.
        usable = self.exposure if self.exposure is not None and self.exposure.problem is None else self.good_exposure
        through = usable.orders_through if usable else None
        self.unseen = {
            key for key in self.unseen
            if key in self.outstanding and self.outstanding[key].counts_in_potential(through, now_ns, grace_s)
        }


@dataclass(frozen=True, slots=True)
class Transition:
    from_mode: str
    to_mode: str
    rule: str
    reason: str
    numbers: dict[str, Any]
    seq: int
    at_ns: int


@dataclass(frozen=True, slots=True)
class IssuedIntent:
    key: str
    intent: Intent
    slot: str


@dataclass
class Decision:
    state: BrainState
    transition: Transition | None = None
    intents: list[IssuedIntent] = field(default_factory=list)
    records: dict[str, Outstanding] = field(default_factory=dict)  # upserted bookkeeping
    removed: list[str] = field(default_factory=list)  # bookkeeping records no longer needed
    generations: dict[str, int] = field(default_factory=dict)  # updated counters
    suppressed: list[Suppressed] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)  # not reported before
    trace: dict[str, Any] = field(default_factory=dict)
    book: PotentialBook | None = None  # the Brain's potential after this decision's intents
    symbol_errors: dict[str, str] = field(default_factory=dict)  # symbols skipped: evaluating them failed


def generation_field(day: str | None, slot: str, symbol: str, side: str) -> str:
    return f"{day}|{slot}|{symbol}|{side}"


def intent_key(day: str | None, slot: str, symbol: str, side: str, generation: int) -> str:
    return idempotency_key("intent", day, slot, symbol, side, generation)


def skip_field(day: str | None, skip: Skip) -> str:
    return f"{day}|{skip.symbol}|{skip.slot}|{skip.reason}"


class MergedPositions:
    """Positions from ev.positions, falling back to the exposure snapshot; lazy, so
    a per-symbol evaluation does not touch every position."""

    def __init__(self, ev: "_Evaluation") -> None:
        self.ev = ev

    def get(self, symbol: str) -> PositionView | None:
        qty, bucket = self.ev.position_qty(symbol)
        return None if bucket is None else PositionView(qty, bucket)

    def items(self):
        return self.ev.all_positions().items()


class LiveIndex:
    """The live NEW intent of each (symbol, slot), looked up through the by-symbol index."""

    def __init__(self, view: BrainView, now_ns: int, grace_s: float) -> None:
        self.view = view
        self.now = now_ns
        self.grace = grace_s
        self._symbols: dict[str, dict[str, Outstanding]] = {}

    def of_symbol(self, symbol: str) -> dict[str, Outstanding]:
        found = self._symbols.get(symbol)
        if found is None:
            found = {}
            for key in self.view.by_symbol.get(symbol, ()):
                record = self.view.outstanding[key]
                if record.live(self.now, self.grace):
                    current = found.get(record.slot)
                    if current is None or record.issued_ns > current.issued_ns:
                        found[record.slot] = record
            self._symbols[symbol] = found
        return found

    def get(self, key: tuple[str, str]) -> Outstanding | None:
        return self.of_symbol(key[0]).get(key[1])

    def items(self, symbols: Iterable[str] | None = None) -> list[tuple[tuple[str, str], Outstanding]]:
        chosen = sorted(self.view.by_symbol) if symbols is None else sorted(set(symbols))
        return [((symbol, slot), record) for symbol in chosen for slot, record in sorted(self.of_symbol(symbol).items())]

    def in_slot(self, slot: str) -> list[Outstanding]:
        return [record for (_symbol, s), record in self.items() if s == slot]

    def other_than(self, symbol: str, slots: Iterable[str]) -> bool:
        allowed = set(slots)
        return any(slot not in allowed for slot in self.of_symbol(symbol))


class _Evaluation:
    """Working state of one `decide` call (kept off the view, which stays untouched)."""

    def __init__(self, view: BrainView, er: EngineRules, now_ns: int) -> None:
        self.view = view
        self.er = er
        self.cfg = er.rules
        self.plaus = er.rules.plausibility
        self.now = now_ns
        self.grace = self.cfg.decision.unacked_grace_s
        self.live = LiveIndex(view, now_ns, self.grace)
        self._marks: dict[str, Mark[float]] = {}
        self.mark_rules = MarkRules.from_rules(er.rules)
        self._markets: dict[str, Market | None] = {}
        self._positions: dict[str, PositionView] | None = None
        self.errors: dict[str, str] = {}  # symbol -> why evaluating it failed (the symbol is skipped)
        self.unpriced: list[str] = []  # held symbols the market has not priced (a fallback mark, or none)
        self.skips: list[Skip] = []  # found outside the planners (collar, containment)
        # Unknown is not zero: the latest snapshot, if usable; else the last good one,
        # while it is young enough to size de-risk; else none.
        self.exposure_unknown = guards.exposure_problem(view.exposure, self.plaus)
        basis = view.exposure if self.exposure_unknown is None else view.good_exposure
        if basis is not None and (
            guards.exposure_problem(basis, self.plaus) is not None
            or not guards.age_within(basis.ts_ns, now_ns, self.cfg.decision.derisk_max_exposure_age_s)
        ):
            basis = None
        self.basis: ExposureSnap | None = basis

    # -- containment ----------------------------------------------------------------------------
    def contain(self, symbol: str, what: str, compute: Any, default: Any = None) -> Any:
        """compute() for one symbol; an error is recorded against the symbol and
        `default` returned, so one symbol's absurd numbers never stop the others."""
        try:
            return compute()
        except Exception as exc:  # noqa: BLE001 - contained to the symbol, reported
            self.errors.setdefault(symbol, f"{what}: {type(exc).__name__}: {exc}"[:300])
            return default

    # -- market view --------------------------------------------------------------------------
    def market(self, symbol: str) -> Market | None:
        """The symbol's market as pricing may see it (an implausible quote removed)."""
        if symbol not in self._markets:
            raw = self.view.markets.get(symbol)
            self._markets[symbol] = None if raw is None else self.contain(
                symbol, "quote gate", lambda: guards.judged(raw, self.plaus))
        return self._markets[symbol]

    def reference(self, symbol: str) -> float | None:
        """The trusted reference of the collar (truth tick, GRPAN, last trusted mark)."""
        return guards.reference_of(self.view.markets.get(symbol))

    def mark(self, symbol: str) -> Mark[float]:
        """The symbol's mark by the one rule (qe.marks); the Brain only gathers its inputs:
        its own judged market, the position's average cost, the universe's reference
        price (else the exposure snapshot's mark, for a symbol outside the universe)."""
        found = self._marks.get(symbol)
        if found is not None:
            return found
        market = self.market(symbol) or Market()
        position = self.view.positions.get(symbol)
        avg_cost = position.avg_cost if position is not None and position.qty else None
        reference = self.view.reference_prices.get(symbol)
        if reference is None:
            snap = self.basis.symbols.get(symbol) if self.basis else None
            reference = snap.mark if snap is not None else None
        mark = resolve(market.mark_inputs(avg_cost, reference), self.now, self.mark_rules)
        if mark.price is not None and not guards.price_ok(mark.price, self.plaus):
            self.errors.setdefault(symbol, f"mark {mark.price!r} is not a plausible price")
            mark = Mark(None, MarkSource.NONE, f"mark {mark.price!r} is not a plausible price")
        self._marks[symbol] = mark
        return mark

    def mark_of(self, symbol: str) -> float | None:
        return self.mark(symbol).price

    def position_qty(self, symbol: str) -> tuple[int, str | None]:
        position = self.view.positions.get(symbol)
        if position is not None:
            return position.qty, position.bucket
        snap = self.basis.symbols.get(symbol) if self.basis else None
        if snap is not None:
            return snap.qty, snap.bucket
        return 0, None

    def all_positions(self) -> dict[str, PositionView]:
        """Every non-flat position; a symbol whose position is absurd or was rejected is
        left out (and recorded in `errors`, which blocks risk increases)."""
        if self._positions is not None:
            return self._positions
        merged: dict[str, PositionView] = {}
        if self.basis is not None:
            for symbol, snap in self.basis.symbols.items():
                if snap.qty:
                    merged[symbol] = PositionView(snap.qty, snap.bucket)
        merged.update(self.view.positions)
        for symbol, why in self.view.input_problems.items():
            self.errors.setdefault(symbol, f"position rejected: {why}")
        positions = {}
        for symbol, p in merged.items():
            if symbol in self.view.input_problems or p.qty == 0:
                continue
            if not guards.qty_ok(p.qty, self.plaus, signed=True):
                self.errors.setdefault(symbol, "position quantity beyond plausibility.max_quantity")
                continue
            positions[symbol] = p
        self._positions = positions
        return positions

    def open_reducing_qty(self, symbol: str, qty: int, exclude_key: str | None = None) -> int:
        """Shares of `symbol` already covered by open orders that reduce the position:
        every reducing order the exposure snapshot includes (anyone's), PLUS the Brain's
        own live ones the snapshot does not include (by ev.orders entry id). Never the
        larger of the two: they are different orders."""
        reducing_side = "SELL" if qty > 0 else "BUY"
        snap = self.basis.symbols.get(symbol) if self.basis else None
        in_snapshot = 0 if snap is None else (snap.open_sell if reducing_side == "SELL" else snap.open_buy)
        through = self.basis.orders_through if self.basis else None
        unseen = 0
        for key in self.view.by_symbol.get(symbol, ()):
            record = self.view.outstanding[key]
            if record.side != reducing_side or key == exclude_key or not record.live(self.now, self.grace):
                continue
            if snap is None or record.counts_in_potential(through, self.now, self.grace):
                unseen += record.remaining_qty
        return in_snapshot + unseen

    def settling(self, symbol: str) -> bool:
        since = self.view.settling.get(symbol)
        return since is not None and guards.age_within(since, self.now, self.cfg.decision.fill_settle_timeout_s)

    def cooling_down(self, symbol: str) -> bool:
        """Execution rejected an order on this symbol a moment ago: no new one yet."""
        since = self.view.rejected.get(symbol)
        return since is not None and guards.age_within(since, self.now, self.cfg.decision.reject_cooldown_s)

    # -- exposure -----------------------------------------------------------------------------
    def equity(self) -> float | None:
        if self.basis is not None:
            return self.basis.equity
        account = self.view.account_equity
        if guards.equity_ok(account) and account > 0:  # type: ignore[operator]
            return account
        return None

    def brain_gross(self, equity: float) -> tuple[float, dict[str, float]]:
        """Current gross % from the Brain's freshest positions and marks; per bucket too."""
        total = 0.0
        buckets: dict[str, float] = {}
        for symbol, position in self.all_positions().items():
            # Every held position counts, at its fallback mark until the market prices it;
            # such a position blocks risk increases (unpriced).
            if symbol not in self.errors and not self.mark(symbol).market_priced:
                self.unpriced.append(symbol)
            notional = self.contain(symbol, "gross", lambda: _notional(position.qty, self.mark_of(symbol)))
            if notional is None:
                continue
            total += notional
            buckets[position.bucket] = buckets.get(position.bucket, 0.0) + notional
        return total / equity * 100, {name: value / equity * 100 for name, value in buckets.items()}

    def potential_book(self) -> PotentialBook | None:
        exposure = self.basis
        equity = self.equity()
        if exposure is None or exposure.potential_pct is None or equity is None:
            return None
        book = PotentialBook(
            equity=exposure.equity,
            potential_pct=exposure.potential_pct,
            bucket_potential_pct={name: b.potential_pct for name, b in exposure.buckets.items()},
            base=exposure.symbols,
        )
        for key in sorted(self.view.unseen):
            record = self.view.outstanding.get(key)
            if record is not None and record.counts_in_potential(exposure.orders_through, self.now, self.grace):
                mark = self.mark_of(record.symbol) or record.limit_price or 0.0
                self.contain(record.symbol, "potential", lambda: book.add(record.symbol, record.side, record.qty, mark,
                                                                           record.bucket))
        return book


def _notional(qty: int, mark: float | None) -> float | None:
    """|qty| x mark; an overflow or a non-finite result is an error, not a number."""
    if mark is None:
        return None
    notional = abs(qty) * mark
    if not math.isfinite(notional):
        raise ArithmeticError(f"notional of {qty} x {mark} is not finite")
    return notional


class JudgedMarkets:
    """`markets` for strategies: each symbol's market as judged by the quote gate."""

    def __init__(self, ev: _Evaluation) -> None:
        self.ev = ev

    def get(self, symbol: str, default: Market | None = None) -> Market | None:
        market = self.ev.market(symbol)
        return default if market is None else market


def decide(
    view: BrainView,
    er: EngineRules,
    now_ns: int,
    *,
    full: bool = True,
    symbols: Iterable[str] | None = None,
    reuse_book: bool = False,
) -> Decision:
    """One evaluation. `full=False` re-runs only the per-symbol strategies for
    `symbols` under the current mode (market moves). A full evaluation runs the
    per-symbol strategies for `symbols` too, or for all their symbols when
    `symbols` is None. `reuse_book`: take the Brain's potential from
    `view.pending_book` (kept up to date by the caller) instead of rebuilding it from
    the unacknowledged intents; a per-symbol evaluation always reuses it. The
    cached book may still count an intent that has since expired: conservative."""
    ev = _Evaluation(view, er, now_ns)
    cfg = er.rules
    state = replace(view.state, numbers=dict(view.state.numbers))
    decision = Decision(state=state)
    session, exposure = view.session, view.exposure

    # 1. a new trading day starts from scratch (the operator halt survives it).
    day = state.trading_day
    if full and session is not None and session.trading_day and session.trading_day != state.trading_day:
        day = state.trading_day = session.trading_day
        state.latches = Latches()
        state.hard_steps, state.hard_excess_notional, state.hard_last_step_ns = 0, 0.0, 0
        state.mm_overnight_active = False

    # 2. data health.
    # Ages on the Brain's clock, either way: a snapshot from the future is not fresh.
    session_age_s = None if session is None else abs(now_ns - session.now_ns) / NS
    basis = ev.basis  # the exposure the Brain may act on (None: unknown)
    exposure_age_s = None if basis is None else abs(now_ns - basis.ts_ns) / NS
    session_fresh = session_age_s is not None and session_age_s <= cfg.decision.max_session_age_s
    exposure_ok = basis is not None and ev.equity() is not None
    exposure_fresh = (exposure_ok and ev.exposure_unknown is None and exposure_age_s is not None
                      and exposure_age_s <= cfg.decision.max_exposure_age_s)
    market_open = bool(session is not None and session.market_open)
    blocked_reasons = []
    if state.broker_connected is not True:
        blocked_reasons.append("broker_down")
    if ev.exposure_unknown is not None:
        blocked_reasons.append("exposure_unknown")
    elif not exposure_fresh:
        blocked_reasons.append("stale_exposure")
    if not session_fresh:
        blocked_reasons.append("stale_session")
    if not market_open:
        blocked_reasons.append("market_closed")
    # De-risk goes on from the last good snapshot while it is young enough (basis).
    can_reduce = market_open and exposure_ok and session_fresh
    # What the Brain cannot judge, it reports: in the trace, in the mode's reason, and
    # (by the handler, once per episode) as an alert.
    unknown_why = ev.exposure_unknown
    if unknown_why is None and basis is None:
        unknown_why = f"snapshot older than {cfg.decision.derisk_max_exposure_age_s:g}s"
    if full:
        state.exposure_unknown = unknown_why or ""

    # 3. the Brain's potential gross.
    reuse = (reuse_book or not full) and view.pending_book is not None
    base_book = view.pending_book if reuse else ev.potential_book()
    book = None if base_book is None else base_book.overlay()
    brain_potential = None if book is None else book.potential_pct
    gross = basis.gross_pct if exposure_ok else None  # type: ignore[union-attr]
    equity = ev.equity()
    # O(positions): only on full evaluations (the per-symbol path must stay O(1)).
    brain_gross, brain_buckets = ev.brain_gross(equity) if (equity and full) else (None, {})

    # 4. the mode.
    if full:
        regime = session.regime if session is not None else None
        result = derive_mode(
            ModeInputs(
                halted=state.halted,
                gross_pct=gross,
                potential_pct=brain_potential,
                soft_window=bool(session and session.soft_window),
                hard_window=bool(session and session.hard_window),
                regime=regime,
                regime_rule=er.regimes.get(regime) if regime else None,
                exposure_unknown=unknown_why,
            ),
            state.latches,
            state.mode,
            er.thresholds,
        )
        numbers = {
            **result.numbers,
            "brain_gross_pct": None if brain_gross is None else round(brain_gross, 4),
            "exposure_snapshot": basis.snapshot_id if basis else None,
            "session_snapshot": session.snapshot_id if session else None,
        }
        if result.mode != state.mode:
            state.transitions += 1
            decision.transition = Transition(state.mode, result.mode, result.rule, result.reason, numbers, state.transitions, now_ns)
            state.since_ns = now_ns
        state.mode, state.rule, state.reason, state.numbers, state.latches = (
            result.mode, result.rule, result.reason, numbers, result.latches)
    mode = state.mode
    if mode != "HARD_DERISK":
        state.hard_steps, state.hard_excess_notional, state.hard_last_step_ns = 0, 0.0, 0

    bucket_now: dict[str, tuple[float, float]] = {}
    bucket_target: dict[str, float] = {}
    bucket_max: dict[str, float] = {}
    for name, (target, maximum) in er.default_buckets.items():
        bucket_target[name], bucket_max[name] = target, maximum
    if exposure_ok:
        for name, b in basis.buckets.items():  # type: ignore[union-attr]
            bucket_target[name], bucket_max[name] = b.target_pct, b.max_pct
            bucket_now[name] = (b.current_pct, b.max_pct)
    blocked = blocked_buckets(bucket_now)

    # 5. candidates.
    candidates: list[Candidate] = []
    skips: list[Skip] = []
    in_scope: set[tuple[str | None, str]] = set()  # (symbol or None for all, slot)
    trace_plan: dict[str, Any] = {}
    if mode != "HALTED" and full and can_reduce and equity:
        for slot in DERISK_SLOTS:
            in_scope.add((None, slot))
        plan = _derisk_plan(ev, state, mode, session, brain_gross, brain_buckets, equity)  # type: ignore[arg-type]
        if plan is not None:
            candidates += plan.candidates
            skips += plan.skips
            trace_plan = plan.numbers
        overnight = _mm_overnight(ev, state, session, brain_buckets, equity)  # type: ignore[arg-type]
        if overnight is not None:
            candidates += overnight.candidates
            skips += overnight.skips
    strategy_numbers: dict[str, Any] = {}
    # No risk increase above the regime's tolerance less the strategies' margin (no flapping).
    regime_rule = er.regimes.get(session.regime) if session is not None and session.regime else None
    ceiling = increase_ceiling_pct(None if regime_rule is None else regime_rule.tolerance_pct,
                                   cfg.strategies.tolerance_margin_pct, er.hard_cap_pct)
    if mode != "HALTED" and market_open and equity:
        room = None if book is None or ceiling is None else IncreaseRoom(book.overlay(), ceiling)
        context = _strategy_context(ev, equity, bucket_target, {n: c for n, (c, _m) in bucket_now.items()}, room)
        for strategy in er.strategies:
            if not full and not strategy.per_symbol:
                continue
            if full and not strategy.per_symbol:
                wanted = None
            else:
                wanted = None if symbols is None else list(symbols)
            strategy_context = replace(context, priority=cfg.arbitration.priorities[strategy.name])
            output = ev.contain(f"strategy {strategy.name}", "propose", lambda: strategy.propose(strategy_context, wanted))
            if output is None:
                continue  # reported in symbol_errors; its live orders are left alone (not in scope)
            candidates += output.candidates
            skips += output.skips
            if output.numbers:
                strategy_numbers[strategy.name] = output.numbers
            for slot in strategy.slots:
                if wanted is None:
                    in_scope.add((None, slot))
                else:
                    in_scope.update((symbol, slot) for symbol in wanted)

    # A candidate that is the very order already live in its slot is a continuation:
    # its shares are already in the Brain's potential and must not be counted twice.
    for index, candidate in enumerate(candidates):
        if candidate.keep_key is None:
            live = ev.live.get((candidate.symbol, candidate.slot))
            if live is not None and not live.cancel_sent and _same_order(candidate, live):
                candidates[index] = replace(candidate, keep_key=live.key)

    # 6. arbitration and the hard cap. A symbol that could not be evaluated is unknown:
    # no risk increase anywhere until it is known again (its shares may be anything).
    for skip in skips:
        if skip.reason == "evaluation_error":
            ev.errors.setdefault(skip.symbol, str(skip.numbers.get("error", "evaluation error")))
    candidates = [c for c in candidates if c.symbol not in ev.errors]
    if ev.errors:
        blocked_reasons.append("symbol_errors")
    if ev.unpriced:
        blocked_reasons.append("unpriced_positions")  # their notional is unknown, not zero
    arbitration = arbitrate(
        candidates,
        ArbitrationContext(
            mode=mode,
            gross_pct=gross,
            hard_cap_pct=er.hard_cap_pct,
            mm_increase_gross_limit_pct=cfg.arbitration.drop_mm_increases_above_gross_pct,
            increases_allowed=not blocked_reasons and book is not None,
            increases_blocked_reason=",".join(blocked_reasons) or ("no_potential" if book is None else ""),
            blocked_buckets=frozenset(blocked),
        ),
    )
    decision.suppressed += arbitration.suppressed
    kept = arbitration.kept
    if book is not None:
        capped = cap_filter(
            kept,
            book,
            hard_cap_pct=er.hard_cap_pct,
            increase_ceiling_pct=ceiling,
            bucket_max_pct=bucket_max,
            min_qty=cfg.decision.min_order_qty,
            mark_of={c.symbol: ev.mark_of(c.symbol) or 0.0 for c in kept},
        )
        kept = capped.kept
        decision.suppressed += capped.suppressed
    else:
        kept = [c for c in kept if not c.is_increase or c.keep_key is not None]

    # 7. reconciliation.
    base_trace = {
        "mode": mode,
        "mode_rule": state.rule,
        "mode_reason": state.reason,
        "exposure_snapshot": basis.snapshot_id if basis else None,
        "exposure_ts_ns": basis.ts_ns if basis else None,
        "exposure_unknown": unknown_why,
        "session_snapshot": session.snapshot_id if session else None,
        "session_now_ns": session.now_ns if session else None,
        "regime": session.regime if session else None,
        "gross_pct": gross,
        "brain_gross_pct": None if brain_gross is None else round(brain_gross, 4),
        "brain_potential_pct": None if brain_potential is None else round(brain_potential, 4),
        "equity": equity,
        "evaluation": "full" if full else "symbols",
    }
    causation = [x for x in ((basis.event_id if basis else None), (session.event_id if session else None)) if x]
    _reconcile(ev, decision, kept, in_scope, mode, day, equity, base_trace, causation)
    if base_book is not None:
        # The potential as it stands with what was actually issued (for the next evaluation).
        issued = base_book.overlay()
        for item in decision.intents:
            if item.intent.action == "NEW":
                i = item.intent
                ev.contain(i.symbol, "potential", lambda: issued.add(
                    i.symbol, i.side, i.qty, ev.mark_of(i.symbol) or i.limit_price or 0.0, i.bucket))
        decision.book = issued

    if mode == "HARD_DERISK" and any(i.slot == "HARD_DERISK" and i.intent.action == "NEW" for i in decision.intents):
        state.hard_steps += 1
        state.hard_last_step_ns = now_ns

    # Bookkeeping records nobody needs any more (terminal and seen by exposure).
    if full:
        through = basis.orders_through if basis else None  # an unusable snapshot has seen nothing
        for key, record in view.outstanding.items():
            if key in decision.records:
                continue
            done = record.terminal or record.expired(now_ns, ev.grace)
            if done and not record.counts_in_potential(through, now_ns, ev.grace):
                decision.removed.append(key)

    skips += ev.skips
    decision.symbol_errors = dict(ev.errors)
    decision.skips = [s for s in skips if skip_field(day, s) not in view.reported_skips and s.reason in REPORTED_SKIPS]
    decision.trace = {
        **base_trace,
        "increases_blocked": blocked_reasons,
        "blocked_buckets": blocked,
        "plan": trace_plan,
        "strategies": strategy_numbers,
        "candidates": len(candidates),
        "suppressed": len(decision.suppressed),
        "intents": len(decision.intents),
        "hard_steps": state.hard_steps,
        "session_age_s": None if session_age_s is None else round(session_age_s, 3),
        "exposure_age_s": None if exposure_age_s is None else round(exposure_age_s, 3),
        # Why symbols were left out this time (every skip, not only the newly reported).
        "skips": _skip_trace(skips),
        "symbol_errors": dict(sorted(ev.errors.items())[:TRACE_LIMIT]),
        "unpriced_positions": sorted(ev.unpriced)[:TRACE_LIMIT],
    }
    return decision


# Skips worth an operator's attention (once per day, symbol, slot and reason).
REPORTED_SKIPS = frozenset({"stale_l1", "stale_prints", "no_price", "implausible_quote", "no_reference", "evaluation_error"})
TRACE_LIMIT = 50  # symbols named per skip reason in a trace (the count is always complete)


def _skip_trace(skips: list[Skip]) -> dict[str, dict[str, Any]]:
    """{reason: {count, symbols}}: bounded, whatever the universe size."""
    out: dict[str, dict[str, Any]] = {}
    for skip in skips:
        entry = out.setdefault(skip.reason, {"count": 0, "symbols": []})
        entry["count"] += 1
        if len(entry["symbols"]) < TRACE_LIMIT and skip.symbol not in entry["symbols"]:
            entry["symbols"].append(skip.symbol)
    return out


def _holdings(ev: _Evaluation, slot: str, bucket: str | None = None) -> list[Holding]:
    holdings = []
    for symbol, position in ev.all_positions().items():
        if bucket is not None and position.bucket != bucket:
            continue
        holding = ev.contain(symbol, "holding", lambda: _holding(ev, slot, symbol, position))
        if holding is not None:
            holdings.append(holding)
    return holdings


def _holding(ev: _Evaluation, slot: str, symbol: str, position: PositionView) -> Holding | None:
    derisk = ev.cfg.derisk
    mark = ev.mark_of(symbol)
    if mark is None or mark <= 0:
        return None
    _notional(position.qty, mark)  # raises on an absurd position: contained to this symbol
    market = ev.market(symbol) or Market()  # judged: an implausible quote has no bid/ask
    live = ev.live.get((symbol, slot))
    live_order = None
    if live is not None and not live.cancel_sent:
        live_order = LiveOrder(live.key, live.remaining_qty, live.limit_price)
    # Reduce-only: what no open reducing order (ours, live or being cancelled, or
    # anyone's in the snapshot) covers yet.
    available = max(abs(position.qty) - ev.open_reducing_qty(symbol, position.qty), 0)
    if ev.settling(symbol) or ev.cooling_down(symbol):
        available = 0
    return Holding(
        symbol=symbol,
        bucket=position.bucket,
        qty=position.qty,
        mark=mark,
        bid=market.bid,
        ask=market.ask,
        truth_price=market.truth_price,
        quote_fresh=market.quote_fresh(ev.now, derisk.l1_max_age_s),
        truth_fresh=market.truth_fresh(ev.now, derisk.truth_tick_max_age_s),
        available=available,
        live=live_order,
        max_order_qty=ev.view.order_caps.get(symbol),
        quote_problem=market.quote_problem,
    )


def _awaiting_positions(ev: _Evaluation) -> bool:
    """A fill was seen whose position update has not arrived: the gross is not known
    yet, so reductions keep their live orders but size no new ones."""
    return any(ev.settling(symbol) for symbol in ev.view.settling)


def _derisk_plan(ev, state: BrainState, mode: str, session: SessionSnap, brain_gross: float, brain_buckets, equity: float):
    if _awaiting_positions(ev):
        plan = _derisk_plan_sized(ev, state, mode, session, brain_gross, equity)
        if plan is None:
            return None
        kept = [c for c in plan.candidates if c.keep_key is not None]
        return replace(plan, candidates=kept, numbers={**plan.numbers, "awaiting_positions": True})
    return _derisk_plan_sized(ev, state, mode, session, brain_gross, equity)


def _derisk_plan_sized(ev, state: BrainState, mode: str, session: SessionSnap, brain_gross: float, equity: float):
    cfg = ev.cfg
    priorities = cfg.arbitration.priorities
    derisk = cfg.derisk
    min_qty = cfg.decision.min_order_qty
    if mode == "CAP_RECOVERY":
        target = ev.er.cap_recovery_target_pct
        excess = excess_notional(brain_gross, target, equity)
        return plan_reduction(
            _holdings(ev, "CAP_RECOVERY"), slot="CAP_RECOVERY", purpose="CAP_RECOVERY", priority=priorities["CAP_RECOVERY"],
            excess_notional=excess, new_budget_notional=excess, pricing=derisk.cap_recovery_pricing,
            soft_offset=derisk.soft_price_offset, min_qty=min_qty,
            reason=f"cap recovery: gross {brain_gross:.2f}% -> {target:g}%",
            numbers={"rule": "cap_recovery", "gross_pct": round(brain_gross, 4), "target_pct": target},
        )
    if mode == "HARD_DERISK":
        target = derisk.target_gross_pct
        excess = excess_notional(brain_gross, target, equity)
        holdings = _holdings(ev, "HARD_DERISK")
        if state.hard_excess_notional <= 0:
            state.hard_excess_notional = excess
        covered = sum(h.live.remaining_qty * h.mark for h in holdings if h.live is not None)
        step_due = (
            state.hard_steps < derisk.hard_max_steps
            and ev.now - state.hard_last_step_ns >= derisk.hard_step_interval_s * NS
        )
        budget = 0.0
        if step_due:
            budget = hard_chunk_notional(
                state.hard_excess_notional, excess - covered, derisk.hard_chunk_fraction, state.hard_steps, derisk.hard_max_steps
            )
        return plan_reduction(
            holdings, slot="HARD_DERISK", purpose="HARD_DERISK", priority=priorities["HARD_DERISK"],
            excess_notional=excess, new_budget_notional=budget, pricing="aggressive",
            soft_offset=derisk.soft_price_offset, min_qty=min_qty,
            reason=f"hard de-risk step {state.hard_steps + 1}/{derisk.hard_max_steps}: gross {brain_gross:.2f}% -> {target:g}%",
            numbers={"rule": "hard_derisk", "gross_pct": round(brain_gross, 4), "target_pct": target,
                     "step": state.hard_steps + 1, "max_steps": derisk.hard_max_steps, "step_due": step_due,
                     "excess_at_start_notional": round(state.hard_excess_notional, 2)},
        )
    if mode == "SOFT_DERISK":
        if state.rule == "tolerance_derisk":
            target = ev.er.regimes[session.regime].tolerance_pct
            rule = "tolerance_derisk"
        else:
            target = derisk.target_gross_pct
            rule = "soft_derisk"
        excess = excess_notional(brain_gross, target, equity)
        return plan_reduction(
            _holdings(ev, "SOFT_DERISK"), slot="SOFT_DERISK", purpose="SOFT_DERISK", priority=priorities["SOFT_DERISK"],
            excess_notional=excess, new_budget_notional=excess, pricing="passive",
            soft_offset=derisk.soft_price_offset, min_qty=min_qty,
            reason=f"soft de-risk ({rule}): gross {brain_gross:.2f}% -> {target:g}%",
            numbers={"rule": rule, "gross_pct": round(brain_gross, 4), "target_pct": target},
        )
    return None


def _mm_overnight(ev, state: BrainState, session: SessionSnap, brain_buckets: dict[str, float], equity: float):
    """At the open, MM_PURE inventory above mm_overnight_max_pct is reduced to it."""
    cfg = ev.cfg
    limit = cfg.derisk.mm_overnight_max_pct
    mm_pct = brain_buckets.get("MM_PURE", 0.0)
    if state.mm_overnight_checked_day != state.trading_day:
        state.mm_overnight_checked_day = state.trading_day
        state.mm_overnight_active = session.regime == "OPEN" and mm_pct > limit
    if state.mm_overnight_active and (session.regime != "OPEN" or mm_pct <= limit):
        state.mm_overnight_active = False
    if not state.mm_overnight_active:
        return None
    excess = excess_notional(mm_pct, limit, equity)
    plan = plan_reduction(
        _holdings(ev, "MM_OVERNIGHT", bucket="MM_PURE"), slot="MM_OVERNIGHT", purpose="MM_OVERNIGHT",
        priority=cfg.arbitration.priorities["MM_OVERNIGHT"], excess_notional=excess, new_budget_notional=excess,
        pricing="passive", soft_offset=cfg.derisk.soft_price_offset, min_qty=cfg.decision.min_order_qty,
        reason=f"MM overnight leftover {mm_pct:.2f}% of equity > {limit:g}%",
        numbers={"rule": "mm_overnight", "mm_pct": round(mm_pct, 4), "target_pct": limit},
    )
    if _awaiting_positions(ev):
        plan = replace(plan, candidates=[c for c in plan.candidates if c.keep_key is not None])
    return plan


def _strategy_context(ev: _Evaluation, equity: float, bucket_target: dict[str, float], bucket_current: dict[str, float],
                      room: IncreaseRoom | None) -> StrategyContext:
    cfg = ev.cfg
    return StrategyContext(
        now_ns=ev.now,
        equity=equity,
        positions=MergedPositions(ev),  # type: ignore[arg-type]
        markets=JudgedMarkets(ev),  # type: ignore[arg-type]
        live=ev.live,
        universe=ev.view.universe,
        bucket_target_pct=bucket_target,
        bucket_current_pct=bucket_current,
        min_qty=cfg.decision.min_order_qty,
        priority=0,
        l1_max_age_s=cfg.derisk.l1_max_age_s,
        truth_max_age_s=cfg.derisk.truth_tick_max_age_s,
        mark_of=ev.mark_of,
        room=room,
    )


def _reconcile(
    ev: _Evaluation,
    decision: Decision,
    kept: list[Candidate],
    in_scope: set[tuple[str | None, str]],
    mode: str,
    day: str | None,
    equity: float | None,
    base_trace: dict[str, Any],
    causation: list[str],
) -> None:
    cfg = ev.cfg.decision
    now = ev.now
    wanted: dict[tuple[str, str], Candidate] = {}
    for candidate in kept:
        collared, why = _collared(ev, candidate)
        if collared is None:
            decision.suppressed.append(Suppressed(candidate, why))
            continue
        wanted.setdefault((candidate.symbol, candidate.slot), collared)

    if mode == "HALTED":
        wanted = {}
        in_scope = {(None, slot) for slot in (*DERISK_SLOTS, *MM_SLOTS, "LT_BAND")}

    # Cancels first: a replacement for the same slot waits for the cancel to be confirmed.
    scoped_symbols = None if any(symbol is None for symbol, _slot in in_scope) else {s for s, _ in in_scope}
    for (symbol, slot), live in ev.live.items(scoped_symbols):
        candidate = wanted.get((symbol, slot))
        in_play = (None, slot) in in_scope or (symbol, slot) in in_scope
        if not in_play or live.cancel_sent:
            continue
        if candidate is not None and _same_order(candidate, live):
            continue
        why = "no longer wanted" if candidate is None else "replaced by a different order"
        _emit_cancel(ev, decision, live, f"cancel {live.slot} {live.symbol}: {why} (mode {mode})", base_trace, causation)

    for (symbol, slot), candidate in wanted.items():
        live = ev.live.get((symbol, slot))
        if live is not None:
            if live.cancel_sent or not _same_order(candidate, live):
                continue  # waiting for the cancel to be confirmed
            price = candidate.limit_price
            if (
                price is not None
                and live.limit_price is not None
                and abs(price - live.limit_price) >= cfg.reprice_min_change - 1e-9
                and now - live.last_change_ns >= cfg.reprice_min_interval_s * NS
            ):
                ev.contain(symbol, "modify", lambda: _emit_modify(ev, decision, live, candidate, base_trace, causation))
            continue
        if candidate.keep_key is not None:
            continue  # the order it continues is gone; the next evaluation plans afresh
        if ev.settling(symbol):
            decision.suppressed.append(Suppressed(candidate, "awaiting_position_after_fill"))
            continue
        if ev.cooling_down(symbol):
            decision.suppressed.append(Suppressed(candidate, "cooldown_after_reject"))
            continue
        # Never more than execution's liquidity cap allows in one order.
        qty = min(candidate.qty, ev.view.order_caps.get(symbol, candidate.qty))
        if not candidate.is_increase:
            position_qty, _bucket = ev.position_qty(symbol)
            reducing_side = "SELL" if position_qty > 0 else "BUY"
            if position_qty == 0 or candidate.side != reducing_side:
                decision.suppressed.append(Suppressed(candidate, "not_reduce_only"))
                continue
            available = abs(position_qty) - ev.open_reducing_qty(symbol, position_qty)
            available -= sum(i.intent.qty for i in decision.intents
                             if i.intent.symbol == symbol and i.intent.action == "NEW" and i.intent.side == reducing_side)
            qty = min(qty, available)
            # As in execution: an order closing a whole odd-lot position may be smaller.
            if qty < cfg.min_order_qty and qty != abs(position_qty):
                decision.suppressed.append(Suppressed(candidate, "reduce_only_below_min_qty"))
                continue
        sized = replace(candidate, qty=qty) if qty != candidate.qty else candidate
        ev.contain(symbol, "new intent", lambda: _emit_new(ev, decision, sized, day, equity, base_trace, causation))


def _collared(ev: _Evaluation, candidate: Candidate) -> tuple[Candidate | None, str]:
    """The candidate with its price inside `plausibility.collar_pct` of the symbol's
    trusted reference (SPEC 9), or (None, why): no reference, no price, no order."""
    price = candidate.limit_price
    if price is None or candidate.order_type != "LMT":
        return None, "no_price"  # the Brain only sends limit orders: a price it can bound
    reference = ev.reference(candidate.symbol)
    if reference is None:
        ev.skips.append(Skip(candidate.symbol, candidate.slot, "no_reference", {"limit_price": price}))
        return None, "no_reference"
    pct = ev.plaus.collar_pct
    if within_collar(price, reference, pct):
        return candidate, ""
    clamped = clamp_to_collar(price, reference, pct)
    numbers = {**candidate.numbers, "collar_reference": reference, "collar_pct": pct, "collar_clamped_from": price}
    return replace(candidate, limit_price=clamped, numbers=numbers), ""


def _same_order(candidate: Candidate, live: Outstanding) -> bool:
    if candidate.keep_key is not None:
        return candidate.keep_key == live.key
    return candidate.side == live.side and candidate.classification == live.classification and candidate.qty == live.qty


def _risk_delta(candidate: Candidate, mark: float | None, equity: float | None) -> float:
    if not equity or not mark:
        return 0.0
    if candidate.is_increase:
        potential = candidate.numbers.get("brain_potential_after_pct")
        before = candidate.numbers.get("brain_potential_before_pct")
        if potential is not None and before is not None:
            return round(potential - before, 6)
        return round(candidate.qty * mark / equity * 100, 6)
    return round(-candidate.qty * mark / equity * 100, 6)


def _emit_new(ev, decision: Decision, candidate: Candidate, day, equity, base_trace, causation) -> None:
    gen_field = generation_field(day, candidate.slot, candidate.symbol, candidate.side)
    generation = decision.generations.get(gen_field, ev.view.generations.get(gen_field, 0))
    key = intent_key(day, candidate.slot, candidate.symbol, candidate.side, generation)
    ttl = ev.cfg.decision.ttl_s[candidate.purpose]
    mark = ev.mark_of(candidate.symbol)
    intent = Intent(
        intent_id=intent_id_for(key),
        action="NEW",
        intent_type=candidate.purpose,
        symbol=candidate.symbol,
        side=candidate.side,  # type: ignore[arg-type]
        qty=candidate.qty,
        order_type=candidate.order_type,  # type: ignore[arg-type]
        limit_price=candidate.limit_price,
        tif="DAY",
        bucket=candidate.bucket,  # type: ignore[arg-type]
        classification=candidate.classification,  # type: ignore[arg-type]
        priority=candidate.priority,
        ttl_s=ttl,
        created_ns=ev.now,
        risk_delta_gross_pct=_risk_delta(candidate, mark, equity),
        reason=candidate.reason,
        causation_ids=causation,
        trace={**base_trace, "rule": candidate.numbers.get("rule", candidate.purpose), "slot": candidate.slot,
               "generation": generation, "numbers": _jsonable(candidate.numbers)},
    )
    # Only once the intent is valid: a failure leaves the decision untouched.
    decision.generations[gen_field] = generation + 1
    decision.intents.append(IssuedIntent(key, intent, candidate.slot))
    decision.records[key] = Outstanding(
        key=key, slot=candidate.slot, symbol=candidate.symbol, side=candidate.side, qty=candidate.qty,
        bucket=candidate.bucket, classification=candidate.classification, order_type=candidate.order_type,
        limit_price=candidate.limit_price, priority=candidate.priority, intent_type=candidate.purpose, ttl_s=ttl,
        issued_ns=ev.now, last_change_ns=ev.now,
    )


def _follow_up(ev, live: Outstanding, action: str, key: str, price: float | None, reason: str, base_trace, causation, numbers) -> Intent:
    return Intent(
        intent_id=intent_id_for(key),
        action=action,  # type: ignore[arg-type]
        target_intent_key=live.key,
        intent_type=live.intent_type,
        symbol=live.symbol,
        side=live.side,  # type: ignore[arg-type]
        qty=live.qty,
        order_type=live.order_type,  # type: ignore[arg-type]
        limit_price=price,
        tif="DAY",
        bucket=live.bucket,  # type: ignore[arg-type]
        classification=live.classification,  # type: ignore[arg-type]
        priority=live.priority,
        ttl_s=live.ttl_s,
        created_ns=ev.now,
        risk_delta_gross_pct=0.0,
        reason=reason,
        causation_ids=causation,
        trace={**base_trace, "rule": action.lower(), "slot": live.slot, "target_intent_key": live.key,
               "numbers": _jsonable(numbers)},
    )


def _emit_modify(ev, decision: Decision, live: Outstanding, candidate: Candidate, base_trace, causation) -> None:
    key = idempotency_key("modify", live.key, live.modifies + 1)
    reason = f"re-price {live.slot} {live.symbol} {live.limit_price:.2f} -> {candidate.limit_price:.2f}"
    numbers = {**candidate.numbers, "old_price": live.limit_price, "new_price": candidate.limit_price}
    intent = _follow_up(ev, live, "MODIFY", key, candidate.limit_price, reason, base_trace, causation, numbers)
    decision.intents.append(IssuedIntent(key, intent, live.slot))
    decision.records[live.key] = replace(live, limit_price=candidate.limit_price, last_change_ns=ev.now, modifies=live.modifies + 1)


def _emit_cancel(ev, decision: Decision, live: Outstanding, reason: str, base_trace, causation) -> None:
    key = idempotency_key("cancel", live.key)
    intent = _follow_up(ev, live, "CANCEL", key, live.limit_price, reason, base_trace, causation, {})
    decision.intents.append(IssuedIntent(key, intent, live.slot))
    decision.records[live.key] = replace(live, cancel_sent=True, last_change_ns=ev.now)


def _jsonable(numbers: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in numbers.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[name] = value
    return out
