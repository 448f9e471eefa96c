"""qe-market-data (Hammer source) as a real subprocess against the fake Hammer Pro
server (tests/support/fake_hammer.py) and a real Redis."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis

from qe import config, state, streams
from qe.clock import sim_env
from qe.contracts import Order, Session, make_event
from tests.support.fake_hammer import FakeHammer
from tests.support.processes import DaemonProcess, console_script, daemon_env, wait_until, write_rules

SYMBOLS = ["CIM PRB", "AGNCN", "NYCB PRU"] + [f"ZZ{chr(65 + i // 26)}{chr(65 + i % 26)} PRA" for i in range(117)]  # 120
# Trade times near the daemon's clock: prints older than plausibility.prints.max_age_s or
# ahead of it by more than max_future_skew_s are not published.
T0_MS = (time.time_ns() // 1_000_000 // 1000 - 600) * 1000
NEW_YORK = ZoneInfo("America/New_York")


SPAWNED: list[DaemonProcess] = []


@pytest.fixture
def hammer():
    server = FakeHammer(password="right-password").start()
    yield server
    server.stop()


def write_universe(directory: Path, symbols=SYMBOLS) -> Path:
    path = directory / "universe.csv"
    rows = ["symbol,bucket_hint,adv,group,ref_price"] + [f"{s},LT,50000,G,24.50" for s in symbols]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_password(directory: Path, password: str) -> Path:
    path = directory / "hammer.pass"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def spawned():
    """Every daemon a test starts is killed at teardown, even when the test fails."""
    yield SPAWNED
    while SPAWNED:
        SPAWNED.pop().kill()


def start_market_data(
    redis_url, tmp_path, hammer: FakeHammer, password="right-password", env: dict | None = None, **market_data
) -> DaemonProcess:
    section = {
        "source": "hammer",
        "reconnect_base_s": 0.2,
        "reconnect_cap_s": 1.0,
        "hammer": {"ticks_sweep_interval_s": 0.3, "ticks_last_few": 20, "request_timeout_s": 3},
        **market_data,
    }
    rules = write_rules(tmp_path, market_data=section)
    env = daemon_env(
        redis_url,
        QE_CONFIG=rules,
        QE_UNIVERSE=write_universe(tmp_path),
        QE_HAMMER_URL=hammer.url,
        QE_HAMMER_PASSWORD_FILE=write_password(tmp_path, password),
        **(env or {}),
    )
    process = DaemonProcess(console_script("qe-market-data"), env, tmp_path / "market-data.log").start()
    SPAWNED.append(process)
    return process


def stream_events(r: redis.Redis, stream: str) -> list[dict]:
    return [json.loads(fields[b"event"]) for _id, fields in r.xrange(stream)]


def prints_of(r: redis.Redis, symbol: str) -> list[dict]:
    return [e for e in stream_events(r, "ev.prints") if e["payload"]["symbol"] == symbol]


def alerts(r: redis.Redis) -> list[str]:
    """Alert types as published; a resolved one as "<type>:resolved" (the contract's state)."""
    return [e["payload"]["alert_type"] + (":resolved" if e["payload"]["state"] == "resolved" else "")
            for e in stream_events(r, "ev.alerts")]


def test_quotes_and_prints_flow_subscribed_in_batches_of_50_without_duplicate_prints(redis_url, r, tmp_path, hammer):
    for n in range(5):
        hammer.add_trade("CIM-B", T0_MS + n * 1000, 24.80 + n / 100, 100, "NYSE")
    # Two genuinely identical prints (same ms, price, size, venue): both are real.
    hammer.add_trade("CIM-B", T0_MS + 9000, 24.90, 100, "FNRA")
    hammer.add_trade("CIM-B", T0_MS + 9000, 24.90, 100, "FNRA")
    t0_new_york = datetime.fromtimestamp(T0_MS / 1000, tz=NEW_YORK)
    hammer.add_trade("AGNCN", (t0_new_york.replace(microsecond=250_000)).isoformat(timespec="milliseconds"), 25.31, 300, "ARCA")
    naive = (t0_new_york.replace(tzinfo=None) + timedelta(seconds=1)).isoformat()
    hammer.add_trade("AGNCN", naive, 25.32, 100, "ARCA")  # no offset: New York time
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: hammer.authenticated_clients() and sum(hammer.authenticated_clients()[0].subscribe_batches) == 120,
               timeout=20, message="subscribed")
    assert hammer.authenticated_clients()[0].subscribe_batches == [50, 50, 20]

    for n in range(3):
        hammer.push_l1("CIM-B", bid=24.84, ask=24.88 + n / 100, last=24.86, size=100, venue="NYSE", volume=1000 + n)
    hammer.push_l1("NYCB-U", bid=18.40, ask=18.47, last=18.45, size=200, venue="ARCA", volume=5000)
    wait_until(lambda: r.xlen("ev.l1") >= 4, message="4 quotes")
    quotes = stream_events(r, "ev.l1")
    assert {q["payload"]["symbol"] for q in quotes} == {"CIM PRB", "NYCB PRU"}
    last_cim = [q for q in quotes if q["payload"]["symbol"] == "CIM PRB"][-1]["payload"]
    assert (last_cim["bid"], last_cim["ask"], last_cim["last"], last_cim["last_size"]) == (24.84, 24.90, 24.86, 100)

    wait_until(lambda: len(prints_of(r, "CIM PRB")) == 7 and len(prints_of(r, "AGNCN")) == 2, message="first prints")
    # Keep polling (overlapping getTicks replies), then add two more trades.
    polls = hammer.ticks_requests("CIM-B")
    wait_until(lambda: hammer.ticks_requests("CIM-B") >= polls + 3, message="more overlapping polls")
    hammer.add_trade("CIM-B", T0_MS + 10_000, 24.91, 200, "ADFN")
    hammer.add_trade("CIM-B", T0_MS + 11_000, 24.92, 20, "NSDQ")
    wait_until(lambda: len(prints_of(r, "CIM PRB")) == 9, message="new prints")
    time.sleep(1.0)  # several more overlapping polls
    cim = prints_of(r, "CIM PRB")
    assert len(cim) == 9, "an overlapping getTicks reply must not publish a print twice"
    keys = Counter(e["idempotency_key"] for e in stream_events(r, "ev.prints"))
    assert max(keys.values()) == 1
    twins = [e for e in cim if e["payload"]["price"] == 24.90]
    assert len(twins) == 2 and twins[0]["idempotency_key"] != twins[1]["idempotency_key"]
    assert twins[0]["payload"]["trade_ts_ns"] == (T0_MS + 9000) * 1_000_000
    assert twins[0]["payload"]["venue"] == "FNRA"
    agncn = [e["payload"]["trade_ts_ns"] for e in prints_of(r, "AGNCN")]
    assert sorted(agncn) == [T0_MS * 1_000_000 + 250_000_000, (T0_MS + 1000) * 1_000_000]
    assert md.terminate() == 0


