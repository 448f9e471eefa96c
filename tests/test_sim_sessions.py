"""Trading sessions (opt-in) on the XNYS calendar and the shared simulated clock: phases, DAY
expiry at the close, no regular-hours fills outside them (outsideRth honoured), halts with IB's
halted tick, quiet and no-prints symbols; through the real ib_async client."""

from __future__ import annotations

from datetime import datetime

import pytest
from ib_async import IB, LimitOrder, Stock

from qe.clock import Clock
from sim.market import Market, PrintEvent, QuoteEvent
from sim.sessions import NEW_YORK, can_trade, phase
from sim.testing import start_in_thread, wait_until


def ny_ns(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=NEW_YORK).timestamp() * 1e9)


class ManualClock(Clock):
    """A simulated clock the test moves by hand."""

    def __init__(self, text: str) -> None:
        self.ns = ny_ns(text)

    def set(self, text: str) -> None:
        self.ns = ny_ns(text)

    def now_ns(self) -> int:
        return self.ns

    def describe(self) -> str:
        return "manual"


@pytest.mark.parametrize("moment, expected", [
    ("2025-03-12 03:59:59", "closed"),
    ("2025-03-12 04:00:00", "pre_open"),
    ("2025-03-12 09:30:00", "regular"),
    ("2025-03-12 15:59:59", "regular"),
    ("2025-03-12 16:00:00", "after_hours"),
    ("2025-03-12 20:00:00", "closed"),
    ("2025-03-15 12:00:00", "closed"),       # Saturday
    ("2025-12-25 12:00:00", "closed"),       # Christmas
    ("2025-11-28 12:59:00", "regular"),      # day after Thanksgiving: early close 13:00
    ("2025-11-28 13:00:00", "after_hours"),
])
def test_phases_follow_the_xnys_calendar(moment, expected):
    assert phase(ny_ns(moment)) == expected


def test_outside_rth_trades_only_pre_open_and_after_hours():
    assert can_trade(ny_ns("2025-03-12 08:00:00"), True) and not can_trade(ny_ns("2025-03-12 08:00:00"), False)
    assert not can_trade(ny_ns("2025-03-12 21:00:00"), True)


def test_quiet_and_no_prints_symbols_in_the_market_model():
    clock = ManualClock("2025-03-12 10:00:00")
    market = Market({"A": 25.0, "B": 25.0}, seed=3, now_ns=clock.now_ns)
    market.config.quote_rate = market.config.print_rate = 5.0
    market.books["A"].quiet_until_ns = clock.ns + 60 * 10**9
    market.books["B"].no_prints_until_ns = clock.ns + 60 * 10**9
    events = market.advance(10.0)
    assert not [e for e in events if e.symbol == "A" and isinstance(e, QuoteEvent)]
    assert [e for e in events if e.symbol == "A" and isinstance(e, PrintEvent)]
    assert not [e for e in events if e.symbol == "B" and isinstance(e, PrintEvent)]
    assert [e for e in events if e.symbol == "B" and isinstance(e, QuoteEvent)]
    clock.ns += 61 * 10**9  # over: both kinds again
    events = market.advance(10.0)
    assert {(e.symbol, type(e).__name__) for e in events} >= {("A", "QuoteEvent"), ("B", "PrintEvent")}


@pytest.fixture
def session_sim():
    clock = ManualClock("2025-03-12 15:59:00")
    running = start_in_thread(clock=clock, sessions=True)
    running.clock = clock  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def ib(session_sim):
    ib = IB()
    ib.connect("127.0.0.1", session_sim.port, clientId=21, timeout=5)
    yield ib
    ib.disconnect()


def contract(ib, symbol="CIM PRB"):
    c = Stock(symbol, "SMART", "USD")
    ib.qualifyContracts(c)
    return c


def test_sessions_are_off_by_default():
    running = start_in_thread()
    try:
        assert running.control.state()["session"] == {"enabled": False, "phase": "regular", "halted": []}
    finally:
        running.stop()


