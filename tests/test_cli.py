"""The `qe` tool as an operator runs it: a real subprocess against a real Redis."""

from __future__ import annotations

import json
import subprocess
import time

import yaml

from qe import cli, config, state, streams
from qe.contracts import L1, BrokerState, BucketExposure, Exposure, Session, make_event
from tests.support.processes import REPO, VENV_BIN, daemon_env
from tests.support.raw_streams import create_group

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
    create_group(r, "ev.l1", "exposure")
    listing = json.loads(qe(redis_url, "--json", "streams").stdout)["streams"]
    row = next(row for row in listing if row["stream"] == "ev.l1")
    assert row["length"] == 1 and row["group"] == "exposure" and row["lag"] == 1

    # A dead letter as the runtime writes it, then list / show / requeue.
    entry = streams.Entry("ev.l1", "1-1", {b"event": b"{broken"}, 3)
    effects = streams.Effects(streams.StreamPolicy(rules.streams))
    effects.dead_letter(entry, "invalid payload: bad JSON", "invalid", "c1", "exposure")
    streams.commit(r, effects)
    listed = json.loads(qe(redis_url, "--json", "dlq", "list").stdout)["entries"]
    assert len(listed) == 1 and listed[0]["reason"] == "invalid payload: bad JSON"
    dead_id = listed[0]["id"]
    human = qe(redis_url, "dlq", "list").stdout
    assert "ev.l1/1-1" in human and "invalid" in human
    shown = json.loads(qe(redis_url, "--json", "dlq", "show", dead_id).stdout)["entry"]
    assert shown["fields"] == {"event": "{broken"}
    requeued = qe(redis_url, "dlq", "requeue", dead_id)
    assert requeued.returncode == 0, requeued.stderr
    assert r.xlen("ev.dlq") == 0
    assert r.xrange("ev.l1")[-1][1] == {b"event": b"{broken"}
    missing = qe(redis_url, "dlq", "show", dead_id)
    assert missing.returncode == 1 and f"no dead letter with id {dead_id}" in missing.stderr


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
    shown = qe(redis_url, "status")
    assert shown.returncode == 1  # no daemon runs: the rest is still shown
    human = shown.stdout
    assert "MODE SOFT_DERISK: soft de-risk window" in human
    assert "SESSION 2026-11-20T15:47:00 New York, CLOSE, 13.0 min to close" in human
    assert "gross    112.00%  118.50%" in human and "130% (hard cap)" in human
    assert "stale marks: 1" in human
    assert "BROKER DOWN, orders REFUSED: account DU1 (paper), IB lost connectivity (1100)" in human
    status = json.loads(qe(redis_url, "--json", "status").stdout)
    assert status["exposure"]["potential_gross_pct"] == 118.5 and status["caps"]["hard_cap_pct"] == 130
    assert status["broker"]["connected"] is False and status["decision"]["mode"] == "SOFT_DERISK"


# --- which Redis, said every time -----------------------------------------------------------------


def test_json_anywhere_on_the_line_and_json_errors(redis_url):
    for args in (("--json", "status"), ("status", "--json"), ("dlq", "--json", "list"), ("dlq", "list", "--json")):
        result = qe(redis_url, *args)
        document = json.loads(result.stdout)
        assert document["redis"] == {"url": redis_url, "source": "QE_REDIS_URL"}, args
    unreachable = qe("redis://127.0.0.1:1/0", "streams", "--json")
    assert unreachable.returncode == 1
    error = json.loads(unreachable.stdout)
    assert error["ok"] is False and "cannot reach Redis at redis://127.0.0.1:1/0" in error["error"]
    usage = qe(redis_url, "dlq", "show", "--json")  # the id is missing
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["ok"] is False and "id" in json.loads(usage.stdout)["error"]
    human = qe(redis_url, "streams")
    assert human.stdout.splitlines()[0] == f"Redis {redis_url} (from QE_REDIS_URL)"


