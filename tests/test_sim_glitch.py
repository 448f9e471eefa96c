"""A feed glitch: the simulator sends subscribers a bad quote (crossed, zero) while its
book, its marks and every order ignore it -- what a real feed does on a bad day."""

from __future__ import annotations

from ib_async import LimitOrder, Stock

try:
    from conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import ib_connect, sim, sim_control, wait_until  # noqa: F401


def test_a_glitch_reaches_subscribers_and_nothing_else(sim, sim_control, ib_connect):
    sim_control.configure(quote_rate=0, print_rate=0)
    ib = ib_connect()
    contract = Stock("CIM PRB", "SMART", "USD")
    ib.qualifyContracts(contract)
    ticker = ib.reqMktData(contract)
    wait_until(ib, lambda: ticker.bid > 0 and ticker.ask > 0)
    book = sim_control.quote("CIM PRB")
    marks_before = {p["symbol"]: p["mark"] for p in sim_control.state()["positions"]}

    crossed_bid, crossed_ask = round(book["ask"] + 0.10, 2), book["bid"]
    sim_control.glitch_quote("CIM PRB", crossed_bid, crossed_ask)
    wait_until(ib, lambda: (ticker.bid, ticker.ask) == (crossed_bid, crossed_ask))  # the client sees it crossed
    assert sim_control.quote("CIM PRB")["bid"] == book["bid"] and sim_control.quote("CIM PRB")["ask"] == book["ask"]
    assert {p["symbol"]: p["mark"] for p in sim_control.state()["positions"]} == marks_before

    # A BUY at the glitch's ask (the real bid) would cross the glitch but not the book: it rests.
    trade = ib.placeOrder(contract, LimitOrder("BUY", 100, crossed_ask))
    ib.sleep(0.5)
    assert trade.orderStatus.filled == 0 and trade.orderStatus.status in ("PreSubmitted", "Submitted")

    sim_control.glitch_quote("CIM PRB", 0.0, 0.0)  # a zero quote
    wait_until(ib, lambda: ticker.bid in (0.0, -1.0) or ticker.bid != ticker.bid)
    # A real quote change replaces the glitch at the client.
    sim_control.set_quote("CIM PRB", book["bid"], book["ask"], freeze=False)
    wait_until(ib, lambda: (ticker.bid, ticker.ask) == (book["bid"], book["ask"]))
