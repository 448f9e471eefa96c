"""Order ids like IB (issue 16 pt 3), through the real ib_async client: one nextValidId
sequence per account across clients, sessions and simulator processes; no master client
unless configured; order messages (global cancel's 202s included) only to the owner."""

from __future__ import annotations

import pytest
from ib_async import IB, LimitOrder, Stock

from sim.testing import start_in_thread, wait_until

try:
    from conftest_sim import sim, sim_control  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import sim, sim_control  # noqa: F401


def qualified(ib, symbol: str = "RITM PRA") -> Stock:
    contract = Stock(symbol, "SMART", "USD")
    assert ib.qualifyContracts(contract) == [contract]
    return contract


def next_valid_id(ib: IB) -> int:
    """The last nextValidId the server sent this client (recorded by ``connect``)."""
    return ib.valid_ids[-1]


def connect(port: int, client_id: int) -> IB:
    ib = IB()
    ib.valid_ids = []
    original = ib.wrapper.nextValidId

    def record(order_id: int) -> None:
        ib.valid_ids.append(order_id)
        original(order_id)

    ib.wrapper.nextValidId = record
    ib.connect("127.0.0.1", port, clientId=client_id, timeout=5)
    return ib


@pytest.fixture
def ib_connect(sim):
    clients: list[IB] = []

    def make(client_id: int) -> IB:
        clients.append(connect(sim.port, client_id))
        return clients[-1]

    yield make
    for ib in clients:
        ib.disconnect()


def errors_of(ib) -> list[tuple[int, int, str]]:
    seen: list[tuple[int, int, str]] = []
    ib.errorEvent += lambda req_id, code, text, contract: seen.append((req_id, code, text))
    return seen


def test_one_order_id_sequence_across_clients_and_sessions(ib_connect):
    first = ib_connect(client_id=1)
    contract = qualified(first)
    trades = [first.placeOrder(contract, LimitOrder("BUY", 100, 20.00 - i / 100)) for i in range(3)]
    highest = max(t.order.orderId for t in trades)
    wait_until(first, lambda: all(t.orderStatus.status == "Submitted" for t in trades))
    second = ib_connect(client_id=2)
    assert next_valid_id(second) == highest + 1  # another client starts above client 1's ids
    other = second.placeOrder(qualified(second), LimitOrder("BUY", 100, 19.00))
    assert other.order.orderId > highest  # ib_async also spends ids on its own requests
    wait_until(second, lambda: other.orderStatus.status == "Submitted")
    first.disconnect()
    again = ib_connect(client_id=1)
    assert next_valid_id(again) == other.order.orderId + 1  # client 1's new session: above client 2's id too
    again.client.reqIds(1)
    wait_until(again, lambda: len(again.valid_ids) == 2)
    assert again.valid_ids[1] == other.order.orderId + 1  # reqIds: the same sequence


def test_order_ids_survive_a_simulator_process_restart(tmp_path):
    path = tmp_path / "order_ids.json"
    running = start_in_thread(order_id_file=str(path))
    try:
        ib = connect(running.port, 5)
        trade = ib.placeOrder(qualified(ib), LimitOrder("BUY", 100, 19.50))
        wait_until(ib, lambda: trade.orderStatus.status == "Submitted")
        used = trade.order.orderId
        ib.disconnect()
    finally:
        running.stop()
    restarted = start_in_thread(order_id_file=str(path))
    try:
        ib = connect(restarted.port, 9)  # another client id, in a new process
        assert next_valid_id(ib) == used + 1
        ib.disconnect()
    finally:
        restarted.stop()


def test_no_master_client_by_default(ib_connect):
    zero = ib_connect(client_id=0)
    worker = ib_connect(client_id=3)
    seen = []
    zero.openOrderEvent += lambda trade: seen.append(trade.order.orderRef)
    trade = worker.placeOrder(qualified(worker), LimitOrder("BUY", 100, 20.00, orderRef="from-3"))
    wait_until(worker, lambda: trade.orderStatus.status == "Submitted")
    zero.sleep(0.3)
    assert seen == [] and zero.reqOpenOrders() == []
    assert [t.order.orderRef for t in zero.reqAllOpenOrders()] == ["from-3"]


def test_configured_master_client_sees_other_clients_orders():
    running = start_in_thread(master_client_id=0)
    clients = []
    try:
        master, worker, other = (connect(running.port, cid) for cid in (0, 3, 4))
        clients = [master, worker, other]
        seen = []
        master.openOrderEvent += lambda trade: seen.append(trade.order.orderRef)
        trade = worker.placeOrder(qualified(worker), LimitOrder("BUY", 100, 20.00, orderRef="from-3"))
        wait_until(worker, lambda: trade.orderStatus.status == "Submitted")
        wait_until(master, lambda: "from-3" in seen)
        assert [t.order.orderRef for t in master.reqOpenOrders()] == ["from-3"]
        assert [t.order.orderRef for t in worker.reqOpenOrders()] == ["from-3"]
        assert other.reqOpenOrders() == []
    finally:
        for ib in clients:
            ib.disconnect()
        running.stop()


def test_global_cancel_reports_only_to_each_owner(sim_control, ib_connect):
    first = ib_connect(client_id=1)
    second = ib_connect(client_id=2)
    away = ib_connect(client_id=3)
    first_errors, second_errors = errors_of(first), errors_of(second)
    mine = first.placeOrder(qualified(first), LimitOrder("BUY", 100, 19.00, orderRef="c1"))
    theirs = second.placeOrder(qualified(second), LimitOrder("BUY", 100, 19.01, orderRef="c2"))
    gone = away.placeOrder(qualified(away), LimitOrder("BUY", 100, 19.02, orderRef="c3"))
    wait_until(first, lambda: mine.orderStatus.status == "Submitted")
    wait_until(second, lambda: theirs.orderStatus.status == "Submitted")
    wait_until(away, lambda: gone.orderStatus.status == "Submitted")
    away.disconnect()
    first.reqGlobalCancel()
    wait_until(first, lambda: mine.orderStatus.status == "Cancelled")
    wait_until(second, lambda: theirs.orderStatus.status == "Cancelled")
    first.sleep(0.3)
    assert [(r, c) for r, c, _ in first_errors if c == 202] == [(mine.order.orderId, 202)]
    assert [(r, c) for r, c, _ in second_errors if c == 202] == [(theirs.order.orderId, 202)]
    assert [o["status"] for o in sim_control.orders("c3")] == ["Cancelled"]  # cancelled, its owner told nobody else
    back = ib_connect(client_id=3)
    assert back.reqOpenOrders() == []
    assert "c3" in [t.order.orderRef for t in back.reqCompletedOrders(False)]
