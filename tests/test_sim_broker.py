"""Account, orders and matching, without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from qe.universe import Instrument, load_universe
from sim import protocol as P
from sim.broker import (
    Account,
    Broker,
    CommissionModel,
    FillReport,
    MarketChange,
    OrderError,
    OrderUpdate,
    PositionChange,
    parse_exec_filter_time,
)
from sim.config import SimConfigError, load_account, parse_account
from sim.contracts import Catalogue
from sim.market import Market, MarketConfig, PrintEvent

ROOT = Path(__file__).resolve().parent.parent
INSTRUMENTS = [
    Instrument("CIM PRB", "LT", 61000, "CIM", 24.85),
    Instrument("AGNCO", "MM_PURE", 69000, "AGNC", 23.95),
]


class Clock:
    def __init__(self) -> None:
        self.ns = 1_795_000_000_000_000_000

    def __call__(self) -> int:
        self.ns += 1_000_000
        return self.ns


@pytest.fixture
def broker() -> Broker:
    clock = Clock()
    market = Market({i.symbol: i.ref_price for i in INSTRUMENTS}, seed=1, config=MarketConfig(), now_ns=clock)
    market.set_quote("CIM PRB", 24.80, 24.82, bid_size=300, ask_size=200)
    market.set_quote("AGNCO", 23.90, 23.93, bid_size=500, ask_size=500)
    return Broker(
        Account("DU1234567", 100_000.0),
        market,
        Catalogue(INSTRUMENTS),
        buckets={i.symbol: i.bucket_hint for i in INSTRUMENTS},
        now_ns=clock,
        exec_id_prefix="0000e1a7",
        perm_id_base=5000,
    )


def place(broker: Broker, order_id=1, action="BUY", qty=100, order_type="LMT", price=24.82, client_id=1, ref="ref-1",
          symbol="CIM PRB", tif="DAY", hidden=False):
    req = P.PlaceOrder(
        order_id=order_id, contract=P.ContractRef(symbol=symbol, sec_type="STK", exchange="SMART", currency="USD"),
        action=action, total_quantity=float(qty), order_type=order_type,
        lmt_price=P.UNSET_DOUBLE if price is None else price, aux_price=P.UNSET_DOUBLE, tif=tif, oca_group="",
        account="", open_close="", origin=0, order_ref=ref, transmit=True, parent_id=0, block_order=False,
        sweep_to_fill=False, display_size=0, trigger_method=0, outside_rth=False, hidden=hidden,
    )
    return broker.place(client_id, req, broker.catalogue.resolve(req.contract))


def kinds(events):
    return [type(e).__name__ for e in events]


def statuses(events):
    return [e.snapshot.status for e in events if isinstance(e, OrderUpdate)]


def fills(events):
    return [(e.execution.shares, e.execution.price) for e in events if isinstance(e, FillReport)]


def test_marketable_limit_fills_displayed_size_then_rests(broker):
    events = place(broker, qty=500, price=24.82)
    assert statuses(events) == ["PreSubmitted", "Submitted", "Submitted"]
    assert [e.open_order for e in events if isinstance(e, OrderUpdate)] == [True, True, False]
    assert fills(events) == [(200, 24.82)]
    assert any(isinstance(e, MarketChange) and e.event.ask == 2483 for e in events)  # level taken, book walked
    order = broker.orders[(1, 1)]
    assert (order.status, order.filled, order.remaining) == ("Submitted", 200, 300)
    assert broker.account.positions["CIM PRB"].qty == 200
    execution = broker.executions[0]
    assert execution.exec_id == "0000e1a7.00000001.01.01" and execution.liquidity == 2 and execution.order_ref == "ref-1"


def test_resting_limit_fills_at_its_price_when_market_crosses(broker):
    place(broker, qty=300, price=24.79)
    assert not broker.executions
    quote = broker.market.set_quote("CIM PRB", 24.76, 24.78, 500, 200)
    events = broker.on_market(quote)
    assert fills(events) == [(200, 24.79)]  # our limit, displayed size only
    assert broker.orders[(1, 1)].remaining == 100
    events = broker.on_market(broker.market.set_quote("CIM PRB", 24.76, 24.78, 500, 1000))
    assert fills(events) == [(100, 24.79)]
    assert broker.orders[(1, 1)].status == "Filled"
    assert statuses(events)[-1] == "Filled" and [e for e in events if isinstance(e, OrderUpdate)][-1].open_order


def test_market_order_sweeps_levels(broker):
    events = place(broker, qty=700, order_type="MKT", price=None)
    assert fills(events)[:2] == [(200, 24.82), (fills(events)[1][0], 24.83)]
    assert sum(q for q, _ in fills(events)) == 700
    assert [p for _, p in fills(events)] == sorted(p for _, p in fills(events))
    assert broker.orders[(1, 1)].status == "Filled"


def test_print_through_a_resting_limit_fills_it(broker):
    place(broker, action="SELL", qty=300, price=24.84)
    tape = broker.market.inject_print("CIM PRB", 24.85, 100, "FINRA")
    events = broker.on_market(tape)
    assert fills(events) == [(100, 24.84)]
    assert [e.execution.exchange for e in events if isinstance(e, FillReport)] == ["FINRA"]
    own = PrintEvent("CIM PRB", 2490, 100, "NYSE", "", 0, own_fill=True)
    assert broker.on_market(own) == []
    broker.fill_on_prints = False
    assert broker.on_market(broker.market.inject_print("CIM PRB", 24.90, 100, "NYSE")) == []


def test_modify_same_order_id(broker):
    place(broker, qty=300, price=24.70)
    events = place(broker, qty=400, price=24.75)
    assert statuses(events) == ["Submitted"] and [e.open_order for e in events if isinstance(e, OrderUpdate)] == [True]
    order = broker.orders[(1, 1)]
    assert (order.total_qty, order.lmt) == (400, 2475)
    events = place(broker, qty=400, price=24.82)  # now marketable
    assert fills(events) == [(200, 24.82)]
    assert [h["event"] for h in order.history][:3] == ["place", "modify", "modify"]
    bad = place(broker, action="SELL", qty=400, price=24.82)
    assert [(e.code, e.order_id) for e in bad if isinstance(e, OrderError)] == [(105, 1)]
    assert order.is_live


def test_modify_filled_and_cancel_paths(broker):
    place(broker, qty=100, price=24.82)
    assert broker.orders[(1, 1)].status == "Filled"
    assert [e.code for e in place(broker, qty=100, price=24.83)] == [104]
    assert [e.code for e in broker.cancel(1, 1)] == [10148]
    assert [e.code for e in broker.cancel(1, 99)] == [10147]
    place(broker, order_id=2, qty=100, price=24.70)
    events = broker.cancel(1, 2)
    assert kinds(events) == ["OrderError", "OrderUpdate"]
    assert events[0].code == 202 and events[1].snapshot.status == "Cancelled"
    assert broker.open_orders() == []


def test_global_cancel_cancels_every_client(broker):
    place(broker, order_id=1, client_id=1, price=24.70)
    place(broker, order_id=1, client_id=2, price=24.71, ref="other")
    events = broker.global_cancel()
    assert sorted((e.client_id, e.code) for e in events if isinstance(e, OrderError)) == [(1, 202), (2, 202)]
    assert broker.open_orders() == []


def test_validation_and_reject_fault(broker):
    assert [e.code for e in place(broker, order_id=1, qty=0)] == [434]
    assert [e.code for e in place(broker, order_id=2, order_type="STP")] == [387]
    assert [e.code for e in place(broker, order_id=3, price=24.805)] == [110]
    assert [e.code for e in place(broker, order_id=4, symbol="NOPE")] == [200]
    assert [e.code for e in place(broker, order_id=5, tif="OPG")] == [201]
    broker.faults.reject_next = 2
    broker.faults.reject_text = "Order rejected - reason:Simulated"
    assert [(e.code, e.text) for e in place(broker, order_id=6)] == [(201, "Order rejected - reason:Simulated")]
    assert [e.code for e in place(broker, order_id=7)] == [201]
    assert kinds(place(broker, order_id=8, price=24.70))[:2] == ["OrderUpdate", "OrderUpdate"]
    rejected = [o for o in broker.all_orders() if o.status == "Inactive"]
    assert len(rejected) == 7 and all(o.history[-1]["event"] == "rejected" for o in rejected)
    assert broker.next_order_id(1) == 9


def test_forced_partial_fill_waits_for_the_next_market_change(broker):
    broker.faults.partial_next = 1
    broker.faults.partial_max_qty = 100
    events = place(broker, qty=150, price=24.82)
    assert fills(events) == [(100, 24.82)]
    order = broker.orders[(1, 1)]
    assert order.held and order.remaining == 50
    events = broker.on_market(broker.market.set_quote("CIM PRB", 24.80, 24.82, 300, 500))
    assert fills(events) == [(50, 24.82)] and order.status == "Filled"
    assert broker.faults.partial_next == 0


def test_ioc_remainder_is_cancelled(broker):
    events = place(broker, qty=500, price=24.82, tif="IOC")
    assert fills(events) == [(200, 24.82)]
    assert statuses(events)[-1] == "Cancelled"
    assert broker.orders[(1, 1)].filled == 200


def test_account_pnl_avg_cost_and_net_liquidation(broker):
    account = broker.account
    start_cash = account.cash
    place(broker, order_id=1, qty=200, price=24.82)  # buy 200 @ 24.82, fee $1.00
    pos = account.positions["CIM PRB"]
    assert pos.qty == 200 and pos.avg_cost == pytest.approx(24.82 + 1.0 / 200)
    assert account.cash == pytest.approx(start_cash - 200 * 24.82 - 1.0)
    broker.market.set_quote("CIM PRB", 25.00, 25.02, 300, 300)
    events = place(broker, order_id=2, action="SELL", qty=300, order_type="MKT", price=None)  # close 200, short 100
    report = [e for e in events if isinstance(e, FillReport)][0]
    assert report.execution.price == 25.00
    assert report.realized_pnl == pytest.approx((25.00 - (24.82 + 0.005)) * 200 - 1.5 * 200 / 300, abs=1e-3)
    assert pos.qty == -100 and pos.avg_cost == pytest.approx(25.00 - 0.5 / 100)
    values = broker.account_values()
    marks = broker.marks()
    assert values["NetLiquidation"] == pytest.approx(account.cash - 100 * marks["CIM PRB"])
    assert values["GrossPositionValue"] == pytest.approx(100 * marks["CIM PRB"])
    assert any(isinstance(e, PositionChange) for e in events)


def test_commission_model():
    model = CommissionModel()
    assert model.commission(100, 25.0) == 1.0  # minimum
    assert model.commission(1000, 25.0) == 5.0
    assert model.commission(1, 0.5) == 0.005  # capped at 1 % of value


def test_execution_filter(broker):
    place(broker, order_id=1, client_id=1, qty=100, price=24.82)
    place(broker, order_id=1, client_id=2, action="SELL", qty=100, order_type="MKT", price=None, ref="two")
    assert len(broker.find_executions(P.ExecFilter())) == 2
    assert [e.client_id for e in broker.find_executions(P.ExecFilter(client_id=2))] == [2]
    assert [e.side for e in broker.find_executions(P.ExecFilter(side="SELL"))] == ["SLD"]
    assert broker.find_executions(P.ExecFilter(symbol="AGNCO")) == []
    assert len(broker.find_executions(P.ExecFilter(time="20200101-00:00:00"))) == 2
    assert broker.find_executions(P.ExecFilter(time="20991231 23:59:59 America/New_York")) == []
    ids = [e.exec_id for e in broker.executions]
    assert len(set(ids)) == len(ids)


def test_exec_filter_time_formats():
    utc = parse_exec_filter_time("20261120-20:30:00")
    assert utc == parse_exec_filter_time("20261120 15:30:00 America/New_York") == parse_exec_filter_time("20261120 15:30:00")
    assert parse_exec_filter_time("yesterday") is None


def test_demo_account_file_is_valid_and_over_100_pct_gross():
    universe = load_universe(ROOT / "etc" / "universe.csv")
    spec = load_account(ROOT / "etc" / "sim_account.yaml", universe)
    assert spec.is_paper
    marks = {s: i.ref_price for s, i in universe.items()}
    long_value = sum(p.qty * marks[p.symbol] for p in spec.positions if p.qty > 0)
    short_value = -sum(p.qty * marks[p.symbol] for p in spec.positions if p.qty < 0)
    mm = sum(abs(p.qty) * marks[p.symbol] for p in spec.positions if p.bucket == "MM_PURE")
    assert spec.equity == 1_000_000
    assert 1.20 < (long_value + short_value) / spec.equity < 1.30
    assert 0.85 < long_value / spec.equity < 0.95 and 0.30 < short_value / spec.equity < 0.40
    assert 0.15 < mm / spec.equity < 0.25
    assert spec.starting_cash(marks) + long_value - short_value == pytest.approx(spec.equity)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"account": "X1", "equity": 1}, "must look like"),
        ({"account": "DU1234567"}, "exactly one of"),
        ({"account": "DU1234567", "equity": 1, "positions": [{"symbol": "NOPE", "qty": 1, "avg_cost": 1, "bucket": "LT"}]}, "not in the universe"),
        ({"account": "DU1234567", "equity": 1, "positions": [{"symbol": "AGNCO", "qty": 1, "avg_cost": 1, "bucket": "LT"}]}, "bucket_hint"),
        ({"account": "DU1234567", "equity": 1, "positions": [{"symbol": "AGNCO", "qty": 1.5, "avg_cost": 1, "bucket": "MM_PURE"}]}, "whole number"),
        ({"account": "DU1234567", "equity": 1, "bogus": 1}, "unknown keys"),
    ],
)
def test_account_file_errors_name_the_problem(raw, message):
    with pytest.raises(SimConfigError, match=message):
        parse_account(raw, {i.symbol: i for i in INSTRUMENTS})


def test_request_log_records_every_order_request_with_its_outcome(broker):
    place(broker, order_id=1, price=24.70, ref="r1")
    place(broker, order_id=1, price=24.71, ref="r1")
    broker.cancel(1, 1)
    broker.cancel(1, 42)
    broker.faults.reject_next = 1
    place(broker, order_id=2, ref="r2")
    broker.global_cancel(client_id=3)
    log = [(r["event"], r["order_id"] if "order_id" in r else None, r["result"], r.get("code")) for r in broker.requests]
    assert log == [
        ("place", 1, "ok", None),
        ("modify", 1, "ok", None),
        ("cancel", 1, "ok", None),
        ("cancel", 42, "error", 10147),
        ("place", 2, "error", 201),
        ("global_cancel", None, "ok", None),
    ]
    assert broker.requests[0]["order_ref"] == "r1" and broker.requests[0]["symbol"] == "CIM PRB"


# ------------------------------------------------------------------ referee


def referee_pct(broker: Broker) -> float:
    return broker.exposure.current["pct"]


def test_potential_gross_hand_computation_and_max(broker):
    # $100,000 cash, no positions. CIM PRB 24.80 / 24.82, last print 24.81 -> mark 24.81.
    broker.on_market(broker.market.inject_print("CIM PRB", 24.81, 100, "NYSE"))
    place(broker, order_id=1, qty=1000, price=24.70, ref="buy")  # resting
    assert referee_pct(broker) == pytest.approx(100 * 1000 * 24.81 / 100_000)
    place(broker, order_id=2, action="SELL", qty=400, price=24.95, ref="sell")  # max(|0+1000|, |0-400|): no change
    assert referee_pct(broker) == pytest.approx(24.81)
    place(broker, order_id=2, action="SELL", qty=1500, price=24.95, ref="sell")  # modify: the sell side now dominates
    assert referee_pct(broker) == pytest.approx(1500 * 24.81 / 1000)
    assert broker.exposure.max["event"] == "modify" and broker.exposure.max["order_ref"] == "sell"
    broker.cancel(1, 2)
    assert referee_pct(broker) == pytest.approx(24.81)
    # The market comes to the buy: 200 fill at 24.70 (displayed size); mark = last 24.70 within 24.69 / 24.71.
    broker.on_market(broker.market.set_quote("CIM PRB", 24.69, 24.70, 500, 200))
    assert broker.orders[(1, 1)].filled == 200
    cash = 100_000 - 200 * 24.70 - 1.0
    net_liq = cash + 200 * 24.70
    assert broker.exposure.current["event"] == "fill"
    assert referee_pct(broker) == pytest.approx(100 * 1000 * 24.70 / net_liq)
    assert broker.exposure.max["pct"] == pytest.approx(1500 * 24.81 / 1000)
    assert broker.potential_gross_full()["pct"] == pytest.approx(referee_pct(broker))
    broker.reset_potential_max()
    assert broker.exposure.max["pct"] == referee_pct(broker) and broker.exposure.max["event"] == "reset"


def test_incremental_potential_gross_equals_a_full_recomputation(broker):
    import random

    rng = random.Random(7)
    broker.account.set_position("AGNCO", -700, 24.0, "MM_PURE")
    broker.exposure.set_symbol("AGNCO", *broker._exposure_of("AGNCO"))
    symbols = ["CIM PRB", "AGNCO"]
    next_id = 1
    for _ in range(400):
        symbol = rng.choice(symbols)
        book = broker.market.book(symbol)
        action = rng.random()
        if action < 0.35:
            price = (book.bid + rng.randint(-5, 5)) / 100
            place(broker, order_id=next_id, action=rng.choice(["BUY", "SELL"]), qty=100 * rng.randint(1, 9),
                  price=price, symbol=symbol, ref=f"o{next_id}")
            next_id += 1
        elif action < 0.5 and broker.open_orders():
            order = rng.choice(broker.open_orders())
            broker.cancel(order.client_id, order.order_id)
        elif action < 0.6 and broker.open_orders():
            order = rng.choice(broker.open_orders())
            place(broker, order_id=order.order_id, action=order.action, qty=order.total_qty + 100,
                  price=(order.lmt + rng.choice([-1, 1])) / 100, symbol=order.symbol, ref=order.order_ref)
        else:
            bid = max(100, book.bid + rng.randint(-3, 3))
            broker.on_market(broker.market.set_quote(symbol, bid / 100, (bid + rng.randint(1, 3)) / 100, 300, 300))
        full = broker.potential_gross_full()
        assert broker.exposure.current["pct"] == pytest.approx(full["pct"], rel=1e-9)
        assert broker.exposure.current["net_liquidation"] == pytest.approx(full["net_liquidation"], rel=1e-9)
    assert broker.executions and broker.exposure.max["pct"] >= broker.exposure.current["pct"]


def test_referee_log_is_ordered_and_bounded(broker):
    broker.log.resize(4)
    place(broker, order_id=1, qty=300, price=24.79, ref="r1")  # request, PreSubmitted, Submitted
    broker.on_market(broker.market.set_quote("CIM PRB", 24.76, 24.78, 500, 200))  # fill 200, Submitted
    broker.cancel(1, 1)  # request, Cancelled
    entries = broker.log.read()
    assert [(e["seq"], e["kind"], e.get("status") or e.get("event") or e.get("exec_id")) for e in entries] == [
        (4, "fill", broker.executions[0].exec_id),
        (5, "order", "Submitted"),
        (6, "request", "cancel"),
        (7, "order", "Cancelled"),
    ]
    assert entries[1]["filled"] == 200 and entries[3]["remaining"] == 100 and entries[2]["result"] == "ok"
    assert [e["ts_ns"] for e in entries] == sorted(e["ts_ns"] for e in entries)
    assert broker.log.describe() | {"counts": None} == {"cap": 4, "size": 4, "total": 7, "evicted": 3, "first_seq": 4, "counts": None}
    assert broker.log.counts == {"request": 2, "order": 4, "fill": 1}  # evicted entries still counted
    assert [e["seq"] for e in broker.log.read(after=5)] == [6, 7]
    assert [e["seq"] for e in broker.log.read(kind="order", limit=1)] == [5]


def test_request_is_logged_before_what_it_causes(broker):
    place(broker, order_id=1, qty=500, price=24.82, ref="agg")  # fills 200 at once
    assert [e["kind"] for e in broker.log.read(order_ref="agg")] == ["request", "order", "order", "fill", "order"]
    assert broker.log.read(order_ref="agg")[0]["result"] == "ok"  # completed after the fact


def test_partial_fault_is_used_by_the_next_order_that_trades_resting_too(broker):
    place(broker, order_id=1, qty=300, price=24.79, ref="resting")
    broker.faults.partial_next = 1
    broker.faults.partial_max_qty = 100
    place(broker, order_id=2, qty=100, price=24.50, ref="far")  # does not trade: the fault stays armed
    assert broker.faults.partial_next == 1
    events = broker.on_market(broker.market.set_quote("CIM PRB", 24.76, 24.78, 500, 1000))
    order = broker.orders[(1, 1)]
    assert fills(events) == [(100, 24.79)] and order.held and broker.faults.partial_next == 0
    assert [e["fault"] for e in broker.log.read(kind="fault")] == ["forced_partial"]
    events = broker.on_market(broker.market.set_quote("CIM PRB", 24.76, 24.78, 500, 1000))  # next change: the rest
    assert fills(events) == [(200, 24.79)] and order.status == "Filled"


def test_partial_fault_applies_to_a_print_through_a_resting_order(broker):
    place(broker, action="SELL", qty=300, price=24.84, ref="rest-sell")
    broker.faults.partial_next = 1
    broker.faults.partial_fraction = 0.5
    events = broker.on_market(broker.market.inject_print("CIM PRB", 24.85, 500, "NYSE"))
    assert fills(events) == [(150, 24.84)] and broker.orders[(1, 1)].held
    assert fills(broker.on_market(broker.market.inject_print("CIM PRB", 24.85, 500, "NYSE"))) == []  # held
    assert fills(broker.on_market(broker.market.set_quote("CIM PRB", 24.84, 24.86, 300, 300))) == [(150, 24.84)]
