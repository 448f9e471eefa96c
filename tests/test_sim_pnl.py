"""P&L as IB reports it (reqPnL / reqPnLSingle), hand-computed: average cost, commissions in
the average cost when opening and in realized P&L when closing, daily P&L against the
previous close. Pure broker cases first, then the same story through the real ib_async client."""

from __future__ import annotations

from pathlib import Path

import pytest
from ib_async import LimitOrder, Stock

from sim import protocol as P
from sim.broker import Account, Broker
from sim.config import SimConfigError, parse_account
from sim.contracts import Catalogue
from sim.market import Market, MarketConfig
from sim.testing import start_in_thread, wait_until

try:
    from test_sim_broker import INSTRUMENTS, Clock, place
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_sim_broker import INSTRUMENTS, Clock, place

# Start: long 1000 CIM PRB at 24.50, previous close 24.70.
# 1. BUY 200 @ 24.82, fee 1.00       -> 1200 @ 29465/1200 (= 24.554167)
# 2. SELL 500 @ 24.80, fee 2.50      -> realized (24.80 - 24.554167) x 500 - 2.50 = 120.4167; 700 left
# 3. SELL 1000 @ 24.80, fee 5.00     -> closes 700: (24.80 - 24.554167) x 700 - 3.50 = 168.5833;
#                                       opens short 300 at 24.80 - 1.50/300 = 24.795
# 4. BUY 300 @ 24.82, fee 1.50       -> covers: (24.795 - 24.82) x 300 - 1.50 = -9.00; flat
# With the mark at 24.91 after each step: (position, daily, unrealized, realized)
EXPECTED = {
    0: (1000, 1000 * 24.91 - 1000 * 24.70, 1000 * (24.91 - 24.50), 0.0),
    1: (1200, 1200 * 24.91 - 24700 - 200 * 24.82 - 1.0, 1200 * 24.91 - 29465, 0.0),
    2: (700, 169.5, 700 * (24.91 - 29465 / 1200), 120.416667),
    3: (-300, 54.5, -34.5, 289.0),
    4: (0, 80.0, 0.0, 280.0),
}
STEPS = {1: ("BUY", 200), 2: ("SELL", 500), 3: ("SELL", 1000), 4: ("BUY", 300)}


def set_mark_2491(market: Market) -> None:
    market.set_quote("CIM PRB", 24.90, 24.92, 5000, 5000)
    market.inject_print("CIM PRB", 24.91, 100, "NYSE")


@pytest.fixture
def seeded() -> Broker:
    clock = Clock()
    market = Market({"CIM PRB": 24.70, "AGNCO": 23.95}, seed=1, config=MarketConfig(), now_ns=clock)
    account = Account("DU1234567", 100_000.0)
    account.set_position("CIM PRB", 1000, 24.50, "LT")
    return Broker(account, market, Catalogue(INSTRUMENTS), buckets={"CIM PRB": "LT"}, now_ns=clock,
                  exec_id_prefix="0000e1a7", perm_id_base=5000)


def figures(f) -> tuple:
    return (f.position, f.daily, f.unrealized, f.realized)


def test_previous_close_comes_from_the_market_reference(seeded):
    assert seeded.account.prev_close["CIM PRB"] == 24.70
    assert seeded.account.day_start_qty == {"CIM PRB": 1000}


def test_buy_partial_sell_sell_through_zero_and_cover_hand_computed(seeded):
    set_mark_2491(seeded.market)
    assert figures(seeded.pnl_single("CIM PRB")) == pytest.approx(EXPECTED[0], abs=1e-4)
    for step, (action, qty) in STEPS.items():
        seeded.market.set_quote("CIM PRB", 24.80, 24.82, 5000, 5000)
        price = 24.82 if action == "BUY" else 24.80
        events = place(seeded, order_id=step, action=action, qty=qty, price=price)
        assert [e for e in events if type(e).__name__ == "OrderUpdate"][-1].snapshot.status == "Filled"
        set_mark_2491(seeded.market)
        assert figures(seeded.pnl_single("CIM PRB")) == pytest.approx(EXPECTED[step], abs=1e-4), step
        # The account is the sum of its symbols (here: one).
        assert figures(seeded.pnl())[1:] == pytest.approx(EXPECTED[step][1:], abs=1e-4)
    assert seeded.account.day_commissions == pytest.approx(10.0)
    assert seeded.pnl_single("CIM PRB").value == 0.0
    # Realized P&L of the day is what the account values report too.
    assert seeded.account_values()["RealizedPnL"] == pytest.approx(280.0)


def test_value_and_unrealized_of_a_short_at_the_mark(seeded):
    seeded.market.set_quote("CIM PRB", 24.80, 24.82, 5000, 5000)
    place(seeded, order_id=1, action="SELL", qty=1300, price=24.80)  # flat 1000, short 300
    set_mark_2491(seeded.market)
    single = seeded.pnl_single("CIM PRB")
    fee_short = 6.5 * 300 / 1300
    assert single.position == -300
    assert single.value == pytest.approx(-300 * 24.91)
    assert single.unrealized == pytest.approx(-300 * (24.91 - (24.80 - fee_short / 300)), abs=1e-6)


