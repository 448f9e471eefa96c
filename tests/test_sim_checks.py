"""IB's pre-trade checks in the simulator (issue 16 pt 2), through the real ib_async client:
Reg-T margin (201), the precautionary price cap (163), size (383) and value (451) limits,
configurable per account; transmit=False holds an order until it is transmitted."""

from __future__ import annotations

import pytest
import yaml
from ib_async import LimitOrder, MarketOrder, Stock

from sim.config import SimConfigError, parse_account
from sim.testing import DEFAULT_ACCOUNT, start_in_thread, wait_until
from qe.universe import load_universe

try:
    from conftest_sim import ib_connect, sim, sim_control  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import ib_connect, sim, sim_control  # noqa: F401

MARGIN_TEXT = "Order rejected - reason:YOUR ORDER IS NOT ACCEPTED. IN ORDER TO OBTAIN THE DESIRED POSITION YOUR EQUITY WITH LOAN VALUE ["


def qualified(ib, symbol: str = "CIM PRB") -> Stock:
    contract = Stock(symbol, "SMART", "USD")
    assert ib.qualifyContracts(contract) == [contract]
    return contract


def errors_of(ib) -> list[tuple[int, int, str]]:
    seen: list[tuple[int, int, str]] = []
    ib.errorEvent += lambda req_id, code, text, contract: seen.append((req_id, code, text))
    return seen


def rejected_with(ib, errors, trade) -> tuple[int, str]:
    wait_until(ib, lambda: any(r == trade.order.orderId for r, _, _ in errors))
    wait_until(ib, lambda: trade.orderStatus.status == "Cancelled")  # ib_async's view of a rejected order
    (code, text), = [(c, t) for r, c, t in errors if r == trade.order.orderId]
    return code, text


def test_two_million_share_buy_is_rejected_for_margin(sim_control, ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    contract = qualified(ib)
    ask = sim_control.quote("CIM PRB")["ask"]
    trade = ib.placeOrder(contract, LimitOrder("BUY", 2_000_000, ask, orderRef="huge"))
    code, text = rejected_with(ib, errors, trade)
    assert code == 201 and text.startswith(MARGIN_TEXT) and "MUST EXCEED THE INITIAL MARGIN [" in text
    (order,) = sim_control.orders("huge")
    assert order["status"] == "Inactive" and order["reject_reason"].startswith("201 ")
    assert sim_control.fills("huge") == []
    # A size the account can carry goes through.
    ok = ib.placeOrder(contract, LimitOrder("BUY", 100, round(ask - 0.5, 2), orderRef="small"))
    wait_until(ib, lambda: ok.orderStatus.status == "Submitted")


def test_price_far_through_the_market_hits_the_percentage_constraint(sim_control, ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    contract = qualified(ib)
    trade = ib.placeOrder(contract, LimitOrder("BUY", 100, 1000.0, orderRef="fat-finger"))
    code, text = rejected_with(ib, errors, trade)
    assert code == 163
    assert text == (f'The following order "ID:{trade.order.orderId}" price exceeds the Percentage constraint of 3%. '
                    "Restriction is specified in Precautionary Settings of Global Configuration/Presets.")
    bid = sim_control.quote("CIM PRB")["bid"]
    sell = ib.placeOrder(contract, LimitOrder("SELL", 100, round(bid * 0.9, 2), orderRef="dump"))
    assert rejected_with(ib, errors, sell)[0] == 163
    # Passive prices far from the market are not checked (they cannot trade through it).
    resting = ib.placeOrder(contract, LimitOrder("BUY", 100, round(bid * 0.5, 2), orderRef="low-bid"))
    wait_until(ib, lambda: resting.orderStatus.status == "Submitted")
    assert sim_control.fills("fat-finger") == []


def test_size_and_value_limits_and_modifies_are_checked(sim_control, ib_connect):
    ib = ib_connect()
    errors = errors_of(ib)
    contract = qualified(ib)
    sim_control.configure(max_order_size=500, max_order_value=10_000)
    bid = sim_control.quote("CIM PRB")["bid"]
    big = ib.placeOrder(contract, LimitOrder("BUY", 600, round(bid - 1, 2)))
    code, text = rejected_with(ib, errors, big)
    assert code == 383 and "size exceeds the Size Limit of 500." in text
    rich = ib.placeOrder(contract, LimitOrder("BUY", 500, round(bid - 1, 2)))
    code, text = rejected_with(ib, errors, rich)
    assert code == 451 and "exceeds the Total Value Limit of 10,000 USD." in text
    fine = ib.placeOrder(contract, LimitOrder("BUY", 100, round(bid - 1, 2), orderRef="fine"))
    wait_until(ib, lambda: fine.orderStatus.status == "Submitted")
    fine.order.totalQuantity = 900
    ib.placeOrder(contract, fine.order)
    wait_until(ib, lambda: any(c == 383 for r, c, _ in errors if r == fine.order.orderId))
    assert sim_control.orders("fine")[0]["total_qty"] == 100  # the modify was refused, the order lives on
    sim_control.configure(max_order_size=None, max_order_value=None, price_cap_pct=None, margin_check=False)
    assert sim_control.state()["checks"] == {"price_cap_pct": None, "max_order_size": None, "max_order_value": None, "margin": False}


def test_account_file_configures_the_checks(tmp_path):
    raw = yaml.safe_load(DEFAULT_ACCOUNT.read_text())
    raw["checks"] = {"price_cap_pct": 10, "max_order_size": 200, "margin": False}
    path = tmp_path / "account.yaml"
    path.write_text(yaml.safe_dump(raw))
    running = start_in_thread(account_path=str(path))
    try:
        assert running.control.state()["checks"] == {"price_cap_pct": 10.0, "max_order_size": 200, "max_order_value": None, "margin": False}
    finally:
        running.stop()
    universe = load_universe(str(DEFAULT_ACCOUNT.parent / "universe.csv"))
    for bad in ({"price_cap_pct": -1}, {"margin": "yes"}, {"max_order_size": True}, {"nope": 1}):
        with pytest.raises(SimConfigError, match="checks"):
            parse_account(dict(raw, checks=bad), universe)


def test_untransmitted_order_is_held_until_transmitted(sim_control, ib_connect):
    ib = ib_connect()
    contract = qualified(ib)
    ask = sim_control.quote("CIM PRB")["ask"]
    trade = ib.placeOrder(contract, LimitOrder("BUY", 100, ask, orderRef="held", transmit=False))
    wait_until(ib, lambda: trade.orderStatus.status == "PreSubmitted")
    ib.sleep(0.5)  # marketable, but not at the exchange: no fill
    assert trade.fills == [] and sim_control.fills("held") == []
    assert sim_control.orders("held")[0]["status"] == "PreSubmitted"
    trade.order.transmit = True
    ib.placeOrder(contract, trade.order)
    wait_until(ib, lambda: trade.orderStatus.status == "Filled")
    assert sum(f.execution.shares for f in trade.fills) == 100
    # An untransmitted order can be cancelled like any other.
    held = ib.placeOrder(contract, MarketOrder("BUY", 100, orderRef="held-mkt", transmit=False))
    wait_until(ib, lambda: held.orderStatus.status == "PreSubmitted")
    ib.cancelOrder(held.order)
    wait_until(ib, lambda: held.orderStatus.status == "Cancelled")
    assert sim_control.fills("held-mkt") == []
