"""The real ib_async client against the simulator: connect, contracts, market data, orders."""

from __future__ import annotations

import logging
import time

from ib_async import LimitOrder, MarketOrder, Stock

try:
    from conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401

ACCOUNT = "DU7654321"


def errors_of(ib) -> list[tuple[int, int, str]]:
    seen: list[tuple[int, int, str]] = []
    ib.errorEvent += lambda req_id, code, text, contract: seen.append((req_id, code, text))
    return seen


def qualified(ib, symbol: str) -> Stock:
    contract = Stock(symbol, "SMART", "USD")
    assert ib.qualifyContracts(contract) == [contract]
    return contract


def test_connect_is_complete_without_timeouts(sim, ib_connect, caplog):
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    ib = ib_connect(client_id=1)
    assert time.monotonic() - started < 3
    assert ib.isConnected() and ib.managedAccounts() == [ACCOUNT]
    problems = [r.getMessage() for r in caplog.records if r.name.startswith("ib_async") and r.levelno >= logging.WARNING]
    assert problems == []
    assert not any("timed out" in r.getMessage() for r in caplog.records)
    assert any("Synchronization complete" in r.getMessage() for r in caplog.records)
    assert len(ib.positions()) == 23
    assert len(ib.portfolio()) == 23
    values = {(v.tag, v.currency): v.value for v in ib.accountValues()}
    assert abs(float(values[("NetLiquidation", "USD")]) - 1_000_000) < 10_000
    assert float(values[("GrossPositionValue", "USD")]) > 1_000_000  # demo starts above 100 % gross
    assert ib.openTrades() == [] and ib.fills() == []
    summary = {v.tag: v.value for v in ib.accountSummary(ACCOUNT)}
    assert {"NetLiquidation", "BuyingPower", "GrossPositionValue"} <= set(summary)


