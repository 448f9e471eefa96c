"""The Brain's own plausibility guards (SPEC 9): pure functions over plain data.

Every number from another daemon is hostile until checked, even after the contracts
have validated it (a contract may be older or laxer than this code; a value can be
well-formed and absurd). Three kinds of guard live here:

* ingest guards, used by the handler before anything reaches the view or the
  `state:decision*` hashes: absurd values (non-finite, prices above `max_price`,
  quantities above `max_quantity`) are rejected, and every timestamp is bounded by
  the Brain's own clock at receipt, so a time in 2100 never keeps anything fresh;
* the quote gate as the Brain applies it: market data's flag (`L1.implausible`) is
  honoured and `qe.plausibility.quote_verdict` is applied again against the Brain's
  own trusted reference (last truth tick, GRPAN, last trusted mark);
* the exposure check: a snapshot in error, or with a missing / negative / non-finite
  number, is *unknown*, never zero.

The rules themselves (gate, collar, reference) are `qe.plausibility`'s; nothing here
re-implements them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping

from qe.alert_types import FEED_QUOTES_STALE_UNTIL_A_QUOTE
from qe.config import PlausibilityRules
from qe.plausibility import quote_verdict, trusted_reference

from .model import NS, ExposureSnap, Market

# Equity and notionals far beyond any desk's account: a sign of a broken feed.
MAX_MONEY = 1e13


def finite(value: Any) -> bool:
    """A real number (not a bool, not NaN/inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _is_finite(value)


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def price_ok(value: Any, rules: PlausibilityRules) -> bool:
    return finite(value) and 0 < value <= rules.max_price


def qty_ok(value: Any, rules: PlausibilityRules, *, signed: bool = False) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (abs(value) if signed else value) <= rules.max_quantity and (signed or value >= 0)


def received_ns(ts_ns: int | None, now_ns: int) -> int:
    """A timestamp from another daemon as the Brain may use it: never later than the
    Brain's own clock at receipt (a time in 2100 would otherwise stay fresh forever)."""
    if ts_ns is None or not isinstance(ts_ns, int) or ts_ns <= 0:
        return now_ns
    return min(ts_ns, now_ns)


def age_within(ts_ns: int, now_ns: int, max_age_s: float) -> bool:
    """Fresh on the Brain's clock, in either direction: a timestamp far in the future
    is as untrustworthy as one far in the past."""
    return abs(now_ns - ts_ns) <= max_age_s * NS


# --- ingest guards ---------------------------------------------------------------------------


def apply_l1(market: Market, l1: Any, vouched_ns: int, now_ns: int, rules: PlausibilityRules) -> str | None:
    """Record an L1 quote in `market`; returns why it is not usable (None: usable).
    `vouched_ns` is the L1 event's envelope ts_ns: when market data vouched for the quote
    (docs/market_data.md); its age decides whether the quote is current (qe.marks).

    An absurd quote is recorded as *present but unusable* (sides cleared, flagged), so
    the previous quote cannot stay fresh and no absurd number reaches saved state. A
    plausible quote with a reference moves the last trusted mark."""
    market.quote_ts_ns = received_ns(vouched_ns, now_ns)
    problem = None
    for side in ("bid", "ask"):
        value = getattr(l1, side)
        if value is not None and not price_ok(value, rules):
            problem = "absurd_price"
    if not (qty_ok(l1.bid_size, rules) and qty_ok(l1.ask_size, rules)):
        problem = problem or "absurd_size"
    if problem is None and l1.implausible:
        problem = str(l1.implausible)[:32]
    if problem is not None:
        market.bid = market.ask = None
        market.bid_size = market.ask_size = 0
        market.flagged = problem
        return problem
    market.bid, market.ask = l1.bid, l1.ask
    market.bid_size, market.ask_size = l1.bid_size, l1.ask_size
    market.flagged = None
    problem = quote_problem(market, rules)
    reference = trusted_reference(market.truth_price, market.grpan, market.trusted_mark)
    if problem is None and reference is not None and market.bid is not None and market.ask is not None:
        # Only a quote checked against a reference becomes the trusted mark: a first
        # quote judged against nothing must not anchor the collar on its own.
        market.trusted_mark = (market.bid + market.ask) / 2
        market.trusted_ts_ns = market.quote_ts_ns
    return problem


def feed_episodes_standing(episodes: Mapping[str, int], vouched_ns: int | None, now_ns: int) -> dict[str, int]:
    """The feed-wide stale episodes (alert type -> ts_ns of its raise) still standing once
    market data has vouched for a quote at `vouched_ns` (the L1 envelope's ts_ns, bounded
    by the Brain's clock: a time from the future proves nothing beyond now).

    An episode whose premise is that no quote can arrive (`FEED_QUOTES_STALE_UNTIL_A_QUOTE`:
    the feed is disconnected, ev.l1 is silent) is over once a quote vouched for after its
    raise arrives, resolve or not: a resolve can be lost (market data killed with it
    unflushed, or restarted without the episode in memory), and a latch nobody ends
    would keep every quote "not current" for the rest of the day, every de-risk order
    skipped as stale_l1. A quote vouched for before the raise (a late backlog) ends
    nothing; `feed_stale` ends only with its resolve."""
    vouched = received_ns(vouched_ns, now_ns)
    return {kind: raised for kind, raised in episodes.items()
            if not (kind in FEED_QUOTES_STALE_UNTIL_A_QUOTE and vouched > raised)}


def apply_feature(market: Market, feature: Any, event_ts_ns: int, now_ns: int, rules: PlausibilityRules) -> str | None:
    """Record a feature event; an absurd one is ignored whole (returns why)."""
    truth = feature.truth_tick
    prices = [feature.grpan_price, feature.last_price, truth.price if truth is not None else None]
    if any(p is not None and not price_ok(p, rules) for p in prices):
        return "absurd_price"
    if not qty_ok(feature.print_count, rules) or (truth is not None and not qty_ok(truth.size, rules)):
        return "absurd_quantity"
    if not (finite(feature.concentration_pct) and 0 <= feature.concentration_pct <= 100):
        return "absurd_concentration"
    market.grpan = feature.grpan_price
    market.concentration_pct = float(feature.concentration_pct)
    market.print_count = feature.print_count
    market.feature_ts_ns = received_ns(event_ts_ns, now_ns)
    if feature.last_price is not None:
        market.last_price = feature.last_price
    if truth is not None:
        market.truth_price = truth.price
        market.truth_ts_ns = received_ns(truth.ts_ns, now_ns)
    return None


def position_problem(qty: Any, avg_cost: Any, rules: PlausibilityRules) -> str | None:
    if not qty_ok(qty, rules, signed=True):
        return "absurd_quantity"
    if not finite(avg_cost) or abs(avg_cost) > rules.max_price:
        return "absurd_avg_cost"
    return None


def equity_ok(value: Any) -> bool:
    return finite(value) and abs(value) <= MAX_MONEY


def market_problem(market: Market, rules: PlausibilityRules) -> str | None:
    """A market record (e.g. reloaded from state written by an older version) holding
    an absurd number."""
    for value in (market.bid, market.ask, market.truth_price, market.grpan, market.last_price, market.trusted_mark):
        if value is not None and not price_ok(value, rules):
            return "absurd_price"
    for value in (market.bid_size, market.ask_size, market.print_count):
        if not qty_ok(value, rules):
            return "absurd_quantity"
    return None


# --- the quote gate as the Brain applies it --------------------------------------------------


def quote_problem(market: Market, rules: PlausibilityRules) -> str | None:
    """Why this market's quote may be neither a mark nor a price anchor (None: it may).
    Market data's verdict stands; otherwise the gate is applied again against the
    Brain's own trusted reference. No quote at all is not a problem (it is absent)."""
    if market.flagged:
        return market.flagged
    if market.bid is None and market.ask is None:
        return None
    reference = trusted_reference(market.truth_price, market.grpan, market.trusted_mark)
    verdict = quote_verdict(
        market.bid, market.ask, reference=reference, confirming_price=market.truth_price, rules=rules.quote,
        bid_size=market.bid_size, ask_size=market.ask_size,
    )
    return None if verdict.plausible else str(verdict.problem)


def judged(market: Market, rules: PlausibilityRules) -> Market:
    """The market as the pricing code may see it: an implausible quote is removed
    (no bid, no ask) and its problem named, so nothing downstream can use it."""
    problem = quote_problem(market, rules)
    if problem is None:
        return market
    return replace(market, bid=None, ask=None, quote_problem=problem)


def reference_of(market: Market | None) -> float | None:
    """The trusted reference for collars: last truth tick, else GRPAN, else last trusted mark."""
    if market is None:
        return None
    return trusted_reference(market.truth_price, market.grpan, market.trusted_mark)


# --- exposure: unknown is not zero -----------------------------------------------------------


def exposure_problem(snap: ExposureSnap | None, rules: PlausibilityRules) -> str | None:
    """Why this snapshot cannot be used as the exposure (None: it can)."""
    if snap is None:
        return "no exposure snapshot"
    if snap.problem:
        return snap.problem
    for name, value in (("gross_pct", snap.gross_pct), ("potential_gross_pct", snap.potential_pct), ("equity", snap.equity)):
        if value is None:
            return f"{name} missing"
        if not finite(value) or value < 0 or abs(value) > MAX_MONEY:
            return f"{name} {value!r}"
    if snap.equity <= 0:
        return "equity <= 0"
    if not snap.ok:
        return "exposure status error"
    for bucket, b in snap.buckets.items():
        if not all(finite(v) and v >= 0 for v in (b.current_pct, b.potential_pct)):
            return f"bucket {bucket} {b.current_pct!r}/{b.potential_pct!r}"
    for symbol, s in snap.symbols.items():
        if not qty_ok(s.qty, rules, signed=True) or not qty_ok(s.open_buy, rules) or not qty_ok(s.open_sell, rules):
            return f"{symbol}: absurd quantity"
        if s.mark is not None and not price_ok(s.mark, rules):
            return f"{symbol}: absurd mark"
    return None


def unknown_exposure(template: ExposureSnap, problem: str) -> ExposureSnap:
    """What is kept of an unusable snapshot: its identity, time and why, no numbers
    (so nothing absurd reaches saved state)."""
    return ExposureSnap(
        snapshot_id=template.snapshot_id, event_id=template.event_id, ts_ns=template.ts_ns, ok=False, equity=0.0,
        gross_pct=None, potential_pct=None, buckets={}, symbols={}, problem=problem[:200],
    )
