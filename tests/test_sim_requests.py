"""Every request ib_async can send gets an answer or IB's specific error for it (issue 16):
each call runs with a timeout against the simulator through the real ib_async client."""

from __future__ import annotations

import asyncio

import pytest
from ib_async import IB, LimitOrder, Option, ScannerSubscription, Stock, WshEventData

try:
    from conftest_sim import ib_connect, sim, sim_control  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import ib_connect, sim, sim_control  # noqa: F401

TIMEOUT = 3.0


def answer(ib: IB, coro):
    """The call's result within TIMEOUT (asyncio.TimeoutError fails the test)."""
    return ib.run(asyncio.wait_for(coro, TIMEOUT))


def request_error(ib: IB, coro) -> tuple[int, str]:
    """The RequestError (code, text) the call ends with within TIMEOUT."""
    ib.RaiseRequestErrors = True
    try:
        with pytest.raises(Exception) as info:
            answer(ib, coro)
    finally:
        ib.RaiseRequestErrors = False
    exc = info.value
    assert type(exc).__name__ == "RequestError", repr(exc)
    return exc.code, exc.message


@pytest.fixture
def ib(ib_connect):
    return ib_connect(client_id=7)


@pytest.fixture
def cim(ib):
    contract = Stock("CIM PRB", "SMART", "USD")
    assert ib.qualifyContracts(contract) == [contract]
    return contract


def test_reference_data_requests_are_answered(ib, cim):
    assert answer(ib, ib.reqSecDefOptParamsAsync("CIM PRB", "", "STK", cim.conId)) == []
    components = answer(ib, ib.reqSmartComponentsAsync("9c0001"))
    assert {c.exchange for c in components} == {"NYSE", "ARCA", "NASDAQ", "BATS", "DRCTEDGE", "IEX"}
    assert answer(ib, ib.reqMktDepthExchangesAsync()) == []
    (rule,) = answer(ib, ib.reqMarketRuleAsync(26))
    assert (rule.lowEdge, rule.increment) == (0.0, 0.01)
    matches = answer(ib, ib.reqMatchingSymbolsAsync("CIM PR"))
    assert matches and all(m.contract.symbol.startswith("CIM PR") for m in matches)
    assert cim.conId in {m.contract.conId for m in matches}
    assert answer(ib, ib.reqUserInfoAsync()) == []  # userInfo ends the request (ib_async returns its empty result)
    assert request_error(ib, ib.reqSecDefOptParamsAsync("NOPE", "", "STK", 1))[0] == 200


def test_news_research_and_fundamentals(ib, cim):
    assert answer(ib, ib.reqNewsProvidersAsync()) == []
    assert answer(ib, ib.reqHistoricalNewsAsync(cim.conId, "BRFG", "", "", 10)) == []
    assert request_error(ib, ib.reqNewsArticleAsync("BRFG", "BRFG$1")) == (10172, "Failed to request news article: No data available")
    code, text = request_error(ib, ib.reqFundamentalDataAsync(cim, "ReportSnapshot"))
    assert code == 430 and text.startswith("We are sorry, but fundamentals data")
    meta = answer(ib, ib.getWshMetaDataAsync())
    assert '"meta_data"' in meta
    assert answer(ib, ib.getWshEventDataAsync(WshEventData(conId=cim.conId))) == "[]"


def test_scanner_parameters_and_data(ib):
    xml = answer(ib, ib.reqScannerParametersAsync())
    assert "<scanCode>MOST_ACTIVE</scanCode>" in xml
    sub = ScannerSubscription(instrument="STK", locationCode="STK.US.MAJOR", scanCode="MOST_ACTIVE", numberOfRows=5)
    rows = answer(ib, ib.reqScannerDataAsync(sub))
    assert len(rows) == 5 and [r.rank for r in rows] == [0, 1, 2, 3, 4]
    assert all(r.contractDetails.contract.secType == "STK" for r in rows)
    bad = ScannerSubscription(instrument="STK", locationCode="STK.US.MAJOR", scanCode="NO_SUCH_SCAN")
    ib.RaiseRequestErrors = True
    with pytest.raises(Exception) as info:
        answer(ib, ib.reqScannerDataAsync(bad))
    assert getattr(info.value, "code", None) == 162


