"""The stream runtime under faults, with the consumer as a real subprocess:
SIGKILL at any point, Redis kill -9, SIGTERM, invalid configuration."""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
import yaml

from qe import config, streams
from qe.contracts import L1, make_event
from tests.support.processes import REPO, DaemonProcess, daemon_env, wait_until, write_rules
from tests.support.raw_streams import copy
from tests.support.redis_server import CONSUMES

L1_COPY = copy("ev.l1", "test_counter")  # where the counter daemon's group reads ev.l1

COUNTER = [sys.executable, str(REPO / "tests" / "support" / "counter_daemon.py")]
RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")


def publish_l1(r: redis.Redis, symbol: str, numbers) -> None:
    events = [
        make_event(
            L1(symbol=symbol, bid=24.0, ask=24.1, bid_size=100, ask_size=100),
            idempotency_key=f"l1:{symbol}:{n}",
            source="test",
            ts_ns=time.time_ns(),
        )
        for n in numbers
    ]
    streams.Publisher(r, RULES).publish("ev.l1", *events)


def processed(r: redis.Redis) -> int:
    return r.llen("test:log")


def assert_exactly_once(r: redis.Redis, expected_keys: set[str]) -> None:
    log = [item.decode() for item in r.lrange("test:log", 0, -1)]
    duplicates = {key: n for key, n in Counter(log).items() if n > 1}
    assert duplicates == {}, f"effects applied twice: {duplicates}"
    assert set(log) == expected_keys
    counts = {k.decode(): int(v) for k, v in r.hgetall("test:count").items()}
    assert sum(counts.values()) == len(expected_keys)


@pytest.fixture
def fast_rules(tmp_path: Path) -> Path:
    return write_rules(tmp_path, runtime={"block_ms": 200, "backoff_base_s": 0.05, "backoff_cap_s": 0.5, "batch_size": 20})


def test_sigkill_at_any_point_never_applies_an_effect_twice(redis_url, r, tmp_path, fast_rules):
    keys = {f"l1:CIM PRB:{n}" for n in range(400)}
    publish_l1(r, "CIM PRB", range(400))
    env = daemon_env(redis_url, QE_CONFIG=fast_rules, TEST_SLEEP_S="0.002", QE_CONSUMER_NAME="counter-1")
    daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
    rng = random.Random(7)
    kills = 0
    while processed(r) < 400 and kills < 8:
        time.sleep(rng.uniform(0.05, 0.4))  # lands inside handling, between effect and ack, or in a commit
        daemon.kill()
        kills += 1
        daemon.start()
    wait_until(lambda: processed(r) >= 400, timeout=60, message="all 400 events processed")
    time.sleep(0.3)
    assert daemon.terminate() == 0
    assert kills >= 3
    assert_exactly_once(r, keys)
    assert r.xpending(L1_COPY, "test_counter")["pending"] == 0
    assert r.xlen("ev.dlq") == 0


def test_redis_kill9_and_restart_during_blocking_read_loses_nothing(own_redis, tmp_path, fast_rules):
    r = own_redis.client()
    env = daemon_env(own_redis.url, QE_CONFIG=fast_rules, QE_CONSUMER_NAME="counter-1")
    daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
    publish_l1(r, "AGNCN", range(50))
    wait_until(lambda: processed(r) == 50, message="first 50 processed")
    time.sleep(0.3)  # the consumer is now blocked in XREADGROUP
    own_redis.kill()
    time.sleep(1.5)
    assert daemon.alive(), "consumer must ride out the outage"
    own_redis.start()
    r = own_redis.client()
    publish_l1(r, "AGNCN", range(50, 100))
    wait_until(lambda: processed(r) == 100, timeout=30, message="all 100 processed after restart")
    assert daemon.terminate() == 0
    assert_exactly_once(r, {f"l1:AGNCN:{n}" for n in range(100)})
    logs = daemon.log_lines()
    assert any(line.get("msg") == "redis error; backing off" for line in logs)
    assert any(line.get("msg") == "redis reachable again" for line in logs)


def test_sigterm_finishes_the_batch_in_hand_and_exits_0(redis_url, r, tmp_path):
    rules = write_rules(tmp_path, runtime={"batch_size": 40, "block_ms": 200})
    publish_l1(r, "NLY PRF", range(40))
    env = daemon_env(redis_url, QE_CONFIG=rules, TEST_SLEEP_S="0.05", QE_CONSUMER_NAME="counter-1")
    daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
    # Wait until the batch of 40 is delivered (pending) but not yet committed (~2 s of work).
    wait_until(
        lambda: r.exists(L1_COPY) and r.xinfo_groups(L1_COPY) and r.xpending(L1_COPY, "test_counter")["pending"] == 40,
        message="batch delivered",
    )
    assert processed(r) == 0
    started = time.monotonic()
    assert daemon.terminate(timeout=10) == 0
    assert time.monotonic() - started < 10  # well within supervisord's stopwaitsecs
    assert processed(r) == 40  # the whole batch was finished and committed
    assert r.xpending(L1_COPY, "test_counter")["pending"] == 0
    assert any(line.get("msg") == "stop requested" and line.get("signal") == "SIGTERM" for line in daemon.log_lines())


