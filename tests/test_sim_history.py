"""History from the simulated market (issue 16): bars recorded as the market runs and earlier
sessions synthesized from the seed and the previous closes, head timestamp, historical ticks,
tick-by-tick history, generic ticks (validated; 233 and 236 served) and the $LEDGER summary,
through the real ib_async client."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from ib_async import Stock

from sim.history import History, HistoryError, sessions_before
from sim.testing import wait_until

try:
    from conftest_sim import ib_connect, sim, sim_control  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import ib_connect, sim, sim_control  # noqa: F401

START_NS = int(dt.datetime(2025, 3, 12, 11, 0, tzinfo=dt.timezone.utc).timestamp() * 1e9)  # Wed 07:00 New York


def test_synthesized_sessions_are_deterministic_and_end_at_the_previous_close():
    a = History(42, START_NS, {"CIM PRB": 2485})
    b = History(42, START_NS, {"CIM PRB": 2485})
    end = START_NS // 10**9
    bars_a = a.bars("CIM PRB", "TRADES", end, "1 M", "1 day", True)
    assert bars_a == b.bars("CIM PRB", "TRADES", end, "1 M", "1 day", True)
    assert bars_a != History(7, START_NS, {"CIM PRB": 2485}).bars("CIM PRB", "TRADES", end, "1 M", "1 day", True)
    assert bars_a[-1].label == "20250311" and bars_a[-1].close == 24.85  # the previous session closes at the seed
    days = [dt.datetime.strptime(bar.label, "%Y%m%d").date() for bar in bars_a]
    assert days == sessions_before(dt.date(2025, 3, 12), len(days))  # XNYS sessions only (no weekends/holidays)
    for bar in bars_a:
        assert bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high and bar.volume > 0
    # The same session in 30-minute bars adds up to the daily bar.
    halves = a.bars("CIM PRB", "TRADES", end, "1 D", "30 mins", True)
    assert len(halves) == 13 and halves[0].label == "20250311 09:30:00 US/Eastern"
    assert (halves[0].open, halves[-1].close) == (bars_a[-1].open, bars_a[-1].close)
    assert max(h.high for h in halves) == bars_a[-1].high and sum(h.volume for h in halves) == bars_a[-1].volume
    mids = a.bars("CIM PRB", "MIDPOINT", end, "1 D", "1 hour", True)
    assert all(m.volume == -1 for m in mids)


def test_recorded_bars_from_quotes_and_prints():
    h = History(1, START_NS, {"X": 1000})
    t = START_NS + 3 * 3600 * 10**9  # 10:00 New York
    h.on_print("X", t, 1001, 100, "NYSE", "")
    h.on_print("X", t + 2 * 10**9, 1003, 300, "ARCA", "")
    h.on_print("X", t + 7 * 10**9, 999, 50, "FINRA", "I")
    h.on_quote("X", t, 1000, 1002, 100, 100)
    (first, second) = h.bars("X", "TRADES", t // 10**9 + 60, "60 S", "5 secs", False)
    assert (first.open, first.high, first.low, first.close, first.volume, first.count) == (10.01, 10.03, 10.01, 10.03, 400, 2)
    assert first.wap == pytest.approx((10.01 * 100 + 10.03 * 300) / 400)
    assert (second.open, second.volume) == (9.99, 50)
    (minute,) = h.bars("X", "TRADES", t // 10**9 + 60, "60 S", "1 min", False)
    assert (minute.open, minute.high, minute.low, minute.close, minute.volume) == (10.01, 10.03, 9.99, 9.99, 450)
    (mid,) = h.bars("X", "MIDPOINT", t // 10**9 + 60, "60 S", "1 min", False)
    assert mid.close == 10.01
    assert [row[1] for row in h.ticks("X", "TRADES", None, t + 3 * 10**9, 10)] == [1001, 1003]
    assert [row[1] for row in h.ticks("X", "TRADES", t + 1, None, 1)] == [1003]


def test_bad_parameters_are_refused_like_ib():
    h = History(1, START_NS, {"X": 1000})
    with pytest.raises(HistoryError) as info:
        h.bars("X", "TRADES", START_NS // 10**9, "1 D", "7 mins", True)
    assert info.value.code == 162 and "Legal ones are" in info.value.text
    with pytest.raises(HistoryError) as info:
        h.bars("X", "TRADES", START_NS // 10**9, "1 Q", "1 min", True)
    assert info.value.code == 162
    with pytest.raises(HistoryError) as info:
        h.bars("X", "OPTION_IMPLIED_VOLATILITY", START_NS // 10**9, "1 D", "1 min", True)
    assert info.value.code == 162


@pytest.fixture
def ib(ib_connect):
    return ib_connect(client_id=11)


@pytest.fixture
def cim(ib):
    contract = Stock("CIM PRB", "SMART", "USD")
    ib.qualifyContracts(contract)
    return contract


def run(ib, coro, timeout=5.0):
    return ib.run(asyncio.wait_for(coro, timeout))


def test_ib_async_daily_and_intraday_bars_and_head_timestamp(ib, cim, sim_control):
    daily = run(ib, ib.reqHistoricalDataAsync(cim, "", "1 Y", "1 day", "TRADES", True))
    assert len(daily) > 240 and all(isinstance(b.date, dt.date) for b in daily)
    assert daily[-1].date < dt.date.today() + dt.timedelta(days=2)
    head = run(ib, ib.reqHeadTimeStampAsync(cim, "TRADES", True, 1))
    assert head <= dt.datetime.combine(daily[0].date, dt.time(9, 30))
    for what in ("BID", "ASK", "MIDPOINT"):
        bars = run(ib, ib.reqHistoricalDataAsync(cim, "", "2 D", "1 hour", what, True))
        assert bars and all(b.low <= b.high for b in bars)
    # Today's own prints become bars: inject two and read them back as 5-second TRADES bars.
    sim_control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)
    sim_control.inject_print("CIM PRB", 24.81, 300)
    sim_control.inject_print("CIM PRB", 24.81, 200)
    bars = run(ib, ib.reqHistoricalDataAsync(cim, "", "30 S", "5 secs", "TRADES", False))
    assert bars and sum(b.volume for b in bars if b.close == 24.81) >= 500


def test_ib_async_keep_up_to_date_streams_the_last_bar(ib, cim, sim, sim_control):
    sim_control.inject_print("CIM PRB", 24.75, 100)  # ib_async ignores updates to an empty bar list
    bars = run(ib, ib.reqHistoricalDataAsync(cim, "", "60 S", "5 secs", "TRADES", False, keepUpToDate=True))
    assert bars
    updates = []
    bars.updateEvent += lambda bars, has_new: updates.append(bars[-1])
    sim_control.set_quote("CIM PRB", 24.70, 24.72, 500, 500, freeze=True)
    sim_control.inject_print("CIM PRB", 24.71, 1234)
    wait_until(ib, lambda: any(b.close == 24.71 for b in updates), timeout=4)
    ib.cancelHistoricalData(bars)
    ib.sleep(0.3)
    assert sim.call(lambda: sum(len(s.history_subs) for s in sim.server.sessions)) == 0


def test_ib_async_keep_up_to_date_with_an_end_is_refused(ib, cim):
    ib.RaiseRequestErrors = True
    with pytest.raises(Exception) as info:
        run(ib, ib.reqHistoricalDataAsync(cim, "20250101 10:00:00", "1 D", "1 min", "TRADES", True, keepUpToDate=True))
    ib.RaiseRequestErrors = False
    # IB's text; 162 rather than IB's 321, which ib_async takes for a warning and keeps waiting.
    assert info.value.code == 162 and "End date not supported with live updates" in info.value.message


def test_ib_async_historical_ticks_from_recorded_prints(ib, cim, sim_control):
    sim_control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)
    sim_control.inject_print("CIM PRB", 24.81, 77, "IEX")
    ticks = run(ib, ib.reqHistoricalTicksAsync(cim, "", dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5), 5, "TRADES", False))
    assert ticks and (ticks[-1].price, ticks[-1].size, ticks[-1].exchange) == (24.81, 77, "IEX")
    quotes = run(ib, ib.reqHistoricalTicksAsync(cim, "", dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5), 3, "BID_ASK", False))
    assert quotes and (quotes[-1].priceBid, quotes[-1].priceAsk) == (24.80, 24.82)
    mids = run(ib, ib.reqHistoricalTicksAsync(cim, "", dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5), 3, "MIDPOINT", False))
    assert mids[-1].price == 24.81


def test_ib_async_tick_by_tick_sends_history_first(ib, cim, sim_control):
    sim_control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)
    for size in (11, 22, 33):
        sim_control.inject_print("CIM PRB", 24.81, size)
    history = []
    original = ib.wrapper.historicalTicksLast

    def capture(req_id, ticks, done):
        history.append((ticks, done))
        original(req_id, ticks, done)

    ib.wrapper.historicalTicksLast = capture
    ib.reqTickByTickData(cim, "AllLast", numberOfTicks=2)
    wait_until(ib, lambda: history, timeout=3)
    ticks, done = history[0]
    assert [t.size for t in ticks] == [22, 33] and done


def test_ib_async_generic_ticks_validated_and_served(ib, cim, sim_control):
    errors = []
    ib.errorEvent += lambda req_id, code, text, contract: errors.append((code, text))
    bad = ib.reqMktData(cim, "233,999")
    wait_until(ib, lambda: errors, timeout=3)
    code, text = errors[0]
    assert code == 321 and "Incorrect generic tick list of 233,999" in text and "233(RTVolume)" in text
    ib.cancelMktData(bad.contract)
    ticker = ib.reqMktData(cim, "233,236")
    wait_until(ib, lambda: ticker.shortable == 3.0 and ticker.shortableShares > 0, timeout=3)
    sim_control.set_quote("CIM PRB", 24.80, 24.82, 500, 500, freeze=True)
    sim_control.inject_print("CIM PRB", 24.81, 444)
    wait_until(ib, lambda: ticker.rtTime is not None and ticker.vwap > 0, timeout=3)
    assert ticker.rtVolume >= 444


def test_ib_async_ledger_account_summary(ib):
    rows = run(ib, ib.accountSummaryAsync())
    tags = {r.tag for r in rows}
    for tag in ("NetLiquidation", "BuyingPower", "PreviousDayEquityWithLoanValue", "LookAheadAvailableFunds",
                "HighestSeverity", "SMA", "Cushion"):
        assert tag in tags, tag
    req = ib.client.getReqId()
    got = []
    ib.wrapper.accountSummary = lambda req_id, account, tag, value, currency: got.append((tag, value, currency))
    ib.client.reqAccountSummary(req, "All", "$LEDGER:ALL")
    wait_until(ib, lambda: len(got) >= 46, timeout=3)
    ledger = {(tag, currency): value for tag, value, currency in got}
    assert ledger[("CashBalance", "BASE")] == ledger[("CashBalance", "USD")]
    assert ("NetLiquidationByCurrency", "USD") in ledger and ledger[("ExchangeRate", "USD")] == "1.00"
