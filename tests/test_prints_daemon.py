"""qe-prints as a real subprocess on a real Redis: features and state, one feature
per symbol per batch, dedupe of re-sent prints, dead-lettering of malformed
entries, and SIGKILL/restart giving the same features as a run without crashes."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from daemons.prints.core import Rules, SymbolPrints
from daemons.prints.service import feature_payload
from qe import config, streams
from qe.contracts import Feature, Print, make_event
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.support.raw_streams import append, copy

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
CORE_RULES = Rules.from_config(RULES.prints)
VENUES = ["NYSE", "ARCA", "NSDQ", "FNRA", "ADFN", "FINRA"]
SIZES = [10, 15, 20, 50, 100, 200, 300, 400, 150, 1000]


def make_print(symbol: str, n: int, price: float, size: int, venue: str, ts_ns: int, key: str | None = None):
    return make_event(
        Print(symbol=symbol, price=price, size=size, venue=venue, trade_ts_ns=ts_ns),
        idempotency_key=key or f"print:{symbol}:{n}",
        source="test",
        ts_ns=time.time_ns(),
    )


def random_prints(symbols: list[str], count: int, seed: int, base_ns: int) -> list:
    rng = random.Random(seed)
    events = []
    for n in range(count):
        symbol = symbols[n % len(symbols)]
        price = rng.randint(2440, 2460) / 100
        events.append(make_print(symbol, n, price, rng.choice(SIZES), rng.choice(VENUES), base_ns + n * 1_000_000))
    return events


def publish(r: redis.Redis, events) -> None:
    publisher = streams.Publisher(r, RULES)
    for start in range(0, len(events), 200):
        publisher.publish("ev.prints", *events[start:start + 200])


def reference_features(events, now_ns: int) -> dict[str, Feature]:
    """What the worker must end with: the core fed the same prints in stream order."""
    symbols: dict[str, SymbolPrints] = {}
    for event in events:
        p = event.payload
        prints = symbols.setdefault(p.symbol, SymbolPrints(CORE_RULES))
        prints.add(prints.record(event.idempotency_key, p.price, p.size, p.venue, p.trade_ts_ns))
    return {symbol: feature_payload(symbol, prints.evaluate(now_ns)) for symbol, prints in symbols.items()}


def stored_feature(r: redis.Redis, symbol: str) -> Feature | None:
    raw = r.hgetall(f"state:features:{symbol}")
    if not raw:
        return None
    fields = {k.decode(): json.loads(v) for k, v in raw.items()}
    return Feature.model_validate({name: fields[name] for name in Feature.model_fields if name in fields})


def feature_events(r: redis.Redis) -> list[tuple[str, dict]]:
    return [(f[b"idk"].decode(), json.loads(f[b"event"])) for _id, f in r.xrange("ev.features")]


SPAWNED: list[DaemonProcess] = []


@pytest.fixture
def rules_path(tmp_path: Path) -> Path:
    return write_rules(tmp_path, runtime={"block_ms": 200, "backoff_base_s": 0.05, "backoff_cap_s": 0.5}, prints={"batch_size": 50})


@pytest.fixture(autouse=True)
def spawned():
    """Every daemon a test starts is killed at teardown, even when the test fails."""
    yield SPAWNED
    while SPAWNED:
        SPAWNED.pop().kill()


def start_worker(redis_url: str, rules_path: Path, tmp_path: Path, name: str = "prints.log") -> DaemonProcess:
    env = daemon_env(redis_url, QE_CONFIG=rules_path, QE_CONSUMER_NAME="prints-1")
    process = DaemonProcess(console_script("qe-prints"), env, tmp_path / name).start()
    SPAWNED.append(process)
    return process


def processed(r: redis.Redis) -> int:
    groups = r.xinfo_groups(copy("ev.prints", "prints")) if r.exists(copy("ev.prints", "prints")) else []
    group = next((g for g in groups if g["name"] == b"prints"), None)
    if group is None:
        return 0
    return group["entries-read"] - group["pending"] if group["entries-read"] is not None else 0


def test_features_match_the_core_and_one_feature_per_symbol_per_batch(redis_url, r, tmp_path, rules_path):
    base = time.time_ns() - 60 * 1_000_000_000
    events = random_prints(["CIM PRB", "AGNCN"], 40, seed=1, base_ns=base)  # 20 each, one batch of 50
    publish(r, events)
    worker = start_worker(redis_url, rules_path, tmp_path)
    wait_until(lambda: processed(r) == 40, message="40 prints handled")
    expected = reference_features(events, time.time_ns())
    for symbol in ("CIM PRB", "AGNCN"):
        assert stored_feature(r, symbol) == expected[symbol]
        assert expected[symbol].grpan_price is not None
    published = feature_events(r)
    # All 40 prints came in one batch: exactly one feature per symbol, keyed by its last print.
    assert sorted(key for key, _ in published) == ["feature:AGNCN:print:AGNCN:39", "feature:CIM PRB:print:CIM PRB:38"]
    assert r.llen("state:prints:buffer:CIM PRB") == 20
    assert worker.terminate() == 0


def test_a_re_sent_print_is_counted_once(redis_url, r, tmp_path, rules_path):
    now = time.time_ns()
    first = make_print("NLY PRF", 1, 25.10, 100, "NYSE", now)
    worker = start_worker(redis_url, rules_path, tmp_path)
    publish(r, [first])
    wait_until(lambda: stored_feature(r, "NLY PRF") is not None, message="first feature")
    # The same print again (a reconnect or a getTicks overlap): new event id, same key.
    again = make_print("NLY PRF", 1, 25.10, 100, "NYSE", now)
    second = make_print("NLY PRF", 2, 25.20, 100, "NYSE", now + 1_000_000)
    publish(r, [again, second])
    wait_until(lambda: processed(r) == 3, message="all three handled")
    feature = stored_feature(r, "NLY PRF")
    assert feature.print_count == 2
    assert feature.windows["10m"].print_count == 2
    assert r.llen("state:prints:buffer:NLY PRF") == 2
    keys = [key for key, _ in feature_events(r)]
    assert keys == ["feature:NLY PRF:print:NLY PRF:1", "feature:NLY PRF:print:NLY PRF:2"]
    assert worker.terminate() == 0


def test_malformed_entries_go_to_the_dlq_and_the_worker_goes_on(redis_url, r, tmp_path, rules_path):
    worker = start_worker(redis_url, rules_path, tmp_path)
    append(r, "ev.prints", {"type": "print", "idk": "junk", "event": "{not json"})
    bad = json.loads(make_print("PFF", 1, 31.0, 100, "NYSE", time.time_ns()).model_dump_json())
    bad["payload"]["size"] = -5
    append(r, "ev.prints", {"type": "print", "idk": "bad-size", "event": json.dumps(bad)})
    publish(r, [make_print("PFF", 2, 31.05, 100, "ARCA", time.time_ns())])
    wait_until(lambda: r.xlen("ev.dlq") == 2 and stored_feature(r, "PFF") is not None, message="dlq + feature")
    reasons = [fields[b"reason"].decode() for _id, fields in r.xrange("ev.dlq")]
    assert any("invalid payload" in reason for reason in reasons)
    assert any("payload.size" in reason for reason in reasons)
    assert stored_feature(r, "PFF").grpan_price == 31.05
    assert worker.alive()
    assert worker.terminate() == 0


def test_sigkill_and_restart_give_the_same_features_as_an_uninterrupted_run(redis_url, r, tmp_path, rules_path):
    symbols = [f"SYM{i} PRA" for i in range(12)]
    base = time.time_ns() - 120 * 1_000_000_000
    total, chunk = 1800, 300
    events = random_prints(symbols, total, seed=5, base_ns=base)
    small_batches = write_rules(tmp_path, runtime={"block_ms": 200}, prints={"batch_size": 5})
    worker = start_worker(redis_url, small_batches, tmp_path)
    rng = random.Random(3)
    killed_at = []
    for start in range(0, total, chunk):
        publish(r, events[start:start + chunk])
        # Kill once the worker is busy with this chunk: inside a batch, between
        # effects and ack, or in a commit.
        part = start + rng.randint(1, chunk // 2)
        deadline = time.monotonic() + 30
        while processed(r) < part and time.monotonic() < deadline:
            time.sleep(0.001)
        worker.kill()
        killed_at.append(processed(r))
        worker.start()
    wait_until(lambda: processed(r) == total, timeout=60, message="all prints handled")
    before = {symbol: stored_feature(r, symbol) for symbol in symbols}
    expected = reference_features(events, time.time_ns())
    assert before == expected
    # Most kills landed with part of a chunk still to do.
    assert sum(1 for n, start in zip(killed_at, range(0, total, chunk)) if n < start + chunk) >= 4, killed_at

    # Each feature event is published once: no key twice.
    keys = Counter(key for key, _ in feature_events(r))
    assert [key for key, n in keys.items() if n > 1] == []
    # The buffers in Redis hold every print exactly once.
    buffered = sum(r.llen(f"state:prints:buffer:{symbol}") for symbol in symbols)
    assert buffered == total

    # A restart with nothing new publishes nothing and changes nothing ...
    worker.kill()
    features_before = r.xlen("ev.features")
    worker.start()
    wait_until(lambda: any(line.get("msg") == "state loaded" for line in worker.log_lines()[-20:]), message="reloaded")
    time.sleep(0.5)
    assert r.xlen("ev.features") == features_before
    assert {symbol: stored_feature(r, symbol) for symbol in symbols} == before

    # ... and the next print after the restart gives what an uninterrupted worker gives.
    more = [make_print(symbol, 5000 + i, 24.47, 100, "NYSE", base + 10**11 + i) for i, symbol in enumerate(symbols)]
    publish(r, more)
    wait_until(lambda: processed(r) == total + len(symbols), message="new prints handled")
    assert {symbol: stored_feature(r, symbol) for symbol in symbols} == reference_features(events + more, time.time_ns())
    assert worker.terminate() == 0
    assert r.xpending(copy("ev.prints", "prints"), "prints")["pending"] == 0
    assert r.xlen("ev.dlq") == 0


def test_windows_going_stale_are_republished_on_the_clock(redis_url, r, tmp_path):
    rules = write_rules(
        tmp_path,
        runtime={"block_ms": 100},
        prints={"windows_s": {"2s": 2, "1h": 3600}, "stale_check_interval_s": 0.5},
    )
    worker = start_worker(redis_url, rules, tmp_path)
    publish(r, [make_print("DX PRC", 1, 24.60, 100, "NYSE", time.time_ns())])
    wait_until(lambda: stored_feature(r, "DX PRC") is not None, message="feature")
    assert not stored_feature(r, "DX PRC").windows["2s"].stale
    wait_until(lambda: stored_feature(r, "DX PRC").windows["2s"].stale, timeout=10, message="2s window stale")
    feature = stored_feature(r, "DX PRC")
    assert feature.windows["2s"].grpan_price is None
    assert feature.windows["1h"].grpan_price == 24.60 and not feature.windows["1h"].stale
    keys = [key for key, _ in feature_events(r)]
    assert keys == ["feature:DX PRC:print:DX PRC:1", "feature:DX PRC:print:DX PRC:1:stale:2s"]
    assert worker.terminate() == 0


def test_invalid_prints_config_exits_78_naming_the_field(redis_url, tmp_path):
    rules = write_rules(tmp_path, prints={"dark_venues": ["FNRA", "NYSE"], "weight_dark_other": 0.25})
    worker = DaemonProcess(console_script("qe-prints"), daemon_env(redis_url, QE_CONFIG=rules), tmp_path / "p.log").start()
    assert worker.wait(timeout=30) == config.EX_CONFIG
    assert "prints: venues listed as both lit and dark: ['NYSE']" in worker.output()
