"""De-risk sizing and pricing (SPEC 6, De-risk playbook): pure functions.

One planner serves every reduction: SOFT_DERISK (passive, truth-tick proximity),
HARD_DERISK (aggressive, in chunks), CAP_RECOVERY (to 123 %) and the MM overnight
leftover at the open. It is given the holdings it may reduce, the excess notional
to remove and a budget for new orders, and returns candidates:

* Holdings are ranked MM_PURE before LT, then by the expected slippage of
  crossing half the spread per dollar reduced (half-spread / mark, smallest
  first), then by position notional (largest first), then by symbol.
* A live order of the same slot is kept (re-priced) while the excess it covers is
  still needed; once the excess is covered the rest are left out, so the
  caller cancels them: every reduction stops at its target.
* New orders: whole shares, at least `min_qty`, never more than what the position
  still has uncovered by other open reducing orders (reduce-only); prices on the
  $0.01 grid.
* A symbol whose quote is implausible (the quote gate) or stale (or, for passive
  pricing, whose truth tick is stale) is skipped and reported; its live order, if
  any, is kept at its old price. The engine then keeps every price inside the collar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .model import Candidate, Skip, ceil_cent, classification, floor_cent

Pricing = Literal["passive", "aggressive"]


@dataclass(frozen=True, slots=True)
class LiveOrder:
    key: str
    remaining_qty: int
    limit_price: float | None


@dataclass(frozen=True, slots=True)
class Holding:
    """One position the planner may reduce."""

    symbol: str
    bucket: str
    qty: int  # signed
    mark: float
    bid: float | None
    ask: float | None
    truth_price: float | None
    quote_fresh: bool
    truth_fresh: bool
    available: int  # shares a new reducing order may take (|qty| - other open reducing orders)
    live: LiveOrder | None = None  # this slot's live order on the symbol
    max_order_qty: int | None = None  # liquidity cap per order (None: no cap)
    quote_problem: str | None = None  # the quote gate's verdict: an implausible quote prices nothing

    @property
    def notional(self) -> float:
        return abs(self.qty) * self.mark

    @property
    def reduce_side(self) -> str:
        return "SELL" if self.qty > 0 else "BUY"

    @property
    def slippage_per_dollar(self) -> float:
        if self.bid is None or self.ask is None or self.mark <= 0:
            return math.inf
        return (self.ask - self.bid) / 2 / self.mark


@dataclass(frozen=True, slots=True)
class ReductionPlan:
    candidates: list[Candidate]
    skips: list[Skip]
    numbers: dict[str, Any] = field(default_factory=dict)


def passive_price(side: str, truth: float, bid: float, ask: float, offset: float) -> float:
    """Sell a long at truth - offset but not below the bid; cover a short at
    truth + offset but not above the ask."""
    if side == "SELL":
        return ceil_cent(max(truth - offset, bid))
    return floor_cent(min(truth + offset, ask))


def aggressive_price(side: str, bid: float, ask: float) -> float:
    """Longs hit the bid, shorts lift the ask."""
    return floor_cent(bid) if side == "SELL" else ceil_cent(ask)


def rank(holdings: list[Holding]) -> list[Holding]:
    return sorted(
        holdings,
        key=lambda h: (0 if h.bucket == "MM_PURE" else 1, h.slippage_per_dollar, -h.notional, h.symbol),
    )


def plan_reduction(
    holdings: list[Holding],
    *,
    slot: str,
    purpose: str,
    priority: int,
    excess_notional: float,
    new_budget_notional: float,
    pricing: Pricing,
    soft_offset: float,
    min_qty: int,
    reason: str,
    numbers: dict[str, Any] | None = None,
) -> ReductionPlan:
    """Candidates that remove `excess_notional` (live orders first, then new ones
    limited to `new_budget_notional`), in ranking order."""
    numbers = dict(numbers or {})
    ranked = [h for h in rank(holdings) if h.qty != 0 and h.mark > 0]
    candidates: list[Candidate] = []
    skips: list[Skip] = []

    covered = 0.0
    for holding in ranked:
        live = holding.live
        if live is None or live.remaining_qty <= 0:
            continue
        if covered >= excess_notional:
            break  # not kept: the caller cancels it (target reached)
        price, skip_reason = _price(holding, pricing, soft_offset)
        if price is None:  # kept at its old price (the engine still collars it); said why
            skips.append(Skip(holding.symbol, slot, skip_reason or "no_price", _market_numbers(holding)))
        candidates.append(
            _candidate(holding, slot, purpose, priority, live.remaining_qty, price if price is not None else live.limit_price,
                       reason, numbers, keep_key=live.key)
        )
        covered += live.remaining_qty * holding.mark

    budget = min(new_budget_notional, excess_notional - covered)
    issued = 0.0
    for holding in ranked:
        if budget - issued <= 0:
            break
        if holding.live is not None:
            continue
        price, skip_reason = _price(holding, pricing, soft_offset)
        if price is None:
            skips.append(Skip(holding.symbol, slot, skip_reason or "no_price", _market_numbers(holding)))
            continue
        if holding.available < min_qty and holding.available != abs(holding.qty):
            skips.append(Skip(holding.symbol, slot, "below_min_qty", {"available": holding.available, "min_qty": min_qty}))
            continue
        wanted = max(min(min_qty, holding.available), math.ceil((budget - issued) / holding.mark - 1e-9))
        qty = min(holding.available, wanted, holding.max_order_qty or wanted)
        candidates.append(_candidate(holding, slot, purpose, priority, qty, price, reason, numbers))
        issued += qty * holding.mark

    numbers.update(
        excess_notional=round(excess_notional, 2),
        covered_by_live_notional=round(covered, 2),
        new_budget_notional=round(max(budget, 0.0), 2),
        new_orders_notional=round(issued, 2),
    )
    return ReductionPlan(candidates, skips, numbers)


def _price(holding: Holding, pricing: Pricing, soft_offset: float) -> tuple[float | None, str | None]:
    if holding.quote_problem is not None:
        return None, "implausible_quote"
    if not holding.quote_fresh or holding.bid is None or holding.ask is None:
        return None, "stale_l1"
    side = holding.reduce_side
    if pricing == "aggressive":
        return aggressive_price(side, holding.bid, holding.ask), None  # type: ignore[arg-type]
    if not holding.truth_fresh:
        return None, "stale_prints"
    return passive_price(side, holding.truth_price, holding.bid, holding.ask, soft_offset), None  # type: ignore[arg-type]


def _candidate(
    holding: Holding,
    slot: str,
    purpose: str,
    priority: int,
    qty: int,
    price: float | None,
    reason: str,
    plan_numbers: dict[str, Any],
    keep_key: str | None = None,
) -> Candidate:
    direction = "LONG" if holding.qty > 0 else "SHORT"
    return Candidate(
        slot=slot,
        purpose=purpose,
        symbol=holding.symbol,
        side=holding.reduce_side,
        qty=qty,
        order_type="LMT",
        limit_price=price,
        bucket=holding.bucket,
        classification=classification(holding.bucket, direction, "DEC"),
        priority=priority,
        reason=reason,
        numbers={**plan_numbers, **_market_numbers(holding), "position_qty": holding.qty, "available": holding.available},
        keep_key=keep_key,
    )


def _market_numbers(holding: Holding) -> dict[str, Any]:
    return {
        "mark": round(holding.mark, 4),
        "bid": holding.bid,
        "ask": holding.ask,
        "truth_tick": holding.truth_price,
        "quote_fresh": holding.quote_fresh,
        "truth_fresh": holding.truth_fresh,
        "quote_problem": holding.quote_problem,
    }


def hard_chunk_notional(excess_at_start: float, excess_now: float, chunk_fraction: float, steps_done: int, max_steps: int) -> float:
    """New-order budget of the next hard step: a chunk of `chunk_fraction` of the
    excess measured when HARD_DERISK began, raised if needed so that the steps
    left still cover today's excess; the last step takes all that remains."""
    steps_left = max_steps - steps_done
    if steps_left <= 0 or excess_now <= 0:
        return 0.0
    if steps_left == 1:
        return excess_now
    return min(excess_now, max(chunk_fraction * excess_at_start, excess_now / steps_left))


def excess_notional(gross_pct: float, target_pct: float, equity: float) -> float:
    return max(gross_pct - target_pct, 0.0) / 100.0 * equity