def test_qualify_preferreds_plain_tickers_etf_and_unknown(ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    contracts = [Stock(s, "SMART", "USD") for s in ("CIM PRB", "AGNCN", "PFF", "NOPE")]
    result = ib.qualifyContracts(*contracts)
    cim, agncn, pff = contracts[:3]
    assert result[:3] == [cim, agncn, pff] and result[3] is None
    assert cim.conId > 0 and cim.primaryExchange == "NYSE" and cim.localSymbol == "CIM PRB"
    assert agncn.primaryExchange == "NASDAQ" and pff.primaryExchange == "NASDAQ"
    assert len({cim.conId, agncn.conId, pff.conId}) == 3
    assert [code for _, code, _ in errors] == [200]
    (details,) = ib.reqContractDetails(Stock(conId=cim.conId))
    assert details.contract.symbol == "CIM PRB" and details.stockType == "PREFERRED" and details.minTick == 0.01
    assert ib.reqContractDetails(Stock(conId=pff.conId))[0].stockType == "ETF"


def test_market_data_ticks_move_and_cancel(sim, sim_control, ib_connect):
    sim_control.configure(quote_rate=25, print_rate=10)
    ib = ib_connect()
    contract = qualified(ib, "CIM PRB")
    ticker = ib.reqMktData(contract)
    wait_until(ib, lambda: ticker.bid > 0 and ticker.ask > 0 and ticker.last > 0)
    assert ticker.close == 24.85 and ticker.minTick == 0.01
    seen = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        ib.sleep(0.05)
        assert ticker.bid < ticker.ask
        assert round(ticker.bid * 100, 6).is_integer() and round(ticker.ask * 100, 6).is_integer()
        assert ticker.bidSize % 100 == 0 and ticker.askSize % 100 == 0
        seen.add((ticker.bid, ticker.ask, ticker.bidSize, ticker.askSize, ticker.last, ticker.volume))
    assert len(seen) > 5
    assert ticker.volume > 0 and ticker.lastExchange
    ib.cancelMktData(contract)
    ib.sleep(0.2)
    assert sim_control.state()["clients"][0]["mkt_subscriptions"] == 0
    frozen = (ticker.bid, ticker.ask, ticker.last)
    ib.sleep(0.5)
    assert (ticker.bid, ticker.ask, ticker.last) == frozen


def test_snapshot_via_req_tickers(ib_connect):
    ib = ib_connect()
    (ticker,) = ib.reqTickers(qualified(ib, "AGNCN"))
    assert ticker.bid > 0 and ticker.ask > ticker.bid and ticker.close == 25.30


def test_tick_by_tick_prints_with_lit_and_dark_venues_and_bid_ask(sim, sim_control, ib_connect):
    sim_control.configure(quote_rate=20, print_rate=40)
    ib = ib_connect()
    contract = qualified(ib, "NLY PRF")
    trades = ib.reqTickByTickData(contract, "AllLast")
    venues: set[str] = set()
    sizes: list[float] = []

    def collect(ticker):
        for tick in ticker.tickByTicks:
            if hasattr(tick, "exchange"):
                venues.add(tick.exchange)
                sizes.append(tick.size)

    trades.updateEvent += collect
    wait_until(ib, lambda: "FINRA" in venues and venues - {"FINRA"} and any(s < 100 for s in sizes), timeout=6)
    assert venues <= {"FINRA", "NYSE", "ARCA", "NASDAQ", "BATS", "DRCTEDGE", "IEX"}
    sim_control.inject_print("NLY PRF", 25.13, 200, venue="FINRA")
    wait_until(ib, lambda: any(200 == s for s in sizes))
    quotes = ib.reqTickByTickData(contract, "BidAsk")
    wait_until(ib, lambda: any(type(t).__name__ == "TickByTickBidAsk" for t in quotes.tickByTicks))
    tick = [t for t in quotes.tickByTicks if type(t).__name__ == "TickByTickBidAsk"][-1]
    assert 0 < tick.bidPrice < tick.askPrice and tick.bidSize % 100 == 0
    last = ib.reqTickByTickData(qualified(ib, "PFF"), "Last")
    mids = ib.reqTickByTickData(qualified(ib, "AGNCN"), "MidPoint")
    wait_until(ib, lambda: any(type(t).__name__ == "TickByTickAllLast" and t.tickType == 1 for t in last.tickByTicks))
    wait_until(ib, lambda: any(type(t).__name__ == "TickByTickMidPoint" for t in mids.tickByTicks))
    assert sim_control.state()["clients"][0]["tbt_subscriptions"] == 4
    ib.cancelTickByTickData(last.contract, "Last")
    ib.cancelTickByTickData(mids.contract, "MidPoint")
    ib.cancelTickByTickData(contract, "AllLast")
    ib.cancelTickByTickData(contract, "BidAsk")
    wait_until(ib, lambda: sim_control.state()["clients"][0]["tbt_subscriptions"] == 0)


def test_place_limit_and_market_orders(sim_control, ib_connect):
    ib = ib_connect()
    contract = qualified(ib, "CIM PRB")
    sim_control.set_quote("CIM PRB", 24.80, 24.82, bid_size=300, ask_size=500)
    resting = ib.placeOrder(contract, LimitOrder("BUY", 100, 24.70, orderRef="lt-rest-1", hidden=True))
    wait_until(ib, lambda: resting.orderStatus.status == "Submitted")
    assert resting.order.permId > 0 and [t.order.orderRef for t in ib.openTrades()] == ["lt-rest-1"]
    market = ib.placeOrder(contract, MarketOrder("BUY", 300, orderRef="lt-mkt-1"))
    wait_until(ib, lambda: market.orderStatus.status == "Filled")
    assert market.orderStatus.avgFillPrice == 24.82 and market.orderStatus.filled == 300
    wait_until(ib, lambda: market.fills and market.fills[0].commissionReport.commission > 0)
    assert market.fills[0].commissionReport.commission == 1.5
    referee = {o["order_ref"]: o for o in sim_control.orders()}
    assert referee["lt-rest-1"]["status"] == "Submitted" and referee["lt-rest-1"]["hidden"] is True
    assert referee["lt-rest-1"]["lmt_price"] == 24.70 and referee["lt-rest-1"]["tif"] == "DAY"
    assert referee["lt-mkt-1"]["status"] == "Filled"
    assert [f["order_ref"] for f in sim_control.fills()] == ["lt-mkt-1"]
    statuses = [entry.status for entry in market.log]
    assert statuses[:3] == ["PendingSubmit", "PreSubmitted", "Submitted"] and statuses[-1] == "Filled"


def test_modify_with_same_order_id_then_cancel(sim_control, ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    contract = qualified(ib, "AGNCO")
    sim_control.set_quote("AGNCO", 23.90, 23.93, 500, 500)
    order = LimitOrder("SELL", 200, 24.10, orderRef="mm-quote-7")
    trade = ib.placeOrder(contract, order)
    wait_until(ib, lambda: trade.orderStatus.status == "Submitted")
    order.lmtPrice = 24.05
    same = ib.placeOrder(contract, order)
    assert same is trade
    wait_until(ib, lambda: any(entry.message == "Modified" for entry in trade.log))
    (record,) = sim_control.orders("mm-quote-7")
    assert record["order_id"] == trade.order.orderId and record["lmt_price"] == 24.05
    assert [h["event"] for h in record["history"]] == ["place", "modify"]
    ib.cancelOrder(order)
    wait_until(ib, lambda: trade.orderStatus.status == "Cancelled")
    assert (trade.order.orderId, 202) in [(r, c) for r, c, _ in errors]
    assert sim_control.orders("mm-quote-7")[0]["status"] == "Cancelled"
    assert [(r["event"], r["result"]) for r in sim_control.requests("mm-quote-7")] == [
        ("place", "ok"), ("modify", "ok"), ("cancel", "ok")]
    assert ib.openTrades() == []


def test_global_cancel_reaches_every_client(sim_control, ib_connect):
    first, second = ib_connect(client_id=1), ib_connect(client_id=2)
    a = first.placeOrder(qualified(first, "CIM PRB"), LimitOrder("BUY", 100, 20.00, orderRef="a"))
    b = second.placeOrder(qualified(second, "PFF"), LimitOrder("SELL", 100, 40.00, orderRef="b"))
    wait_until(first, lambda: a.orderStatus.status == "Submitted")
    wait_until(second, lambda: b.orderStatus.status == "Submitted")
    assert {t.order.orderRef for t in first.reqAllOpenOrders()} >= {"a", "b"}
    first.reqGlobalCancel()
    wait_until(first, lambda: a.orderStatus.status == "Cancelled")
    wait_until(second, lambda: b.orderStatus.status == "Cancelled")
    assert sim_control.state()["open_orders"] == 0


def test_partial_fill_by_displayed_size_then_resting_fill_when_market_crosses(sim_control, ib_connect):
    ib = ib_connect()
    contract = qualified(ib, "CIM PRB")
    start_qty = {p.contract.symbol: p.position for p in ib.positions()}["CIM PRB"]
    sim_control.set_quote("CIM PRB", 24.80, 24.82, bid_size=300, ask_size=200)
    trade = ib.placeOrder(contract, LimitOrder("BUY", 500, 24.82, orderRef="lt-partial"))
    wait_until(ib, lambda: trade.orderStatus.filled == 200)
    assert trade.orderStatus.status == "Submitted" and trade.orderStatus.remaining == 300
    assert sim_control.quote("CIM PRB")["ask"] == 24.83  # the 200 shown at 24.82 are gone
    sim_control.set_quote("CIM PRB", 24.79, 24.81, bid_size=300, ask_size=1000)
    wait_until(ib, lambda: trade.orderStatus.status == "Filled")
    assert [f.execution.shares for f in trade.fills] == [200, 300]
    assert {f.execution.price for f in trade.fills} == {24.82}
    assert [f.execution.lastLiquidity for f in trade.fills] == [2, 1]  # took, then was taken
    exec_ids = [f.execution.execId for f in trade.fills]
    assert len(set(exec_ids)) == 2
    wait_until(ib, lambda: all(f.commissionReport.execId for f in trade.fills))
    wait_until(ib, lambda: {p.contract.symbol: p.position for p in ib.positions()}["CIM PRB"] == start_qty + 500)
    assert [f["exec_id"] for f in sim_control.fills("lt-partial")] == exec_ids


def test_positions_and_account_values_follow_fills_and_marks(sim_control, ib_connect):
    sim_control.configure(quote_rate=0, print_rate=0)  # marks move only when we say so
    ib = ib_connect()
    contract = qualified(ib, "TWO PRB")  # flat in the demo account
    assert "TWO PRB" not in {p.contract.symbol for p in ib.positions()}
    sim_control.set_quote("TWO PRB", 22.70, 22.74, 400, 400)
    trade = ib.placeOrder(contract, MarketOrder("SELL", 400, orderRef="mm-short"))
    wait_until(ib, lambda: trade.orderStatus.status == "Filled")
    wait_until(ib, lambda: {p.contract.symbol: p.position for p in ib.positions()}.get("TWO PRB") == -400)
    position = [p for p in ib.positions() if p.contract.symbol == "TWO PRB"][0]
    assert position.account == ACCOUNT and abs(position.avgCost - (22.70 - 2.0 / 400)) < 1e-6
    wait_until(ib, lambda: any(i.contract.symbol == "TWO PRB" for i in ib.portfolio()))
    before = sim_control.state()["account"]["net_liquidation"]
    sim_control.shock("TWO PRB", 10)  # short position loses 10 %
    after = sim_control.state()["account"]["net_liquidation"]
    assert before - after == round(before - after, 2) and 850 < before - after < 1000

    def nlv():
        values = {(v.tag, v.currency): v.value for v in ib.accountValues()}
        return float(values[("NetLiquidation", "USD")])

    wait_until(ib, lambda: abs(nlv() - after) < 1.0, timeout=5)  # pushed every second in tests
    item = [i for i in ib.portfolio() if i.contract.symbol == "TWO PRB"][0]
    wait_until(ib, lambda: [i for i in ib.portfolio() if i.contract.symbol == "TWO PRB"][0].marketPrice > 24.9)
    assert item.position == -400


def test_request_ids_time_and_market_data_type(ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    now = ib.reqCurrentTime()
    assert abs(now.timestamp() - time.time()) < 5
    ib.reqMarketDataType(3)
    ib.client.reqIds(1)
    ib.sleep(0.2)
    assert errors == []