def test_poison_entry_in_a_subprocess_goes_to_dlq_and_the_daemon_keeps_going(redis_url, r, tmp_path):
    rules = write_rules(tmp_path, runtime={"block_ms": 100, "max_deliveries": 3, "backoff_base_s": 0.01, "handler_retry_cap_s": 0.05})
    publish_l1(r, "PFF", range(3))
    publish_l1(r, "TWO PRB", [1])  # the handler raises for this symbol
    publish_l1(r, "PFF", range(3, 6))
    env = daemon_env(redis_url, QE_CONFIG=rules, TEST_FAIL_SYMBOL="TWO PRB", QE_CONSUMER_NAME="counter-1")
    daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
    wait_until(lambda: processed(r) == 6 and r.xlen("ev.dlq") == 1, timeout=20, message="poison dead-lettered")
    dead = r.xrange("ev.dlq")[0][1]
    assert dead[b"origin_stream"] == b"ev.l1"
    assert dead[b"label"] == b"max_deliveries"
    assert b"RuntimeError: cannot handle TWO PRB" in dead[b"reason"]
    assert daemon.alive()
    assert daemon.terminate() == 0
    assert_exactly_once(r, {f"l1:PFF:{n}" for n in range(6)})


# --- configuration: every invalid field is named precisely, exit 78 -----------------------

INVALID_RULES = [
    (("runtime", "block_ms"), 6000, "runtime: block_ms (6000) must be below socket_timeout_s*1000 (5000)"),
    (("runtime", "batch_size"), 0, "runtime.batch_size: Input should be greater than or equal to 1 (got 0)"),
    (("runtime", "max_deliveries"), "many", "runtime.max_deliveries: Input should be a valid integer"),
    (("runtime", "claim_min_idle_s"), -1, "runtime.claim_min_idle_s: Input should be greater than 0 (got -1)"),
    (("runtime", "group_start_id"), "1-0", "runtime.group_start_id: Input should be '0' or '$'"),
    (("runtime", "backoff_cap_s"), 0.01, "runtime: backoff_cap_s must be >= backoff_base_s"),
    (("runtime", "unknown_knob"), 1, "runtime.unknown_knob: Extra inputs are not permitted"),
    (("streams", "ev.intents"), {"maxlen": 1000}, "streams.ev.intents: must keep a whole trading day"),
    (("streams", "ev.l1"), {"maxlen": 10, "minid_age_s": 10}, "streams.ev.l1: set exactly one of maxlen or minid_age_s"),
    (("streams", "ev.l1"), {"maxlen": -5}, "streams.ev.l1.maxlen: Input should be greater than 0 (got -5)"),
    (("streams", "ev.nonsense"), {"maxlen": 5}, "streams: unknown stream(s) ['ev.nonsense']"),
    (("schema_version",), 2, "schema_version: Input should be 1 (got 2)"),
]


def mutated_rules(tmp_path: Path, location: tuple[str, ...], value) -> Path:
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    target = document
    for part in location[:-1]:
        target = target[part]
    target[location[-1]] = value
    path = tmp_path / "risk_rules.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("location, value, message", INVALID_RULES, ids=[".".join(c[0]) for c in INVALID_RULES])
def test_each_invalid_rule_is_named_precisely(tmp_path, location, value, message):
    path = mutated_rules(tmp_path, location, value)
    with pytest.raises(config.ConfigError) as raised:
        config.load_rules(path)
    assert message in str(raised.value)
    assert str(path) in str(raised.value)


def test_missing_stream_retention_is_named(tmp_path):
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    del document["streams"]["ev.session"]
    path = tmp_path / "risk_rules.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(config.ConfigError, match=r"streams: no retention rule for \['ev.session'\]"):
        config.load_rules(path)


def test_bad_environment_is_named_by_variable():
    with pytest.raises(config.ConfigError, match="QE_REDIS_URL: unknown scheme .http."):
        config.load_settings({"QE_REDIS_URL": "http://nope"})
    with pytest.raises(config.ConfigError, match="QE_METRICS_PORT: Input should be less than or equal to 65535"):
        config.load_settings({"QE_METRICS_PORT": "70000"})


def test_password_file_must_be_private(tmp_path):
    secret = tmp_path / "redis.pass"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    with pytest.raises(config.ConfigError, match="must not be readable by group/others"):
        config.load_settings({"QE_REDIS_PASSWORD_FILE": str(secret)})
    secret.chmod(0o600)
    settings = config.load_settings({"QE_REDIS_PASSWORD_FILE": str(secret)})
    assert settings.redis_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


def test_daemon_with_invalid_config_exits_78_naming_the_field(redis_url, tmp_path):
    path = mutated_rules(tmp_path, ("runtime", "batch_size"), -3)
    env = daemon_env(redis_url, QE_CONFIG=path)
    daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
    assert daemon.wait(timeout=30) == config.EX_CONFIG
    output = daemon.output()
    assert "qe-test-counter: invalid configuration:" in output
    assert "runtime.batch_size: Input should be greater than or equal to 1 (got -3)" in output


