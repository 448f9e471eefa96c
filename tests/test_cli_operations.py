"""The operator's commands against real daemons: `qe halt` / `qe resume` succeed only
once the Brain and execution acknowledged them; `qe orders`, `qe fills` and
`qe alerts` read what execution and the Brain really wrote."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from qe import acl, config, operator_ack, state, streams
from qe.contracts import Intent, Print, intent_id_for, make_event, order_ref_for
from sim.testing import start_in_thread
from tests.support.processes import REPO, VENV_BIN, DaemonProcess, console_script, daemon_env, wait_until
from tests.support.redis_server import RedisServer

QE = str(VENV_BIN / "qe")
RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")


def qe(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QE, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def system(redis_url, r, tmp_path):
    """The Brain and execution (against the IB simulator) as real processes, with the
    prints worker so that execution has a trusted reference (truth ticks) for its collar."""
    sim = start_in_thread(quote_rate=0.0, print_rate=0.0)
    env = daemon_env(redis_url, QE_IB_PORT=str(sim.port))
    daemons = {name: DaemonProcess(console_script(f"qe-{name}"), env, tmp_path / f"{name}.log").start()
               for name in ("decision", "execution", "prints")}
    wait_until(lambda: r.hget("state:broker", "connected") == b"true", timeout=30, message="execution connected")
    # Execution refuses increases while the Brain's mode is unknown: wait for the Brain.
    wait_until(lambda: state.read_decision(r).value is not None, timeout=30, message="the Brain's mode")
    try:
        yield env, sim, daemons
    finally:
        codes = {name: process.terminate() for name, process in daemons.items()}
        sim.stop()
        assert codes == {name: 0 for name in daemons}, codes


def intent(r, key: str, symbol: str, side: str, limit_price: float, qty: int = 200) -> None:
    """What the Brain would publish (execution is the writer under test here)."""
    payload = Intent(
        intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol=symbol, side=side, qty=qty, order_type="LMT",
        limit_price=limit_price, bucket="LT", classification="LT_LONG_DEC" if side == "SELL" else "LT_LONG_INC",
        priority=60, ttl_s=600, created_ns=time.time_ns(), risk_delta_gross_pct=-0.5 if side == "SELL" else 0.1,
        reason="test",
    )
    streams.Publisher(r, RULES).publish("ev.intents", make_event(payload, idempotency_key=key, source="test", ts_ns=time.time_ns()))


def statuses(r, key: str) -> list[str]:
    events = [json.loads(fields[b"event"])["payload"] for _id, fields in r.xrange("ev.orders")]
    return [e["status"] for e in events if e["order_ref"] == order_ref_for(key)]


def test_halt_and_resume_are_acknowledged_by_the_brain_and_execution(system, r):
    env, _sim, _daemons = system
    halted = qe(env, "halt", "--reason", "drill", "--operator", "alice")
    assert halted.returncode == 0, halted.stderr
    assert "halted: acknowledged by decision and execution in " in halted.stdout
    assert "(timeout 10 s;" in halted.stdout
    acks = {name: operator_ack.read(r, name) for name in operator_ack.REQUIRED}
    assert all(ack.halted and ack.command == "halt" for ack in acks.values())
    assert acks["decision"].mode == "HALTED"
    assert acks["decision"].control_event_id == acks["execution"].control_event_id

    resumed = json.loads(qe(env, "resume", "--reason", "drill over", "--operator", "alice", "--json").stdout)
    assert resumed["ok"] is True and resumed["command"] == "resume" and resumed["missing"] == {}
    assert set(resumed["acknowledged"]) == {"decision", "execution"}
    assert all(ack["halted"] is False for ack in resumed["acknowledged"].values())
    assert isinstance(resumed["elapsed_s"], float) and resumed["elapsed_s"] < resumed["timeout_s"]

    # The Brain's mode change, written by the Brain, through `qe alerts` and its filters.
    alerts = json.loads(qe(env, "alerts", "--type", "mode_change", "--severity", "critical", "--json").stdout)["alerts"]
    assert alerts and alerts[0]["source"] == "decision" and "alice" in alerts[0]["message"]
    assert all(a["severity"] == "critical" and a["alert_type"] == "mode_change" for a in alerts)
    assert json.loads(qe(env, "alerts", "--symbol", "NOPE", "--json").stdout)["alerts"] == []
    human = qe(env, "alerts", "--since", "10m", "--limit", "1")
    assert human.returncode == 0 and "1 alerts (newest first)" in human.stdout


def test_orders_and_fills_as_execution_wrote_them(system, r):
    env, sim, _daemons = system
    sim.control.set_quote("CIM PRB", bid=24.80, ask=24.82, bid_size=1000, ask_size=1000)
    sim.control.set_quote("AGNCN", bid=25.00, ask=25.10, bid_size=1000, ask_size=1000)
    # Truth ticks through the real prints worker: execution's trusted reference. The
    # prints are published as market data would (its contract, its stream).
    publisher = streams.Publisher(r, RULES)
    for symbol, price in (("CIM PRB", 24.81), ("AGNCN", 25.05)):
        trade = Print(symbol=symbol, price=price, size=100, venue="NYSE", trade_ts_ns=time.time_ns())
        publisher.publish("ev.prints", make_event(trade, idempotency_key=f"print:{symbol}", source="market-data", ts_ns=time.time_ns()))
    wait_until(lambda: {json.loads(f[b"event"])["payload"]["symbol"] for _id, f in r.xrange("ev.features")} >= {"CIM PRB", "AGNCN"},
               timeout=30, message="truth ticks for both symbols")
    intent(r, "intent:cli:fill", "CIM PRB", "SELL", 24.80)
    # A decrease resting above the market (an increase would be refused: the other held
    # symbols have no market price in this test, so they block risk increases).
    intent(r, "intent:cli:rest", "AGNCN", "SELL", 26.00, qty=100)
    wait_until(lambda: "FILLED" in statuses(r, "intent:cli:fill"), timeout=30, message="filled")
    wait_until(lambda: "SUBMITTED" in statuses(r, "intent:cli:rest"), timeout=30, message="resting")

    orders = json.loads(qe(env, "orders", "--json").stdout)
    by_ref = {o["order_ref"]: o for o in orders["orders"]}
    assert by_ref[order_ref_for("intent:cli:fill")]["status"] == "FILLED"
    assert by_ref[order_ref_for("intent:cli:rest")]["status"] == "SUBMITTED"
    assert len(by_ref) == len(orders["orders"])  # each order once, as its latest event says
    only = json.loads(qe(env, "orders", "--symbol", "AGNCN", "--json").stdout)["orders"]
    assert [o["order_ref"] for o in only] == [order_ref_for("intent:cli:rest")]
    working = json.loads(qe(env, "orders", "--status", "submitted", "--json").stdout)["orders"]
    assert [o["symbol"] for o in working] == ["AGNCN"]
    assert json.loads(qe(env, "orders", "--limit", "1", "--json").stdout)["count"] == 1

    fills = json.loads(qe(env, "fills", "--json").stdout)["fills"]
    assert [(f["symbol"], f["side"], f["qty"], f["price"]) for f in fills] == [("CIM PRB", "SELL", 200, 24.80)]
    assert json.loads(qe(env, "fills", "--symbol", "AGNCN", "--json").stdout)["fills"] == []
    table = qe(env, "fills")
    assert table.returncode == 0 and "CIM PRB" in table.stdout and "1 fills" in table.stdout
    assert "FILLED" in qe(env, "orders").stdout


def test_halt_against_a_redis_where_nobody_runs_fails_within_the_timeout(redis_url):
    env = daemon_env(redis_url)
    started = time.monotonic()
    result = qe(env, "halt", "--reason", "x", "--timeout", "1.5")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "halt NOT confirmed within 1.5 s: nobody acknowledged" in result.stderr
    assert "decision did not acknowledge" in result.stderr and "execution did not acknowledge" in result.stderr
    assert "daemon absent" in result.stderr
    assert elapsed < 1.5 + 5  # the timeout plus the interpreter's start
    as_json = json.loads(qe(env, "--json", "resume", "--reason", "x", "--timeout", "0.5").stdout)
    assert as_json["ok"] is False and set(as_json["missing"]) == {"decision", "execution"}
    assert as_json["redis"]["url"] == redis_url and as_json["redis"]["source"] == "QE_REDIS_URL"


def test_halt_is_acknowledged_under_least_privilege(tmp_path):
    """Each daemon as its own ACL user (as in the demo): the liveness beat, the
    acknowledgements in the Brain's and execution's commits and qe's reads are allowed."""
    secrets_dir = tmp_path / "secrets"
    acl_file = acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    server = RedisServer(tmp_path / "redis", extra=["--aclfile", str(acl_file)]).start_with_auth(
        "qe-admin", acl.password_file(secrets_dir, acl.ADMIN).read_text().strip())
    sim = start_in_thread(quote_rate=0.0, print_rate=0.0)
    env = daemon_env(server.url, QE_IB_PORT=str(sim.port), QE_REDIS_SECRETS_DIR=str(secrets_dir))
    daemons = {name: DaemonProcess(console_script(f"qe-{name}"), env, tmp_path / f"{name}.log").start()
               for name in ("decision", "execution")}
    try:
        wait_until(lambda: qe(env, "status", "--daemons", "decision,execution").returncode == 0, timeout=30,
                   message="decision and execution ok")
        halted = qe(env, "halt", "--reason", "drill")
        assert halted.returncode == 0, halted.stderr
        assert "acknowledged by decision and execution" in halted.stdout
        assert qe(env, "resume", "--reason", "drill over").returncode == 0
    finally:
        codes = {name: process.terminate() for name, process in daemons.items()}
        sim.stop()
        server.stop()
    assert codes == {"decision": 0, "execution": 0}, codes
    for name, process in daemons.items():
        assert "NOPERM" not in process.output(), name