def test_option_computations_answer_no_security_definition(ib):
    option = Option("CIM", "20300118", 25, "C", "SMART")
    assert request_error(ib, ib.calculateImpliedVolatilityAsync(option, 1.0, 25.0))[0] == 200
    assert request_error(ib, ib.calculateOptionPriceAsync(option, 0.2, 25.0))[0] == 200


def test_what_if_order_carries_margin_and_commission(ib, cim, sim_control):
    sim_control.set_quote("CIM PRB", 24.80, 24.90, 500, 500, freeze=True)
    state = answer(ib, ib.whatIfOrderAsync(cim, LimitOrder("BUY", 1000, 24.95)))
    init_change, maint_change = float(state.initMarginChange), float(state.maintMarginChange)
    mark = init_change / 500  # Reg-T initial: 50 % of the 1000 shares at the mark
    assert 24.80 <= mark <= 24.90
    assert maint_change == pytest.approx(0.25 * 1000 * mark, abs=0.01)  # a long: 25 % maintenance
    assert float(state.initMarginAfter) == pytest.approx(float(state.initMarginBefore) + init_change, abs=0.01)
    assert state.commission == 5.0 and state.commissionCurrency == "USD"  # 1000 x $0.005
    # Bought at the ask (24.90) and valued at the mark, less the commission.
    assert float(state.equityWithLoanChange) == pytest.approx(1000 * (mark - 24.90) - 5.0, abs=0.02)
    assert ib.openTrades() == [] and sim_control.state()["orders"] == 0  # nothing was placed
    huge = answer(ib, ib.whatIfOrderAsync(cim, LimitOrder("BUY", 2_000_000, 24.95)))
    assert float(huge.initMarginAfter) > float(huge.equityWithLoanAfter)


def test_history_requests_end_with_an_answer_or_an_error_not_a_wait(ib, cim):
    assert request_error(ib, ib.reqHistogramDataAsync(cim, True, "1 week"))[0] == 162
    # Before the simulator ran there are no recorded prints: an empty answer, not a wait.
    assert answer(ib, ib.reqHistoricalTicksAsync(cim, "", "20050102 10:00:00", 10, "TRADES", True)) == []


def test_request_fa_is_refused_like_a_non_fa_account(ib):
    errors = []
    ib.errorEvent += lambda req_id, code, text, contract: errors.append((req_id, code, text))
    with pytest.raises(asyncio.TimeoutError):  # ib_async waits for receiveFA by name, as against IB
        ib.run(asyncio.wait_for(ib.requestFAAsync(1), 1.0))
    assert (-1, 321) in [(r, c) for r, c, _ in errors]
    assert any("FA data operations ignored for non FA customers" in t for _, _, t in errors)


def test_bag_with_negative_leg_count_is_answered_321_and_client_stays(ib):
    errors = []
    ib.errorEvent += lambda req_id, code, text, contract: errors.append((req_id, code, text))
    # reqMktData for a BAG claiming -3 combo legs (as a hostile client could send it).
    ib.client.send(1, 11, 4242, 0, "X", "BAG", "", 0, "", "", "SMART", "", "USD", "", "", -3, 0, "", 0, 0, "")
    ib.client.send(1, 11, 4243, 0, "X", "BAG", "", 0, "", "", "SMART", "", "USD", "", "", "many", 0, "", 0, 0, "")
    ib.sleep(0.5)
    codes = {(r, c) for r, c, _ in errors}
    assert {(4242, 321), (4243, 321)} <= codes
    assert ib.isConnected() and ib.reqCurrentTime() is not None
