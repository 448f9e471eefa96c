"""Intent arbitration and the hard-cap filter (SPEC 6): pure functions.

arbitrate(candidates, context):
  1. suppression, each with a reason:
     - HALTED: everything (only cancels are issued, by the reconciler);
     - CAP_RECOVERY, or current gross >= the hard cap: every increase;
     - CAP_RECOVERY / HARD_DERISK, or gross > 120: MM increases;
     - HARD_DERISK: LT band correctives (increases and decreases);
     - any other mode than NORMAL (THROTTLE, SOFT_DERISK), broker down, stale
       exposure/session, market closed: every increase ("increases_blocked");
     - a bucket over its max: increases in that bucket.
  2. merge candidates with the same symbol, direction (LONG/SHORT) and effect
     (INC/DEC): quantities summed, the highest priority's slot, type and price
     kept;
  3. conflicts on one symbol (what is left pulls it both ways and comes from
     different purposes): the higher priority wins; on equal priority the
     decrease wins (safer). Two quotes of one market maker are not a conflict.

cap_filter(candidates, book, ...): every new increase, highest priority first, is
kept only if the Brain's potential gross (exposure snapshot + unacknowledged
intents + what this evaluation already let through) stays at or below the
increase ceiling (the regime's tolerance less `strategies.tolerance_margin_pct`,
never above the hard cap), and its bucket's potential at or below the bucket
max; otherwise it is shrunk to the largest whole-share quantity (>= min qty) that
fits, or dropped. Why the ceiling sits below the tolerance: an increase that took
potential over the tolerance would make the mode machine de-risk it again at
once (NORMAL <-> SOFT_DERISK flapping, issue 13).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from qe.exposure_math import potential_notional

from .model import Candidate


@dataclass(frozen=True, slots=True)
class ArbitrationContext:
    mode: str
    gross_pct: float | None
    hard_cap_pct: float = 130.0
    mm_increase_gross_limit_pct: float = 120.0
    increases_allowed: bool = True  # data fresh, broker up, market open, mode NORMAL
    increases_blocked_reason: str = ""
    blocked_buckets: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Suppressed:
    candidate: Candidate
    reason: str


@dataclass(slots=True)
class ArbitrationResult:
    kept: list[Candidate] = field(default_factory=list)
    suppressed: list[Suppressed] = field(default_factory=list)


def _suppression_reason(c: Candidate, ctx: ArbitrationContext) -> str | None:
    gross = ctx.gross_pct
    if ctx.mode == "HALTED":
        return "halted"
    if c.is_increase and (ctx.mode == "CAP_RECOVERY" or (gross is not None and gross >= ctx.hard_cap_pct)):
        return "cap_recovery_no_increases"
    if c.is_increase and c.purpose == "MM_QUOTE" and (
        ctx.mode in ("CAP_RECOVERY", "HARD_DERISK") or (gross is not None and gross > ctx.mm_increase_gross_limit_pct)
    ):
        return "mm_increases_dropped"
    if c.purpose == "LT_BAND" and ctx.mode == "HARD_DERISK":
        return "lt_band_dropped_in_hard_derisk"
    if c.is_increase and ctx.mode != "NORMAL":
        return f"no_increases_in_{ctx.mode.lower()}"
    if c.is_increase and not ctx.increases_allowed:
        return ctx.increases_blocked_reason or "increases_blocked"
    if c.is_increase and c.bucket in ctx.blocked_buckets:
        return "bucket_over_max"
    return None


def arbitrate(candidates: list[Candidate], ctx: ArbitrationContext) -> ArbitrationResult:
    result = ArbitrationResult()
    survivors: list[Candidate] = []
    for candidate in candidates:
        reason = _suppression_reason(candidate, ctx)
        if reason is None:
            survivors.append(candidate)
        else:
            result.suppressed.append(Suppressed(candidate, reason))

    # Merge same symbol / direction / effect.
    groups: dict[tuple[str, str, str], list[Candidate]] = {}
    for candidate in survivors:
        groups.setdefault((candidate.symbol, candidate.direction, candidate.effect), []).append(candidate)
    merged: list[Candidate] = []
    for members in groups.values():
        if len(members) == 1:
            merged.append(members[0])
            continue
        members.sort(key=lambda c: (-c.priority, c.slot))
        top = members[0]
        # Quotes of one market maker on one side are already one order per slot;
        # only different purposes (or slots) merge into the top one.
        total = sum(c.qty for c in members)
        merged_from = [f"{c.slot}:{c.qty}" for c in members]
        merged.append(
            replace(
                top,
                qty=total,
                keep_key=top.keep_key if total == top.qty else None,
                numbers={**top.numbers, "merged_from": merged_from},
                reason=top.reason + f" (merged {len(members)} candidates)",
            )
        )
        for other in members[1:]:
            result.suppressed.append(Suppressed(other, f"merged_into_{top.slot}"))

    # Conflicts per symbol: keep the highest-priority purpose.
    by_symbol: dict[str, list[Candidate]] = {}
    for candidate in merged:
        by_symbol.setdefault(candidate.symbol, []).append(candidate)
    for _symbol, members in by_symbol.items():
        purposes = {c.purpose for c in members}
        sides = {c.side for c in members}
        if len(purposes) == 1 or len(sides) == 1:
            result.kept.extend(members)
            continue
        winner = max(members, key=lambda c: (c.priority, c.effect == "DEC", c.purpose))
        for candidate in members:
            if candidate.purpose == winner.purpose or candidate.side == winner.side:
                result.kept.append(candidate)
            else:
                result.suppressed.append(Suppressed(candidate, f"conflict_lost_to_{winner.purpose}"))
    result.kept.sort(key=lambda c: (-c.priority, c.symbol, c.slot))
    return result


# --- the hard cap ---------------------------------------------------------------------------


@dataclass(slots=True)
class SymbolBook:
    """One symbol as the Brain's potential-gross arithmetic sees it."""

    qty: int
    open_buy: int
    open_sell: int
    mark: float
    bucket: str

    def potential(self) -> float:
        return potential_notional(self.qty, self.open_buy, self.open_sell, self.mark)


