"""The P&L core (lib/qe/pnl.py) against hand-computed days."""

from __future__ import annotations

import pytest

from qe.marks import Mark, MarkSource
from qe.pnl import Book, Carried, Trade, apply_trade, day_pnl, start_of_day, unique_trades

S = 1_000_000_000
T0 = 1_795_000_000 * S


def trade(n, symbol, side, qty, price, commission=1.0, bucket="LT"):
    return Trade(f"e{n}", symbol, bucket, side, qty, price, T0 + n * S, commission, n)


def mid(price):
    return Mark(price, MarkSource.L1_MID)


def test_several_buys_then_a_partial_close():
    # Buy 100 @ 10 and 300 @ 11: average (1000 + 3300) / 400 = 10.75.
    # Sell 200 @ 12: realized (12 - 10.75) * 200 = 250; 200 left at 10.75.
    # Mark 11.50: unrealized (11.50 - 10.75) * 200 = 150. Commissions 1 + 1.5 + 1 = 3.5.
    fills = [trade(1, "AAA", "BUY", 100, 10.0, 1.0), trade(2, "AAA", "BUY", 300, 11.0, 1.5), trade(3, "AAA", "SELL", 200, 12.0, 1.0)]
    day = day_pnl([], fills, {"AAA": mid(11.5)})
    line = day.symbols["AAA"]
    assert (line.qty, line.avg_price) == (200, pytest.approx(10.75))
    assert line.realized == pytest.approx(250.0)
    assert line.unrealized == pytest.approx(150.0)
    assert line.commissions == pytest.approx(3.5)
    assert line.total == pytest.approx(396.5)
    assert (line.bought_qty, line.sold_qty, line.fills, line.commissions_pending) == (400, 200, 3, 0)
    assert day.account.total == pytest.approx(396.5)


def test_long_to_short_through_zero():
    # Buy 100 @ 20, sell 250 @ 21: the 100 close for +100; -150 open at 21.
    # Mark 20.50: unrealized (20.50 - 21) * -150 = +75.
    fills = [trade(1, "BBB", "BUY", 100, 20.0, 1.0), trade(2, "BBB", "SELL", 250, 21.0, 1.25)]
    line = day_pnl([], fills, {"BBB": mid(20.5)}).symbols["BBB"]
    assert (line.qty, line.avg_price) == (-150, pytest.approx(21.0))
    assert line.realized == pytest.approx(100.0)
    assert line.unrealized == pytest.approx(75.0)
    assert line.total == pytest.approx(100 + 75 - 2.25)


def test_short_to_long_through_zero_and_back_to_flat():
    # Sell 200 @ 25 (short), buy 300 @ 24: +200 on the short, +100 long at 24.
    # Sell 100 @ 24.40: +40, flat: no unrealized, the mark does not matter.
    fills = [trade(1, "CCC", "SELL", 200, 25.0), trade(2, "CCC", "BUY", 300, 24.0), trade(3, "CCC", "SELL", 100, 24.4)]
    line = day_pnl([], fills, {"CCC": Mark(None, MarkSource.NONE, "no price")}).symbols["CCC"]
    assert (line.qty, line.avg_price) == (0, 0.0)
    assert line.realized == pytest.approx(240.0)
    assert line.unrealized == 0.0
    assert line.mark_stale is False  # flat: no mark needed
    assert line.total == pytest.approx(237.0)


def test_short_partly_covered():
    # Sell 200 @ 25 and 100 @ 25.30: average short (5000 + 2530) / 300 = 25.10.
    # Buy 50 @ 24.60: realized (25.10 - 24.60) * 50 = 25; -250 left at 25.10.
    # Mark 24.80: unrealized (24.80 - 25.10) * -250 = 75.
    fills = [trade(1, "DDD", "SELL", 200, 25.0), trade(2, "DDD", "SELL", 100, 25.3), trade(3, "DDD", "BUY", 50, 24.6)]
    line = day_pnl([], fills, {"DDD": mid(24.8)}).symbols["DDD"]
    assert (line.qty, line.avg_price) == (-250, pytest.approx(25.10))
    assert line.realized == pytest.approx(25.0)
    assert line.unrealized == pytest.approx(75.0)


def test_carried_position_starts_from_the_previous_close():
    # 1000 carried, previous close 24.00, bought at 23.00 originally.
    # Sell 400 @ 24.30: day realized 0.30 * 400 = 120 (vs cost: 1.30 * 400 = 520).
    # Mark 24.10: unrealized 0.10 * 600 = 60. Day total 180 - 1.
    carried = [Carried("EEE", "LT", 1000, 24.0, "close", 23.0)]
    line = day_pnl(carried, [trade(1, "EEE", "SELL", 400, 24.3)], {"EEE": mid(24.1)}).symbols["EEE"]
    assert (line.start_qty, line.qty, line.prev_close) == (1000, 600, 24.0)
    assert line.realized == pytest.approx(120.0)
    assert line.realized_vs_cost == pytest.approx(520.0)
    assert line.unrealized == pytest.approx(60.0)
    assert line.total == pytest.approx(179.0)


