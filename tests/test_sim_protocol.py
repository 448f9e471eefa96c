"""The codec against the real client code: requests as ib_async encodes them,
messages as ib_async's and ib_insync's decoders read them (no sockets)."""

from __future__ import annotations

import struct
from datetime import timezone

import ib_async
import ib_insync
import pytest

from sim import protocol as P

CIM_PRB = P.ContractInfo(con_id=861123106, symbol="CIM PRB", primary_exchange="NYSE", stock_type="PREFERRED",
                         long_name="CIM SERIES B PREFERRED")


# ------------------------------------------------------------------ helpers


class Recorder:
    """Stands in for a client wrapper: records every callback the decoder makes."""

    defaultTimezone = timezone.utc

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

        class _IB:
            TimezoneTWS = ""

        self.ib = _IB()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def record(*args):
            self.calls.append((name, args))

        return record


def fields_of(message: bytes) -> list[str]:
    (size,) = struct.unpack(">I", message[:4])
    assert size == len(message) - 4
    parts = message[4:].decode().split("\0")
    assert parts[-1] == ""
    return parts[:-1]


@pytest.fixture(params=["ib_async", "ib_insync"])
def decode(request):
    """Decode one of our messages with a real client decoder; return the wrapper calls."""
    module = ib_async if request.param == "ib_async" else ib_insync

    def run(message: bytes) -> list[tuple[str, tuple]]:
        recorder = Recorder()
        decoder = module.decoder.Decoder(recorder, P.SERVER_VERSION)
        fields = fields_of(message)
        handler = decoder.handlers[int(fields[0])]
        handler(fields)  # call directly: interpret() would swallow exceptions
        return recorder.calls

    return run


def client_requests(action) -> list[list[str]]:
    """Fields of every request ib_async's Client sends while running ``action(client)``."""
    client = ib_async.client.Client(Recorder())
    client.connState = client.CONNECTED
    client._serverVersion = P.SERVER_VERSION
    client.MaxRequests = 0
    sent: list[bytes] = []
    client.conn.sendMsg = sent.append  # type: ignore[method-assign]
    action(client)
    return [fields_of(message) for message in sent]


# ------------------------------------------------------------------- framing


def test_handshake_parse_and_reply():
    raw = b"API\0" + struct.pack(">I", 9) + b"v157..178"
    assert P.parse_handshake(raw[:6]) is None
    handshake, used = P.parse_handshake(raw + b"extra")
    assert (handshake.min_version, handshake.max_version, used) == (157, 178, len(raw))
    with_options = b"API\0" + struct.pack(">I", 18) + b"v100..176 +PACEAPI"
    assert P.parse_handshake(with_options)[0].options == "+PACEAPI"
    assert fields_of(P.handshake_reply(176, "20261120 15:35:00 EST")) == ["176", "20261120 15:35:00 EST"]


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"API\0" + struct.pack(">I", 5) + b"hello"])
def test_handshake_rejects_garbage(garbage):
    with pytest.raises(P.ProtocolError):
        P.parse_handshake(garbage)


def test_split_frames_keeps_partial_tail():
    buffer = bytearray(P.encode([1, 2, "a"]) + P.encode([3]) + P.encode(["x", "y"])[:5])
    assert P.split_frames(buffer) == [["1", "2", "a"], ["3"]]
    assert len(buffer) == 5


def test_split_frames_rejects_absurd_length():
    with pytest.raises(P.ProtocolError):
        P.split_frames(bytearray(struct.pack(">I", P.MAX_FRAME_BYTES + 1) + b"x"))


def test_field_formatting():
    assert [P.fmt(v) for v in (None, True, False, 100.0, 24.85, P.UNSET_DOUBLE, 7)] == ["", "1", "0", "100", "24.85", "", "7"]
    assert [P.price_text(c) for c in (2485, 5, 100, -1)] == ["24.85", "0.05", "1.00", "-0.01"]


# ------------------------------------------------------------------ requests


def stock(symbol="CIM PRB"):
    return ib_async.Stock(symbol, "SMART", "USD")