def test_day_orders_expire_at_the_close_gtc_stays(session_sim, ib):
    control = session_sim.control
    cim = contract(ib)
    control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)
    day = ib.placeOrder(cim, LimitOrder("BUY", 100, 24.70, tif="DAY"))
    gtc = ib.placeOrder(cim, LimitOrder("BUY", 100, 24.70, tif="GTC"))
    wait_until(ib, lambda: day.orderStatus.status == "Submitted" and gtc.orderStatus.status == "Submitted")
    session_sim.clock.set("2025-03-12 16:00:01")
    wait_until(ib, lambda: day.orderStatus.status == "Cancelled", timeout=3)
    assert gtc.orderStatus.status == "Submitted" and day.orderStatus.filled == 0
    assert control.state()["session"]["phase"] == "after_hours"
    assert [o["history"][-1]["event"] for o in control.orders() if o["tif"] == "DAY"] == ["expired"]


def test_no_regular_hours_fills_outside_them_outside_rth_honoured(session_sim, ib):
    control = session_sim.control
    session_sim.clock.set("2025-03-12 17:00:00")
    wait_until(ib, lambda: control.state()["session"]["phase"] == "after_hours")
    cim = contract(ib)
    control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)
    rth_only = ib.placeOrder(cim, LimitOrder("BUY", 100, 24.82))
    extended = ib.placeOrder(cim, LimitOrder("BUY", 100, 24.82, outsideRth=True))
    wait_until(ib, lambda: extended.orderStatus.status == "Filled", timeout=3)
    ib.sleep(0.3)
    assert rth_only.orderStatus.status == "PreSubmitted" and rth_only.orderStatus.filled == 0
    # The next morning's open: the regular-hours order works (Submitted) and trades.
    session_sim.clock.set("2025-03-13 09:30:01")
    wait_until(ib, lambda: control.state()["session"]["phase"] == "regular", timeout=3)
    control.set_quote("CIM PRB", 24.81, 24.82, 500, 500, freeze=True)
    wait_until(ib, lambda: rth_only.orderStatus.status == "Filled", timeout=3)


def test_halt_and_resume_with_ibs_halted_tick(session_sim, ib):
    control = session_sim.control
    session_sim.clock.set("2025-03-12 11:00:00")
    cim = contract(ib)
    control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=False)
    halted_ticks = []  # raw tick 49 values (ib_async stores 0 as NaN)
    original = ib.wrapper.tickGeneric

    def capture(req_id, tick_type, value):
        if tick_type == 49:
            halted_ticks.append(float(value))
        original(req_id, tick_type, value)

    ib.wrapper.tickGeneric = capture
    ticker = ib.reqMktData(cim)
    wait_until(ib, lambda: halted_ticks == [0.0], timeout=3)  # not halted, in the first snapshot
    control.halt("CIM PRB")
    wait_until(ib, lambda: ticker.halted == 1 and halted_ticks == [0.0, 1.0], timeout=3)
    trade = ib.placeOrder(cim, LimitOrder("BUY", 100, 24.85))
    wait_until(ib, lambda: trade.orderStatus.status == "PreSubmitted")
    control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)  # the book moves, but no fill while halted
    ib.sleep(0.5)
    assert trade.orderStatus.filled == 0 and control.state()["session"]["halted"] == ["CIM PRB"]
    control.resume("CIM PRB")
    wait_until(ib, lambda: halted_ticks == [0.0, 1.0, 0.0], timeout=3)
    control.set_quote("CIM PRB", 24.81, 24.82, 500, 500, freeze=True)
    wait_until(ib, lambda: trade.orderStatus.status == "Filled", timeout=3)


def test_quiet_and_no_prints_knobs_through_control(session_sim, ib):
    control = session_sim.control
    session_sim.clock.set("2025-03-12 11:00:00")
    quiet = control.quiet("CIM PRB", 30)
    assert quiet["quiet_until_ns"] == ny_ns("2025-03-12 11:30:00")
    assert control.no_prints("AGNCO", 60)["no_prints_until_ns"] == ny_ns("2025-03-12 12:00:00")
    cim = contract(ib)
    ticker = ib.reqMktData(cim)
    wait_until(ib, lambda: ticker.bid > 0)
    bid, ask, bid_size, ask_size = ticker.bid, ticker.ask, ticker.bidSize, ticker.askSize
    ib.sleep(1.0)  # 4 quotes/s in tests: a live symbol would have moved
    assert (ticker.bid, ticker.ask, ticker.bidSize, ticker.askSize) == (bid, ask, bid_size, ask_size)
    control.reset()
    assert control.quote("CIM PRB")["quiet_until_ns"] is None
