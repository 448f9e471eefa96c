"""The seams between daemons, with every real writer running (tests/support/system.py):
the Brain's mode as execution reads it, judged at the simulator (the referee).

No daemon's state is written by the test. The one outside event is a risk-increasing
intent from a test producer with its own Redis ACL user (allowed to append to
ev.intents and nothing else), built with lib/qe's contracts and publisher: what a
buggy or compromised Brain could send. Execution must refuse it on the Brain's mode.
"""

from __future__ import annotations

import time

import pytest
import redis

from qe import acl, state, streams, topology
from qe.config import load_rules
from qe.contracts import Intent, intent_id_for, is_our_order_ref, make_event, order_ref_for
from tests.support.processes import wait_until
from tests.support.system import System, new_york

pytestmark = pytest.mark.slow

PRODUCER = "qe-test-producer"
PRODUCER_PASSWORD = "test-producer-password"


def producer(system: System) -> streams.Publisher:
    """A publisher that can append to ev.intents (its delivery copy and its dedupe markers) only."""
    system.r.execute_command(
        "ACL", "SETUSER", PRODUCER, "reset", "on", f">{PRODUCER_PASSWORD}", "~ev.intents",
        *(f"~{key}" for key in topology.delivery_copies(["ev.intents"])), "~dedupe:test-producer:*",
        *acl.CONNECTION_COMMANDS.split(), *acl.FUNCTION_COMMANDS.split(), *acl.PUBLISH_COMMANDS.split(),
        *acl.DEDUPE_COMMANDS.split(),
    )
    client = redis.Redis(port=system.redis_server.port, username=PRODUCER, password=PRODUCER_PASSWORD)
    assert "no permissions" in _refused(lambda: client.hset(state.DECISION, "mode", "\"NORMAL\""))  # it cannot fake the Brain
    return streams.Publisher(client, load_rules(system.rules_file))


def _refused(call) -> str:
    try:
        call()
    except redis.ResponseError as exc:
        return str(exc)
    return "accepted"


def brain_mode(system: System) -> str | None:
    reading = state.read_decision(system.r)
    return reading.value.mode if reading.value is not None else None


def held_long(system: System) -> tuple[str, float]:
    """A symbol held long and its current mark, as execution and exposure published them."""
    positions = state.read_positions(system.r).values
    marks = state.read_exposure_symbols(system.r).values
    for symbol, position in sorted(positions.items()):
        line = marks.get(symbol)
        if position.qty > 0 and line is not None and line.mark is not None:
            return symbol, round(line.mark, 2)
    raise AssertionError(f"no long position with a mark: {sorted(positions)}")


def publish_increase(system: System, publisher: streams.Publisher, key: str, symbol: str, price: float) -> None:
    intent = Intent(
        intent_id=intent_id_for(key), intent_type="LT_BAND", symbol=symbol, side="BUY", qty=100, order_type="LMT",
        limit_price=price, bucket="LT", classification="LT_LONG_INC", priority=20, ttl_s=300,
        created_ns=system.clock.now_ns(), risk_delta_gross_pct=0.3, reason="seam test: a risk-increasing intent",
    )
    publisher.publish("ev.intents", make_event(intent, idempotency_key=key, source="test-producer", ts_ns=system.clock.now_ns()))


def order_events(system: System, key: str) -> list[dict]:
    return [o for o in system.payloads("ev.orders") if o["order_ref"] == order_ref_for(key)]


def sent_to_broker(system: System, key: str) -> list[dict]:
    return [q for q in system.sim.control.requests() if q.get("order_ref") == order_ref_for(key)]


def wait_execution_ready(system: System) -> None:
    """Execution connected and reconciled: the Brain's own orders are working."""
    wait_until(lambda: any(o["status"] == "SUBMITTED" for o in system.payloads("ev.orders")), timeout=90,
               message="orders working at the broker")


def test_execution_refuses_an_increase_while_the_real_brain_is_in_soft_derisk(tmp_path):
    # 15:46: the soft de-risk window (close - 15 min) with the seeded ~125 % gross book.
    system = System(tmp_path, new_york("2026-11-20", "15:46"))
    try:
        publisher = producer(system)
        wait_until(lambda: brain_mode(system) == "SOFT_DERISK", timeout=60, message="the Brain in SOFT_DERISK")
        wait_execution_ready(system)
        symbol, price = held_long(system)
        publish_increase(system, publisher, "intent:seam:soft:1", symbol, price)
        wait_until(lambda: any(o["status"] == "REJECTED" for o in order_events(system, "intent:seam:soft:1")),
                   timeout=30, message=f"refused: {order_events(system, 'intent:seam:soft:1')}")
        assert brain_mode(system) == "SOFT_DERISK"  # still: the refusal was the mode's
        refused = [o for o in order_events(system, "intent:seam:soft:1") if o["status"] == "REJECTED"][0]
        assert refused["reject_reason"].startswith("reduce_only: mode SOFT_DERISK"), refused
        time.sleep(1.0)
        assert sent_to_broker(system, "intent:seam:soft:1") == []  # the referee saw nothing
        assert system.sim.control.orders(order_ref_for("intent:seam:soft:1")) == []
    finally:
        system.stop()


def test_execution_sends_only_cancels_while_the_real_brain_is_halted(tmp_path):
    system = System(tmp_path, new_york("2026-11-20", "15:46"))
    try:
        publisher = producer(system)
        wait_execution_ready(system)
        halted = system.qe("halt", "--reason", "seam test", "--operator", "tester")
        assert halted.returncode == 0, halted.stderr
        wait_until(lambda: brain_mode(system) == "HALTED", timeout=30, message="the Brain HALTED")
        reading = state.read_decision(system.r).value
        assert reading is not None and reading.halted and reading.cancels_only and reading.halt_operator == "tester"

        def ours_live() -> list[dict]:
            return [o for o in system.sim.control.orders()
                    if is_our_order_ref(o["order_ref"]) and o["status"] in ("PreSubmitted", "Submitted")]

        wait_until(lambda: not ours_live(), timeout=30, message="every order of ours cancelled at the broker")
        halted_at_ns = system.clock.now_ns()  # the referee's clock; from here on only cancels may reach the broker
        symbol, price = held_long(system)
        publish_increase(system, publisher, "intent:seam:halt:1", symbol, price)
        wait_until(lambda: any(o["status"] == "REJECTED" for o in order_events(system, "intent:seam:halt:1")),
                   timeout=30, message=f"refused: {order_events(system, 'intent:seam:halt:1')}")
        refused = [o for o in order_events(system, "intent:seam:halt:1") if o["status"] == "REJECTED"][0]
        assert refused["reject_reason"].startswith("halted"), refused
        time.sleep(4.0)  # two simulated minutes of HALTED
        late = [q for q in system.sim.control.requests()
                if q["event"] not in ("cancel", "global_cancel") and is_our_order_ref(q.get("order_ref"))
                and q["ts_ns"] > halted_at_ns]
        assert late == [], late  # at the referee: only cancels since the halt took effect
        assert not ours_live()
        assert brain_mode(system) == "HALTED"
    finally:
        system.stop()
