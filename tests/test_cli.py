"""The `qe` tool as an operator runs it: a real subprocess against a real Redis."""

from __future__ import annotations

import json
import subprocess
import time

import yaml

from qe import config, state, streams
from qe.contracts import L1, BrokerState, BucketExposure, Exposure, Session, make_event
from tests.support.processes import REPO, VENV_BIN, daemon_env

QE = str(VENV_BIN / "qe")


def qe(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QE, *args], env=daemon_env(redis_url, **env), capture_output=True, text=True, timeout=60)


def test_check_config_ok_and_invalid(redis_url, tmp_path):
    ok = qe(redis_url, "check-config")
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout and "25 symbols" in ok.stdout
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    document["runtime"]["max_deliveries"] = 0
    bad = tmp_path / "rules.yaml"
    bad.write_text(yaml.safe_dump(document))
    failed = qe(redis_url, "check-config", QE_CONFIG=str(bad))
    assert failed.returncode == config.EX_CONFIG
    assert "runtime.max_deliveries: Input should be greater than or equal to 1 (got 0)" in failed.stderr


def test_unreachable_redis_is_a_clear_failure():
    result = qe("redis://127.0.0.1:1/0", "streams")
    assert result.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr


def test_streams_and_dlq_round_trip(redis_url, r):
    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    event = make_event(L1(symbol="CIM PRB", bid=24.8, ask=24.9), idempotency_key="l1:x", source="t", ts_ns=time.time_ns())
    streams.Publisher(r, rules).publish("ev.l1", event)
    r.xgroup_create("ev.l1", "exposure", id="0")
    listing = json.loads(qe(redis_url, "--json", "streams").stdout)
    row = next(row for row in listing if row["stream"] == "ev.l1")
    assert row["length"] == 1 and row["group"] == "exposure" and row["lag"] == 1

    # A dead letter as the runtime writes it, then list / show / requeue.
    entry = streams.Entry("ev.l1", "1-1", {b"event": b"{broken"}, 3)
    effects = streams.Effects(streams.StreamPolicy(rules.streams))
    effects.dead_letter(entry, "invalid payload: bad JSON", "invalid", "c1", "exposure")
    streams.commit(r, r.register_script(streams._APPLY_LUA), effects)
    listed = json.loads(qe(redis_url, "--json", "dlq", "list").stdout)
    assert len(listed) == 1 and listed[0]["reason"] == "invalid payload: bad JSON"
    dead_id = listed[0]["id"]
    human = qe(redis_url, "dlq", "list").stdout
    assert "ev.l1/1-1" in human and "invalid" in human
    shown = json.loads(qe(redis_url, "--json", "dlq", "show", dead_id).stdout)
    assert shown["fields"] == {"event": "{broken"}
    requeued = qe(redis_url, "dlq", "requeue", dead_id)
    assert requeued.returncode == 0, requeued.stderr
    assert r.xlen("ev.dlq") == 0
    assert r.xrange("ev.l1")[-1][1] == {b"event": b"{broken"}
    missing = qe(redis_url, "dlq", "show", dead_id)
    assert missing.returncode == 1 and f"no dead letter with id {dead_id}" in missing.stderr


def test_status_reports_heartbeats(redis_url, r):
    r.hset("state:daemon:session", mapping={"ts_ns": time.time_ns(), "pid": 4242, "consumer": "session@h"})
    r.hset("state:daemon:exposure", mapping={"ts_ns": time.time_ns() - 600 * 10**9, "pid": 7, "consumer": "exposure@h"})
    status = json.loads(qe(redis_url, "--json", "status").stdout)
    health = {d["daemon"]: d["health"] for d in status["daemons"]}
    assert health == {"exposure": "STALE", "session": "ok"}


def test_status_shows_mode_session_exposure_against_caps_and_broker(redis_url, r):
    # Every value through its writer's code in qe.state (the contracts the CLI reads).
    now = time.time_ns()

    def snapshot(key, payload):
        r.hset(key, mapping=state.snapshot_fields(make_event(payload, idempotency_key=f"{key}:1", source="t", ts_ns=now)))

    r.hset(state.DECISION, mapping=state.decision_fields(state.DecisionState(
        mode="SOFT_DERISK", since_ns=now, reason="soft de-risk window and gross 112.00% > target 100%")))
    snapshot(state.SESSION, Session(now_ns=now, now_utc="2026-11-20T20:47:00+00:00", now_ny="2026-11-20T15:47:00-05:00",
                                    trading_day="2026-11-20", market_open=True, regime="CLOSE", minutes_to_close=13.0,
                                    soft_derisk_active=True, hard_derisk_active=False, early_close=False))
    buckets = {"LT": BucketExposure(current_pct=95.0, potential_pct=99.0, target_pct=80.0, max_pct=90.0),
               "MM_PURE": BucketExposure(current_pct=17.0, potential_pct=19.5, target_pct=20.0, max_pct=30.0)}
    exposure = Exposure(equity=1_000_000.0, long_notional=810_000.0, short_notional=310_000.0, gross_pct=112.0,
                        net_pct=50.0, potential_gross_pct=118.5, buckets=buckets, marks_stale=["PFF"])
    totals, _symbols = state.exposure_fields(make_event(exposure, idempotency_key="exposure:1", source="t", ts_ns=now))
    r.hset(state.EXPOSURE, mapping=totals)
    snapshot(state.BROKER, BrokerState(connected=False, orders_allowed=False, account="DU1", mode="paper",
                                       reason="IB lost connectivity (1100)"))
    human = qe(redis_url, "status").stdout
    assert "MODE SOFT_DERISK: soft de-risk window" in human
    assert "SESSION 2026-11-20T15:47:00 New York, CLOSE, 13.0 min to close" in human
    assert "gross    112.00%  118.50%" in human and "130% (hard cap)" in human
    assert "stale marks: 1" in human
    assert "BROKER DOWN, orders REFUSED: account DU1 (paper), IB lost connectivity (1100)" in human
    status = json.loads(qe(redis_url, "--json", "status").stdout)
    assert status["exposure"]["potential_gross_pct"] == 118.5 and status["caps"]["hard_cap_pct"] == 130
    assert status["broker"]["connected"] is False and status["decision"]["mode"] == "SOFT_DERISK"