@dataclass(slots=True)
class PotentialBook:
    """The Brain's potential gross: the exposure snapshot's total plus adjustments
    per symbol. `base` is the snapshot's per-symbol view (qty, open_buy, open_sell,
    mark, bucket); symbols touched since are copied into `symbols`."""

    equity: float
    potential_pct: float
    bucket_potential_pct: dict[str, float]
    base: Mapping[str, Any] = field(default_factory=dict)
    symbols: dict[str, SymbolBook] = field(default_factory=dict)
    parent: "PotentialBook | None" = None

    def overlay(self) -> "PotentialBook":
        """A child book to try things on: O(1) to make, the parent stays untouched."""
        return PotentialBook(self.equity, self.potential_pct, dict(self.bucket_potential_pct), self.base, {}, self)

    def merge_into_parent(self) -> "PotentialBook":
        """Apply this overlay's changes to its parent (what was actually issued)."""
        parent = self.parent
        assert parent is not None
        parent.symbols.update(self.symbols)
        parent.potential_pct = self.potential_pct
        parent.bucket_potential_pct = self.bucket_potential_pct
        return parent

    def book(self, symbol: str, default_mark: float, bucket: str) -> SymbolBook:
        book = self.symbols.get(symbol)
        if book is not None:
            return book
        if self.parent is not None:
            inherited = self.parent.book(symbol, default_mark, bucket)
            return SymbolBook(inherited.qty, inherited.open_buy, inherited.open_sell, inherited.mark, inherited.bucket)
        snap = self.base.get(symbol)
        if snap is not None:
            mark = snap.mark if snap.mark else default_mark
            return SymbolBook(snap.qty, snap.open_buy, snap.open_sell, mark, snap.bucket)
        return SymbolBook(0, 0, 0, default_mark, bucket)

    def delta_pct(self, symbol: str, side: str, qty: int, default_mark: float, bucket: str) -> float:
        book = self.book(symbol, default_mark, bucket)
        before = book.potential()
        after = potential_notional(
            book.qty, book.open_buy + (qty if side == "BUY" else 0), book.open_sell + (qty if side == "SELL" else 0), book.mark
        )
        return (after - before) / self.equity * 100

    def add(self, symbol: str, side: str, qty: int, default_mark: float, bucket: str) -> float:
        delta = self.delta_pct(symbol, side, qty, default_mark, bucket)
        book = self.symbols.get(symbol)
        if book is None:
            book = self.symbols[symbol] = self.book(symbol, default_mark, bucket)
        if side == "BUY":
            book.open_buy += qty
        else:
            book.open_sell += qty
        self.potential_pct += delta
        self.bucket_potential_pct[book.bucket] = self.bucket_potential_pct.get(book.bucket, 0.0) + delta
        return delta


