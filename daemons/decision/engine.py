"""The pure decision step: `decide(view, rules, now_ns) -> Decision`.

The daemon keeps a `BrainView` (plain data rebuilt from Redis), calls `decide`,
and commits what it returns: the new state, the transition (if any), the
intents, the bookkeeping records and the skips to report. Nothing here reads a
clock, Redis or the environment.

One evaluation is a pipeline of steps, each a function of plain values returning
a value (`decide` reads as the whole of it):
  start_trading_day     a new trading day resets the latches and the day's counters;
  judge_inputs          data health: broker, exposure (unknown is not zero: a missing,
                        errored or absurd snapshot blocks increases; de-risk goes on from
                        the last good one within `derisk_max_exposure_age_s`), session
                        age, market open -> InputHealth;
  measure_gross         the snapshot's gross, the Brain's potential (snapshot + intents
                        it does not include), its own gross from fresher positions -> Gross;
  decide_mode           the mode (modes.derive_mode) and its transition;
  bucket_limits         bucket targets and maxima, the buckets over their max;
  size_derisk           the de-risk planner of the mode and the MM overnight leftover;
  propose_strategies    every enabled strategy, under the increase ceiling;
  continue_live_orders  a candidate that is the order already live keeps its key;
  arbitrate_candidates  arbitration, then the hard-cap filter -> Arbitrated;
  reprice_and_cancel    (orders.py) NEW / MODIFY / CANCEL against the live intents,
                        every price inside the collar -> OrderChanges;
  book_after, count_hard_step, finished_records, decision_trace: what the handler
                        keeps for the next evaluation, and the trace.

Bad data never becomes a price: every quote is judged by the quote gate
(guards.judged) before a mark or a price is taken from it, and an error while
evaluating one symbol is contained to that symbol (skipped, reported in
`Decision.symbol_errors`; risk increases are blocked while any symbol is unknown).
The one record the steps share is that containment record (`Evaluation.errors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from qe.config import RiskRules

from . import rules as rule_access
from .arbitration import ArbitrationContext, PotentialBook, Suppressed, arbitrate, cap_filter, increase_ceiling_pct
from .derisk import Holding, LiveOrder, ReductionPlan, excess_notional, hard_chunk_notional, plan_reduction
from .evaluation import Evaluation, JudgedMarkets, LiveIndex, MergedPositions, _notional
from .model import (
    DERISK_SLOTS,
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
from .orders import IntentContext, IssuedIntent, OrderChanges, Scope, _same_order, reprice_and_cancel
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


def skip_field(day: str | None, skip: Skip) -> str:
    return f"{day}|{skip.symbol}|{skip.slot}|{skip.reason}"


# --- the pipeline --------------------------------------------------------------------------


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
    ev = Evaluation(view, er, now_ns)
    session = view.session
    state = start_trading_day(replace(view.state, numbers=dict(view.state.numbers)), session, full)
    health = judge_inputs(ev, state, session)
    gross = measure_gross(ev, health, full, reuse_book)
    state, transition = decide_mode(state, health, gross, ev.basis, session, er, now_ns, full)
    limits = bucket_limits(er, ev.basis if health.exposure_ok else None)
    derisk, state = size_derisk(ev, state, session, health, gross, full)
    ceiling = increase_ceiling(er, session)
    strategies = propose_strategies(ev, state.mode, health, gross, limits, ceiling, full, symbols)
    candidates = continue_live_orders(ev.live, derisk.candidates + strategies.candidates)
    skips = derisk.skips + strategies.skips
    arbitrated = arbitrate_candidates(ev, candidates, skips, state.mode, health, gross, limits, ceiling)
    base_trace = intent_trace(state, ev.basis, session, health, gross, full)
    context = IntentContext(state.trading_day, gross.equity, base_trace, causation_of(ev.basis, session))
    orders = reprice_and_cancel(ev, arbitrated.kept, derisk.scope | strategies.scope, state.mode, context)
    book = book_after(ev, gross.base_book, orders.intents)
    state = count_hard_step(state, orders.intents, now_ns)
    removed = finished_records(ev, orders.records) if full else []
    skips = skips + orders.skips
    suppressed = arbitrated.suppressed + orders.suppressed
    trace = decision_trace(base_trace, ev, state, health, gross, limits, arbitrated, derisk, strategies, suppressed,
                           orders, skips)
    return Decision(
        state=state, transition=transition, intents=orders.intents, records=orders.records, removed=removed,
        generations=orders.generations, suppressed=suppressed, skips=skips_to_report(skips, state.trading_day, view),
        trace=trace, book=book, symbol_errors=dict(ev.errors),
    )


def start_trading_day(state: BrainState, session: SessionSnap | None, full: bool) -> BrainState:
    """A new trading day starts from scratch (the operator halt survives it)."""
    if full and session is not None and session.trading_day and session.trading_day != state.trading_day:
        return replace(state, trading_day=session.trading_day, latches=Latches(), hard_steps=0, hard_excess_notional=0.0,
                       hard_last_step_ns=0, mm_overnight_active=False)
    return state


@dataclass(frozen=True, slots=True)
class InputHealth:
    """What the inputs allow this evaluation: ages on the Brain's clock, either way (a
    snapshot from the future is not fresh), and why risk increases are blocked."""

    session_age_s: float | None
    exposure_age_s: float | None
    exposure_ok: bool  # an exposure basis to act on, and an equity
    market_open: bool
    can_reduce: bool  # de-risk may run: market open, exposure basis, fresh session
    blocked: tuple[str, ...]  # why increases are blocked, by the inputs alone
    unknown_why: str | None  # why the exposure is unknown (None: known)


def judge_inputs(ev: Evaluation, state: BrainState, session: SessionSnap | None) -> InputHealth:
    cfg = ev.cfg.decision
    basis = ev.basis  # the exposure the Brain may act on (None: unknown)
    session_age_s = None if session is None else abs(ev.now - session.now_ns) / NS
    exposure_age_s = None if basis is None else abs(ev.now - basis.ts_ns) / NS
    session_fresh = session_age_s is not None and session_age_s <= cfg.max_session_age_s
    exposure_ok = basis is not None and ev.equity() is not None
    exposure_fresh = (exposure_ok and ev.exposure_unknown is None and exposure_age_s is not None
                      and exposure_age_s <= cfg.max_exposure_age_s)
    market_open = bool(session is not None and session.market_open)
    blocked = []
    if state.broker_connected is not True:
        blocked.append("broker_down")
    if ev.exposure_unknown is not None:
        blocked.append("exposure_unknown")
    elif not exposure_fresh:
        blocked.append("stale_exposure")
    if not session_fresh:
        blocked.append("stale_session")
    if not market_open:
        blocked.append("market_closed")
    # What the Brain cannot judge, it reports: in the trace, in the mode's reason, and
    # (by the handler, once per episode) as an alert.
    unknown_why = ev.exposure_unknown
    if unknown_why is None and basis is None:
        unknown_why = f"snapshot older than {cfg.derisk_max_exposure_age_s:g}s"
    # De-risk goes on from the last good snapshot while it is young enough (basis).
    return InputHealth(session_age_s, exposure_age_s, exposure_ok, market_open,
                       can_reduce=market_open and exposure_ok and session_fresh, blocked=tuple(blocked),
                       unknown_why=unknown_why)


@dataclass(frozen=True, slots=True)
class Gross:
    """The gross figures of one evaluation."""

    base_book: PotentialBook | None  # the Brain's potential before this evaluation's intents (None: unknown)
    potential_pct: float | None  # its total
    snapshot_gross_pct: float | None  # the exposure snapshot's gross (the mode rules' authority)
    equity: float | None
    brain_gross_pct: float | None  # from the Brain's fresher positions and marks (full evaluations only)
    brain_buckets: dict[str, float]
    unpriced: list[str]  # held symbols the market has not priced: they block risk increases


def measure_gross(ev: Evaluation, health: InputHealth, full: bool, reuse_book: bool) -> Gross:
    view = ev.view
    reuse = (reuse_book or not full) and view.pending_book is not None
    base_book = view.pending_book if reuse else ev.potential_book()
    snapshot_gross = ev.basis.gross_pct if health.exposure_ok else None  # type: ignore[union-attr]
    equity = ev.equity()
    # O(positions): only on full evaluations (the per-symbol path must stay O(1)).
    brain_gross, brain_buckets, unpriced = ev.brain_gross(equity) if (equity and full) else (None, {}, [])
    return Gross(base_book, None if base_book is None else base_book.potential_pct, snapshot_gross, equity,
                 brain_gross, brain_buckets, unpriced)


def decide_mode(state: BrainState, health: InputHealth, gross: Gross, basis: ExposureSnap | None,
                session: SessionSnap | None, er: EngineRules, now_ns: int, full: bool) -> tuple[BrainState, Transition | None]:
    """The mode and its transition (full evaluations only); the hard de-risk step
    counters end with HARD_DERISK."""
    transition = None
    if full:
        regime = session.regime if session is not None else None
        result = derive_mode(
            ModeInputs(
                halted=state.halted, gross_pct=gross.snapshot_gross_pct, potential_pct=gross.potential_pct,
                soft_window=bool(session and session.soft_window), hard_window=bool(session and session.hard_window),
                regime=regime, regime_rule=er.regimes.get(regime) if regime else None, exposure_unknown=health.unknown_why,
            ),
            state.latches, state.mode, er.thresholds,
        )
        numbers = {
            **result.numbers,
            "brain_gross_pct": _rounded(gross.brain_gross_pct),
            "exposure_snapshot": basis.snapshot_id if basis else None,
            "session_snapshot": session.snapshot_id if session else None,
        }
        since_ns, transitions = state.since_ns, state.transitions
        if result.mode != state.mode:
            since_ns, transitions = now_ns, transitions + 1
            transition = Transition(state.mode, result.mode, result.rule, result.reason, numbers, transitions, now_ns)
        state = replace(state, mode=result.mode, rule=result.rule, reason=result.reason, numbers=numbers,
                        latches=result.latches, since_ns=since_ns, transitions=transitions,
                        exposure_unknown=health.unknown_why or "")
    if state.mode != "HARD_DERISK":
        state = replace(state, hard_steps=0, hard_excess_notional=0.0, hard_last_step_ns=0)
    return state, transition


@dataclass(frozen=True, slots=True)
class BucketLimits:
    target: dict[str, float]
    maximum: dict[str, float]
    current: dict[str, float]  # from the exposure basis
    over_max: dict[str, dict[str, float]]  # buckets over their max (no increase in them)


def bucket_limits(er: EngineRules, basis: ExposureSnap | None) -> BucketLimits:
    """Targets and maxima from the rules, overridden by the exposure basis (if usable)."""
    target = {name: t for name, (t, _m) in er.default_buckets.items()}
    maximum = {name: m for name, (_t, m) in er.default_buckets.items()}
    now: dict[str, tuple[float, float]] = {}
    for name, b in (basis.buckets.items() if basis is not None else ()):
        target[name], maximum[name] = b.target_pct, b.max_pct
        now[name] = (b.current_pct, b.max_pct)
    return BucketLimits(target, maximum, {n: c for n, (c, _m) in now.items()}, blocked_buckets(now))


def increase_ceiling(er: EngineRules, session: SessionSnap | None) -> float | None:
    """No risk increase above the regime's tolerance less the strategies' margin (no flapping)."""
    regime_rule = er.regimes.get(session.regime) if session is not None and session.regime else None
    return increase_ceiling_pct(None if regime_rule is None else regime_rule.tolerance_pct,
                                er.rules.strategies.tolerance_margin_pct, er.hard_cap_pct)


@dataclass(frozen=True, slots=True)
class Proposals:
    """Candidates of one step, the skips it found, the (symbol, slot)s whose live
    orders it judges, and its numbers for the trace."""

    candidates: list[Candidate] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    scope: Scope = field(default_factory=set)
    numbers: dict[str, Any] = field(default_factory=dict)


def size_derisk(ev: Evaluation, state: BrainState, session: SessionSnap | None, health: InputHealth, gross: Gross,
                full: bool) -> tuple[Proposals, BrainState]:
    """The reductions of the mode's planner and the MM overnight leftover (full
    evaluations, when de-risk may run); the state carries the planners' memory."""
    equity = gross.equity
    if state.mode == "HALTED" or not full or not health.can_reduce or not equity:
        return Proposals(), state
    assert session is not None and gross.brain_gross_pct is not None
    plan, state = _mode_reduction(ev, state, session, gross.brain_gross_pct, equity)
    mm_pct = gross.brain_buckets.get("MM_PURE", 0.0)
    state = _mm_overnight_state(state, session, mm_pct, ev.cfg.derisk.mm_overnight_max_pct)
    overnight = _mm_overnight_plan(ev, mm_pct, equity) if state.mm_overnight_active else None
    candidates: list[Candidate] = []
    skips: list[Skip] = []
    for found in (plan, overnight):
        if found is not None:
            candidates += found.candidates
            skips += found.skips
    return Proposals(candidates, skips, {(None, slot) for slot in DERISK_SLOTS}, plan.numbers if plan else {}), state