def test_new_day_rolls_closes_and_resets_the_day(seeded):
    set_mark_2491(seeded.market)
    seeded.market.set_quote("CIM PRB", 24.80, 24.82, 5000, 5000)
    place(seeded, order_id=1, action="SELL", qty=400, price=24.80)
    assert seeded.pnl_single("CIM PRB").realized != 0.0
    assert not seeded.roll_day()  # same New York date: nothing happens
    set_mark_2491(seeded.market)
    seeded.now_ns.ns += 86_400 * 10**9  # the next day (the fixture's Clock)
    assert seeded.roll_day()
    single = seeded.pnl_single("CIM PRB")
    assert seeded.account.prev_close["CIM PRB"] == pytest.approx(24.91)
    assert seeded.market.books["CIM PRB"].ref == 2491 and seeded.market.books["CIM PRB"].volume == 0
    assert (single.position, single.daily, single.realized) == (600, pytest.approx(0.0), 0.0)
    assert single.unrealized == pytest.approx(600 * (24.91 - 24.50))


def test_account_file_prev_close_is_validated():
    universe = {i.symbol: i for i in INSTRUMENTS}
    raw = {"account": "DU1234567", "equity": 100000,
           "positions": [{"symbol": "CIM PRB", "qty": 100, "avg_cost": 24.5, "bucket": "LT", "prev_close": 24.7}]}
    assert parse_account(raw, universe).positions[0].prev_close == 24.7
    raw["positions"][0]["prev_close"] = -1
    with pytest.raises(SimConfigError, match="prev_close"):
        parse_account(raw, universe)


def test_pnl_requests_decode():
    assert P.decode_request(["92", "5", "DU1", ""]) == P.ReqPnL(5, "DU1", "")
    assert P.decode_request(["94", "6", "DU1", "", "123"]) == P.ReqPnLSingle(6, "DU1", "", 123)
    assert P.decode_request(["93", "5"]) == P.CancelPnL(5)
    assert P.decode_request(["95", "6"]) == P.CancelPnLSingle(6)


# ---------------------------------------------------------------- through ib_async


@pytest.fixture
def pnl_sim(tmp_path: Path):
    account = tmp_path / "account.yaml"
    account.write_text(
        "account: DU1112223\nequity: 100000\npositions:\n"
        '  - {symbol: "CIM PRB", qty: 1000, avg_cost: 24.50, bucket: LT, prev_close: 24.70}\n'
    )
    running = start_in_thread(account_path=str(account), pnl_update_s=0.1)
    try:
        yield running
    finally:
        running.stop()


def test_ib_async_pnl_streams_hand_computed_figures(pnl_sim):
    from ib_async import IB

    control = pnl_sim.control
    control.set_quote("CIM PRB", 24.90, 24.92, 5000, 5000, freeze=True)
    control.inject_print("CIM PRB", 24.91, 100)
    ib = IB()
    ib.connect("127.0.0.1", pnl_sim.port, clientId=3, timeout=5)
    try:
        contract = Stock("CIM PRB", "SMART", "USD")
        ib.qualifyContracts(contract)
        account = "DU1112223"
        pnl = ib.reqPnL(account)
        single = ib.reqPnLSingle(account, "", contract.conId)

        def seen(step: int) -> bool:
            pos, daily, unrealized, realized = EXPECTED[step]
            return (single.position == pos and abs(single.dailyPnL - daily) < 0.006
                    and abs(single.unrealizedPnL - unrealized) < 0.006 and abs(single.realizedPnL - realized) < 0.006
                    and abs(pnl.dailyPnL - daily) < 0.006 and abs(pnl.unrealizedPnL - unrealized) < 0.006
                    and abs(pnl.realizedPnL - realized) < 0.006)

        wait_until(ib, lambda: seen(0), timeout=3)
        assert single.value == pytest.approx(1000 * 24.91)
        assert ib.pnl(account) == [pnl] and ib.pnlSingle(account, "", contract.conId) == [single]
        for step, (action, qty) in STEPS.items():
            control.set_quote("CIM PRB", 24.80, 24.82, 5000, 5000, freeze=True)
            trade = ib.placeOrder(contract, LimitOrder(action, qty, 24.82 if action == "BUY" else 24.80))
            wait_until(ib, lambda: trade.orderStatus.status == "Filled", timeout=3)
            control.set_quote("CIM PRB", 24.90, 24.92, 5000, 5000, freeze=True)
            control.inject_print("CIM PRB", 24.91, 100)
            wait_until(ib, lambda step=step: seen(step), timeout=3)
        assert control.pnl()["account"]["realized"] == pytest.approx(280.0)
        assert control.pnl()["commissions"] == pytest.approx(10.0)

        # Cancelled subscriptions stop: a later change is not streamed.
        ib.cancelPnL(account)
        ib.cancelPnLSingle(account, "", contract.conId)
        ib.sleep(0.3)
        assert pnl_sim.call(lambda: sum(len(s.pnl_subs) for s in pnl_sim.server.sessions)) == 0
    finally:
        ib.disconnect()


def test_ib_async_pnl_errors(pnl_sim):
    from ib_async import IB

    ib = IB()
    ib.connect("127.0.0.1", pnl_sim.port, clientId=4, timeout=5)
    errors = []
    ib.errorEvent += lambda req_id, code, text, contract: errors.append((code, text))
    try:
        ib.reqPnL("DU9999999")
        ib.reqPnLSingle("DU1112223", "", 987654321)
        wait_until(ib, lambda: len(errors) >= 2, timeout=3)
        assert {code for code, _ in errors} == {321, 200}
        assert any("Invalid account code" in text for _, text in errors)
    finally:
        ib.disconnect()