@dataclass(slots=True)
class CapResult:
    kept: list[Candidate] = field(default_factory=list)
    suppressed: list[Suppressed] = field(default_factory=list)
    deltas: dict[int, float] = field(default_factory=dict)  # index in kept -> potential delta pct


def increase_ceiling_pct(tolerance_pct: float | None, margin_pct: float, hard_cap_pct: float) -> float | None:
    """The potential gross a new risk increase may take the book to: the regime's
    tolerance less the margin, never above the hard cap. None (no regime, so no
    tolerance known): no increase at all - unknown is not zero."""
    if tolerance_pct is None:
        return None
    return min(tolerance_pct - margin_pct, hard_cap_pct)


def cap_filter(
    candidates: list[Candidate],
    book: PotentialBook,
    *,
    hard_cap_pct: float,
    increase_ceiling_pct: float | None,
    bucket_max_pct: Mapping[str, float],
    min_qty: int,
    mark_of: Mapping[str, float],
) -> CapResult:
    """Keep decreases and re-pricings as they are; admit new increases only within
    the increase ceiling (<= the hard cap) and their bucket's max."""
    result = CapResult()
    no_room = "no_equity" if book.equity <= 0 else "no_regime_tolerance" if increase_ceiling_pct is None else None
    if no_room is not None:
        for candidate in candidates:
            if candidate.is_increase and candidate.keep_key is None:
                result.suppressed.append(Suppressed(candidate, no_room))
            else:
                result.kept.append(candidate)
        return result
    ceiling = min(increase_ceiling_pct, hard_cap_pct)  # type: ignore[type-var]
    for candidate in sorted(candidates, key=lambda c: (-c.priority, c.symbol, c.slot)):
        mark = mark_of.get(candidate.symbol) or candidate.limit_price or 0.0
        if not candidate.is_increase or candidate.keep_key is not None:
            # A live order being re-priced is already counted in the book.
            delta = 0.0 if candidate.keep_key is not None else book.add(
                candidate.symbol, candidate.side, candidate.qty, mark, candidate.bucket)
            result.deltas[len(result.kept)] = delta
            result.kept.append(candidate)
            continue
        bucket_max = bucket_max_pct.get(candidate.bucket, float("inf"))

        def fits(qty: int) -> bool:
            delta = book.delta_pct(candidate.symbol, candidate.side, qty, mark, candidate.bucket)
            return (
                book.potential_pct + delta <= ceiling + 1e-9
                and book.bucket_potential_pct.get(candidate.bucket, 0.0) + delta <= bucket_max + 1e-9
            )

        qty = candidate.qty
        if not fits(qty):
            qty = _largest_fitting(candidate.qty, fits)
            if qty < min_qty:
                result.suppressed.append(Suppressed(candidate, _binding_limit(book, candidate, mark, min_qty,
                                                                              hard_cap_pct, ceiling)))
                continue
        before = book.potential_pct
        delta = book.add(candidate.symbol, candidate.side, qty, mark, candidate.bucket)
        kept = candidate if qty == candidate.qty else replace(
            candidate, qty=qty, numbers={**candidate.numbers, "shrunk_from_qty": candidate.qty}
        )
        kept = replace(kept, numbers={**kept.numbers, "brain_potential_before_pct": round(before, 4),
                                      "brain_potential_after_pct": round(book.potential_pct, 4),
                                      "increase_ceiling_pct": round(ceiling, 4)})
        result.deltas[len(result.kept)] = delta
        result.kept.append(kept)
    return result


def _largest_fitting(upper: int, fits: Any) -> int:
    """Largest q in [0, upper] with fits(q) (fits is monotone: more shares, more risk)."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _binding_limit(book: PotentialBook, candidate: Candidate, mark: float, qty: int, hard_cap: float, ceiling: float) -> str:
    """Which limit refused `qty` shares: the hard cap, the regime tolerance's margin, or the bucket max."""
    after = book.potential_pct + book.delta_pct(candidate.symbol, candidate.side, qty, mark, candidate.bucket)
    if after > hard_cap + 1e-9:
        return "hard_cap"
    if after > ceiling + 1e-9:
        return "regime_tolerance"
    return "bucket_max"