def propose_strategies(ev: Evaluation, mode: str, health: InputHealth, gross: Gross, limits: BucketLimits,
                       ceiling: float | None, full: bool, symbols: Iterable[str] | None) -> Proposals:
    """Every enabled strategy (a per-symbol evaluation: only the per-symbol ones, for
    `symbols`). A strategy that fails is contained: reported in symbol_errors, its
    live orders left alone (not in scope)."""
    out = Proposals()
    if mode == "HALTED" or not health.market_open or not gross.equity:
        return out
    base_book = gross.base_book
    room = None if base_book is None or ceiling is None else IncreaseRoom(base_book.overlay(), ceiling)
    context = _strategy_context(ev, gross.equity, limits.target, limits.current, room)
    for strategy in ev.er.strategies:
        if not full and not strategy.per_symbol:
            continue
        wanted = None if (full and not strategy.per_symbol) or symbols is None else list(symbols)
        strategy_context = replace(context, priority=ev.cfg.arbitration.priorities[strategy.name])
        output = ev.contain(f"strategy {strategy.name}", "propose", lambda: strategy.propose(strategy_context, wanted))
        if output is None:
            continue
        out.candidates.extend(output.candidates)
        out.skips.extend(output.skips)
        if output.numbers:
            out.numbers[strategy.name] = output.numbers
        for slot in strategy.slots:
            out.scope.update([(None, slot)] if wanted is None else [(symbol, slot) for symbol in wanted])
    return out


