"""Reconciliation with the broker's P&L (qe.pnl.reconcile), pure: our books on IB's basis
against hand-computed reqPnLSingle figures (the simulator's documented story), against the
simulator's own bookkeeping for random fill sequences, and the mismatch cases."""

from __future__ import annotations

import random

import pytest

from qe.marks import Mark, MarkSource
from qe.pnl import BrokerFigures, Carried, Trade, apply_trade_ib, Book, day_pnl, reconcile
from sim.broker import Account

# The simulator's story (tests/test_sim_pnl.py): long 1000 CIM PRB at an average cost of 24.50,
# previous close 24.70; mark 24.91 after each step.
CARRIED = Carried("CIM PRB", "LT", 1000, 24.70, "close", 24.50)
FILLS = [("BUY", 200, 24.82, 1.0), ("SELL", 500, 24.80, 2.5), ("SELL", 1000, 24.80, 5.0), ("BUY", 300, 24.82, 1.5)]
# (position, daily, unrealized, realized) as IB reports them, by hand (see test_sim_pnl.EXPECTED).
EXPECTED = {
    1: (1200, 1200 * 24.91 - 24700 - 200 * 24.82 - 1.0, 1200 * 24.91 - 29465, 0.0),
    2: (700, 169.5, 700 * (24.91 - 29465 / 1200), 120.416667),
    3: (-300, 54.5, -34.5, 289.0),
    4: (0, 80.0, 0.0, 280.0),
}
MARK = Mark(24.91, MarkSource.L1_MID)


def trades(n: int) -> list[Trade]:
    return [Trade(f"e{i}", "CIM PRB", "LT", side, qty, price, 1_000 + i, fee, i) for i, (side, qty, price, fee) in enumerate(FILLS[:n])]


def broker(position, daily, unrealized, realized, mark=24.91) -> BrokerFigures:
    return BrokerFigures(position, daily, unrealized, realized, position * mark)


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_the_simulators_story_reconciles_exactly(step):
    line = day_pnl([CARRIED], trades(step), {"CIM PRB": MARK}).symbols["CIM PRB"]
    result = reconcile(line, broker(*EXPECTED[step]))
    assert result.status == "ok", result.problems
    assert result.position_diff == 0
    assert result.realized_diff == pytest.approx(0.0, abs=1e-4)
    assert result.unrealized_diff == pytest.approx(0.0, abs=1e-4)
    assert result.daily_diff == pytest.approx(0.0, abs=1e-4)


def test_ib_book_puts_opening_commissions_in_the_cost_and_closing_ones_in_realized():
    book, realized = apply_trade_ib(Book(), 100, 10.0, 1.0)
    assert (book.qty, book.avg, realized) == (100, pytest.approx(10.01), 0.0)
    book, realized = apply_trade_ib(book, -150, 11.0, 3.0)  # closes 100 (fee 2), opens 50 short (fee 1)
    assert realized == pytest.approx((11.0 - 10.01) * 100 - 2.0)
    assert (book.qty, book.avg) == (-50, pytest.approx(11.0 - 1.0 / 50))


def test_random_fill_sequences_agree_with_the_simulators_bookkeeping():
    rng = random.Random(17)
    for _case in range(200):
        account = Account("DU1", 1_000_000.0)
        start = rng.choice([0, 500, -300, 1200])
        avg_cost = round(rng.uniform(20, 26), 4)
        if start:
            account.set_position("X", start, avg_cost, "LT")
        account.start_day({"X": 24.70})
        ours = []
        for i in range(rng.randint(1, 8)):
            side = rng.choice(["BUY", "SELL"])
            qty = rng.choice([1, 100, 300, 700, 1500])
            price = round(rng.uniform(24.0, 25.5), 2)
            fee = round(max(1.0, qty * 0.005), 2)
            account.apply_fill("X", side == "BUY", qty, price, fee, "LT")
            ours.append(Trade(f"e{i}", "X", "LT", side, qty, price, 1_000 + i, fee, i))
        mark = round(rng.uniform(24.0, 25.5), 2)
        carried = [Carried("X", "LT", start, 24.70, "close", avg_cost)] if start else []
        line = day_pnl(carried, ours, {"X": Mark(mark, MarkSource.L1_MID)}).symbols["X"]
        sim = account.pnl_single("X", mark)
        result = reconcile(line, BrokerFigures(sim.position, sim.daily, sim.unrealized, sim.realized, sim.value))
        assert result.status == "ok", (result.problems, start, ours, mark)
        for diff in (result.realized_diff, result.unrealized_diff, result.daily_diff):
            assert diff == pytest.approx(0.0, abs=1e-6)