def test_malformed_messages_are_skipped_and_counted(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: hammer.authenticated_clients() and hammer.authenticated_clients()[0].subscribe_batches, message="subscribed")
    time.sleep(0.3)
    hammer.send_raw("{this is not json")
    hammer.send_raw("[1, 2, 3]")
    hammer.push_l1("CIM-B", bid="abc", ask=24.9)
    hammer.send_raw(json.dumps({"cmd": "L1Update", "result": {"sym": "NOT A SYMBOL!", "bid": 1.0}}))
    hammer.send_raw(json.dumps({"cmd": "L1Update", "result": {"sym": "QQQQ", "bid": 1.0}}))  # not in the universe
    hammer.send_raw(json.dumps({"cmd": "L1Update", "result": ["no", "object"]}))
    hammer.push_l1("AGNCN", bid=25.30, ask=25.35, last=25.32, size=100, volume=10)
    wait_until(lambda: r.xlen("ev.l1") == 1, message="the good quote")
    assert stream_events(r, "ev.l1")[0]["payload"]["symbol"] == "AGNCN"
    logs = [line for line in md.log_lines() if line.get("msg") == "malformed feed message skipped"]
    assert {line["reason"] for line in logs} == {"bad_json", "not_an_object", "bad_bid", "bad_l1", "unknown_symbol"}
    assert md.alive()
    assert md.terminate() == 0