def continue_live_orders(live: LiveIndex, candidates: list[Candidate]) -> list[Candidate]:
    """A candidate that is the very order already live in its slot is a continuation:
    its shares are already in the Brain's potential and must not be counted twice."""
    out = []
    for candidate in candidates:
        if candidate.keep_key is None:
            order = live.get((candidate.symbol, candidate.slot))
            if order is not None and not order.cancel_sent and _same_order(candidate, order):
                candidate = replace(candidate, keep_key=order.key)
        out.append(candidate)
    return out


@dataclass(frozen=True, slots=True)
class Arbitrated:
    kept: list[Candidate]
    suppressed: list[Suppressed]
    blocked: list[str]  # why risk increases are blocked (inputs, unknown symbols, unpriced positions)
    considered: int  # candidates of symbols that could be evaluated


def arbitrate_candidates(ev: Evaluation, candidates: list[Candidate], skips: list[Skip], mode: str, health: InputHealth,
                         gross: Gross, limits: BucketLimits, ceiling: float | None) -> Arbitrated:
    """Arbitration and the hard cap. A symbol that could not be evaluated is unknown:
    no risk increase anywhere until it is known again (its shares may be anything)."""
    ev.record_failures(skips)
    candidates = [c for c in candidates if c.symbol not in ev.errors]
    blocked = list(health.blocked)
    if ev.errors:
        blocked.append("symbol_errors")
    if gross.unpriced:
        blocked.append("unpriced_positions")  # their notional is unknown, not zero
    er, base_book = ev.er, gross.base_book
    arbitration = arbitrate(candidates, ArbitrationContext(
        mode=mode, gross_pct=gross.snapshot_gross_pct, hard_cap_pct=er.hard_cap_pct,
        mm_increase_gross_limit_pct=ev.cfg.arbitration.drop_mm_increases_above_gross_pct,
        increases_allowed=not blocked and base_book is not None,
        increases_blocked_reason=",".join(blocked) or ("no_potential" if base_book is None else ""),
        blocked_buckets=frozenset(limits.over_max),
    ))
    suppressed, kept = list(arbitration.suppressed), arbitration.kept
    if base_book is None:
        return Arbitrated([c for c in kept if not c.is_increase or c.keep_key is not None], suppressed, blocked,
                          len(candidates))
    capped = cap_filter(
        kept, base_book.overlay(), hard_cap_pct=er.hard_cap_pct, increase_ceiling_pct=ceiling,
        bucket_max_pct=limits.maximum, min_qty=ev.cfg.decision.min_order_qty,
        mark_of={c.symbol: ev.mark_of(c.symbol) or 0.0 for c in kept},
    )
    return Arbitrated(capped.kept, suppressed + capped.suppressed, blocked, len(candidates))