def test_a_fill_we_never_saw_is_a_mismatch_naming_the_position():
    line = day_pnl([CARRIED], trades(1), {"CIM PRB": MARK}).symbols["CIM PRB"]  # we saw fill 1 only
    result = reconcile(line, broker(*EXPECTED[2]))  # the broker booked fill 2 as well
    assert result.status == "mismatch" and result.position_diff == 500
    assert any(p.startswith("position 1200 here, 700 at the broker") for p in result.problems)
    assert any(p.startswith("realized differs") for p in result.problems)


def test_a_commission_we_never_heard_of_is_a_mismatch_beyond_the_rounding():
    line = day_pnl([CARRIED], trades(2), {"CIM PRB": MARK}).symbols["CIM PRB"]
    position, daily, unrealized, realized = EXPECTED[2]
    # Within tolerance: a cent per share traded (700) plus a cent per fill.
    assert reconcile(line, broker(position, daily - 5.0, unrealized, realized - 7.0)).status == "ok"
    # A $10 fee the system does not know of: realized (and daily) differ by more than $7.02.
    result = reconcile(line, broker(position, daily - 10.0, unrealized, realized - 10.0))
    assert result.status == "mismatch" and result.position_diff == 0
    assert result.realized_diff == pytest.approx(10.0, abs=1e-4)
    assert result.realized_tolerance == pytest.approx(0.01 * 700 + 0.02)


def test_marks_never_make_a_mismatch_the_broker_mark_is_used():
    line = day_pnl([CARRIED], trades(2), {"CIM PRB": Mark(25.50, MarkSource.L1_MID)}).symbols["CIM PRB"]
    result = reconcile(line, broker(*EXPECTED[2]))  # the broker's mark is 24.91, ours 25.50
    assert result.status == "ok" and result.broker_mark == pytest.approx(24.91)


def test_pending_commission_and_missing_broker_figures_are_not_judged():
    pending = [Trade("e0", "CIM PRB", "LT", "BUY", 200, 24.82, 1_000, None, 0)]
    line = day_pnl([CARRIED], pending, {"CIM PRB": MARK}).symbols["CIM PRB"]
    assert reconcile(line, broker(0, 0.0, 0.0, 0.0)).status == "pending"
    assert reconcile(line, None).status == "no_broker"


def test_unset_broker_figures_are_not_compared():
    line = day_pnl([CARRIED], trades(2), {"CIM PRB": MARK}).symbols["CIM PRB"]
    result = reconcile(line, BrokerFigures(700, None, None, None, None))
    assert result.status == "ok"
    assert (result.realized_diff, result.unrealized_diff, result.daily_diff) == (None, None, None)


def test_unset_figures_from_ib_are_none():
    from daemons.execution.broker import pnl_figure

    assert pnl_figure(1.7976931348623157e308) is None  # IB's "max double": unset
    assert pnl_figure(float("nan")) is None and pnl_figure(float("-inf")) is None and pnl_figure("x") is None
    assert pnl_figure(2e15) is None  # beyond the contract's money ceiling
    assert pnl_figure(-12.5) == -12.5 and pnl_figure(0) == 0.0


def test_mismatch_episode_raises_after_the_grace_once_and_resolves_once():
    from daemons.pnl.core import Episode, next_episode
    from qe.pnl import Reconciliation

    bad, good, pending = Reconciliation("mismatch"), Reconciliation("ok"), Reconciliation("pending")
    episode, action = next_episode(None, bad, 100, grace_ns=10)
    assert (episode, action) == (Episode(100), None)
    assert next_episode(episode, bad, 109, 10) == (Episode(100), None)
    episode, action = next_episode(episode, bad, 110, 10)
    assert (episode, action) == (Episode(100, True), "raise")
    assert next_episode(episode, bad, 500, 10) == (episode, None)  # raised once per episode
    assert next_episode(episode, pending, 600, 10) == (episode, None)  # not judged: unchanged
    assert next_episode(episode, good, 700, 10) == (None, "resolve")
    assert next_episode(Episode(100), good, 105, 10) == (None, None)  # a blip shorter than the grace: no alert at all