def test_auth_failure_gives_a_clear_error_and_retries(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer, password="wrong-password")
    wait_until(lambda: len(hammer.auth_attempts) >= 3, timeout=20, message="three attempts")
    assert all(not ok for _pwd, ok in hammer.auth_attempts)
    errors = [line for line in md.log_lines() if line.get("msg") == "feed connection failed; retrying"]
    assert errors and "Hammer Pro refused the password from QE_HAMMER_PASSWORD_FILE" in errors[0]["error"]
    assert errors[0]["level"] == "error"
    assert md.alive()
    wait_until(lambda: "feed_auth_failed" in alerts(r), message="auth alert")
    # The operator fixes the password on the Hammer side: the next retry gets in.
    hammer.password = "wrong-password"
    wait_until(lambda: hammer.authenticated_clients(), timeout=20, message="authenticated")
    wait_until(lambda: hammer.authenticated_clients()[0].subscribe_batches == [50, 50, 20], message="subscribed")
    hammer.push_l1("AGNCN", bid=25.30, ask=25.35)
    wait_until(lambda: r.xlen("ev.l1") == 1, message="quote after auth")
    assert md.terminate() == 0


def test_server_drop_reconnects_resubscribes_and_publishes_no_duplicate_prints(redis_url, r, tmp_path, hammer):
    for n in range(10):
        hammer.add_trade("NYCB-U", T0_MS + n * 500, 18.40 + n / 100, 100 * (n % 3 + 1), "NYSE")
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: len(prints_of(r, "NYCB PRU")) == 10, message="first prints")
    first = hammer.authenticated_clients()[0]
    hammer.drop_connections()
    wait_until(
        lambda: [c for c in hammer.authenticated_clients() if c is not first and sum(c.subscribe_batches) == 120],
        timeout=20, message="reconnected and re-subscribed",
    )
    second = [c for c in hammer.authenticated_clients() if c is not first][0]
    assert second.subscribe_batches == [50, 50, 20]
    wait_until(lambda: hammer.ticks_requests("NYCB-U") >= 3, message="polling after reconnect")
    hammer.add_trade("NYCB-U", T0_MS + 20_000, 18.55, 200, "FNRA")
    wait_until(lambda: len(prints_of(r, "NYCB PRU")) == 11, message="the new print")
    hammer.push_l1("NYCB-U", bid=18.50, ask=18.56, volume=99)
    wait_until(lambda: r.xlen("ev.l1") >= 1, message="quotes after reconnect")
    time.sleep(0.8)
    assert len(prints_of(r, "NYCB PRU")) == 11
    wait_until(lambda: {"feed_disconnected", "feed_disconnected:resolved"} <= set(alerts(r)), message="alerts")
    assert md.terminate() == 0

    # A restarted daemon re-reads the same tape: still nothing twice.
    polls = hammer.ticks_requests("NYCB-U")
    md2 = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: hammer.ticks_requests("NYCB-U") >= polls + 3, message="polls by the new process")
    time.sleep(0.5)
    assert len(prints_of(r, "NYCB PRU")) == 11
    assert md2.terminate() == 0


def test_silent_feed_in_market_hours_goes_stale_alerts_and_resubscribes(redis_url, r, tmp_path, hammer):
    # The session daemon says the market is open (kept fresh by the test).
    def session_open():
        now = time.time_ns()
        session = Session(now_ns=now, now_utc="-", now_ny="-", trading_day="2026-11-20", market_open=True, regime="MID",
                          minutes_to_close=60.0, soft_derisk_active=False, hard_derisk_active=False, early_close=False)
        event = make_event(session, idempotency_key=f"session:{now}", source="session", ts_ns=now)
        r.hset(state.SESSION, mapping=state.snapshot_fields(event))  # the session daemon's writer

    session_open()
    md = start_market_data(redis_url, tmp_path, hammer, stale_after_s=1.5)
    wait_until(lambda: hammer.authenticated_clients(), message="connected")
    client = hammer.authenticated_clients()[0]
    wait_until(lambda: (session_open(), "feed_stale" in alerts(r))[1], timeout=15, message="stale alert")
    wait_until(lambda: (session_open(), sum(client.subscribe_batches) >= 240)[1], timeout=15, message="re-subscribed")
    assert client.subscribe_batches[:6] == [50, 50, 20, 50, 50, 20]
    heartbeat = r.hgetall("state:daemon:market-data")
    wait_until(lambda: r.hget("state:daemon:market-data", "feed_stale") == b"1", message="stale in heartbeat")
    hammer.push_l1("AGNCN", bid=25.30, ask=25.35)
    wait_until(lambda: "feed_stale:resolved" in alerts(r), timeout=10, message="recovered")
    assert heartbeat[b"feed_source"] == b"hammer"
    stale = [e for e in stream_events(r, "ev.alerts") if e["payload"]["alert_type"] == "feed_stale"][0]
    assert stale["payload"]["severity"] == "warning" and "no update" in stale["payload"]["message"]
    assert md.terminate() == 0


