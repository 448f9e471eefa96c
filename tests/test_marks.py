"""The marks rule (qe.marks, SPEC 6 Marks): every branch, pure."""

from __future__ import annotations

import pytest

from qe.marks import Mark, MarkInputs, MarkRules, MarkSource, quote_current, resolve

S = 1_000_000_000
NOW = 1_795_000_000 * S
RULES = MarkRules.of(60, 300)


def mark(now: int = NOW, **inputs) -> Mark:
    return resolve(MarkInputs(**inputs), now, RULES)


def test_a_current_plausible_quote_gives_the_mid():
    got = mark(mid=25.05, mid_vouched_ns=NOW - 60 * S, tick=25.0, tick_ts_ns=NOW - 10 * S)
    assert got == Mark(25.05, MarkSource.L1_MID) and not got.stale and got.market_priced  # exactly 60 s: current


def test_a_quiet_quote_confirmed_by_the_feed_stays_current_for_ten_minutes_and_more():
    # The quote last CHANGED 10 minutes ago (quote_ts_ns is not an input at all); market
    # data vouched for it 5 s ago: current.
    assert mark(mid=25.05, mid_vouched_ns=NOW - 5 * S).source == MarkSource.L1_MID
    assert quote_current(NOW - 5 * S, NOW, RULES.l1_max_age_ns)


def test_an_unconfirmed_quote_is_not_current_after_l1_max_age():
    inputs = dict(mid=25.05, mid_vouched_ns=NOW - 60 * S, tick=25.0, tick_ts_ns=NOW - 10 * S)
    assert mark(NOW + 1, **inputs) == Mark(25.0, MarkSource.TRUTH_TICK)


@pytest.mark.parametrize("feed_problem", ["feed down", "data farm broken", "halted"])
def test_a_known_feed_problem_makes_a_fresh_quote_not_current(feed_problem):
    got = mark(mid=25.05, mid_vouched_ns=NOW, feed_problem=feed_problem, tick=25.0, tick_ts_ns=NOW - 400 * S)
    assert got.source == MarkSource.LAST_KNOWN and got.price == 25.05 and got.stale
    assert feed_problem in got.reason
    assert not quote_current(NOW, NOW, RULES.l1_max_age_ns, feed_problem=feed_problem)


def test_an_implausible_latest_quote_makes_the_last_trusted_mid_not_current():
    got = mark(mid=25.05, mid_vouched_ns=NOW, quote_problem="wide_spread")
    assert got.source == MarkSource.LAST_KNOWN and got.price == 25.05 and "wide_spread" in got.reason
    assert mark(mid=25.05, mid_vouched_ns=NOW, quote_problem="crossed", tick=25.0, tick_ts_ns=NOW).source == MarkSource.TRUTH_TICK


def test_a_vouched_time_in_the_future_is_not_current():
    assert mark(mid=25.05, mid_vouched_ns=NOW + 3600 * S).source == MarkSource.LAST_KNOWN
    assert mark(tick=25.0, tick_ts_ns=NOW + 3600 * S).source == MarkSource.LAST_KNOWN


def test_a_fresh_truth_tick_then_the_more_recent_trusted_price():
    assert mark(tick=25.0, tick_ts_ns=NOW - 300 * S) == Mark(25.0, MarkSource.TRUTH_TICK)  # exactly 300 s
    newer_tick = mark(NOW + 1, mid=25.05, mid_vouched_ns=NOW - 400 * S, tick=25.0, tick_ts_ns=NOW - 300 * S)
    assert (newer_tick.price, newer_tick.source) == (25.0, MarkSource.LAST_KNOWN)
    newer_mid = mark(mid=25.05, mid_vouched_ns=NOW - 100 * S, tick=25.0, tick_ts_ns=NOW - 400 * S)
    assert (newer_mid.price, newer_mid.source) == (25.05, MarkSource.LAST_KNOWN)


def test_the_fallback_chain_average_cost_then_reference_then_none():
    by_cost = mark(avg_cost=24.5, reference=24.0)
    assert (by_cost.price, by_cost.source, by_cost.stale, by_cost.market_priced) == (24.5, MarkSource.FALLBACK, True, False)
    assert "average cost" in by_cost.reason
    by_reference = mark(avg_cost=None, reference=24.0)
    assert (by_reference.price, by_reference.source) == (24.0, MarkSource.FALLBACK) and "reference" in by_reference.reason
    assert mark(avg_cost=0.0, reference=24.0).price == 24.0  # a zero cost is no price
    nothing = mark()
    assert (nothing.price, nothing.source, nothing.stale, nothing.market_priced) == (None, MarkSource.NONE, True, False)
    # A market price, however old, wins over the fallbacks.
    assert mark(tick=25.0, tick_ts_ns=NOW - 9000 * S, avg_cost=24.5, reference=24.0).source == MarkSource.LAST_KNOWN


def test_integer_mark_units_work_the_same():
    assert mark(mid=250_500, mid_vouched_ns=NOW) == Mark(250_500, MarkSource.L1_MID)
    assert mark(avg_cost=245_000) == Mark(245_000, MarkSource.FALLBACK, "no market price yet: the broker's average cost")


def test_the_reason_does_not_change_while_the_mark_does_not():
    inputs = dict(mid=25.05, mid_vouched_ns=NOW - 100 * S)
    assert mark(NOW, **inputs) == mark(NOW + 500 * S, **inputs)  # no running age in the text
