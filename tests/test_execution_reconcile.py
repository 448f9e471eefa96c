"""Reconciliation (pure): every change the broker reports after an outage is one step,
in order — one per execution never applied, one per status change — so the service
publishes each of them once."""

from __future__ import annotations

import dataclasses

from daemons.execution import core
from daemons.execution.reconcile import BrokerFill, BrokerOrder, reconcile
from qe.contracts import Intent

S = 1_000_000_000
REF = "qe-0123456789abcdef0123"


def record(**overrides) -> core.OrderRecord:
    intent = Intent(
        intent_id="i", intent_type="LT_BAND", symbol="CIM PRB", side="SELL", qty=300, order_type="LMT",
        limit_price=24.80, bucket="LT", classification="LT_LONG_DEC", priority=20, ttl_s=600,
        created_ns=1_000 * S, risk_delta_gross_pct=-0.5, reason="test",
    )
    base = core.record_for_intent(intent, "intent:k", REF, expires_ns=1_600 * S, received_ns=1_000 * S)
    return dataclasses.replace(base, **overrides)


def fill(exec_id: str, qty: int, ts_s: int, price: float = 24.80) -> BrokerFill:
    return BrokerFill(exec_id=exec_id, order_ref=REF, order_id=7, perm_id=70, symbol="CIM PRB", side="SELL",
                      qty=qty, price=price, ts_ns=ts_s * S)


def broker_order(status: str, filled: float, open_: bool) -> BrokerOrder:
    return BrokerOrder(order_ref=REF, order_id=7, perm_id=70, client_id=7, status=status, filled=filled, symbol="CIM PRB",
                       side="SELL", qty=300, limit_price=24.80, open=open_)


def live() -> core.OrderRecord:
    return record(status="SUBMITTED", broker_order_id=7, perm_id=70, acknowledged=True)


def test_every_missed_fill_of_one_order_is_a_step_of_its_own_in_time_order():
    fills = [fill("e.3", 100, 1_030), fill("e.1", 100, 1_010), fill("e.2", 100, 1_020)]
    result = reconcile({REF: live()}, [broker_order("Filled", 300, open_=False)], fills, now_ns=1_100 * S)
    steps = [(s.fill.exec_id if s.fill else None, s.record.status, s.record.filled_qty) for s in result.steps]
    assert steps == [("e.1", "PARTIALLY_FILLED", 100), ("e.2", "PARTIALLY_FILLED", 200), ("e.3", "FILLED", 300)]
    assert result.records[REF].exec_ids == ("e.1", "e.2", "e.3")


def test_fills_already_applied_are_not_steps_again():
    applied = core.on_fill(live(), "e.1", 100, 24.80)
    fills = [fill("e.1", 100, 1_010), fill("e.2", 100, 1_020), fill("e.2", 100, 1_020)]  # e.2 reported twice
    result = reconcile({REF: applied}, [broker_order("Submitted", 200, open_=True)], fills, now_ns=1_100 * S)
    assert [s.fill.exec_id for s in result.steps if s.fill] == ["e.2"]
    assert result.records[REF].filled_qty == 200
    again = reconcile(result.records, [broker_order("Submitted", 200, open_=True)], fills, now_ns=1_200 * S)
    assert again.steps == [] and again.fills == []


def test_fills_then_a_cancel_while_away_are_each_a_step_in_order():
    fills = [fill("e.1", 100, 1_010), fill("e.2", 100, 1_020)]
    result = reconcile({REF: live()}, [broker_order("Cancelled", 200, open_=False)], fills, now_ns=1_100 * S)
    assert [(s.fill.exec_id if s.fill else None, s.record.status) for s in result.steps] == [
        ("e.1", "PARTIALLY_FILLED"), ("e.2", "PARTIALLY_FILLED"), (None, "CANCELLED"),
    ]


def test_an_order_adopted_after_a_crash_then_filled_twice():
    sent = record(broker_order_id=7)  # PENDING_SUBMIT: the broker never acknowledged it to us
    fills = [fill("e.1", 100, 1_010), fill("e.2", 200, 1_020)]
    result = reconcile({REF: sent}, [broker_order("Filled", 300, open_=False)], fills, now_ns=1_100 * S)
    assert [s.fill.exec_id for s in result.steps if s.fill] == ["e.1", "e.2"]
    assert result.steps[0].record.perm_id == 70  # the broker's ids are taken with the first step
    assert result.records[REF].status == "FILLED" and result.resubmit == []


def test_an_order_whose_place_may_still_be_on_its_way_is_awaited_not_resubmitted():
    sent = record(broker_order_id=7)  # PENDING_SUBMIT, unknown to the broker's snapshot
    waiting = reconcile({REF: sent}, [], [], now_ns=1_001 * S, in_flight=frozenset({REF}))
    assert waiting.resubmit == [] and waiting.awaiting_ack == [REF] and waiting.steps == []
    later = reconcile({REF: sent}, [], [], now_ns=1_010 * S)  # its ack timeout passed: still unknown
    assert later.resubmit == [REF] and later.awaiting_ack == []
    expired = reconcile({REF: sent}, [], [], now_ns=1_700 * S, in_flight=frozenset({REF}))
    assert expired.expired == [REF] and expired.awaiting_ack == []
