"""Fault injection through the control interface, seen by the real ib_async client;
and bad input that must never take the simulator down."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from ib_async import IB, LimitOrder, MarketOrder, Stock

from sim import protocol as P

try:
    from conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401


def qualified(ib, symbol: str) -> Stock:
    contract = Stock(symbol, "SMART", "USD")
    ib.qualifyContracts(contract)
    return contract


def errors_of(ib) -> list[tuple[int, int, str]]:
    seen: list[tuple[int, int, str]] = []
    ib.errorEvent += lambda req_id, code, text, contract: seen.append((req_id, code, text))
    return seen


def wait_disconnected(ib: IB, timeout: float = 3.0) -> None:
    wait_until(ib, lambda: not ib.isConnected(), timeout)


def test_reconnect_after_forced_drop_keeps_positions_orders_and_executions(sim_control, ib_connect):
    ib = ib_connect(client_id=1)
    contract = qualified(ib, "CIM PRB")
    sim_control.set_quote("CIM PRB", 24.80, 24.82, 300, 1000)
    filled = ib.placeOrder(contract, MarketOrder("BUY", 200, orderRef="pre-drop-fill"))
    resting = ib.placeOrder(contract, LimitOrder("BUY", 100, 24.50, orderRef="pre-drop-rest"))
    wait_until(ib, lambda: filled.orderStatus.status == "Filled" and resting.orderStatus.status == "Submitted")
    exec_id = filled.fills[0].execution.execId
    position = {p.contract.symbol: p.position for p in ib.positions()}["CIM PRB"]
    disconnects = []
    ib.disconnectedEvent += lambda: disconnects.append(1)

    assert sim_control.drop_connections()["dropped"] == 1
    wait_disconnected(ib)
    assert disconnects == [1]

    again = ib_connect(client_id=1)  # same client id is free again
    assert [(t.order.orderRef, t.orderStatus.status) for t in again.openTrades()] == [("pre-drop-rest", "Submitted")]
    assert exec_id in {f.execution.execId for f in again.fills()}
    assert {f.execution.execId for f in again.reqExecutions()} == {exec_id}
    assert {p.contract.symbol: p.position for p in again.positions()}["CIM PRB"] == position
    assert {t.order.orderRef for t in again.reqCompletedOrders(False)} == {"pre-drop-fill"}


def test_refuse_connections_for_a_while(sim_control, ib_connect):
    sim_control.refuse_connections(1.0)
    with pytest.raises(ConnectionRefusedError):
        IB().connect("127.0.0.1", int(sim_control.state()["port"]), clientId=9, timeout=2)
    time.sleep(1.2)
    assert ib_connect(client_id=9).isConnected()


def test_next_order_rejected_with_201(sim_control, ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    sim_control.reject_next(1, code=201, text="Order rejected - reason:Simulated margin check")
    trade = ib.placeOrder(qualified(ib, "PFF"), LimitOrder("BUY", 100, 31.00, orderRef="will-reject"))
    wait_until(ib, lambda: trade.orderStatus.status == "Cancelled")
    assert (trade.order.orderId, 201, "Order rejected - reason:Simulated margin check") in errors
    (record,) = sim_control.orders("will-reject")
    assert record["status"] == "Inactive" and record["history"][-1]["event"] == "rejected"
    second = ib.placeOrder(qualified(ib, "PFF"), LimitOrder("BUY", 100, 31.00, orderRef="accepted"))
    wait_until(ib, lambda: second.orderStatus.status == "Submitted")


def test_delayed_acks_arrive_late_but_order_is_live_at_once(sim_control, ib_connect):
    ib = ib_connect()
    sim_control.delay_acks(1, seconds=1.0)
    trade = ib.placeOrder(qualified(ib, "NLY PRI"), LimitOrder("BUY", 100, 20.00, orderRef="slow-ack"))
    ib.sleep(0.4)
    assert trade.orderStatus.status == "PendingSubmit"
    assert sim_control.orders("slow-ack")[0]["status"] == "Submitted"  # live at the broker already
    wait_until(ib, lambda: trade.orderStatus.status == "Submitted", timeout=3)
    assert trade.order.permId == sim_control.orders("slow-ack")[0]["perm_id"]


def test_dropped_acks_are_recovered_by_open_orders_request(sim_control, ib_connect):
    ib = ib_connect()
    sim_control.drop_acks(1)
    trade = ib.placeOrder(qualified(ib, "NLY PRI"), LimitOrder("BUY", 100, 20.00, orderRef="lost-ack"))
    ib.sleep(0.5)
    assert trade.orderStatus.status == "PendingSubmit"
    assert sim_control.orders("lost-ack")[0]["status"] == "Submitted"
    open_refs = [t.order.orderRef for t in ib.reqOpenOrders()]
    assert open_refs == ["lost-ack"]
    wait_until(ib, lambda: trade.orderStatus.status == "Submitted")


def test_forced_partial_fill_via_control(sim_control, ib_connect):
    ib = ib_connect()
    sim_control.set_quote("AGNCM", 24.68, 24.72, 1000, 1000)
    sim_control.partial_fills(1, max_qty=100)
    trade = ib.placeOrder(qualified(ib, "AGNCM"), MarketOrder("BUY", 300, orderRef="forced-partial"))
    wait_until(ib, lambda: trade.orderStatus.filled == 100)
    ib.sleep(0.3)
    assert trade.orderStatus.status == "Submitted" and trade.orderStatus.remaining == 200
    sim_control.set_quote("AGNCM", 24.69, 24.73, 1000, 1000)  # the market moves: the rest trades
    wait_until(ib, lambda: trade.orderStatus.status == "Filled")
    assert [f.execution.shares for f in trade.fills] == [100, 200]


def test_connectivity_and_farm_codes_reach_error_event(sim, sim_control, ib_connect):
    sim_control.configure(quote_rate=30, print_rate=10)
    ib = ib_connect()
    errors = errors_of(ib)
    contract = qualified(ib, "CIM PRB")
    ticker = ib.reqMktData(contract)
    wait_until(ib, lambda: ticker.bid > 0)

    sim_control.send_code(1100)
    wait_until(ib, lambda: 1100 in [c for _, c, _ in errors])
    ib.sleep(0.1)
    count = []
    ticker.updateEvent += lambda t: count.append(1)
    ib.sleep(0.5)
    assert count == []  # no market data while IB connectivity is lost

    sim_control.send_code(1102)  # restored, data maintained: subscriptions keep flowing
    wait_until(ib, lambda: 1102 in [c for _, c, _ in errors])
    wait_until(ib, lambda: count)

    sim_control.send_code(1101)  # restored, data lost: the client must resubscribe
    wait_until(ib, lambda: 1101 in [c for _, c, _ in errors])
    assert sim_control.state()["clients"][0]["mkt_subscriptions"] == 0

    sim_control.send_code(2103)
    sim_control.send_code(2104)
    wait_until(ib, lambda: {2103, 2104} <= {c for _, c, _ in errors})
    texts = {c: t for _, c, t in errors}
    assert texts[1100].startswith("Connectivity between IB and Trader Workstation has been lost")
    assert texts[2103] == "Market data farm connection is broken:usfarm"
    assert all(r == -1 for r, c, _ in errors if c in (1100, 1101, 1102, 2103, 2104))


def test_restart_keeps_live_orders_and_fills_made_while_down(sim_control, ib_connect):
    ib = ib_connect(client_id=1)
    contract = qualified(ib, "RITM PRC")
    sim_control.set_quote("RITM PRC", 23.30, 23.33, 500, 500)
    keep = ib.placeOrder(contract, LimitOrder("BUY", 100, 23.00, orderRef="survives-restart"))
    fill_later = ib.placeOrder(contract, LimitOrder("SELL", 200, 23.36, orderRef="fills-while-down"))
    wait_until(ib, lambda: keep.orderStatus.status == "Submitted" and fill_later.orderStatus.status == "Submitted")

    sim_control.restart(down_seconds=1.0)
    wait_disconnected(ib)
    with pytest.raises(ConnectionRefusedError):
        IB().connect("127.0.0.1", ib.client.port, clientId=1, timeout=2)
    sim_control.set_quote("RITM PRC", 23.36, 23.38, 500, 500)  # the sell trades while the gateway is down
    assert sim_control.orders("fills-while-down")[0]["status"] == "Filled"
    time.sleep(1.1)

    again = ib_connect(client_id=1)
    assert [t.order.orderRef for t in again.openTrades()] == ["survives-restart"]
    assert again.openTrades()[0].order.permId == keep.order.permId
    fills = again.reqExecutions()
    assert [(f.execution.orderRef, f.execution.shares) for f in fills] == [("fills-while-down", 200)]
    assert {p.contract.symbol: p.position for p in again.positions()}["RITM PRC"] == 1500 - 200
    assert sim_control.state()["open_orders"] == 1


def test_duplicate_client_id_gets_326_and_first_client_is_unaffected(ib_connect):
    first = ib_connect(client_id=5)
    second = IB()
    errors = errors_of(second)
    # The gateway answers 326 and hangs up; ib_async then gives up waiting for the API.
    with pytest.raises((TimeoutError, ConnectionError)):
        second.connect("127.0.0.1", first.client.port, clientId=5, timeout=1.5)
    assert 326 in [c for _, c, _ in errors]
    assert not second.isConnected()
    assert first.isConnected() and first.reqCurrentTime()


def test_tick_by_tick_subscription_limit_gives_10190(sim_control, ib_connect):
    sim_control.configure(max_tick_by_tick=2)
    ib = ib_connect()
    errors = errors_of(ib)
    contracts = [qualified(ib, s) for s in ("CIM PRA", "CIM PRB", "CIM PRC")]
    for contract in contracts:
        ib.reqTickByTickData(contract, "AllLast")
    wait_until(ib, lambda: 10190 in [c for _, c, _ in errors])
    assert sim_control.state()["clients"][0]["tbt_subscriptions"] == 2


def test_market_data_line_limit_gives_101(sim_control, ib_connect):
    sim_control.configure(max_market_data_lines=1)
    ib = ib_connect()
    errors = errors_of(ib)
    ib.reqMktData(qualified(ib, "CIM PRA"))
    ib.reqMktData(qualified(ib, "CIM PRB"))
    wait_until(ib, lambda: 101 in [c for _, c, _ in errors])
    assert sim_control.state()["clients"][0]["mkt_subscriptions"] == 1


def test_unsupported_requests_answer_with_an_error_not_a_hang(ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    started = time.monotonic()
    histogram = ib.reqHistogramData(qualified(ib, "PFF"), True, "1 week")  # still not simulated
    assert list(histogram) == [] and time.monotonic() - started < 2
    assert 162 in [c for _, c, _ in errors]
    assert ib.isConnected() and ib.reqCurrentTime()


# --------------------------------------------------------------- raw socket abuse


class RawClient:
    """Speaks the wire protocol directly, to send what no library would."""

    def __init__(self, port: int, client_id: int = 77) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=3)
        self.buffer = bytearray()
        self.sock.sendall(b"API\0" + struct.pack(">I", 9) + b"v100..176")
        self.handshake = self.read_messages(1)[0]
        self.send(["71", "2", str(client_id), ""])

    def send(self, fields: list[str]) -> None:
        self.sock.sendall(P.encode(fields))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_messages(self, minimum: int = 1, timeout: float = 3.0) -> list[list[str]]:
        messages: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while len(messages) < minimum and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            self.buffer += chunk
            messages += P.split_frames(self.buffer)
        return messages

    def read_until(self, predicate, timeout: float = 3.0) -> list[list[str]]:
        seen: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += self.read_messages(1, timeout=deadline - time.monotonic())
            if any(predicate(m) for m in seen):
                return seen
        raise AssertionError(f"no matching message in {seen[-10:]}")

    def closed_by_server(self, timeout: float = 3.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def is_error(code: int):
    return lambda m: m[0] == "4" and m[3] == str(code)


def test_malformed_and_unknown_requests_get_errors_and_never_crash(sim, ib_connect):
    raw = RawClient(sim.port)
    assert raw.handshake[0] == "176"
    raw.read_until(lambda m: m[0] == "9")  # nextValidId after startApi
    raw.send(["1", "11", "5", "not-a-conid"])  # reqMktData with garbage
    errors = raw.read_until(is_error(321))
    assert any(m[2] == "5" and "conId" in m[4] for m in errors if is_error(321)(m))
    raw.send(["999", "1"])  # unknown message id
    raw.read_until(lambda m: is_error(321)(m) and "Unknown message id 999" in m[4])
    raw.send(["abc"])  # message id not a number
    raw.send(["3", "17"])  # placeOrder cut short
    raw.send_raw(struct.pack(">I", 6) + b"\xff\xfe\x00\x01\x00\x00")  # not UTF-8
    raw.send(["49", "1"])  # still answers: reqCurrentTime
    raw.read_until(lambda m: m[0] == "49")
    raw.send(["2", "2", "12345"])  # cancelMktData for a ticker id never requested
    raw.read_until(lambda m: is_error(300)(m) and m[2] == "12345")
    raw.send(["74", "1", "500", "DU7654321", ""])  # reqPositionsMulti: rows, then the end marker
    seen = raw.read_until(lambda m: m[0] == "72" and m[2] == "500")
    assert len([m for m in seen if m[0] == "71" and m[2] == "500"]) == 23
    raw.close()
    ib = ib_connect()  # the server is fine for everyone else
    assert ib.reqCurrentTime()


def test_broken_stream_closes_only_that_client(sim, ib_connect):
    ib = ib_connect()
    bad = socket.create_connection(("127.0.0.1", sim.port), timeout=3)
    bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    bad.settimeout(3)
    assert bad.recv(100) == b""  # server hung up on the non-API client
    bad.close()
    huge = RawClient(sim.port, client_id=78)
    huge.read_until(lambda m: m[0] == "9")
    huge.send_raw(struct.pack(">I", P.MAX_FRAME_BYTES + 1) + b"x")
    assert huge.closed_by_server()
    huge.close()
    assert ib.isConnected() and ib.reqCurrentTime()
