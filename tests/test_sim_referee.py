"""The simulator as referee, and faults on resting orders, seen by the real ib_async client:
potential gross at the broker (hand-computed), the referee log, forced partials of a
resting order, delayed and dropped order status messages, a connection dropped mid-fill."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from ib_async import IB, LimitOrder, Stock

from sim.testing import RunningSim, start_in_thread

try:
    from conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401


def qualified(ib: IB, symbol: str) -> Stock:
    contract = Stock(symbol, "SMART", "USD")
    ib.qualifyContracts(contract)
    return contract


def submitted(ib: IB, trade) -> None:
    wait_until(ib, lambda: trade.orderStatus.status == "Submitted")


@pytest.fixture
def empty_sim() -> Iterator[RunningSim]:
    """An empty $1,000,000 account (cash only), so potential gross is easy to compute by hand."""
    running = start_in_thread(account_path=None)
    try:
        yield running
    finally:
        running.stop()


def test_potential_gross_max_matches_a_hand_computation(empty_sim):
    control = empty_sim.control
    ib = IB()
    ib.connect("127.0.0.1", empty_sim.port, clientId=1, timeout=5)
    try:
        cim, agncm = qualified(ib, "CIM PRB"), qualified(ib, "AGNCM")
        # Frozen quotes and a last print inside them: marks CIM PRB 24.81, AGNCM 24.62.
        control.set_quote("CIM PRB", 24.80, 24.82, 500, 500)
        control.inject_print("CIM PRB", 24.81, 100)
        control.set_quote("AGNCM", 24.60, 24.64, 500, 500)
        control.inject_print("AGNCM", 24.62, 100)
        assert control.referee()["potential_gross"]["current"]["pct"] == 0

        buy_a = ib.placeOrder(cim, LimitOrder("BUY", 1000, 24.70, orderRef="a-buy"))
        sell_a = ib.placeOrder(cim, LimitOrder("SELL", 400, 24.95, orderRef="a-sell"))
        buy_b = ib.placeOrder(agncm, LimitOrder("BUY", 2000, 24.50, orderRef="b-buy"))
        for trade in (buy_a, sell_a, buy_b):
            submitted(ib, trade)
        # CIM PRB max(|0+1000|, |0-400|) x 24.81 + AGNCM 2000 x 24.62, over $1M
        assert control.referee()["potential_gross"]["current"]["pct"] == pytest.approx(100 * (24_810 + 49_240) / 1e6)

        # The market comes to the CIM PRB buy: 500 fill at 24.70 ($2.50 commission); the
        # level is taken, the ask walks to 24.71; mark = last (24.70) within 24.68 / 24.71.
        control.set_quote("CIM PRB", 24.68, 24.70, 500, 500)
        wait_until(ib, lambda: buy_a.orderStatus.filled == 500)
        net_liq = 1_000_000 - 500 * 24.70 - 2.50 + 500 * 24.70
        cim_potential = max(abs(500 + 500), abs(500 - 400)) * 24.70
        assert control.state()["account"]["net_liquidation"] == pytest.approx(net_liq, abs=0.01)
        assert control.referee()["potential_gross"]["current"]["pct"] == pytest.approx(100 * (cim_potential + 49_240) / net_liq)

        big_b = ib.placeOrder(agncm, LimitOrder("BUY", 3000, 24.40, orderRef="b-big"))
        submitted(ib, big_b)
        peak = 100 * (cim_potential + 5000 * 24.62) / net_liq
        ib.cancelOrder(big_b.order)
        ib.cancelOrder(buy_a.order)
        wait_until(ib, lambda: big_b.orderStatus.status == "Cancelled" and buy_a.orderStatus.status == "Cancelled")

        referee = control.referee()
        now = 100 * (500 * 24.70 + 2000 * 24.62) / net_liq  # CIM PRB max(|500|, |500-400|); AGNCM 2000
        assert referee["potential_gross"]["current"]["pct"] == pytest.approx(now, abs=1e-5)
        assert referee["potential_gross"]["current"]["event"] == "cancel"
        peak_seen = referee["potential_gross"]["max"]
        assert peak_seen["pct"] == pytest.approx(peak, abs=1e-5)
        assert (peak_seen["event"], peak_seen["order_ref"], peak_seen["symbol"]) == ("place", "b-big", "AGNCM")
        (place_request,) = [e for e in control.referee_log(kind="request", order_ref="b-big")["entries"] if e["event"] == "place"]
        assert peak_seen["ts_ns"] == place_request["ts_ns"]
        assert referee["counts"] | {"filled_shares": None} == {
            "requests": 6, "orders": 4, "open_orders": 2, "rejected": 0, "fills": 1, "filled_shares": None,
        }

        # One ordered log: the request first, then every state, the fill, the cancel.
        story = [(e["kind"], e.get("event") or e.get("status")) for e in control.referee_log(order_ref="a-buy")["entries"]]
        assert story == [
            ("request", "place"), ("order", "PreSubmitted"), ("order", "Submitted"),
            ("fill", None), ("order", "Submitted"), ("request", "cancel"), ("order", "Cancelled"),
        ]
        assert control.state()["referee"]["potential_gross"]["max"]["pct"] == peak_seen["pct"]

        reset = control.reset_referee()["potential_gross"]
        assert reset["max"]["pct"] == pytest.approx(now, abs=1e-5) and reset["max"]["event"] == "reset"
    finally:
        ib.disconnect()


def test_resting_order_crossed_with_partial_fault_fills_partly_then_completes(sim_control, ib_connect):
    ib = ib_connect()
    contract = qualified(ib, "AGNCM")
    sim_control.set_quote("AGNCM", 24.60, 24.64, 1000, 1000)
    trade = ib.placeOrder(contract, LimitOrder("BUY", 300, 24.55, orderRef="rest-partial"))
    submitted(ib, trade)
    sim_control.partial_fills(1, max_qty=100)
    far = ib.placeOrder(contract, LimitOrder("BUY", 100, 24.00, orderRef="far-away"))
    submitted(ib, far)
    assert sim_control.state()["faults"]["partial_next"] == 1  # an order that does not trade leaves it armed

    sim_control.set_quote("AGNCM", 24.50, 24.55, 1000, 1000)  # crosses the resting buy; 1000 offered
    wait_until(ib, lambda: trade.orderStatus.filled == 100)
    ib.sleep(0.3)
    assert (trade.orderStatus.status, trade.orderStatus.remaining) == ("Submitted", 200)
    assert sim_control.state()["faults"]["partial_next"] == 0
    (fault,) = sim_control.referee_log(kind="fault")["entries"]
    assert (fault["fault"], fault["order_ref"], fault["qty"]) == ("forced_partial", "rest-partial", 100)

    sim_control.set_quote("AGNCM", 24.50, 24.55, 1000, 1000)  # the next market change: the rest trades
    wait_until(ib, lambda: trade.orderStatus.status == "Filled")
    assert [f.execution.shares for f in trade.fills] == [100, 200]
    assert far.orderStatus.status == "Submitted" and far.orderStatus.filled == 0


def test_delayed_status_arrives_late(sim_control, ib_connect):
    ib = ib_connect()
    contract = qualified(ib, "NLY PRI")
    sim_control.set_quote("NLY PRI", 20.10, 20.14, 500, 500)
    trade = ib.placeOrder(contract, LimitOrder("BUY", 200, 20.05, orderRef="late-status"))
    submitted(ib, trade)
    sim_control.delay_status(1, seconds=1.0)
    sim_control.set_quote("NLY PRI", 20.03, 20.05, 500, 500)  # fills all 200
    started = time.monotonic()
    wait_until(ib, lambda: len(trade.fills) == 1)  # the execution is not delayed
    assert sim_control.orders("late-status")[0]["status"] == "Filled"
    ib.sleep(0.4)
    assert trade.orderStatus.status == "Submitted"  # the Filled status is still held back
    wait_until(ib, lambda: trade.orderStatus.status == "Filled", timeout=3)
    assert time.monotonic() - started >= 0.9
    (fault,) = sim_control.referee_log(kind="fault")["entries"]
    assert (fault["fault"], fault["status"], fault["order_ref"]) == ("status_delayed", "Filled", "late-status")


def test_dropped_status_never_arrives_but_open_orders_and_executions_tell_the_truth(sim_control, ib_connect):
    ib = ib_connect()
    contract = qualified(ib, "NLY PRI")
    sim_control.set_quote("NLY PRI", 20.10, 20.14, 500, 500)
    sim_control.drop_status(1, fills_only=True)  # acks of the new order do not count
    trade = ib.placeOrder(contract, LimitOrder("BUY", 300, 20.05, orderRef="lost-status"))
    submitted(ib, trade)
    assert sim_control.state()["faults"]["drop_status_next"] == 1

    sim_control.set_quote("NLY PRI", 20.03, 20.05, 500, 100)  # 100 offered: a partial fill
    wait_until(ib, lambda: len(trade.fills) == 1)
    ib.sleep(0.5)
    assert trade.orderStatus.filled == 0  # its orderStatus (filled 100) was lost
    assert [(t.order.orderRef, t.orderStatus.filled, t.orderStatus.remaining) for t in ib.reqOpenOrders()] == [
        ("lost-status", 100, 200)
    ]
    assert trade.orderStatus.filled == 100

    sim_control.drop_status(1, fills_only=True)
    sim_control.set_quote("NLY PRI", 20.03, 20.05, 500, 1000)  # the rest: its Filled status is lost too
    wait_until(ib, lambda: len(trade.fills) == 2)
    ib.sleep(0.5)
    assert trade.orderStatus.status == "Submitted"
    assert ib.reqOpenOrders() == []  # the truth: nothing open
    completed = [(t.order.orderRef, t.orderStatus.status) for t in ib.reqCompletedOrders(False)]
    assert ("lost-status", "Filled") in completed
    assert sorted(f.execution.shares for f in ib.reqExecutions() if f.execution.orderRef == "lost-status") == [100, 200]
    assert [e["fault"] for e in sim_control.referee_log(kind="fault")["entries"]] == ["status_dropped", "status_dropped"]


def test_connection_dropped_mid_fill_and_recovered_by_executions(sim_control, ib_connect):
    ib = ib_connect(client_id=3)
    contract = qualified(ib, "RITM PRC")
    sim_control.set_quote("RITM PRC", 23.30, 23.33, 500, 500)
    trade = ib.placeOrder(contract, LimitOrder("SELL", 200, 23.36, orderRef="cut-mid-fill"))
    submitted(ib, trade)
    sim_control.drop_on_fill(1)

    sim_control.set_quote("RITM PRC", 23.36, 23.38, 500, 500)  # the resting sell trades
    wait_until(ib, lambda: not ib.isConnected(), timeout=3)
    assert trade.fills == [] and trade.orderStatus.status == "Submitted"  # the client missed it
    (fill,) = sim_control.fills("cut-mid-fill")
    (fault,) = sim_control.referee_log(kind="fault")["entries"]
    assert (fault["fault"], fault["client_id"], fault["exec_id"]) == ("connection_dropped_mid_fill", 3, fill["exec_id"])
    assert sim_control.state()["faults"]["drop_on_fill_next"] == 0

    again = ib_connect(client_id=3)
    assert [(f.execution.execId, f.execution.orderRef, f.execution.shares) for f in again.reqExecutions()] == [
        (fill["exec_id"], "cut-mid-fill", 200)
    ]
    assert ("cut-mid-fill", "Filled") in [(t.order.orderRef, t.orderStatus.status) for t in again.reqCompletedOrders(False)]
    assert again.openTrades() == []


def test_referee_log_cap_is_configurable_and_evictions_are_counted(sim_control, ib_connect):
    ib = ib_connect()
    assert sim_control.configure(referee_log_cap=3)["referee_log_cap"] == 3
    trade = ib.placeOrder(qualified(ib, "PFF"), LimitOrder("BUY", 100, 20.00, orderRef="tiny-log"))
    submitted(ib, trade)
    ib.cancelOrder(trade.order)
    wait_until(ib, lambda: trade.orderStatus.status == "Cancelled")
    page = sim_control.referee_log()
    # place, PreSubmitted, Submitted, cancel, Cancelled: the newest 3 are kept, all 5 counted.
    assert [(e["kind"], e.get("event") or e.get("status")) for e in page["entries"]] == [
        ("order", "Submitted"), ("request", "cancel"), ("order", "Cancelled"),
    ]
    assert (page["log"]["total"], page["log"]["evicted"], page["log"]["counts"]) == (5, 2, {"request": 2, "order": 3})
    assert sim_control.referee_log(after=page["entries"][-1]["seq"])["entries"] == []
