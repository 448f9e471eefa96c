"""The Brain's handler (imperative shell) on real contract events, without Redis: what
reaches the view and the state hashes, and that an evaluation error never fails the
event being handled (it would be retried and, with it, good events dead-lettered)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest

import daemons.decision.service as brain
from daemons.decision import codecs
from daemons.decision.model import Outstanding
from qe.contracts import L1, Account, BrokerState, Order, Position, Session, make_event
from qe.streams import Effects, StreamPolicy
from tests.support.brain import NS, T0, decision_handler

YEAR_2100_NS = 4_102_444_800 * NS


@pytest.fixture
def handler(tmp_path):
    return decision_handler(tmp_path, {"CIM PRB": "LT", "CIM PRC": "MM_PURE"})


def effects_of(handler) -> Effects:
    return Effects(StreamPolicy(handler.rules.streams))


def event(payload, key: str, ts_ns: int = T0):
    return make_event(payload, idempotency_key=key, source="test", ts_ns=ts_ns)


def session_payload(now_ns: int = T0) -> Session:
    iso = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).isoformat()
    return Session(now_ns=now_ns, now_utc=iso, now_ny=iso, trading_day="2026-11-20", market_open=True, regime="CLOSE",
                   minutes_to_close=1.5, soft_derisk_active=True, hard_derisk_active=True, early_close=False)


def hsets(effects: Effects, key: str) -> dict[str, str]:
    out = {}
    for op in effects.ops:
        if op[0] == "HSET" and op[1] == key:
            out.update(dict(zip(op[2::2], op[3::2])))
    return out


def alerts(effects: Effects, alert_type: str) -> list[dict]:
    """Payloads of the alerts of `alert_type` the effects would publish."""
    found = []
    for op in effects.ops:
        for value in op:
            if value.startswith("{") and '"type":"alert"' in value:
                payload = json.loads(value)["payload"]
                if payload["alert_type"] == alert_type:
                    found.append(payload)
    return found


def test_absurd_position_never_reaches_the_view_or_state(handler):
    effects = effects_of(handler)
    handler.handle(event(Position(account="DU1", symbol="CIM PRB", qty=20000, avg_cost=24.5, bucket="LT"), "p1"), effects)
    # The contract refuses this on decode (tests/test_contracts_strict.py); the Brain's own
    # guard is tested with a payload built past validation (defense in depth).
    handler.handle(event(Position.model_construct(account="DU1", symbol="CIM PRB", qty=10**400, avg_cost=24.5, bucket="LT"), "p2"), effects)
    assert handler.view.positions["CIM PRB"].qty == 20000  # the last sane one
    assert handler.view.input_problems == {"CIM PRB": "absurd_quantity"}
    assert json.loads(hsets(effects, codecs.POSITIONS)["CIM PRB"]) == [20000, "LT", 24.5]
    assert hsets(effects, codecs.QUARANTINE) == {"CIM PRB": "absurd_quantity"}
    assert not any(re.search(r"\d{60}", v) for op in effects.ops for v in op)  # no 400-digit number anywhere
    # A sane update lifts the quarantine.
    handler.handle(event(Position(account="DU1", symbol="CIM PRB", qty=0, avg_cost=0.0, bucket="LT"), "p3"), effects)
    assert handler.view.input_problems == {} and ["HDEL", codecs.QUARANTINE, "CIM PRB"] in effects.ops


def test_account_equity_and_quote_times_are_guarded(handler):
    effects = effects_of(handler)
    handler.handle(event(Account.model_construct(account="DU1", net_liquidation=1e300, buying_power=None, currency="USD"), "a1"), effects)
    assert handler.view.account_equity is None  # unknown, not a number
    handler.handle(event(L1(symbol="CIM PRB", bid=24.99, ask=25.01, quote_ts_ns=YEAR_2100_NS), "q1", YEAR_2100_NS), effects)
    assert handler.view.markets["CIM PRB"].quote_ts_ns == T0
    handler.handle(event(session_payload(YEAR_2100_NS), "s1", YEAR_2100_NS), effects)
    assert handler.view.session.now_ns == T0
    handler.handle(event(BrokerState(connected=True), "b1", YEAR_2100_NS), effects)
    assert handler.view.state.broker_ts_ns == T0


def test_order_events_from_the_future_do_not_keep_records_alive(handler):
    record = Outstanding(key="k", slot="HARD_DERISK", symbol="CIM PRB", side="SELL", qty=100, bucket="LT",
                               classification="LT_LONG_DEC", order_type="LMT", limit_price=24.99, priority=80,
                               intent_type="HARD_DERISK", ttl_s=30, issued_ns=T0, last_change_ns=T0)
    handler.view.put_record(record)
    effects = effects_of(handler)
    order = Order(order_ref="qe-x", intent_key="k", symbol="CIM PRB", side="SELL", qty=100, limit_price=24.99,
                  bucket="LT", status="FILLED", filled_qty=100, remaining_qty=0)
    handler.handle(event(order, "o1", YEAR_2100_NS), effects)
    kept = handler.view.outstanding["k"]
    assert kept.last_order_ts_ns == T0 and handler.view.settling["CIM PRB"] == T0


def test_an_evaluation_error_is_contained_and_reported_once(handler, monkeypatch):
    def broken(*_args, **_kwargs):
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(brain, "decide", broken)
    effects = effects_of(handler)
    for n in range(3):  # good session events: handled (and so acked), never raised
        handler.clock.now = T0 + n * NS
        handler.handle(event(session_payload(T0 + n * NS), f"s{n}"), effects)
        handler.tick(T0 + n * NS + NS // 2, effects)
    assert handler.view.session.snapshot_id == "s2"
    failed = alerts(effects, "decision_evaluation_failed")
    assert len(failed) == 1 and "OverflowError" in failed[0]["message"]
    monkeypatch.undo()
    handler.clock.now = T0 + 5 * NS
    handler.handle(event(session_payload(T0 + 5 * NS), "s5"), effects)
    assert handler.evaluation_failure is None
    assert hsets(effects, codecs.STATE)  # evaluations commit their state again