def test_bad_ids_are_friendly(redis_url):
    for command in ("show", "requeue"):
        result = qe(redis_url, "dlq", command, "banana")
        assert result.returncode == 1
        assert result.stderr.strip() == f"qe dlq {command}: not a stream id: banana (expected e.g. 1718000000000-0)"
    as_json = qe(redis_url, "--json", "dlq", "show", "banana")
    assert json.loads(as_json.stdout) == {"ok": False, "error": "not a stream id: banana (expected e.g. 1718000000000-0)",
                                         "redis": {"url": redis_url, "source": "QE_REDIS_URL"}}
    assert "not a stream id: x" in qe(redis_url, "dlq", "list", "--after", "x").stderr


def test_dlq_list_is_bounded_and_pages(redis_url, r):
    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    big = "x" * 50_000
    for n in range(60):  # 60 dead letters of 50 KB each, as the runtime writes them
        effects = streams.Effects(streams.StreamPolicy(rules.streams))
        entry = streams.Entry("ev.l1", f"1-{n}", {b"event": big.encode()}, 3)
        effects.dead_letter(entry, f"invalid payload {n}", "invalid", "c1", "exposure")
        streams.commit(r, effects)
    first = qe(redis_url, "--json", "dlq", "list")
    assert len(first.stdout) < 100_000  # not 3 MB
    page = json.loads(first.stdout)
    assert page["count"] == 50 and page["total"] == 60 and page["entries"][0]["reason"] == "invalid payload 59"
    assert all(len(e["fields_preview"]) <= 200 and e["fields_chars"] > 50_000 for e in page["entries"])
    rest = json.loads(qe(redis_url, "--json", "dlq", "list", "--after", page["next_after"]).stdout)
    assert [e["reason"] for e in rest["entries"]] == [f"invalid payload {n}" for n in range(9, -1, -1)]
    assert rest["next_after"] is None
    offset = json.loads(qe(redis_url, "--json", "dlq", "list", "--limit", "5", "--offset", "50").stdout)
    assert [e["id"] for e in offset["entries"]] == [e["id"] for e in rest["entries"][:5]]
    human = qe(redis_url, "dlq", "list", "--limit", "3")
    assert "3 shown of 60 dead letters" in human.stdout and "next page: qe dlq list --limit 3 --after " in human.stdout
    assert qe(redis_url, "dlq", "list", "--limit", "100000").returncode == 1


def _env_without_redis(tmp_path, **extra: str) -> dict[str, str]:
    env = daemon_env("unused", **extra)
    del env["QE_REDIS_URL"]
    return env