def test_hammer_source_without_password_file_exits_78(redis_url, tmp_path):
    rules = write_rules(tmp_path, market_data={"source": "hammer"})
    env = daemon_env(redis_url, QE_CONFIG=rules)
    md = DaemonProcess(console_script("qe-market-data"), env, tmp_path / "md.log").start()
    assert md.wait(timeout=30) == config.EX_CONFIG
    assert "QE_HAMMER_PASSWORD_FILE: required when market_data.source is hammer" in md.output()


def test_invalid_market_data_config_exits_78_naming_the_field(redis_url, tmp_path):
    rules = write_rules(tmp_path, market_data={"ibkr": {"max_tick_by_tick": -1}})
    md = DaemonProcess(console_script("qe-market-data"), daemon_env(redis_url, QE_CONFIG=rules), tmp_path / "md.log").start()
    assert md.wait(timeout=30) == config.EX_CONFIG
    output = md.output()
    assert "market_data.ibkr.max_tick_by_tick: Input should be greater than or equal to 0 (got -1)" in output
    bad_backoff = write_rules(tmp_path, market_data={"reconnect_cap_s": 1, "reconnect_base_s": 3})
    with pytest.raises(config.ConfigError, match="market_data: reconnect_cap_s must be >= reconnect_base_s"):
        config.load_rules(bad_backoff)


def test_redis_outage_keeps_the_feed_and_loses_no_print(own_redis, tmp_path, hammer):
    r = own_redis.client()
    md = start_market_data(own_redis.url, tmp_path, hammer)
    wait_until(lambda: hammer.authenticated_clients() and sum(hammer.authenticated_clients()[0].subscribe_batches) == 120,
               message="subscribed")
    hammer.add_trade("AGNCN", T0_MS, 25.30, 100, "NYSE")
    wait_until(lambda: r.xlen("ev.prints") == 1, message="first print")
    hammer.push_l1("AGNCN", bid=25.30, ask=25.35, volume=600)
    wait_until(lambda: r.xlen("ev.l1") == 1, message="first quote")
    own_redis.kill()
    polls = hammer.ticks_requests("AGNCN")
    for n in range(1, 6):
        hammer.add_trade("AGNCN", T0_MS + n * 1000, 25.30 + n / 100, 100, "ARCA")
    client = hammer.authenticated_clients()[0]
    hammer.push_l1("AGNCN", bid=25.30, ask=25.36, volume=700)  # new volume: polled at once
    wait_until(lambda: hammer.ticks_requests("AGNCN") >= polls + 1, message="polled while Redis is down")
    time.sleep(1.0)
    assert md.alive() and hammer.authenticated_clients()[0] is client  # the feed was not dropped
    own_redis.start()
    r = own_redis.client()
    wait_until(lambda: r.xlen("ev.prints") == 6, timeout=20, message="buffered prints appended")
    time.sleep(0.5)
    assert r.xlen("ev.prints") == 6
    assert r.xlen("ev.l1") == 2  # the quote received during the outage too
    logs = md.log_lines()
    assert any(line.get("msg") == "redis error; keeping the backlog and backing off" for line in logs)
    assert any(line.get("msg") == "redis reachable again" for line in logs)
    assert md.terminate() == 0


# --- issue 13: confirming unchanged quotes; no unpriced risk ----------------------------------------------

SPEED = 120  # simulated seconds per wall second: an hour in 30 s
CONFIRM_S = 20  # simulated; at most a third of exposure.l1_max_age_s (60)
L1_MAX_AGE_S = 60


def quotes_of(r: redis.Redis, symbol: str) -> list[dict]:
    return [e for e in stream_events(r, "ev.l1") if e["payload"]["symbol"] == symbol]


class Ticking:
    """A busy symbol keeps the feed as a whole alive (what a real universe does)."""

    def __init__(self, hammer: FakeHammer, sym: str = "AGNCN") -> None:
        import threading

        self.hammer, self.sym, self.stop = hammer, sym, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop.wait(0.03):
            n += 1
            self.hammer.push_l1(self.sym, bid=25.30, ask=25.35 + (n % 2) / 100, last=25.32, size=100, volume=10 + n)

    def __enter__(self) -> "Ticking":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


