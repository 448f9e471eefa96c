"""Step `reprice_and_cancel` of `decide`: the kept candidates against the live intents (pure).

NEW for a free slot, MODIFY to re-price a live order, CANCEL for an order that is no
longer wanted (every live order when HALTED). Every NEW/MODIFY price is put inside
the collar around the symbol's trusted reference; no reference, no order. Sizes
respect execution's liquidity cap and, for a decrease, reduce-only room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from qe.contracts import Intent, idempotency_key, intent_id_for
from qe.plausibility import clamp_to_collar, within_collar

from .arbitration import Suppressed
from .evaluation import Evaluation
from .model import DERISK_SLOTS, MM_SLOTS, NS, Candidate, Outstanding, Skip

Scope = set[tuple[str | None, str]]  # (symbol, or None for every symbol; slot) whose live orders are judged


@dataclass(frozen=True, slots=True)
class IssuedIntent:
    key: str
    intent: Intent
    slot: str


@dataclass(frozen=True, slots=True)
class IntentContext:
    """What every intent of one evaluation carries: the day, the equity it was sized
    on, the base of its trace and the events that caused it."""

    day: str | None
    equity: float | None
    trace: dict[str, Any]
    causation: list[str]


@dataclass
class OrderChanges:
    """What `reprice_and_cancel` returns: intents in the order issued, the bookkeeping
    records they create or change, the generation counters they advanced, what was
    suppressed here and the symbols skipped (no collar reference)."""

    intents: list[IssuedIntent] = field(default_factory=list)
    records: dict[str, Outstanding] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    suppressed: list[Suppressed] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def add(self, issued: IssuedIntent, record: Outstanding, generation: tuple[str, int] | None = None) -> None:
        self.intents.append(issued)
        self.records[record.key] = record
        if generation is not None:
            self.generations[generation[0]] = generation[1]


def generation_field(day: str | None, slot: str, symbol: str, side: str) -> str:
    return f"{day}|{slot}|{symbol}|{side}"


def intent_key(day: str | None, slot: str, symbol: str, side: str, generation: int) -> str:
    return idempotency_key("intent", day, slot, symbol, side, generation)


def reprice_and_cancel(ev: Evaluation, kept: list[Candidate], scope: Scope, mode: str,
                       context: IntentContext) -> OrderChanges:
    """Cancels first (a replacement for the same slot waits for the cancel to be
    confirmed), then a MODIFY or a NEW for every wanted order."""
    changes = OrderChanges()
    wanted, changes.suppressed, changes.skips = collared_orders(ev, kept)
    if mode == "HALTED":
        wanted = {}
        scope = {(None, slot) for slot in (*DERISK_SLOTS, *MM_SLOTS, "LT_BAND")}
    for live, reason in unwanted_orders(ev, wanted, scope, mode):
        changes.add(*cancel_intent(ev, live, reason, context))
    for (symbol, slot), candidate in wanted.items():
        live = ev.live.get((symbol, slot))
        if live is not None:
            if repriced(ev, candidate, live):
                made = ev.contain(symbol, "modify", lambda: modify_intent(ev, live, candidate, context))
                if made is not None:
                    changes.add(*made)
            continue
        if candidate.keep_key is not None:
            continue  # the order it continues is gone; the next evaluation plans afresh
        sized, why = new_order_size(ev, candidate, changes.intents)
        if sized is None:
            changes.suppressed.append(Suppressed(candidate, why))
            continue
        made = ev.contain(symbol, "new intent", lambda: new_intent(ev, sized, changes.generations, context))
        if made is not None:
            changes.add(*made)
    return changes


Wanted = dict[tuple[str, str], Candidate]  # (symbol, slot) -> the order wanted there


def collared_orders(ev: Evaluation, kept: list[Candidate]) -> tuple[Wanted, list[Suppressed], list[Skip]]:
    """The first candidate of each (symbol, slot), its price inside the collar; those
    without a price or a reference suppressed (and skipped: no reference)."""
    wanted: Wanted = {}
    suppressed: list[Suppressed] = []
    skips: list[Skip] = []
    for candidate in kept:
        collared, why = _collared(ev, candidate)
        if collared is None:
            suppressed.append(Suppressed(candidate, why))
            if why == "no_reference":
                skips.append(Skip(candidate.symbol, candidate.slot, "no_reference", {"limit_price": candidate.limit_price}))
            continue
        wanted.setdefault((candidate.symbol, candidate.slot), collared)
    return wanted, suppressed, skips


def unwanted_orders(ev: Evaluation, wanted: Wanted, scope: Scope, mode: str) -> list[tuple[Outstanding, str]]:
    """Live orders in scope that no wanted candidate continues: (order, reason to cancel)."""
    symbols = None if any(symbol is None for symbol, _slot in scope) else {s for s, _ in scope}
    out = []
    for (symbol, slot), live in ev.live.items(symbols):
        candidate = wanted.get((symbol, slot))
        in_play = (None, slot) in scope or (symbol, slot) in scope
        if not in_play or live.cancel_sent:
            continue
        if candidate is not None and _same_order(candidate, live):
            continue
        why = "no longer wanted" if candidate is None else "replaced by a different order"
        out.append((live, f"cancel {live.slot} {live.symbol}: {why} (mode {mode})"))
    return out


def repriced(ev: Evaluation, candidate: Candidate, live: Outstanding) -> bool:
    """Is the live order of the candidate's slot to be re-priced to it now? Not while
    a cancel is pending or it is a different order (waiting for the cancel), nor for a
    move below `reprice_min_change` or within `reprice_min_interval_s` of its last change."""
    if live.cancel_sent or not _same_order(candidate, live):
        return False
    cfg = ev.cfg.decision
    price = candidate.limit_price
    return (
        price is not None
        and live.limit_price is not None
        and abs(price - live.limit_price) >= cfg.reprice_min_change - 1e-9
        and ev.now - live.last_change_ns >= cfg.reprice_min_interval_s * NS
    )


def new_order_size(ev: Evaluation, candidate: Candidate, issued: list[IssuedIntent]) -> tuple[Candidate | None, str]:
    """The candidate sized for a NEW order (liquidity cap; reduce-only room for a
    decrease, less what this evaluation already issued), or (None, why not)."""
    symbol = candidate.symbol
    if ev.settling(symbol):
        return None, "awaiting_position_after_fill"
    if ev.cooling_down(symbol):
        return None, "cooldown_after_reject"
    # Never more than execution's liquidity cap allows in one order.
    qty = min(candidate.qty, ev.view.order_caps.get(symbol, candidate.qty))
    if not candidate.is_increase:
        position_qty, _bucket = ev.position_qty(symbol)
        reducing_side = "SELL" if position_qty > 0 else "BUY"
        if position_qty == 0 or candidate.side != reducing_side:
            return None, "not_reduce_only"
        available = abs(position_qty) - ev.open_reducing_qty(symbol, position_qty)
        available -= sum(i.intent.qty for i in issued
                         if i.intent.symbol == symbol and i.intent.action == "NEW" and i.intent.side == reducing_side)
        qty = min(qty, available)
        # As in execution: an order closing a whole odd-lot position may be smaller.
        if qty < ev.cfg.decision.min_order_qty and qty != abs(position_qty):
            return None, "reduce_only_below_min_qty"
    return (replace(candidate, qty=qty) if qty != candidate.qty else candidate), ""


def _collared(ev: Evaluation, candidate: Candidate) -> tuple[Candidate | None, str]:
    """The candidate with its price inside `plausibility.collar_pct` of the symbol's
    trusted reference (SPEC 9), or (None, why): no reference, no price, no order."""
    price = candidate.limit_price
    if price is None or candidate.order_type != "LMT":
        return None, "no_price"  # the Brain only sends limit orders: a price it can bound
    reference = ev.reference(candidate.symbol)
    if reference is None:
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


def new_intent(ev: Evaluation, candidate: Candidate, generations: dict[str, int],
               context: IntentContext) -> tuple[IssuedIntent, Outstanding, tuple[str, int]]:
    """The NEW intent for a candidate, its bookkeeping record and its generation counter
    advanced (`generations`: this evaluation's counters so far, read only)."""
    gen_field = generation_field(context.day, candidate.slot, candidate.symbol, candidate.side)
    generation = generations.get(gen_field, ev.view.generations.get(gen_field, 0))
    key = intent_key(context.day, candidate.slot, candidate.symbol, candidate.side, generation)
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
        risk_delta_gross_pct=_risk_delta(candidate, mark, context.equity),
        reason=candidate.reason,
        causation_ids=context.causation,
        trace={**context.trace, "rule": candidate.numbers.get("rule", candidate.purpose), "slot": candidate.slot,
               "generation": generation, "numbers": _jsonable(candidate.numbers)},
    )
    record = Outstanding(
        key=key, slot=candidate.slot, symbol=candidate.symbol, side=candidate.side, qty=candidate.qty,
        bucket=candidate.bucket, classification=candidate.classification, order_type=candidate.order_type,
        limit_price=candidate.limit_price, priority=candidate.priority, intent_type=candidate.purpose, ttl_s=ttl,
        issued_ns=ev.now, last_change_ns=ev.now,
    )
    return IssuedIntent(key, intent, candidate.slot), record, (gen_field, generation + 1)


