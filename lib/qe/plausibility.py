"""Data plausibility (SPEC 9): the quote gate, the print gate and the price collar.

One place for each rule. Market data applies the quote gate before publishing (it
flags, it does not drop); exposure, the Brain and execution apply it again wherever a
quote becomes a mark or a price, against their own trusted reference. The prints
worker keeps implausible prints out of truth ticks and GRPAN. The Brain prices inside
the collar and execution refuses any new or modified order price outside it.

Every function here is pure: plain numbers in, a verdict out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from .config import PrintGateRules, QuoteGateRules

CENT = 0.01


class QuoteProblem(StrEnum):
    CROSSED = "crossed"
    WIDE_SPREAD = "wide_spread"
    JUMP = "jump"
    ABSURD_SIZE = "absurd_size"
    ABSURD_PRICE = "absurd_price"  # a side or the last price above plausibility.max_price
    NOT_FINITE = "not_finite"


class PrintProblem(StrEnum):
    ABSURD_SIZE = "absurd_size"
    FAR_FROM_REFERENCE = "far_from_reference"
    TOO_OLD = "too_old"
    NOT_FINITE = "not_finite"


@dataclass(frozen=True, slots=True)
class QuoteVerdict:
    problem: QuoteProblem | None
    mid: float | None  # None for a one-sided quote (valid, it just has no mid)
    detail: str = ""

    @property
    def plausible(self) -> bool:
        return self.problem is None


def _finite_positive(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _away_pct(price: float, reference: float) -> float:
    return abs(price - reference) / reference * 100


def trusted_reference(truth_tick: float | None, grpan: float | None, trusted_mark: float | None) -> float | None:
    """The price the market has confirmed: the last truth tick, else GRPAN, else the last
    trusted mark. None when nothing is known (a new symbol)."""
    for candidate in (truth_tick, grpan, trusted_mark):
        if _finite_positive(candidate):
            return candidate
    return None


def quote_verdict(
    bid: float | None,
    ask: float | None,
    *,
    reference: float | None,
    confirming_price: float | None,
    rules: QuoteGateRules,
    bid_size: int = 0,
    ask_size: int = 0,
) -> QuoteVerdict:
    """Is this quote fit to be a mark or a price anchor?

    Absent sides are None (IB's -1/0 and Hammer's omissions are mapped to None by the
    feed): a one-sided quote is valid but has no mid. A present side, or the mid of a
    two-sided quote, more than `max_jump_pct` from the trusted reference is a jump unless
    `confirming_price` (the latest trusted print) lies within `max_jump_pct` of it.
    Without a reference, only crossed, wide and absurd-size quotes are caught."""
    for side, value in (("bid", bid), ("ask", ask)):
        if value is not None and not _finite_positive(value):
            return QuoteVerdict(QuoteProblem.NOT_FINITE, None, f"{side} {value!r}")
    if max(bid_size, ask_size) > rules.max_size:
        return QuoteVerdict(QuoteProblem.ABSURD_SIZE, None, f"size {max(bid_size, ask_size)} > {rules.max_size}")
    if bid is not None and ask is not None:
        if bid >= ask:
            return QuoteVerdict(QuoteProblem.CROSSED, None, f"bid {bid:g} >= ask {ask:g}")
        mid = (bid + ask) / 2
        spread = ask - bid
        spread_pct = spread / mid * 100
        if spread * 100 > rules.max_spread_cents + 1e-9 and spread_pct > rules.max_spread_pct:
            return QuoteVerdict(QuoteProblem.WIDE_SPREAD, None, f"spread {spread:.2f} ({spread_pct:.1f}% of mid)")
        anchors: tuple[float, ...] = (mid,)
    else:
        mid = None
        anchors = tuple(value for value in (bid, ask) if value is not None)
    if reference is not None:
        for price in anchors:
            if _away_pct(price, reference) > rules.max_jump_pct and not _confirmed(price, confirming_price, rules.max_jump_pct):
                return QuoteVerdict(
                    QuoteProblem.JUMP, None, f"{price:g} is {_away_pct(price, reference):.1f}% from reference {reference:g}"
                )
    return QuoteVerdict(None, mid)


def _confirmed(price: float, confirming_price: float | None, pct: float) -> bool:
    return _finite_positive(confirming_price) and _away_pct(price, confirming_price) <= pct  # type: ignore[arg-type]


def print_problem(
    price: float,
    size: int,
    *,
    age_s: float,
    reference: float | None,
    recent_excluded: Sequence[float],
    rules: PrintGateRules,
) -> PrintProblem | None:
    """Why a print must stay out of truth ticks and GRPAN, or None when it may count.

    A print far from the reference counts anyway once the `confirm_prints` prints
    excluded just before it all agree with it (the market really moved): a wrong
    reference never locks a symbol out for good."""
    if not _finite_positive(price):
        return PrintProblem.NOT_FINITE
    if size > rules.max_size:
        return PrintProblem.ABSURD_SIZE
    if age_s > rules.max_age_s:
        return PrintProblem.TOO_OLD
    if reference is None or _away_pct(price, reference) <= rules.max_deviation_pct:
        return None
    recent = list(recent_excluded)[-rules.confirm_prints :]
    if len(recent) >= rules.confirm_prints and all(_away_pct(other, price) <= rules.max_deviation_pct for other in recent):
        return None
    return PrintProblem.FAR_FROM_REFERENCE


# --- price collar -----------------------------------------------------------------------------


def collar_bounds(reference: float, collar_pct: float) -> tuple[float, float]:
    """The lowest and highest price on the $0.01 grid within collar_pct of the reference."""
    low = math.ceil(round(reference * (1 - collar_pct / 100) / CENT, 6)) * CENT
    high = math.floor(round(reference * (1 + collar_pct / 100) / CENT, 6)) * CENT
    return round(low, 2), round(high, 2)


def within_collar(price: float, reference: float, collar_pct: float) -> bool:
    low, high = collar_bounds(reference, collar_pct)
    return low - 1e-9 <= price <= high + 1e-9


def clamp_to_collar(price: float, reference: float, collar_pct: float) -> float:
    """The price moved inside the collar (on the cent grid)."""
    low, high = collar_bounds(reference, collar_pct)
    return round(min(max(price, low), high), 2)


# --- episodes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EpisodeChange:
    symbol: str
    started: bool  # True: the symbol became implausible; False: it is plausible again
    problem: str | None


def episode_change(symbol: str, was_implausible: bool, problem: str | None) -> EpisodeChange | None:
    """One alert per episode: a change only when a symbol crosses between plausible and
    implausible (callers keep `was_implausible` per symbol)."""
    now_implausible = problem is not None
    if now_implausible == was_implausible:
        return None
    return EpisodeChange(symbol, now_implausible, problem)
