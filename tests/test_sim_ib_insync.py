"""ib_insync 0.9.86 (the fallback client library) against the simulator: connect and an order round trip."""

from __future__ import annotations

import logging

import pytest

ib_insync = pytest.importorskip("ib_insync")

try:
    from conftest_sim import sim, sim_control, wait_until  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.conftest_sim import sim, sim_control, wait_until  # noqa: F401


@pytest.fixture
def insync(sim):
    ib = ib_insync.IB()
    yield ib
    ib.disconnect()


def test_ib_insync_connect_and_order_round_trip(sim, sim_control, insync, caplog):
    caplog.set_level(logging.INFO)
    ib = insync
    ib.connect("127.0.0.1", sim.port, clientId=11, timeout=5)
    assert ib.client.serverVersion() == 176
    assert ib.managedAccounts() == ["DU7654321"] and len(ib.positions()) == 23
    assert not [r for r in caplog.records if r.name.startswith("ib_insync") and r.levelno >= logging.WARNING]

    contract = ib_insync.Stock("CIM PRB", "SMART", "USD")
    assert ib.qualifyContracts(contract) == [contract] and contract.conId > 0
    sim_control.set_quote("CIM PRB", 24.80, 24.82, bid_size=300, ask_size=200)

    resting = ib.placeOrder(contract, ib_insync.LimitOrder("SELL", 100, 25.10, orderRef="insync-rest"))
    wait_until(ib, lambda: resting.orderStatus.status == "Submitted")
    resting.order.lmtPrice = 25.05
    ib.placeOrder(contract, resting.order)
    wait_until(ib, lambda: sim_control.orders("insync-rest")[0]["lmt_price"] == 25.05)
    ib.cancelOrder(resting.order)
    wait_until(ib, lambda: resting.orderStatus.status == "Cancelled")

    trade = ib.placeOrder(contract, ib_insync.LimitOrder("BUY", 300, 24.82, orderRef="insync-buy"))
    wait_until(ib, lambda: trade.orderStatus.filled == 200)  # displayed size only
    sim_control.set_quote("CIM PRB", 24.78, 24.80, bid_size=300, ask_size=500)
    wait_until(ib, lambda: trade.orderStatus.status == "Filled")
    wait_until(ib, lambda: len(trade.fills) == 2 and all(f.commissionReport.commission > 0 for f in trade.fills))
    assert [f.execution.orderRef for f in trade.fills] == ["insync-buy", "insync-buy"]
    wait_until(ib, lambda: {p.contract.symbol: p.position for p in ib.positions()}["CIM PRB"] == 3200 + 300)
    assert {f.execution.execId for f in ib.reqExecutions()} == {f.execution.execId for f in trade.fills}