def test_the_demo_environment_is_picked_up_and_named(redis_url, tmp_path):
    home = tmp_path / "checkout"
    (home / "etc").mkdir(parents=True)
    (home / "etc" / "risk_rules.yaml").write_text((REPO / "etc" / "risk_rules.yaml").read_text())
    (home / "etc" / "universe.csv").write_text((REPO / "etc" / "universe.csv").read_text())
    (home / "run").mkdir()
    (home / "run" / "demo.env").write_text(f"QE_HOME={home}\nQE_REDIS_URL={redis_url}\n")
    env = _env_without_redis(tmp_path)
    del env["QE_HOME"]
    result = subprocess.run([QE, "--json", "streams"], env=env, cwd=home / "etc", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["redis"] == {"url": redis_url, "source": str(home / "run" / "demo.env")}
    # QE_REDIS_URL, when set, wins over the demo's file.
    explicit = subprocess.run([QE, "streams"], env={**env, "QE_REDIS_URL": "redis://127.0.0.1:1/0"}, cwd=home,
                              capture_output=True, text=True, timeout=60)
    assert explicit.returncode == 1 and "cannot reach Redis at redis://127.0.0.1:1/0 (from QE_REDIS_URL)" in explicit.stderr


def test_without_any_redis_setting_qe_refuses_to_guess(tmp_path):
    env = _env_without_redis(tmp_path, QE_HOME=str(tmp_path))
    for args in (["status"], ["halt", "--reason", "x"]):
        result = subprocess.run([QE, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == config.EX_CONFIG
        assert "QE_REDIS_URL is not set" in result.stderr and "qe does not guess" in result.stderr
    as_json = subprocess.run([QE, "status", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["ok"] is False and json.loads(as_json.stdout)["redis"] == {"url": None, "source": None}


# --- pure parts -------------------------------------------------------------------------------------


def _session(now_ny: str, **fields) -> dict:
    base = {"now_ny": now_ny, "regime": "CLOSED", "market_open": False, "minutes_to_close": None, "early_close": False}
    return {**base, **fields}


def _ny(text: str):
    from datetime import datetime

    from qe.clock import NEW_YORK

    return datetime.fromisoformat(text).replace(tzinfo=NEW_YORK)


def test_session_line_speaks_of_today():
    friday = (_ny("2026-11-20T09:30"), _ny("2026-11-20T16:00"))
    # After Friday's close; the next session (Monday) as state:session names it.
    after = _session("2026-11-20T16:05:00-05:00", open_utc="2026-11-23T14:30:00+00:00", close_utc="2026-11-23T21:00:00+00:00")
    assert cli.session_line(after, friday) == \
        "SESSION 2026-11-20T16:05:00 New York, CLOSED (closed at 16:00; next open Mon 09:30)"
    # The day before Thanksgiving's early close: about tomorrow, and said so.
    wednesday = (_ny("2026-11-25T09:30"), _ny("2026-11-25T16:00"))
    before_early = _session("2026-11-25T17:00:00-05:00", early_close=True,
                            open_utc="2026-11-27T14:30:00+00:00", close_utc="2026-11-27T18:00:00+00:00")
    line = cli.session_line(before_early, wednesday)
    assert line.endswith("(closed at 16:00; next open Fri 09:30, early close 13:00)") and "(early close)" not in line
    before_open = _session("2026-11-20T08:00:00-05:00", open_utc="2026-11-20T14:30:00+00:00", close_utc="2026-11-20T21:00:00+00:00")
    assert cli.session_line(before_open, friday).endswith("CLOSED (opens 09:30)")
    saturday = _session("2026-11-21T12:00:00-05:00", open_utc="2026-11-23T14:30:00+00:00", close_utc="2026-11-23T21:00:00+00:00")
    assert cli.session_line(saturday, None).endswith("CLOSED (no session today; next open Mon 09:30)")
    black_friday = _session("2026-11-27T12:50:00-05:00", regime="CLOSE", market_open=True, minutes_to_close=10.0, early_close=True)
    assert cli.session_line(black_friday, (_ny("2026-11-27T09:30"), _ny("2026-11-27T13:00"))) == \
        "SESSION 2026-11-27T12:50:00 New York, CLOSE, 10.0 min to close (early close today at 13:00)"


def test_today_session_from_the_exchange_calendar():
    assert cli.today_session("XNYS", "2026-11-27T17:00:00-05:00")[1].strftime("%H:%M") == "13:00"
    assert cli.today_session("XNYS", "2026-11-28T12:00:00-05:00") is None  # a Saturday


def test_halt_acknowledgements_are_judged_by_event_and_state():
    from qe.operator_ack import OperatorAck, judge

    def ack(event_id: str, halted: bool) -> OperatorAck:
        return OperatorAck(daemon="d", control_event_id=event_id, command="halt" if halted else "resume", halted=halted, ts_ns=1)

    outcome = judge({"decision": ack("e1", True), "execution": ack("e0", True)}, "e1", "halt")
    assert set(outcome.acknowledged) == {"decision"} and "another control event" in outcome.missing["execution"]
    assert not outcome.complete
    assert judge({"decision": ack("e1", True)}, "e1", "resume").missing == {"decision": "applied it but reports halted=True"}
    assert judge({"execution": None}, "e1", "halt").missing == {"execution": "no acknowledgement"}
    assert judge({"decision": ack("e1", False), "execution": ack("e1", False)}, "e1", "resume").complete