def book_after(ev: Evaluation, base_book: PotentialBook | None, intents: list[IssuedIntent]) -> PotentialBook | None:
    """The potential as it stands with what was actually issued (for the next evaluation)."""
    if base_book is None:
        return None
    issued = base_book.overlay()
    for item in intents:
        if item.intent.action == "NEW":
            i = item.intent
            ev.contain(i.symbol, "potential", lambda: issued.add(
                i.symbol, i.side, i.qty, ev.mark_of(i.symbol) or i.limit_price or 0.0, i.bucket))
    return issued


def count_hard_step(state: BrainState, intents: list[IssuedIntent], now_ns: int) -> BrainState:
    """A hard de-risk step is counted when it issued a new order."""
    if state.mode == "HARD_DERISK" and any(i.slot == "HARD_DERISK" and i.intent.action == "NEW" for i in intents):
        return replace(state, hard_steps=state.hard_steps + 1, hard_last_step_ns=now_ns)
    return state


def finished_records(ev: Evaluation, changed: dict[str, Outstanding]) -> list[str]:
    """Bookkeeping records nobody needs any more (terminal or expired, and seen by exposure)."""
    through = ev.basis.orders_through if ev.basis else None  # an unusable snapshot has seen nothing
    removed = []
    for key, record in ev.view.outstanding.items():
        if key in changed:
            continue
        done = record.terminal or record.expired(ev.now, ev.grace)
        if done and not record.counts_in_potential(through, ev.now, ev.grace):
            removed.append(key)
    return removed


