"""Least privilege: a private redis-server loaded with the generated ACL file; each
daemon's user can do its own work through the real runtime and is refused outside
its scope."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
import redis

from qe import acl, config, streams
from qe.clock import Clock
from qe.contracts import L1, Control, Intent, intent_id_for, make_event
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until
from tests.support.redis_server import RedisServer

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")


@pytest.fixture
def acl_redis(tmp_path: Path):
    secrets_dir = tmp_path / "secrets"
    acl_file = acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    server = RedisServer(tmp_path / "redis", extra=["--aclfile", str(acl_file)]).start_with_auth(
        "qe-admin", acl.password_file(secrets_dir, acl.ADMIN).read_text().strip()
    )
    yield server, secrets_dir
    server.stop()


def client(server: RedisServer, secrets_dir: Path, daemon: str) -> redis.Redis:
    settings = config.load_settings({"QE_REDIS_URL": server.url, "QE_REDIS_SECRETS_DIR": str(secrets_dir)})
    return streams.connect(settings, RULES, retry_commands=False, user=daemon)


def event(payload, key: str):
    return make_event(payload, idempotency_key=key, source="test", ts_ns=time.time_ns())


def intent(key: str) -> Intent:
    return Intent(
        intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol="CIM PRB", side="SELL", qty=100,
        order_type="LMT", limit_price=24.8, bucket="LT", classification="LT_LONG_DEC", priority=60, ttl_s=60,
        created_ns=time.time_ns(), risk_delta_gross_pct=-0.2, reason="acl test",
    )


def refused(action) -> str:
    """Run an action that must be refused by the ACL; returns "NOPERM: <message>"."""
    with pytest.raises(redis.exceptions.ResponseError) as raised:
        action()
    error = raised.value
    # Plain commands raise NoPermissionError; a refusal inside the Lua commit comes back
    # as a script error saying the script's user cannot access the key.
    text = str(error)
    if isinstance(error, redis.exceptions.NoPermissionError) or "can't access at least one of the keys" in text:
        return f"NOPERM: {text}"
    return text


def test_secrets_are_private_files_and_the_acl_file_holds_only_hashes(tmp_path):
    secrets_dir = tmp_path / "secrets"
    acl_file = acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    text = acl_file.read_text()
    assert "user default off" in text
    for daemon in acl.ACCESS:
        path = acl.password_file(secrets_dir, daemon)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() not in text  # only the SHA-256 is in the ACL file
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    # Re-rendering keeps the passwords (daemons already running keep working).
    before = {d: acl.password_file(secrets_dir, d).read_text() for d in acl.ACCESS}
    acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    assert before == {d: acl.password_file(secrets_dir, d).read_text() for d in acl.ACCESS}


def test_default_user_is_disabled(acl_redis):
    server, _secrets = acl_redis
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port).ping()


def test_each_daemon_is_refused_outside_its_scope(acl_redis):
    server, secrets_dir = acl_redis
    market_data = client(server, secrets_dir, "market-data")
    decision = client(server, secrets_dir, "decision")
    execution = client(server, secrets_dir, "execution")
    exposure = client(server, secrets_dir, "exposure")
    operator = client(server, secrets_dir, "cli")

    # Own work is allowed: market data publishes quotes, the Brain publishes intents.
    streams.Publisher(market_data, RULES).publish("ev.l1", event(L1(symbol="CIM PRB", bid=24.8, ask=24.9), "l1:1"))
    streams.Publisher(decision, RULES).publish("ev.intents", event(intent("intent:acl:1"), "intent:acl:1"))
    assert operator.xlen("ev.intents") == 1 and operator.xlen("ev.l1") == 1

    # Only the Brain writes ev.intents: market data, execution and the operator cannot.
    for name, user in (("market-data", market_data), ("execution", execution), ("cli", operator)):
        message = refused(lambda: user.xadd("ev.intents", {"event": "{}"}))
        assert "NOPERM" in message, (name, message)
    # ... not even through the runtime's Lua commit.
    assert "NOPERM" in refused(
        lambda: streams.Publisher(market_data, RULES).publish("ev.intents", event(intent("intent:acl:2"), "intent:acl:2"))
    )
    # Only execution reads ev.intents: the Brain cannot consume it.
    assert "NOPERM" in refused(lambda: decision.xgroup_create("ev.intents", "decision_engine", id="0"))
    # Only the qe tool writes the operator control stream.
    for user in (decision, execution, market_data):
        assert "NOPERM" in refused(lambda: user.xadd("ev.control", {"event": "{}"}))
    streams.Publisher(operator, RULES).publish("ev.control", event(Control(command="halt", reason="t", operator="op"), "control:1"))
    # State keys belong to their owner.
    assert "NOPERM" in refused(lambda: market_data.hset("state:decision", "mode", "NORMAL"))
    assert "NOPERM" in refused(lambda: exposure.hset("state:orders", "x", "{}"))
    assert "NOPERM" in refused(lambda: execution.delete("state:exposure"))
    assert "NOPERM" in refused(lambda: exposure.flushall())
    assert "NOPERM" in refused(lambda: decision.config_get("*"))


def test_execution_consumes_intents_through_the_runtime_under_its_acl(acl_redis):
    server, secrets_dir = acl_redis
    streams.Publisher(client(server, secrets_dir, "decision"), RULES).publish("ev.intents", event(intent("intent:acl:3"), "intent:acl:3"))
    execution = client(server, secrets_dir, "execution")

    class Forward:
        streams = ("ev.intents", "ev.l1", "ev.control", "ev.session")
        tick_interval_s = None

        def load(self, r) -> None:
            pass

        def handle(self, received, effects) -> None:
            effects.hset("state:orders", {received.idempotency_key: "{}"})

        def tick(self, now_ns, effects) -> None:
            pass

    consumer = streams.Consumer(r=execution, daemon="execution", group="execution_service", handler=Forward(),
                                rules=RULES, clock=Clock(), consumer_name="execution-acl")
    for _ in range(20):
        consumer.run_once()
        if execution.hexists("state:orders", "intent:acl:3"):
            break
    assert execution.hexists("state:orders", "intent:acl:3")
    assert execution.xpending("ev.intents", "execution_service")["pending"] == 0  # XACK allowed
    assert execution.hgetall("state:daemon:execution")  # heartbeat allowed


def test_a_real_daemon_runs_under_its_user_and_never_logs_its_password(acl_redis, tmp_path):
    server, secrets_dir = acl_redis
    env = daemon_env(server.url, QE_REDIS_SECRETS_DIR=str(secrets_dir), QE_CONSUMER_NAME="session-acl")
    session = DaemonProcess(console_script("qe-session"), env, tmp_path / "session.log").start()
    operator = client(server, secrets_dir, "cli")
    wait_until(lambda: operator.xlen("ev.session") >= 2, timeout=30, message="session publishing under its ACL user")
    assert session.terminate() == 0
    log = session.output()
    assert "NOPERM" not in log
    assert acl.password_file(secrets_dir, "session").read_text().strip() not in log
    assert operator.acl_whoami() == "qe-cli"
