"""What the daemons log, read back from a real run's captured stdout (one JSON object
per line): execution logs each fill once as one readable line and each broker code
once at its level (a 202 after our own TTL cancel and the farm-OK codes at info,
never error), with no object reprs; the Brain logs each skipped symbol once."""

from __future__ import annotations

import time
from collections import Counter

from qe.contracts import L1, order_ref_for
from tests.support.processes import wait_until
from tests.test_decision_daemon import alerts_of, fast_hard, keep_session_fresh, state  # noqa: F401 (fixture)
from tests.test_execution_daemon import SYMBOL, execution, sim  # noqa: F401 (fixtures)

REPR = ("Trade(", "Order(", "Contract(", "Fill(", "OrderStatus(", "Execution(")


def assert_plain_json_lines(lines: list[dict]) -> None:
    assert lines and not [line for line in lines if "raw" in line]  # every line is one JSON object
    reprs = [line for line in lines if any(marker in str(line) for marker in REPR)]
    assert not reprs, reprs[:3]


def test_execution_logs_fills_and_broker_codes_at_their_level_without_reprs(execution, sim):
    execution.brain_mode("NORMAL")  # a Brain's mode exists: its absence is (rightly) an error line
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:logs:fill", limit_price=24.80, qty=200)  # SELL at the bid: fills
    execution.wait_status("intent:logs:fill", "FILLED")
    execution.intent("intent:logs:ttl", limit_price=25.20, qty=100, ttl_s=3)  # rests above the ask
    execution.wait_status("intent:logs:ttl", "EXPIRED", timeout=20)
    broker_fills = sim.control.fills(order_ref_for("intent:logs:fill"))
    assert broker_fills
    wait_until(lambda: any(line.get("code") == 202 for line in execution.process.log_lines()), message="202 logged")
    lines = execution.process.log_lines()
    assert_plain_json_lines(lines)

    fills = [line for line in lines if line.get("msg") == "fill"]
    assert sorted(line["exec_id"] for line in fills) == sorted(f["exec_id"] for f in broker_fills)  # each once
    for line in fills:
        assert line["level"] == "info"
        assert (line["symbol"], line["side"], line["order_ref"]) == (SYMBOL, "SELL", order_ref_for("intent:logs:fill"))
        assert line["qty"] > 0 and line["price"] == 24.80
    assert sum(line["qty"] for line in fills) == 200

    codes = [line for line in lines if line.get("msg") == "broker message"]
    levels = {(line["code"], line["level"]) for line in codes}
    cancelled = [line for line in codes if line["code"] == 202]
    assert [(line["level"], line["order_ref"]) for line in cancelled] == [("info", order_ref_for("intent:logs:ttl"))]
    assert {2104, 2106, 2158} <= {code for code, level in levels if level == "info"}
    assert not {code for code, level in levels if level == "error"} & {202, 2104, 2106, 2158}
    # ib_async's own copies ("Error 202, reqId ...", "Canceled order: Trade(...)") are not logged.
    assert not [line for line in lines if line.get("logger", "").startswith("ib_async") and "202" in line["msg"]]
    assert not [line for line in lines if line["level"] == "error"], [line for line in lines if line["level"] == "error"]
    assert max(len(str(line)) for line in lines) < 2000


def test_the_brain_logs_each_skipped_symbol_once(fast_hard, r):
    world, brain = fast_hard
    world.setup()
    world.exposure()
    brain.start()
    hard = {"hard": True, "soft": True, "regime": "CLOSE"}
    keep_session_fresh(world, lambda: state(r).get("mode") == "HARD_DERISK", **hard)
    for symbol, bid, ask in (("CIM PRB", 0.01, 25.01), ("AGNCN", 1.00, 25.01), ("CIM PRC", 0.01, 0.02)):  # stub quotes
        world.publish("ev.l1", L1(symbol=symbol, bid=bid, ask=ask, bid_size=100, ask_size=100))
    keep_session_fresh(world, lambda: len(alerts_of(r, "decision_symbol_skipped")) >= 3, **hard)
    deadline = time.monotonic() + 3  # several more hard steps: still skipped, not reported again
    while time.monotonic() < deadline:
        world.session(**hard)
        time.sleep(0.3)
    assert brain.terminate() == 0

    lines = brain.log_lines()
    assert_plain_json_lines(lines)
    logged = Counter((line["symbol"], line["slot"], line["reason"]) for line in lines if line.get("msg") == "symbol skipped")
    alerted = Counter((a["symbol"], a["data"]["slot"], a["data"]["reason"]) for a in alerts_of(r, "decision_symbol_skipped"))
    assert logged == alerted and set(logged.values()) == {1}
    assert {symbol for symbol, _slot, reason in logged if reason == "implausible_quote"} == {"CIM PRB", "AGNCN", "CIM PRC"}
    assert all(line["level"] == "info" and "numbers" in line for line in lines if line.get("msg") == "symbol skipped")
