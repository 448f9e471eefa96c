"""The exposure book over hand-computed portfolios, and its properties (hypothesis):
potential >= current, potential == current without open orders, running totals
== a recount from scratch after any sequence of events."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.exposure import core
from daemons.exposure.service import exposure_payload
from qe import config
from qe.exposure_math import potential_notional, potential_qty
from tests.support.processes import REPO

ALL_RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
RULES = ALL_RULES.exposure
PLAUSIBILITY = ALL_RULES.plausibility
S = 1_000_000_000  # ns per second
NOW = 1_795_000_000 * S


def book_with(equity: float | None = 100_000.0) -> core.ExposureBook:
    book = core.ExposureBook(RULES, PLAUSIBILITY)
    book.set_equity(equity)
    return book


def order(book, ref, symbol, side, qty, bucket="LT", status="SUBMITTED", filled=0, now=NOW):
    return book.apply_order(ref, symbol, side, bucket, status, qty, filled, now)


# --- the shared formula ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qty, buy, sell, expected",
    [(1000, 300, 500, 1300), (1000, 0, 2500, 1500), (-400, 100, 0, 400), (-400, 1000, 0, 600),
     (-400, 0, 100, 500), (0, 200, 300, 300), (0, 0, 0, 0), (200, 100, 200, 300)],
)
def test_potential_qty_is_the_worst_side(qty, buy, sell, expected):
    assert potential_qty(qty, buy, sell) == expected
    assert potential_notional(qty, buy, sell, 24.5) == pytest.approx(expected * 24.5)


def test_negative_open_quantity_is_refused():
    with pytest.raises(ValueError, match="open quantities must be >= 0"):
        potential_qty(100, -1, 0)


@pytest.mark.parametrize("qty, filled, remaining, expected", [(500, 0, 500, 500), (500, 200, 300, 300), (500, 0, 0, 500), (500, 500, 0, 0)])
def test_open_quantity_is_worst_case(qty, filled, remaining, expected):
    assert core.open_quantity(qty, filled, remaining) == expected


# --- hand-computed portfolios ----------------------------------------------------------------------


def portfolio() -> core.ExposureBook:
    """Equity 100,000.
    AGNCN    +1000 LT       mid (25.00+25.10)/2 = 25.05  -> long 25,050; BUY 300 + SELL 500 open
    CIM PRB   -400 LT       truth tick 24.85 (no L1)     -> short 9,940;  BUY 100 (cover) open
    NLY PRG   +200 MM_PURE  mid 24.80                    -> long 4,960;   SELL 200 + BUY 100 open
    TWO PRA      0          no price at all; BUY 100 LT open -> 0, stale, mark None
    """
    book = book_with(100_000.0)
    book.set_quote("AGNCN", 25.00, 25.10, NOW - 5 * S, NOW)
    book.set_truth_tick("CIM PRB", 24.85, NOW - 30 * S, NOW)
    book.set_quote("NLY PRG", 24.75, 24.85, NOW - 1 * S, NOW)
    book.set_position("AGNCN", 1000, "LT", 25.0, NOW)
    book.set_position("CIM PRB", -400, "LT", 25.2, NOW)
    book.set_position("NLY PRG", 200, "MM_PURE", 24.5, NOW)
    order(book, "o1", "AGNCN", "BUY", 300)
    order(book, "o2", "AGNCN", "SELL", 500)
    order(book, "o3", "CIM PRB", "BUY", 100)
    order(book, "o4", "NLY PRG", "SELL", 200, "MM_PURE")
    order(book, "o5", "NLY PRG", "BUY", 100, "MM_PURE")
    order(book, "o6", "TWO PRA", "BUY", 100)
    return book


def test_hand_computed_portfolio_with_shorts_and_orders_on_both_sides():
    book = portfolio()
    totals = book.totals()
    assert (totals.status, totals.error, totals.equity) == ("ok", None, 100_000.0)
    assert totals.long_notional == pytest.approx(30_010.0)
    assert totals.short_notional == pytest.approx(9_940.0)
    assert totals.gross_pct == pytest.approx(39.95)
    assert totals.net_pct == pytest.approx(20.07)
    # AGNCN 1300 * 25.05 + CIM PRB 400 * 24.85 + NLY PRG 300 * 24.80 + TWO PRA 0
    assert totals.potential_notional == pytest.approx(32_565 + 9_940 + 7_440)
    assert totals.potential_gross_pct == pytest.approx(49.945)
    lt, mm = totals.buckets["LT"], totals.buckets["MM_PURE"]
    assert (lt.current_pct, lt.potential_pct, lt.target_pct, lt.max_pct) == (pytest.approx(34.99), pytest.approx(42.505), 80, 90)
    assert (mm.current_pct, mm.potential_pct, mm.target_pct, mm.max_pct) == (pytest.approx(4.96), pytest.approx(7.44), 20, 30)
    assert book.stale_symbols() == ["TWO PRA"]

    lines = {line.symbol: line for line in book.details()}
    assert set(lines) == {"AGNCN", "CIM PRB", "NLY PRG", "TWO PRA"}
    assert lines["AGNCN"] == core.SymbolDetail("AGNCN", 1000, "LT", 25.05, "l1_mid", 25_050.0, 300, 500, pytest.approx(32_565.0))
    assert lines["CIM PRB"] == core.SymbolDetail("CIM PRB", -400, "LT", 24.85, "truth_tick", pytest.approx(-9_940.0), 100, 0, pytest.approx(9_940.0))
    assert lines["NLY PRG"].mark_source == "l1_mid" and lines["NLY PRG"].potential_notional == pytest.approx(7_440.0)
    assert lines["TWO PRA"] == core.SymbolDetail("TWO PRA", 0, "LT", None, "none", 0.0, 100, 0, 0.0,
                                                  "no price at all: no market price, average cost or reference price")


def test_the_payload_carries_exactly_the_spec_quantities():
    book = portfolio()
    payload = exposure_payload(book.totals(), book.stale_symbols(), book.details(), "full")
    assert payload.status == "ok" and payload.detail == "full"
    assert payload.equity == 100_000.0
    assert (payload.long_notional, payload.short_notional) == (pytest.approx(30_010.0), pytest.approx(9_940.0))
    assert (payload.gross_pct, payload.net_pct, payload.potential_gross_pct) == (pytest.approx(39.95), pytest.approx(20.07), pytest.approx(49.945))
    assert payload.buckets["LT"].potential_pct == pytest.approx(42.505)
    assert payload.symbols["TWO PRA"].mark is None and payload.symbols["TWO PRA"].mark_source == "none"
    assert payload.marks_stale == ["TWO PRA"]


def test_a_bucket_is_restricted_to_its_own_position_and_orders():
    """LT position +100 @ 24.00 and an MM_PURE sell order of 300 on the same symbol."""
    book = book_with(10_000.0)
    book.set_quote("AGNCO", 23.99, 24.01, NOW, NOW)
    book.set_position("AGNCO", 100, "LT", 24.0, NOW)
    order(book, "mm1", "AGNCO", "SELL", 300, "MM_PURE")
    totals = book.totals()
    assert totals.potential_notional == pytest.approx(200 * 24.0)  # max(|100|, |100 - 300|)
    assert (totals.buckets["LT"].current_pct, totals.buckets["LT"].potential_pct) == (pytest.approx(24.0), pytest.approx(24.0))
    assert (totals.buckets["MM_PURE"].current_pct, totals.buckets["MM_PURE"].potential_pct) == (0.0, pytest.approx(72.0))


def test_orders_update_and_terminal_statuses_remove_them_for_good():
    book = portfolio()
    before = book.totals().potential_notional
    assert order(book, "o1", "AGNCN", "BUY", 100, status="PARTIALLY_FILLED", filled=200) == core.UPDATED
    assert book.detail("AGNCN").open_buy_qty == 100
    assert order(book, "o1", "AGNCN", "BUY", 300, status="SUBMITTED", filled=0) == core.IGNORED_STALE  # fewer fills: old news
    assert order(book, "o1", "AGNCN", "BUY", 100, status="PARTIALLY_FILLED", filled=200) == core.UNCHANGED
    assert order(book, "o2", "AGNCN", "SELL", 0, status="CANCELLED") == core.CLOSED
    assert order(book, "o2", "AGNCN", "SELL", 500, status="SUBMITTED") == core.IGNORED_AFTER_TERMINAL  # never resurrected
    assert order(book, "o2", "AGNCN", "SELL", 0, status="CANCELLED") == core.UNCHANGED  # a replayed terminal is a no-op
    line = book.detail("AGNCN")
    assert (line.open_buy_qty, line.open_sell_qty) == (100, 0)
    assert line.potential_notional == pytest.approx(1100 * 25.05)
    assert book.totals().potential_notional < before
    assert order(book, "o9", "AGNCN", "SELL", 0, status="REJECTED") == core.CLOSED  # unknown and terminal: just remembered
    assert "o9" in book.terminal and "o9" not in book.orders
    assert book.forget_terminal(NOW + 1) == ["o2", "o9"] and book.terminal == {}


def test_a_symbol_going_flat_leaves_the_book_and_reads_as_zeros():
    book = portfolio()
    book.take_changed()
    assert order(book, "o6", "TWO PRA", "BUY", 0, status="FILLED", filled=100) == core.CLOSED
    assert "TWO PRA" not in book.symbols
    assert book.stale_symbols() == []
    assert book.take_stale_changed() is True
    assert book.take_changed() == {"TWO PRA"}
    assert book.detail("TWO PRA") == core.SymbolDetail("TWO PRA", 0, "LT", None, "none", 0.0, 0, 0, 0.0)
    book.set_position("NLY PRG", 0, "MM_PURE", 0.0, NOW)
    assert "NLY PRG" in book.symbols  # its open orders keep it in the book
    book.set_position("AGNCN", 0, "LT", 0.0, NOW)
    order(book, "o1", "AGNCN", "BUY", 0, status="CANCELLED")
    order(book, "o2", "AGNCN", "SELL", 0, status="CANCELLED")
    assert "AGNCN" not in book.symbols
    assert book.totals_units == book.recount()


def test_the_book_marks_with_the_shared_rule_and_its_inputs():
    """The rule itself is tested in test_marks.py; here: the book gathers the right
    inputs (envelope time of the latest L1, truth tick, average cost, reference)."""
    book = core.ExposureBook(RULES, PLAUSIBILITY, {"AGNCN": 24.0, "TWO PRA": 23.0})
    book.set_equity(100_000.0)
    book.set_position("AGNCN", 1000, "LT", 25.0, NOW)
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.0, "fallback")  # average cost
    order(book, "o1", "TWO PRA", "BUY", 100)
    assert (book.detail("TWO PRA").mark, book.detail("TWO PRA").mark_source) == (23.0, "fallback")  # universe reference
    assert book.unpriced_symbols().keys() == {"AGNCN", "TWO PRA"}
    book.set_quote("AGNCN", 25.00, 25.10, NOW, NOW)
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.05, "l1_mid")
    # A confirmation of the unchanged quote (later envelope time) keeps it current.
    assert book.set_quote("AGNCN", 25.00, 25.10, NOW + 50 * S, NOW + 50 * S) is True
    book.refresh_marks(NOW + 100 * S)
    assert book.detail("AGNCN").mark_source == "l1_mid"
    book.refresh_marks(NOW + 110 * S + 1)
    assert book.detail("AGNCN").mark_source == "last_known" and "AGNCN" in book.stale_symbols()
    assert book.unpriced_symbols().keys() == {"TWO PRA"}
    assert book.totals_units == book.recount()


def test_marks_age_on_refresh_only_and_the_stale_list_follows():
    book = book_with(50_000.0)
    book.set_quote("AGNCN", 25.00, 25.10, NOW, NOW)
    book.set_truth_tick("AGNCN", 25.20, NOW - 10 * S, NOW)
    book.set_position("AGNCN", 1000, "LT", 25.0, NOW)
    assert book.detail("AGNCN").mark_source == "l1_mid"
    book.refresh_marks(NOW + 61 * S)  # the mid is 61 s old: the truth tick (71 s old) takes over
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.20, "truth_tick")
    assert book.totals().long_notional == pytest.approx(25_200.0)
    assert book.stale_symbols() == []
    book.refresh_marks(NOW + 311 * S)  # both old: last known price (the mid is more recent), stale
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.05, "last_known")
    assert book.stale_symbols() == ["AGNCN"] and book.take_stale_changed()
    assert book.totals().long_notional == pytest.approx(25_050.0)  # a stale mark still counts
    book.set_quote("AGNCN", 25.10, 25.20, NOW + 312 * S, NOW + 312 * S)  # a fresh quote arrives
    assert book.detail("AGNCN").mark_source == "l1_mid" and book.stale_symbols() == []
    assert book.totals_units == book.recount()


@pytest.mark.parametrize(
    "equity, message",
    [(0.0, "equity is 0.00 (NetLiquidation <= 0)"), (-25_000.0, "equity is -25000.00 (NetLiquidation <= 0)"),
     (None, "no account equity (NetLiquidation) received yet"), (math.nan, "equity nan is not a finite number"),
     (math.inf, "equity inf is not a finite number")],
)
def test_unusable_equity_is_an_error_state_not_a_crash(equity, message):
    book = portfolio()
    book.set_equity(equity)
    totals = book.totals()
    assert totals.status == "error" and message in totals.error
    assert (totals.gross_pct, totals.net_pct, totals.potential_gross_pct) == (None, None, None)
    assert totals.long_notional == pytest.approx(30_010.0)  # notionals need no equity
    assert book.ratios() is None
    payload = exposure_payload(totals, book.stale_symbols(), book.details(), "full")
    assert payload.status == "error" and payload.buckets == {} and payload.gross_pct is None
    assert payload.equity == (equity if equity is not None and math.isfinite(equity) else 0.0)
    assert payload.model_dump_json()  # serialisable: no NaN sneaks into the event


def test_redelivered_events_change_nothing():
    book = portfolio()
    units = list(book.totals_units)
    book.take_changed()
    assert book.set_quote("AGNCN", 25.00, 25.10, NOW - 5 * S, NOW) is False
    assert book.set_truth_tick("CIM PRB", 24.85, NOW - 30 * S, NOW) is False
    assert book.set_position("AGNCN", 1000, "LT", 25.0, NOW) is False
    assert order(book, "o1", "AGNCN", "BUY", 300) == core.UNCHANGED
    assert book.set_equity(100_000.0) is False
    assert book.totals_units == units and book.take_changed() == set()


def test_a_new_quote_with_the_same_mid_does_not_dirty_the_symbol():
    book = portfolio()
    book.take_changed()
    assert book.set_quote("AGNCN", 25.00, 25.10, NOW - 1 * S, NOW) is True  # newer: persisted
    assert book.take_changed() == set()  # but the line did not change
    book.set_quote("AGNCN", 25.01, 25.11, NOW, NOW)
    assert book.take_changed() == {"AGNCN"}


def test_unknown_bucket_side_or_huge_quantity_is_refused():
    book = book_with()
    with pytest.raises(ValueError, match="unknown bucket 'HF'"):
        book.set_position("AGNCN", 1, "HF", 1.0, NOW)
    with pytest.raises(ValueError, match="order side must be BUY or SELL"):
        order(book, "x", "AGNCN", "HOLD", 1)
    with pytest.raises(ValueError, match="beyond the 10,000,000 shares"):
        book.set_position("AGNCN", -10_000_001, "LT", 1.0, NOW)
    with pytest.raises(core.QuantityOutOfRange, match="beyond the 10,000,000 shares"):
        order(book, "x", "AGNCN", "BUY", 10_000_001)
    for n in range(10):
        order(book, f"big{n}", "AGNCN", "BUY", 10_000_000)
    units, orders = list(book.totals_units), dict(book.orders)
    with pytest.raises(core.QuantityOutOfRange, match="would have 100,000,001 shares open to BUY in LT"):
        order(book, "big10", "AGNCN", "BUY", 1)
    assert (book.totals_units, book.orders) == (units, orders)  # refused before anything changed
    assert order(book, "big9", "AGNCN", "BUY", 9_999_999, status="PARTIALLY_FILLED", filled=1) == core.UPDATED  # replaces, fits


def test_marks_and_orders_round_trip_through_json():
    inputs = core.SavedPrices(mid=250_500, mid_ts_ns=NOW, tick=None, tick_ts_ns=0)
    assert core.SavedPrices.from_json(inputs.to_json()) == inputs
    open_order = core.OpenOrder("o1", "AGNCN", "BUY", "LT", 300, 0)
    assert core.OpenOrder.from_json("o1", open_order.to_json()) == open_order


# --- the quote gate (SPEC 9): an implausible quote never moves a mark ------------------------------------


@pytest.mark.parametrize(
    "bid, ask, flagged, problem",
    [
        (0.01, 999_999.00, None, "wide_spread"),  # the stub quote: gross went 11 % -> 45,003 %
        (0.01, 0.02, None, "jump"),  # narrow, but 99.9 % from the trusted reference
        (2400.00, 2400.02, None, "jump"),
        (25.10, 25.00, None, "crossed"),
        (25.00, 25.10, "jump", "jump"),  # market data's verdict is honoured even if it looks fine here
    ],
)
def test_an_implausible_quote_on_a_held_symbol_does_not_move_gross(bid, ask, flagged, problem):
    book = portfolio()
    before = book.totals()
    assert book.set_quote("AGNCN", bid, ask, NOW, NOW, flagged=flagged) is True  # the flag is persisted
    assert book.quote_problem("AGNCN") == problem
    after = book.totals()
    assert (after.gross_pct, after.potential_gross_pct) == (before.gross_pct, before.potential_gross_pct)
    line = book.detail("AGNCN")
    # No fresh truth tick: the last trusted mid stands as the last known price, flagged stale.
    assert (line.mark, line.mark_source) == (25.05, "last_known")
    assert book.stale_symbols() == ["AGNCN", "TWO PRA"]
    assert book.set_quote("AGNCN", bid, ask, NOW, NOW, flagged=flagged) is False  # the same episode: nothing new
    assert book.totals_units == book.recount()


def test_an_implausible_quote_falls_back_to_a_fresh_truth_tick_and_recovers_on_a_plausible_one():
    book = portfolio()
    book.set_feature("AGNCN", 25.20, NOW - 10 * S, 25.20, 25.20, NOW)
    book.set_quote("AGNCN", 0.01, 999_999.00, NOW, NOW)
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.20, "truth_tick")
    assert book.stale_symbols() == ["TWO PRA"]  # a fresh truth tick is not stale
    assert book.set_quote("AGNCN", 25.10, 25.20, NOW + S, NOW + S) is True
    assert book.quote_problem("AGNCN") is None
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.15, "l1_mid")
    assert book.totals_units == book.recount()


def test_the_stub_quote_is_caught_even_with_no_reference_at_all():
    book = book_with(100_000.0)
    book.set_position("AGNCN", 1000, "LT", 25.0, NOW)
    book.set_quote("AGNCN", 0.01, 999_999.00, NOW, NOW)
    assert book.quote_problem("AGNCN") == "wide_spread"
    # Never a $500,000 mark: the position counts at its fallback (average cost), reported.
    assert (book.detail("AGNCN").mark, book.detail("AGNCN").mark_source) == (25.0, "fallback")
    assert book.totals().gross_pct == 25.0
    assert book.stale_symbols() == ["AGNCN"]


def test_a_real_move_confirmed_by_prints_is_followed():
    book = portfolio()
    book.set_feature("AGNCN", None, 0, None, 27.90, NOW)  # prints at the new level (not yet a truth tick)
    book.set_quote("AGNCN", 27.85, 27.95, NOW, NOW)
    assert book.quote_problem("AGNCN") is None and book.detail("AGNCN").mark == 27.90


def test_a_quote_stamped_in_2100_does_not_stay_fresh():
    book = portfolio()
    in_2100 = 4_102_444_800 * S
    book.set_quote("AGNCN", 25.00, 25.20, in_2100, NOW)
    assert book.detail("AGNCN").mark_source == "l1_mid"
    book.refresh_marks(NOW + 61 * S)  # received at NOW: 61 s later it is old, whatever it claimed
    assert book.detail("AGNCN").mark_source == "last_known"


def test_absurd_and_non_finite_inputs_are_refused_before_anything_changes():
    plausibility = PLAUSIBILITY.model_copy(update={"max_quantity": 1_000_000})
    book = core.ExposureBook(RULES, plausibility)
    book.set_equity(100_000.0)
    book.set_quote("AGNCN", 25.00, 25.10, NOW, NOW)
    book.set_position("AGNCN", 1000, "LT", 25.0, NOW)
    units = list(book.totals_units)
    with pytest.raises(core.QuantityOutOfRange, match="beyond the 1,000,000 shares"):
        book.set_position("AGNCN", 1_000_001, "LT", 25.0, NOW)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(core.NotFinite):
            book.set_position("AGNCN", 500, "LT", bad, NOW)
    with pytest.raises(core.QuantityOutOfRange):
        order(book, "x", "AGNCN", "BUY", 100, status="PARTIALLY_FILLED", filled=10**400)
    assert book.totals_units == units and book.detail("AGNCN").qty == 1000 and book.orders == {}
    assert book.set_feature("AGNCN", math.nan, NOW, math.inf, -1.0, NOW) is False  # nothing usable: nothing changes


def test_nan_equity_is_unknown_once_not_a_change_on_every_event():
    book = portfolio()
    assert book.set_equity(math.nan) is True
    assert book.set_equity(math.nan) is False
    assert book.totals().status == "error" and book.totals().gross_pct is None


def test_new_mark_inputs_round_trip_and_old_saved_inputs_still_load():
    inputs = core.SavedPrices(mid=250_500, mid_ts_ns=NOW, tick=251_000, tick_ts_ns=NOW, grpan=250_000, last_print=250_100,
                             implausible="wide_spread")
    assert core.SavedPrices.from_json(inputs.to_json()) == inputs
    old_format = {"mid": 250_500, "mid_ts_ns": NOW, "tick": None, "tick_ts_ns": 0}
    assert core.SavedPrices.from_json(old_format) == core.SavedPrices(mid=250_500, mid_ts_ns=NOW)
    for bad in (float("nan"), -1, True, 10**30):
        with pytest.raises(ValueError):
            core.SavedPrices.from_json({**old_format, "mid": bad})


# --- properties ---------------------------------------------------------------------------------------

SYMBOLS = ["AGNCN", "CIM PRB", "NLY PRG", "TWO PRA"]
prices = st.integers(min_value=100, max_value=10_000).map(lambda cents: cents / 100)
operations = st.one_of(
    st.tuples(st.just("position"), st.sampled_from(SYMBOLS), st.integers(-5_000, 5_000), st.sampled_from(["LT", "MM_PURE"])),
    st.tuples(st.just("order"), st.sampled_from([f"o{n}" for n in range(8)]), st.sampled_from(SYMBOLS),
              st.sampled_from(["BUY", "SELL"]), st.sampled_from(["LT", "MM_PURE"]),
              st.sampled_from(["SUBMITTED", "PARTIALLY_FILLED", "PENDING_CANCEL", "FILLED", "CANCELLED"]),
              st.integers(0, 3_000), st.integers(0, 3_000)),
    st.tuples(st.just("quote"), st.sampled_from(SYMBOLS), prices, st.integers(0, 50), st.integers(-400, 0)),
    st.tuples(st.just("tick"), st.sampled_from(SYMBOLS), prices, st.integers(-400, 0)),
    st.tuples(st.just("refresh"), st.integers(0, 400)),
    st.tuples(st.just("equity"), st.one_of(st.none(), st.floats(-1e6, 1e7, allow_nan=False))),
)


def run_operations(ops) -> core.ExposureBook:
    book = book_with(1_000_000.0)
    now = NOW
    for op in ops:
        kind = op[0]
        if kind == "position":
            book.set_position(op[1], op[2], op[3], 20.0, now)
        elif kind == "order":
            _, ref, symbol, side, bucket, status, qty, filled = op
            book.apply_order(ref, symbol, side, bucket, status, qty, filled, now)
        elif kind == "quote":
            bid = op[2]
            book.set_quote(op[1], bid, bid + op[3] / 100, now + op[4] * S, now)
        elif kind == "tick":
            book.set_truth_tick(op[1], op[2], now + op[3] * S, now)
        elif kind == "refresh":
            now += op[1] * S
            book.refresh_marks(now)
        elif kind == "equity":
            book.set_equity(op[1])
    return book


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, max_size=60))
def test_running_totals_always_equal_a_recount(ops):
    book = run_operations(ops)
    assert book.totals_units == book.recount()
    assert all(book.exposed(state) for state in book.symbols.values())
    assert book.stale == {symbol for symbol, state in book.symbols.items() if state.mark.stale}
    assert {o.symbol for o in book.orders.values() if o.open_qty} <= set(book.symbols)


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, max_size=60))
def test_potential_is_at_least_current_and_equal_without_open_orders(ops):
    book = run_operations(ops)
    units = book.totals_units
    gross = units[0] + units[1]
    assert units[2] >= gross
    for index in range(len(book.bucket_names)):
        assert units[4 + 2 * index] >= units[3 + 2 * index]
    assert sum(units[3 + 2 * i] for i in range(len(book.bucket_names))) == gross  # buckets partition gross
    for line in book.details():
        assert line.potential_notional >= abs(line.notional) - 1e-9
    # Cancel every open order: potential collapses to current, per symbol and per bucket.
    for ref, open_order in list(book.orders.items()):
        book.apply_order(ref, open_order.symbol, open_order.side, open_order.bucket, "CANCELLED", 0, 0, NOW)
    units = book.totals_units
    assert units[2] == units[0] + units[1]
    for index in range(len(book.bucket_names)):
        assert units[4 + 2 * index] == units[3 + 2 * index]
    totals = book.totals()
    if totals.status == "ok":
        assert totals.potential_gross_pct == pytest.approx(totals.gross_pct)


@settings(max_examples=200, deadline=None)
@given(st.integers(-100_000, 100_000), st.integers(0, 100_000), st.integers(0, 100_000), prices)
def test_formula_properties(qty, buy, sell, mark):
    assert potential_notional(qty, buy, sell, mark) >= abs(qty) * mark - 1e-9
    assert potential_notional(qty, 0, 0, mark) == pytest.approx(abs(qty) * mark)


# --- the exposure: section of risk_rules.yaml -----------------------------------------------------------

INVALID_EXPOSURE = [
    ({"cap_recovery_target_pct": 130}, "exposure: cap_recovery_target_pct (130) must be below hard_cap_pct (130)"),
    ({"buckets": {"LT": {"target_pct": 80, "max_pct": 90}}}, "exposure.buckets: missing bucket(s) ['MM_PURE']"),
    ({"buckets": {"LT": {"target_pct": 95, "max_pct": 90}, "MM_PURE": {"target_pct": 20, "max_pct": 30}}},
     "exposure.buckets.LT: target_pct (95) must not exceed max_pct (90)"),
    ({"default_bucket": "HF"}, "exposure.default_bucket: Input should be 'LT' or 'MM_PURE'"),
    ({"l1_max_age_s": 0}, "exposure.l1_max_age_s: Input should be greater than 0"),
    ({"min_publish_gap_s": 30}, "exposure: min_publish_gap_s (30) must not exceed publish_interval_s (15)"),
    ({"terminal_order_memory_s": 60}, "exposure.terminal_order_memory_s: Input should be greater than or equal to 3600"),
    ({"hard_cap_pct": 124}, "session.regimes.OPEN.gross_tolerance_pct (125) is above exposure.hard_cap_pct (124)"),
]


@pytest.mark.parametrize("override, message", INVALID_EXPOSURE, ids=[next(iter(o)) for o, _ in INVALID_EXPOSURE])
def test_invalid_exposure_rules_are_named(tmp_path: Path, override, message):
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    document["exposure"] = {**document["exposure"], **override}
    path = tmp_path / "risk_rules.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(config.ConfigError) as raised:
        config.load_rules(path)
    assert message in str(raised.value)


def test_shipped_exposure_rules_are_the_spec_numbers():
    assert (RULES.hard_cap_pct, RULES.cap_recovery_target_pct, RULES.default_bucket) == (130, 123, "LT")
    assert {name: (b.target_pct, b.max_pct) for name, b in RULES.buckets.items()} == {"LT": (80, 90), "MM_PURE": (20, 30)}
    assert (RULES.l1_max_age_s, RULES.truth_tick_max_age_s, RULES.publish_interval_s) == (60, 300, 15)
    with pytest.raises(ValidationError):  # no built-in defaults any more: the file is the only source
        config.ExposureRules()
