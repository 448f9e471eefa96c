"""The chaos referee (sim/chaos.py, docs/chaos.md): its pure checks on small hand-made
data, its seeded plan, and the short chaos afternoon run end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from sim import chaos
from sim import chaos_checks as checks
from tests.support.processes import REPO

# -- duplicate orderRefs -----------------------------------------------------------------------------


def test_duplicate_order_refs_counts_accepted_orders_only():
    orders = [
        {"order_ref": "qe-a", "perm_id": 1},
        {"order_ref": "qe-a", "perm_id": 2},  # a second live order for one intent
        {"order_ref": "qe-b", "perm_id": 3},
        {"order_ref": "qe-c", "perm_id": 0},  # rejected at placement: never lived
        {"order_ref": "qe-c", "perm_id": 4},
        {"order_ref": "", "perm_id": 5},
        {"order_ref": "", "perm_id": 6},  # no orderRef: not ours to judge
    ]
    assert checks.duplicate_order_refs(orders) == {"qe-a": 2}
    assert checks.duplicate_order_refs(orders[2:]) == {}


# -- execIds ------------------------------------------------------------------------------------------


def fill_event(exec_id: str | None) -> dict:
    return {"order_ref": "qe-a", "status": "FILLED", "last_fill": None if exec_id is None else {"exec_id": exec_id, "qty": 100}}


def test_audit_fills_each_exec_id_exactly_once():
    broker = [{"exec_id": "e1"}, {"exec_id": "e2"}, {"exec_id": "e3"}]
    events = [fill_event("e1"), fill_event(None), fill_event("e3"), fill_event("e3"), fill_event("x9")]
    audit = checks.audit_fills(broker, events)
    assert audit.broker_fills == 3
    assert audit.fill_events == 4
    assert audit.missing == ["e2"]  # two fills of one order during an outage, one published
    assert audit.duplicated == {"e3": 2}
    assert audit.unknown == ["x9"]
    clean = checks.audit_fills(broker, [fill_event("e1"), fill_event("e2"), fill_event("e3")])
    assert (clean.missing, clean.duplicated, clean.unknown) == ([], {}, [])


# -- positions ----------------------------------------------------------------------------------------


def test_position_mismatches_treat_absent_as_flat():
    assert checks.position_mismatches({"A": 100, "B": -200}, {"A": 100, "B": -200, "C": 0}) == {}
    assert checks.position_mismatches({"A": 100, "B": -200}, {"A": 200, "C": 300}) == {
        "A": (100, 200), "B": (-200, 0), "C": (0, 300)}


def test_last_published_positions_keep_the_last_event_per_symbol():
    events = [
        {"type": "position", "payload": {"symbol": "A", "qty": 100}},
        {"type": "account", "payload": {"net_liquidation": 1e6}},
        {"type": "position", "payload": {"symbol": "B", "qty": -50}},
        {"type": "position", "payload": {"symbol": "A", "qty": 300}},
        {"type": "position", "payload": {"symbol": "B", "qty": 0}},
    ]
    assert checks.last_published_positions(events) == {"A": 300}


# -- collar ---------------------------------------------------------------------------------------------


def test_mark_tape_takes_the_last_sample_at_or_before():
    tape = checks.MarkTape({"A": [(30, 26.0), (10, 25.0), (20, 0.0)]})  # unsorted; a zero mark is no mark
    assert tape.at("A", 5) == 25.0  # before every sample: the first one
    assert tape.at("A", 10) == 25.0
    assert tape.at("A", 25) == 25.0
    assert tape.at("A", 31) == 26.0
    assert tape.at("B", 31) is None


def test_orders_outside_collar():
    tape = checks.MarkTape({"A": [(0, 25.0)]})
    requests = [
        {"event": "place", "symbol": "A", "lmt_price": 26.0, "ts_ns": 1, "order_ref": "in"},  # 4 %
        {"event": "modify", "symbol": "A", "lmt_price": 23.5, "ts_ns": 1, "order_ref": "out"},  # 6 %
        {"event": "place", "symbol": "A", "lmt_price": 0.01, "ts_ns": 1, "order_ref": "stub"},  # priced off a stub bid
        {"event": "place", "symbol": "A", "lmt_price": None, "ts_ns": 1, "order_ref": "mkt"},  # nothing vouches for it
        {"event": "place", "symbol": "B", "lmt_price": 25.0, "ts_ns": 1, "order_ref": "nomark"},
        {"event": "cancel", "symbol": "A", "lmt_price": 1.0, "ts_ns": 1, "order_ref": "cancel"},  # cancels carry no price risk
    ]
    outside = checks.orders_outside_collar(requests, tape, 5.0)
    assert [o["order_ref"] for o in outside] == ["out", "stub", "mkt", "nomark"]
    assert outside[0]["off_pct"] == 6.0


def test_simulator_mark_is_last_trade_bounded_by_the_quote():
    assert checks.simulator_mark({"bid": 24.9, "ask": 25.1, "last": 25.0}) == 25.0
    assert checks.simulator_mark({"bid": 24.9, "ask": 25.1, "last": 30.0}) == 25.1  # a far print
    assert checks.simulator_mark({"bid": 0.01, "ask": 999999.0, "last": 25.0}) == 25.0  # a stub quote
    assert checks.simulator_mark({"bid": 25.1, "ask": 24.9, "last": 30.0}) == 25.0  # crossed: the mid
    assert checks.simulator_mark({"bid": 24.9, "ask": 25.1, "last": 0.0}) == 25.0
    assert checks.simulator_mark({"bid": 0.0, "ask": 0.0, "last": 0.0}) is None


# -- groups, DLQ, crash loops, verdict ---------------------------------------------------------------


def test_pending_by_group_lists_only_groups_with_pending():
    groups = {"ev.l1": [{"name": "exposure", "pending": 0}, {"name": "decision_engine", "pending": 3}], "ev.orders": []}
    assert checks.pending_by_group(groups) == {"ev.l1/decision_engine": 3}


def test_unexpected_dead_letters_against_the_known_list():
    dlq = [{"origin_stream": "ev.l1", "label": "trimmed_unread", "group": "g", "reason": "x"},
           {"origin_stream": "ev.prints", "label": "invalid", "group": "g", "reason": "price"}]
    assert [e["label"] for e in checks.unexpected_dead_letters(dlq)] == ["trimmed_unread", "invalid"]
    assert checks.unexpected_dead_letters(dlq, frozenset({("ev.prints", "invalid")}))[0]["origin_stream"] == "ev.l1"


SUPERVISORD_LOG = """\
2026-01-05 10:00:00,000 INFO spawned: 'execution' with pid 100
2026-01-05 10:00:02,000 INFO success: execution entered RUNNING state, process has stayed up for > than 2 seconds (startsecs)
2026-01-05 10:00:10,000 INFO exited: execution (terminated by SIGKILL; not expected)
2026-01-05 10:00:11,000 INFO spawned: 'execution' with pid 101
2026-01-05 10:00:20,000 INFO exited: execution (exit status 1; not expected)
2026-01-05 10:00:21,000 INFO spawned: 'execution' with pid 102
2026-01-05 10:00:30,000 INFO exited: execution (exit status 1; not expected)
2026-01-05 10:00:31,000 INFO spawned: 'execution' with pid 103
2026-01-05 10:00:40,000 INFO exited: execution (exit status 1; not expected)
2026-01-05 10:00:41,000 INFO spawned: 'execution' with pid 104
2026-01-05 10:00:45,000 INFO exited: execution (exit status 1; not expected)
2026-01-05 10:00:46,000 INFO spawned: 'prints' with pid 200
2026-01-05 10:00:47,000 INFO exited: prints (exit status 1; not expected)
2026-01-05 10:00:48,000 INFO gave up: prints entered FATAL state, too many start retries too quickly
"""


def test_supervisord_log_exits_not_ours_and_crash_loops():
    exits, fatal = checks.parse_supervisord_log(SUPERVISORD_LOG.splitlines())
    assert [(e.name, e.pid) for e in exits] == [("execution", 100), ("execution", 101), ("execution", 102),
                                                ("execution", 103), ("execution", 104), ("prints", 200)]
    assert fatal == ["prints"]
    not_ours = checks.exits_not_ours(exits, our_kill_pids={100})
    assert [e.pid for e in not_ours] == [101, 102, 103, 104, 200]
    assert checks.crash_loops(not_ours, max_per_minute=3) == {"execution": 4}
    assert checks.crash_loops(not_ours, max_per_minute=4) == {}
    assert checks.crash_loops(checks.exits_not_ours(exits, {100, 101, 102, 103, 104, 200}), 0) == {}


GOOD = {"dup_order_refs": 0, "fills_missing": 0, "max_potential_gross_pct": 125.0, "final_gross_pct": 90.0,
        "kills": 200, "redis_restarts": 5}


def test_violations_name_each_broken_promise():
    assert checks.violations(GOOD, {"kills": 200, "redis_restarts": 5}) == []
    found = checks.violations({**GOOD, "dup_order_refs": 1, "max_potential_gross_pct": 130.5, "final_gross_pct": None,
                               "kills": 199}, {"kills": 200})
    assert len(found) == 4
    assert any("dup_order_refs=1" in line for line in found)
    assert any("130.5" in line for line in found)
    assert any("final_gross_pct=None" in line for line in found)  # unknown is not "fine"
    assert any("kills=199 < 200" in line for line in found)


def test_result_line_is_one_line_of_key_values():
    line = checks.result_line({"run": "short", "kills": 31, "pct": 124.98392, "mode": "SOFT DERISK", "none": None})
    assert line == "RESULT run=short kills=31 pct=124.984 mode=SOFT_DERISK none=None"


# -- the plan -------------------------------------------------------------------------------------------


def test_the_plan_is_seeded_and_covers_what_the_issue_asks():
    symbols = ["A", "B", "C"]
    full = chaos.plan(14, chaos.FULL, 300.0, symbols)
    assert full == chaos.plan(14, chaos.FULL, 300.0, symbols)
    assert full != chaos.plan(15, chaos.FULL, 300.0, symbols)
    kinds = [a.kind for a in full]
    kill_targets = {a.target for a in full if a.kind == "kill"}
    assert kinds.count("kill") + chaos.FULL.intent_kills + chaos.FULL.record_send_kills >= 200
    assert kill_targets == set(chaos.DAEMONS)
    assert kinds.count("redis_restart") == 5
    faults = [a.target for a in full if a.kind == "fault"]
    assert len(faults) >= 20 and set(faults) == set(chaos.FAULT_KINDS)
    assert {a.arg("variant") for a in full if a.kind == "bad_quote"} == set(chaos.BAD_QUOTES)
    assert kinds.count("restore_quote") == kinds.count("bad_quote")
    assert all(6.0 <= a.at_s <= 300.0 for a in full)
    short = chaos.plan(14, chaos.SHORT, 85.0, symbols)
    assert [a.kind for a in short].count("kill") >= 30 and [a.kind for a in short].count("redis_restart") == 1
    assert len([a for a in short if a.kind == "fault"]) == 5


def test_supervisord_programs_copy_the_shipped_restart_policy(tmp_path):
    import configparser

    generated = configparser.RawConfigParser()
    generated.read_string(chaos.supervisord_config(tmp_path, tmp_path / "s.sock"))
    shipped = configparser.RawConfigParser()
    shipped.read(REPO / "etc" / "supervisord.conf")
    for name in chaos.DAEMONS:
        for key in chaos.POLICY_KEYS:
            assert generated.get(f"program:{name}", key) == shipped.get(f"program:{name}", key), (name, key)


# -- the short chaos afternoon ----------------------------------------------------------------------------

RESULT = re.compile(r"^RESULT (.*)$", re.M)


def parse_result(output: str) -> dict[str, str]:
    lines = RESULT.findall(output)
    assert len(lines) == 1, output[-3000:]
    return dict(pair.split("=", 1) for pair in lines[0].split())


@pytest.mark.slow
def test_the_short_chaos_afternoon(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "sim.chaos", "--short", "--workdir", str(tmp_path)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    figures = parse_result(completed.stdout)
    report = json.loads((tmp_path / "short" / "figures.json").read_text())
    assert int(figures["kills"]) >= 30 and int(figures["redis_restarts"]) >= 1 and int(figures["broker_faults"]) >= 5
    assert int(figures["bad_prints"]) >= 1 and int(figures["bad_quotes"]) >= 1
    assert int(figures["broker_orders"]) > 0 and int(figures["broker_fills"]) > 0  # the afternoon really traded
    assert float(figures["max_potential_gross_pct"]) <= 130.0
    assert float(figures["final_gross_pct"]) <= 100.0
    # Every check of the referee holds (the stub-quote collar violations and the false
    # trimmed_unread dead letters after Redis restarts, once tolerated here, are fixed).
    for key in ("dup_order_refs", "fills_missing", "fills_duplicated", "fills_unknown", "position_mismatches",
                "published_position_mismatches", "collar_violations", "pending", "dlq_unexpected", "crash_loops",
                "programs_not_running", "referee_log_evicted"):
        assert figures[key] == "0", (key, figures[key], output[-4000:])
    assert figures["violations"] == "0" and report["violations"] == [], report["violations"]
    assert completed.returncode == 0, output[-4000:]