def test_decode_start_api_and_market_data_requests():
    def act(client):
        client.clientId = 7
        client.startApi()
        client.reqMktData(11, stock(), "233", False, False, [])
        client.cancelMktData(11)
        client.reqTickByTickData(12, stock(), "AllLast", 0, False)
        client.cancelTickByTickData(12)
        client.reqContractDetails(13, stock())
        client.reqMarketDataType(3)
        client.reqCurrentTime()
        client.reqIds(1)

    decoded = [P.decode_request(f) for f in client_requests(act)]
    start, mkt, cancel_mkt, tbt, cancel_tbt, details, mdt, now, ids = decoded
    assert start == P.StartApi(7, "")
    assert (mkt.req_id, mkt.contract.symbol, mkt.contract.sec_type, mkt.generic_ticks, mkt.snapshot) == (11, "CIM PRB", "STK", "233", False)
    assert cancel_mkt == P.CancelMktData(11)
    assert (tbt.req_id, tbt.contract.symbol, tbt.tick_type, tbt.number_of_ticks) == (12, "CIM PRB", "AllLast", 0)
    assert cancel_tbt == P.CancelTickByTick(12)
    assert (details.req_id, details.contract.symbol, details.contract.exchange) == (13, "CIM PRB", "SMART")
    assert mdt == P.ReqMarketDataType(3)
    assert isinstance(now, P.ReqCurrentTime) and ids == P.ReqIds(1)


def test_decode_place_and_cancel_order():
    order = ib_async.LimitOrder("SELL", 300, 24.87, orderRef="it-abc123", hidden=True, tif="DAY")

    def act(client):
        client.placeOrder(42, stock(), order)
        client.placeOrder(43, stock("PFF"), ib_async.MarketOrder("BUY", 100))
        client.cancelOrder(42, "")
        client.reqGlobalCancel()

    place, market, cancel, global_cancel = [P.decode_request(f) for f in client_requests(act)]
    assert (place.order_id, place.contract.symbol, place.action, place.total_quantity) == (42, "CIM PRB", "SELL", 300)
    assert (place.order_type, place.lmt_price, place.tif, place.order_ref, place.hidden) == ("LMT", 24.87, "DAY", "it-abc123", True)
    assert place.what_if is False and place.transmit is True
    assert (market.order_type, market.lmt_price, market.contract.symbol) == ("MKT", P.UNSET_DOUBLE, "PFF")
    assert cancel == P.CancelOrder(42)
    assert isinstance(global_cancel, P.ReqGlobalCancel)


def test_decode_what_if_order_is_recognised():
    order = ib_async.LimitOrder("BUY", 100, 24.5, whatIf=True)
    (place,) = [P.decode_request(f) for f in client_requests(lambda c: c.placeOrder(5, stock(), order))]
    assert place.what_if is True


def test_decode_account_and_execution_requests():
    flt = ib_async.ExecutionFilter(clientId=3, time="20261120-14:00:00", symbol="CIM PRB", side="BUY")

    def act(client):
        client.reqPositions()
        client.reqOpenOrders()
        client.reqAllOpenOrders()
        client.reqCompletedOrders(False)
        client.reqAccountUpdates(True, "DU7654321")
        client.reqAccountUpdatesMulti(8, "DU7654321", "", False)
        client.reqAccountSummary(9, "All", "NetLiquidation,BuyingPower")
        client.reqExecutions(10, flt)

    decoded = [P.decode_request(f) for f in client_requests(act)]
    assert [type(d).__name__ for d in decoded[:4]] == ["ReqPositions", "ReqOpenOrders", "ReqAllOpenOrders", "ReqCompletedOrders"]
    assert decoded[4] == P.ReqAccountUpdates(True, "DU7654321")
    assert decoded[5] == P.ReqAccountUpdatesMulti(8, "DU7654321", "", False)
    assert decoded[6] == P.ReqAccountSummary(9, "All", "NetLiquidation,BuyingPower")
    assert decoded[7].req_id == 10
    assert decoded[7].filter == P.ExecFilter(3, "", "20261120-14:00:00", "CIM PRB", "", "", "BUY")