def skips_to_report(skips: list[Skip], day: str | None, view: BrainView) -> list[Skip]:
    """Skips worth an operator's attention not reported yet today."""
    return [s for s in skips if skip_field(day, s) not in view.reported_skips and s.reason in REPORTED_SKIPS]


def causation_of(basis: ExposureSnap | None, session: SessionSnap | None) -> list[str]:
    return [x for x in ((basis.event_id if basis else None), (session.event_id if session else None)) if x]


def intent_trace(state: BrainState, basis: ExposureSnap | None, session: SessionSnap | None, health: InputHealth,
                 gross: Gross, full: bool) -> dict[str, Any]:
    """What every intent's trace and the evaluation's trace start with."""
    return {
        "mode": state.mode,
        "mode_rule": state.rule,
        "mode_reason": state.reason,
        "exposure_snapshot": basis.snapshot_id if basis else None,
        "exposure_ts_ns": basis.ts_ns if basis else None,
        "exposure_unknown": health.unknown_why,
        "session_snapshot": session.snapshot_id if session else None,
        "session_now_ns": session.now_ns if session else None,
        "regime": session.regime if session else None,
        "gross_pct": gross.snapshot_gross_pct,
        "brain_gross_pct": _rounded(gross.brain_gross_pct),
        "brain_potential_pct": _rounded(gross.potential_pct),
        "equity": gross.equity,
        "evaluation": "full" if full else "symbols",
    }