@pytest.mark.long  # make test-long: make test stays under 15 minutes (covered there by the IB feed's confirmation test and test_market_data_confirm.py's hour)
def test_a_quote_unchanged_for_a_simulated_hour_stays_current_on_a_live_feed(redis_url, r, tmp_path, hammer):
    start = datetime(2026, 3, 10, 10, 0, tzinfo=NEW_YORK)  # a Tuesday, market open
    md = start_market_data(redis_url, tmp_path, hammer, env=sim_env(start, speed=SPEED), confirm_interval_s=CONFIRM_S)
    wait_until(lambda: hammer.authenticated_clients() and sum(hammer.authenticated_clients()[0].subscribe_batches) == 120,
               timeout=20, message="subscribed")
    with Ticking(hammer):
        hammer.push_l1("CIM-B", bid=24.80, ask=24.90, last=24.85, size=100, volume=500)  # then never again
        wait_until(lambda: quotes_of(r, "CIM PRB"), message="the quote")
        time.sleep(3600 / SPEED + 1)
    quiet = quotes_of(r, "CIM PRB")
    assert {(q["payload"]["bid"], q["payload"]["ask"]) for q in quiet} == {(24.80, 24.90)}
    assert len({q["payload"]["quote_ts_ns"] for q in quiet}) == 1  # when it last changed: once
    vouched = [q["ts_ns"] for q in quiet]
    assert vouched[-1] - vouched[0] >= 3600 * 1e9  # a whole simulated hour of quiet
    gaps = sorted(b - a for a, b in zip(vouched, vouched[1:]))
    assert gaps[-1] <= L1_MAX_AGE_S * 1e9, gaps[-5:]  # current at every moment of the hour
    assert gaps[len(gaps) // 2] <= (CONFIRM_S + 7) * 1e9  # typically one interval (+ a 50 ms wall tick = 6 s)
    assert len(quiet) >= 3600 / (CONFIRM_S + 7)
    assert len({q["idempotency_key"] for q in quiet}) == len(quiet)
    assert md.terminate() == 0


def test_a_quiet_feed_is_not_vouched_for(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer, confirm_interval_s=1.0)
    wait_until(lambda: hammer.authenticated_clients() and sum(hammer.authenticated_clients()[0].subscribe_batches) == 120,
               timeout=20, message="subscribed")
    with Ticking(hammer):
        hammer.push_l1("CIM-B", bid=24.80, ask=24.90, last=24.85, size=100, volume=500)
        wait_until(lambda: len(quotes_of(r, "CIM PRB")) >= 3, timeout=10, message="confirmed")
    quiet_from = time.time_ns()  # nothing arrives on the feed any more (connected, farm unknown)
    time.sleep(3.0)
    late = [q["ts_ns"] for q in stream_events(r, "ev.l1") if q["ts_ns"] > quiet_from + 1.0e9]
    assert late == []
    with Ticking(hammer):  # the feed delivers again: the quiet quote is vouched for again
        wait_until(lambda: any(q["ts_ns"] > quiet_from + 3e9 for q in quotes_of(r, "CIM PRB")), timeout=10,
                   message="confirmed again")
    assert md.terminate() == 0


def test_an_open_order_outside_the_universe_file_gets_its_symbol_subscribed(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: hammer.authenticated_clients() and sum(hammer.authenticated_clients()[0].subscribe_batches) == 120,
               timeout=20, message="subscribed")
    # As execution reports an order placed outside quant-engine (its real event shape).
    order = Order(order_ref="ext-4711", perm_id=4711, symbol="QQQX PRA", side="SELL", qty=500, limit_price=24.1,
                  bucket="LT", status="SUBMITTED", remaining_qty=500, external=True)
    streams.Publisher(r, config.load_rules(Path(md.env["QE_CONFIG"]))).publish(
        "ev.orders", make_event(order, idempotency_key="order:external:4711:SUBMITTED", source="execution",
                                ts_ns=time.time_ns()))
    client = hammer.authenticated_clients()[0]
    wait_until(lambda: "QQQX-A" in client.subscribed, timeout=15, message="subscribed the order's symbol")
    hammer.push_l1("QQQX-A", bid=24.05, ask=24.15, last=24.10, size=100, volume=900)
    wait_until(lambda: quotes_of(r, "QQQX PRA"), message="its quote published")
    time.sleep(6)  # a further holdings check: no second alert
    added = [e["payload"] for e in stream_events(r, "ev.alerts") if e["payload"]["alert_type"] == "unpriced_symbol_subscribed"]
    assert [(a["symbol"], a["severity"], a["data"]["open_orders"]) for a in added] == [("QQQX PRA", "warning", ["ext-4711"])]
    assert client.subscribe_batches[-1] == 1
    assert md.terminate() == 0