def test_unsupported_and_malformed_requests():
    hist = client_requests(lambda c: c.reqHistoricalData(21, stock(), "", "1 D", "1 min", "TRADES", True, 1, True, []))
    decoded = P.decode_request(hist[0])
    assert (decoded.req_id, decoded.contract.symbol, decoded.end, decoded.duration, decoded.bar_size) == (21, "CIM PRB", "", "1 D", "1 min")
    assert (decoded.what_to_show, decoded.use_rth, decoded.format_date, decoded.keep_up_to_date) == ("TRADES", True, 1, True)
    histogram = client_requests(lambda c: c.reqHistogramData(22, stock(), True, "1 week"))
    assert P.decode_request(histogram[0]) == P.Unsupported(88, "reqHistogramData", 22)
    assert P.decode_request(["999", "x"]) == P.Unsupported(999, "message 999", -1)
    with pytest.raises(P.MalformedRequest) as exc:
        P.decode_request(["1", "11", "5", "notanint"])
    assert exc.value.req_id == 5 and "conId" in exc.value.text
    with pytest.raises(P.MalformedRequest):
        P.decode_request(["abc"])
    with pytest.raises(P.MalformedRequest):
        P.decode_request(["3", "17"])  # placeOrder cut short


# ------------------------------------------------------------------ messages


def test_error_and_status_messages(decode):
    assert decode(P.error(-1, 2104, "Market data farm connection is OK:usfarm")) == [
        ("error", (-1, 2104, "Market data farm connection is OK:usfarm", ""))
    ]
    assert decode(P.next_valid_id(17)) == [("nextValidId", (17,))]
    assert decode(P.managed_accounts(["DU7654321"])) == [("managedAccounts", ("DU7654321",))]
    assert decode(P.current_time(1_795_000_000)) == [("currentTime", (1_795_000_000,))]


def test_market_data_messages(decode):
    (call,) = decode(P.tick_price(3, P.BID, "24.82", 400, 1))
    assert call == ("priceSizeTick", (3, 1, 24.82, 400.0))
    assert decode(P.tick_size(3, P.ASK_SIZE, 700)) == [("tickSize", (3, 3, 700.0))]
    assert decode(P.tick_string(3, P.LAST_TIMESTAMP, "1795000000")) == [("tickString", (3, 45, "1795000000"))]
    assert decode(P.tick_req_params(3, 0.01, "9c0001", 3)) == [("tickReqParams", (3, 0.01, "9c0001", 3))]
    (last,) = decode(P.tick_by_tick_last(4, P.TBT_ALL_LAST, 1_795_000_000, "24.83", 100, 0, "FINRA", ""))
    assert last[0] == "tickByTickAllLast" and last[1][:5] == (4, 2, 1_795_000_000, 24.83, 100.0)
    assert last[1][6:] == ("FINRA", "")
    (bid_ask,) = decode(P.tick_by_tick_bid_ask(5, 1_795_000_000, "24.82", "24.85", 300, 1200))
    assert bid_ask[0] == "tickByTickBidAsk" and bid_ask[1][:6] == (5, 1_795_000_000, 24.82, 24.85, 300.0, 1200.0)


def test_contract_details_message(decode):
    calls = decode(P.contract_details(9, CIM_PRB, "SMART", "20261120:0400-20261120:2000", "20261120:0930-20261120:1600"))
    assert calls[0][0] in ("contractDetails", "bondContractDetails")
    req_id, details = calls[0][1]
    assert req_id == 9
    c = details.contract
    assert (c.conId, c.symbol, c.secType, c.exchange, c.primaryExchange, c.currency) == (861123106, "CIM PRB", "STK", "SMART", "NYSE", "USD")
    assert details.minTick == 0.01 and details.stockType == "PREFERRED" and details.longName == "CIM SERIES B PREFERRED"
    assert decode(P.contract_details_end(9)) == [("contractDetailsEnd", (9,))]


def order_fields(**overrides):
    values = dict(
        order_id=42, client_id=3, perm_id=1_000_000_123, contract=CIM_PRB, action="SELL", total_quantity=300.0,
        order_type="LMT", lmt_price=24.87, aux_price=0.0, tif="DAY", account="DU7654321", order_ref="it-abc123",
        outside_rth=False, hidden=True, display_size=0, parent_id=0, status="Submitted", filled=100.0,
        remaining=200.0, avg_fill_price=24.87, last_fill_price=24.87,
    )
    values.update(overrides)
    return P.OrderFields(**values)