def _follow_up(ev: Evaluation, live: Outstanding, action: str, key: str, price: float | None, reason: str,
               context: IntentContext, numbers: dict[str, Any]) -> Intent:
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
        causation_ids=context.causation,
        trace={**context.trace, "rule": action.lower(), "slot": live.slot, "target_intent_key": live.key,
               "numbers": _jsonable(numbers)},
    )


def modify_intent(ev: Evaluation, live: Outstanding, candidate: Candidate,
                  context: IntentContext) -> tuple[IssuedIntent, Outstanding]:
    """The MODIFY re-pricing a live order to the candidate's price, and its record."""
    key = idempotency_key("modify", live.key, live.modifies + 1)
    reason = f"re-price {live.slot} {live.symbol} {live.limit_price:.2f} -> {candidate.limit_price:.2f}"
    numbers = {**candidate.numbers, "old_price": live.limit_price, "new_price": candidate.limit_price}
    intent = _follow_up(ev, live, "MODIFY", key, candidate.limit_price, reason, context, numbers)
    return IssuedIntent(key, intent, live.slot), replace(live, limit_price=candidate.limit_price, last_change_ns=ev.now,
                                                         modifies=live.modifies + 1)


def cancel_intent(ev: Evaluation, live: Outstanding, reason: str, context: IntentContext) -> tuple[IssuedIntent, Outstanding]:
    """The CANCEL of a live order, and its record (cancel sent)."""
    key = idempotency_key("cancel", live.key)
    intent = _follow_up(ev, live, "CANCEL", key, live.limit_price, reason, context, {})
    return IssuedIntent(key, intent, live.slot), replace(live, cancel_sent=True, last_change_ns=ev.now)


def _jsonable(numbers: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in numbers.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[name] = value
    return out