def decision_trace(base: dict[str, Any], ev: Evaluation, state: BrainState, health: InputHealth, gross: Gross,
                   limits: BucketLimits, arbitrated: Arbitrated, derisk: Proposals, strategies: Proposals,
                   suppressed: list[Suppressed], orders: OrderChanges, skips: list[Skip]) -> dict[str, Any]:
    """The evaluation's trace (`state:decision` last_trace)."""
    return {
        **base,
        "increases_blocked": arbitrated.blocked,
        "blocked_buckets": limits.over_max,
        "plan": derisk.numbers,
        "strategies": strategies.numbers,
        "candidates": arbitrated.considered,
        "suppressed": len(suppressed),
        "intents": len(orders.intents),
        "hard_steps": state.hard_steps,
        "session_age_s": _rounded(health.session_age_s, 3),
        "exposure_age_s": _rounded(health.exposure_age_s, 3),
        # Why symbols were left out this time (every skip, not only the newly reported).
        "skips": _skip_trace(skips),
        "symbol_errors": dict(sorted(ev.errors.items())[:TRACE_LIMIT]),
        "unpriced_positions": sorted(gross.unpriced)[:TRACE_LIMIT],
    }


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# --- de-risk sizing and the strategies' context ------------------------------------------


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


def _holdings(ev: Evaluation, slot: str, bucket: str | None = None) -> list[Holding]:
    holdings = []
    for symbol, position in ev.all_positions().items():
        if bucket is not None and position.bucket != bucket:
            continue
        holding = ev.contain(symbol, "holding", lambda: _holding(ev, slot, symbol, position))
        if holding is not None:
            holdings.append(holding)
    return holdings


def _holding(ev: Evaluation, slot: str, symbol: str, position: PositionView) -> Holding | None:
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


def _awaiting_positions(ev: Evaluation) -> bool:
    """A fill was seen whose position update has not arrived: the gross is not known
    yet, so reductions keep their live orders but size no new ones."""
    return any(ev.settling(symbol) for symbol in ev.view.settling)


def _mode_reduction(ev: Evaluation, state: BrainState, session: SessionSnap, brain_gross: float,
                    equity: float) -> tuple[ReductionPlan | None, BrainState]:
    """The mode's reduction plan. Awaiting a position after a fill, the gross is not
    known yet: the plan keeps its live orders but sizes no new ones."""
    plan: ReductionPlan | None = None
    if state.mode == "CAP_RECOVERY":
        plan = _cap_recovery_plan(ev, brain_gross, equity)
    elif state.mode == "HARD_DERISK":
        plan, state = _hard_derisk_plan(ev, state, brain_gross, equity)
    elif state.mode == "SOFT_DERISK":
        plan = _soft_derisk_plan(ev, state, session, brain_gross, equity)
    if plan is not None and _awaiting_positions(ev):
        kept = [c for c in plan.candidates if c.keep_key is not None]
        plan = replace(plan, candidates=kept, numbers={**plan.numbers, "awaiting_positions": True})
    return plan, state


def _cap_recovery_plan(ev: Evaluation, brain_gross: float, equity: float) -> ReductionPlan:
    derisk = ev.cfg.derisk
    target = ev.er.cap_recovery_target_pct
    excess = excess_notional(brain_gross, target, equity)
    return plan_reduction(
        _holdings(ev, "CAP_RECOVERY"), slot="CAP_RECOVERY", purpose="CAP_RECOVERY",
        priority=ev.cfg.arbitration.priorities["CAP_RECOVERY"],
        excess_notional=excess, new_budget_notional=excess, pricing=derisk.cap_recovery_pricing,
        soft_offset=derisk.soft_price_offset, min_qty=ev.cfg.decision.min_order_qty,
        reason=f"cap recovery: gross {brain_gross:.2f}% -> {target:g}%",
        numbers={"rule": "cap_recovery", "gross_pct": round(brain_gross, 4), "target_pct": target},
    )