# --- lag and trim detection across Redis restarts (rule 7) ------------------------------------------

GROUP = "test_counter"


def trim_reports(r: redis.Redis) -> list[dict[str, str]]:
    reports = [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in r.xrange("ev.dlq")]
    return [d for d in reports if d["label"] == "trimmed_unread"]


def heartbeats(r: redis.Redis) -> int:
    raw = r.hget("state:daemon:test-counter", "ts_ns")
    return int(raw) if raw else 0


def wait_housekeeping(r: redis.Redis, rounds: int = 3) -> None:
    """Several housekeeping passes (heartbeat, lag, rule 7 check) after this moment."""
    for _ in range(rounds):
        seen = heartbeats(r)
        wait_until(lambda: heartbeats(r) > seen, timeout=15, message="housekeeping")


def our_lag(r: redis.Redis) -> dict:
    return next(g for g in streams.group_lags(r, ["ev.l1"], CONSUMES)["ev.l1"] if g["name"] == GROUP.encode())


@pytest.fixture
def housekeeping_rules(tmp_path: Path) -> Path:
    return write_rules(tmp_path, runtime={"block_ms": 200, "backoff_base_s": 0.05, "backoff_cap_s": 0.5, "housekeeping_interval_s": 0.2})


@pytest.mark.parametrize("persistence", ["aof", "rdb"])
def test_a_redis_restart_raises_no_false_trim_alarm_and_no_lag(tmp_path, housekeeping_rules, persistence):
    from tests.support.redis_server import RedisServer

    extra = [] if persistence == "aof" else ["--appendonly", "no"]
    server = RedisServer(tmp_path / f"redis-{persistence}", fsync="always", extra=extra).start()
    try:
        r = server.client()
        publish_l1(r, "AGNCN", range(5))  # the stream exists before the group: ENTRIESREAD at creation
        env = daemon_env(server.url, QE_CONFIG=housekeeping_rules, QE_CONSUMER_NAME="counter-1")
        daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
        publish_l1(r, "AGNCN", range(5, 60))
        wait_until(lambda: processed(r) == 60, message="60 processed")
        wait_housekeeping(r)
        if persistence == "rdb":
            r.save()
        server.kill()
        server.start()
        r = server.client()
        group = next(g for g in r.xinfo_groups(L1_COPY) if g["name"] == GROUP.encode())
        if persistence == "aof":
            # Redis 7.0 replays the group's creation, not its reads: its own lag is wrong now
            # (an RDB keeps entries-read; the test then shows no harm done either).
            assert group["pending"] == 0 and group["lag"] > 0, group
        publish_l1(r, "AGNCN", range(60, 80))
        wait_until(lambda: processed(r) == 80, timeout=30, message="all 80 processed after the restart")
        wait_housekeeping(r)
        assert trim_reports(r) == []
        assert r.xinfo_groups(L1_COPY)[0]["pending"] == 0
        assert our_lag(r)["lag"] == 0
        assert daemon.terminate() == 0
        assert_exactly_once(r, {f"l1:AGNCN:{n}" for n in range(80)})
    finally:
        server.stop()


def test_a_real_trim_of_unread_entries_is_reported_once_also_after_a_redis_restart(own_redis, tmp_path, housekeeping_rules):
    r = own_redis.client()
    env = daemon_env(own_redis.url, QE_CONFIG=housekeeping_rules, QE_CONSUMER_NAME="counter-1")
    daemon = DaemonProcess(COUNTER, env, tmp_path / "counter.log").start()
    publish_l1(r, "AGNCN", range(30))
    wait_until(lambda: processed(r) == 30, message="30 processed")
    wait_housekeeping(r)
    assert daemon.terminate() == 0
    own_redis.restart()  # kill -9 and back from the AOF: the group's read counter is lost
    r = own_redis.client()
    publish_l1(r, "AGNCN", range(30, 80))  # 50 unread...
    r.xtrim(L1_COPY, maxlen=10, approximate=False)  # ...of which retention trims 40
    assert our_lag(r)["lag"] == 10
    daemon.start()
    wait_until(lambda: processed(r) == 40, timeout=30, message="the 10 left processed")
    wait_housekeeping(r)
    reports = trim_reports(r)
    assert len(reports) == 1, reports
    assert reports[0]["reason"].startswith(f"40 entries of ev.l1 were trimmed before group {GROUP} read them")
    # The group keeps reading: a later trim of entries it did not read yet is reported too.
    assert daemon.terminate() == 0
    publish_l1(r, "AGNCN", range(80, 100))
    r.xtrim(L1_COPY, maxlen=5, approximate=False)
    daemon.start()
    wait_until(lambda: processed(r) == 45, timeout=30, message="the 5 left processed")
    wait_housekeeping(r)
    reports = trim_reports(r)
    assert [d["reason"].split(" entries")[0] for d in reports] == ["40", "15"], reports
    assert our_lag(r)["lag"] == 0
    assert daemon.terminate() == 0