def test_open_order_and_status_messages(decode):
    (call,) = decode(P.open_order(order_fields()))
    assert call[0] == "openOrder"
    order_id, contract, order, state = call[1]
    assert order_id == 42 and contract.symbol == "CIM PRB" and contract.conId == 861123106
    assert (order.action, order.totalQuantity, order.orderType, order.lmtPrice, order.tif) == ("SELL", 300.0, "LMT", 24.87, "DAY")
    assert (order.orderRef, order.clientId, order.permId, order.hidden, order.account) == ("it-abc123", 3, 1_000_000_123, True, "DU7654321")
    assert state.status == "Submitted"
    (status,) = decode(P.order_status(order_fields()))
    assert status == ("orderStatus", (42, "Submitted", 100.0, 200.0, 24.87, 1_000_000_123, 0, 24.87, 3, "", 0.0))
    (market,) = decode(P.open_order(order_fields(order_type="MKT", lmt_price=None, hidden=False)))
    assert market[1][2].orderType == "MKT" and market[1][2].hidden is False


def test_completed_order_message(decode):
    (call,) = decode(P.completed_order(order_fields(status="Filled", filled=300.0, remaining=0.0,
                                                    completed_time="20261120 15:40:00 America/New_York",
                                                    completed_status="Filled")))
    contract, order, state = call[1]
    assert call[0] == "completedOrder" and contract.symbol == "CIM PRB"
    assert (order.permId, order.orderRef, order.filledQuantity) == (1_000_000_123, "it-abc123", 300.0)
    assert (state.status, state.completedStatus) == ("Filled", "Filled")
    assert decode(P.completed_orders_end()) == [("completedOrdersEnd", ())]


def test_execution_and_commission_messages(decode):
    execution = P.ExecFields(
        exec_id="6b04db50.00000001.01.01", time_text="20261120 15:40:00 America/New_York", account="DU7654321",
        exchange="NYSE", side="SLD", shares=100.0, price=24.87, perm_id=1_000_000_123, client_id=3, order_id=42,
        cum_qty=100.0, avg_price=24.87, order_ref="it-abc123", last_liquidity=2,
    )
    (call,) = decode(P.exec_details(-1, CIM_PRB, execution))
    req_id, contract, ex = call[1]
    assert call[0] == "execDetails" and req_id == -1 and contract.symbol == "CIM PRB"
    assert (ex.execId, ex.side, ex.shares, ex.price, ex.permId, ex.orderRef) == (
        "6b04db50.00000001.01.01", "SLD", 100.0, 24.87, 1_000_000_123, "it-abc123")
    assert ex.time.astimezone(timezone.utc).hour == 20  # 15:40 New York (EST) = 20:40 UTC
    (report,) = decode(P.commission_report("6b04db50.00000001.01.01", 1.0, "USD", None))
    cr = report[1][0]
    assert (cr.execId, cr.commission, cr.currency) == ("6b04db50.00000001.01.01", 1.0, "USD")
    (closing,) = decode(P.commission_report("x.1", 1.25, "USD", 42.5))
    assert closing[1][0].realizedPNL == 42.5


def test_position_portfolio_and_account_messages(decode):
    (pos,) = decode(P.position("DU7654321", CIM_PRB, -1500.0, 24.61))
    assert pos[0] == "position" and pos[1][0] == "DU7654321" and pos[1][2:] == (-1500.0, 24.61)
    (port,) = decode(P.portfolio_value(CIM_PRB, 3200.0, 24.835, 79472.0, 24.65, 592.0, 0.0, "DU7654321"))
    assert port[0] == "updatePortfolio" and port[1][1:] == (3200.0, 24.835, 79472.0, 24.65, 592.0, 0.0, "DU7654321")
    assert decode(P.account_value("NetLiquidation", "1000000.00", "USD", "DU7654321")) == [
        ("updateAccountValue", ("NetLiquidation", "1000000.00", "USD", "DU7654321"))]
    assert decode(P.account_download_end("DU7654321")) == [("accountDownloadEnd", ("DU7654321",))]
    assert decode(P.account_summary(4, "DU7654321", "BuyingPower", "123.00", "USD")) == [
        ("accountSummary", (4, "DU7654321", "BuyingPower", "123.00", "USD"))]
    assert decode(P.account_update_multi(5, "DU7654321", "", "NetLiquidation", "1.00", "USD")) == [
        ("accountUpdateMulti", (5, "DU7654321", "", "NetLiquidation", "1.00", "USD"))]
    assert decode(P.position_end()) == [("positionEnd", ())]