def _hard_derisk_plan(ev: Evaluation, state: BrainState, brain_gross: float,
                      equity: float) -> tuple[ReductionPlan, BrainState]:
    """A step's budget is sized on the excess measured when HARD_DERISK began (kept in the state)."""
    derisk = ev.cfg.derisk
    target = derisk.target_gross_pct
    excess = excess_notional(brain_gross, target, equity)
    holdings = _holdings(ev, "HARD_DERISK")
    if state.hard_excess_notional <= 0:
        state = replace(state, hard_excess_notional=excess)
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
        holdings, slot="HARD_DERISK", purpose="HARD_DERISK", priority=ev.cfg.arbitration.priorities["HARD_DERISK"],
        excess_notional=excess, new_budget_notional=budget, pricing="aggressive",
        soft_offset=derisk.soft_price_offset, min_qty=ev.cfg.decision.min_order_qty,
        reason=f"hard de-risk step {state.hard_steps + 1}/{derisk.hard_max_steps}: gross {brain_gross:.2f}% -> {target:g}%",
        numbers={"rule": "hard_derisk", "gross_pct": round(brain_gross, 4), "target_pct": target,
                 "step": state.hard_steps + 1, "max_steps": derisk.hard_max_steps, "step_due": step_due,
                 "excess_at_start_notional": round(state.hard_excess_notional, 2)},
    ), state


def _soft_derisk_plan(ev: Evaluation, state: BrainState, session: SessionSnap, brain_gross: float,
                      equity: float) -> ReductionPlan:
    """From the window: down to 100 %; from the tolerance rule: down to the regime's tolerance."""
    derisk = ev.cfg.derisk
    if state.rule == "tolerance_derisk":
        target = ev.er.regimes[session.regime].tolerance_pct
        rule = "tolerance_derisk"
    else:
        target = derisk.target_gross_pct
        rule = "soft_derisk"
    excess = excess_notional(brain_gross, target, equity)
    return plan_reduction(
        _holdings(ev, "SOFT_DERISK"), slot="SOFT_DERISK", purpose="SOFT_DERISK",
        priority=ev.cfg.arbitration.priorities["SOFT_DERISK"],
        excess_notional=excess, new_budget_notional=excess, pricing="passive",
        soft_offset=derisk.soft_price_offset, min_qty=ev.cfg.decision.min_order_qty,
        reason=f"soft de-risk ({rule}): gross {brain_gross:.2f}% -> {target:g}%",
        numbers={"rule": rule, "gross_pct": round(brain_gross, 4), "target_pct": target},
    )


def _mm_overnight_state(state: BrainState, session: SessionSnap, mm_pct: float, limit: float) -> BrainState:
    """At the first evaluation of a day: is MM_PURE above `mm_overnight_max_pct` at the
    open? It stays active until it is down to it or the OPEN regime ends."""
    if state.mm_overnight_checked_day != state.trading_day:
        state = replace(state, mm_overnight_checked_day=state.trading_day,
                        mm_overnight_active=session.regime == "OPEN" and mm_pct > limit)
    if state.mm_overnight_active and (session.regime != "OPEN" or mm_pct <= limit):
        state = replace(state, mm_overnight_active=False)
    return state


def _mm_overnight_plan(ev: Evaluation, mm_pct: float, equity: float) -> ReductionPlan:
    """MM_PURE inventory above mm_overnight_max_pct is reduced to it."""
    cfg = ev.cfg
    limit = cfg.derisk.mm_overnight_max_pct
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


def _strategy_context(ev: Evaluation, equity: float, bucket_target: dict[str, float], bucket_current: dict[str, float],
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