def test_carried_short_untouched_is_marked_against_the_close():
    # -500 carried at close 30.00, mark 30.20: the day lost 0.20 * 500 = 100.
    line = day_pnl([Carried("FFF", "LT", -500, 30.0)], [], {"FFF": mid(30.2)}).symbols["FFF"]
    assert line.unrealized == pytest.approx(-100.0)
    assert line.realized == 0.0 and line.fills == 0
    assert line.realized_vs_cost is None  # no broker cost given


def test_fill_without_commission_is_counted_and_pending_until_its_report():
    fills = [trade(1, "GGG", "BUY", 100, 10.0, 1.0), trade(2, "GGG", "SELL", 100, 10.5, None)]
    day = day_pnl([], fills, {"GGG": mid(10.2)})
    line = day.symbols["GGG"]
    assert line.realized == pytest.approx(50.0)
    assert (line.commissions, line.commissions_pending) == (pytest.approx(1.0), 1)
    assert day.account.commissions_pending == 1 and day.pending_exec_ids == ["e2"]
    # The commission report arrives later: the same execId again, now with its commission.
    late = Trade("e2", "GGG", "LT", "SELL", 100, 10.5, T0 + 2 * S, 1.0, 9)
    day = day_pnl([], [*fills, late], {"GGG": mid(10.2)})
    assert (day.symbols["GGG"].commissions, day.symbols["GGG"].commissions_pending) == (pytest.approx(2.0), 0)
    assert day.symbols["GGG"].fills == 2 and day.pending_exec_ids == []


def test_duplicate_exec_ids_count_once():
    one = trade(1, "HHH", "BUY", 100, 10.0)
    assert unique_trades([one, one, one]) == [one]
    assert day_pnl([], [one, one], {}).symbols["HHH"].qty == 100


def test_fills_are_applied_in_time_order_whatever_the_arrival_order():
    # Sell first (short 100 @ 11), then buy 100 @ 10: +100. The other order would open long.
    sell = trade(1, "III", "SELL", 100, 11.0)
    buy = trade(2, "III", "BUY", 100, 10.0)
    assert day_pnl([], [buy, sell], {}).symbols["III"].realized == pytest.approx(100.0)


def test_stale_marks_are_flagged_and_buckets_add_up():
    carried = [Carried("LTA", "LT", 100, 10.0), Carried("MMA", "MM_PURE", 200, 20.0)]
    fills = [trade(1, "MMB", "BUY", 50, 5.0, 1.0, bucket="MM_PURE")]
    marks = {"LTA": mid(10.5), "MMA": Mark(19.0, MarkSource.LAST_KNOWN, "quote not confirmed within 20s"), "MMB": mid(5.2)}
    day = day_pnl(carried, fills, marks)
    assert day.marks_stale == ["MMA"]
    assert day.symbols["MMA"].mark_reason.startswith("quote not confirmed")
    assert day.buckets["LT"].total == pytest.approx(50.0)
    assert day.buckets["MM_PURE"].total == pytest.approx(-200.0 + 10.0 - 1.0)
    assert day.buckets["MM_PURE"].marks_stale == 1
    assert day.account.total == pytest.approx(day.buckets["LT"].total + day.buckets["MM_PURE"].total)
    assert day.account.symbols == 3


def test_open_position_without_any_mark_is_flagged_and_counts_no_unrealized():
    line = day_pnl([], [trade(1, "JJJ", "BUY", 10, 10.0)], {}).symbols["JJJ"]
    assert line.mark_stale and line.unrealized == 0.0 and line.mark_source == "none"


@pytest.mark.parametrize(
    "book, qty, price, expected, realized",
    [
        (Book(), 100, 10.0, Book(100, 10.0), 0.0),
        (Book(100, 10.0), -100, 9.0, Book(), -100.0),
        (Book(-100, 10.0), 40, 9.0, Book(-60, 10.0), 40.0),
        (Book(-100, 10.0), 150, 11.0, Book(50, 11.0), -100.0),
        (Book(100, 10.0), 0, 99.0, Book(100, 10.0), 0.0),
    ],
)
def test_apply_trade(book, qty, price, expected, realized):
    after, gained = apply_trade(book, qty, price)
    assert (after.qty, after.avg) == (expected.qty, pytest.approx(expected.avg))
    assert gained == pytest.approx(realized)


def test_start_of_day_takes_the_close_then_the_reference_then_the_cost():
    positions = {"A": (100, "LT", 9.0), "B": (-50, "MM_PURE", 20.0), "C": (10, "LT", 5.0), "D": (0, "LT", 0.0)}
    carried = {c.symbol: c for c in start_of_day(positions, {"A": 10.0}, {"B": 21.0})}
    assert set(carried) == {"A", "B", "C"}
    assert (carried["A"].prev_close, carried["A"].prev_close_source, carried["A"].avg_cost) == (10.0, "close", 9.0)
    assert (carried["B"].prev_close, carried["B"].prev_close_source) == (21.0, "reference")
    assert (carried["C"].prev_close, carried["C"].prev_close_source) == (5.0, "avg_cost")
