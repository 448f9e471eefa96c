"""qe-alerts as a real subprocess against a real Redis, on a simulated clock shared
with the test: alerts fire once, resolve once, survive SIGKILL + restart without
firing again, malformed input is dead-lettered (and shows up as DLQ growth)."""

from __future__ import annotations

import json
import threading
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from qe import clock as clock_module
from qe import config, streams
from qe.contracts import (
    L1,
    BrokerState,
    BucketExposure,
    Exposure,
    Print,
    Session,
    SymbolExposure,
    make_event,
)
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.support.raw_streams import append, copy, create_group

ALERTS = console_script("qe-alerts")
RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
START = datetime.fromisoformat("2026-11-20T11:00:00-05:00")  # a Friday, market open


class Harness:
    """One qe-alerts daemon (restartable), the shared simulated clock, publishers."""

    def __init__(self, redis_url, r, tmp_path, speed: float = 1.0, **rule_overrides) -> None:
        self.r = r
        clock_env = clock_module.sim_env(START, speed=speed)
        self.clock = clock_module.from_env(clock_env)
        rules = write_rules(tmp_path, **rule_overrides) if rule_overrides else REPO / "etc" / "risk_rules.yaml"
        self.env = daemon_env(redis_url, QE_CONFIG=str(rules), QE_CONSUMER_NAME="alerts-1", **clock_env)
        self.process = DaemonProcess(ALERTS, self.env, tmp_path / "alerts.log")
        self.publisher = streams.Publisher(r, RULES)
        self.seq = 0

    def start(self) -> "Harness":
        self.process.start()
        wait_until(lambda: self.r.exists("state:daemon:alerts"), timeout=30, message="qe-alerts heartbeat")
        return self

    def publish(self, stream: str, payload, key: str | None = None, ts_ns: int | None = None) -> int:
        self.seq += 1
        ts = self.clock.now_ns() if ts_ns is None else ts_ns
        event = make_event(payload, idempotency_key=key or f"test:{stream}:{self.seq}", source="test", ts_ns=ts)
        self.publisher.publish(stream, event)
        return ts

    def drained(self, *stream_names: str) -> bool:
        for stream in stream_names:
            key = copy(stream, "alerts")
            groups = {g["name"].decode(): g for g in self.r.xinfo_groups(key)} if self.r.exists(key) else {}
            group = groups.get("alerts")
            if group is None or group["lag"] != 0 or group["pending"] != 0:
                return False
        return True

    def wait_drained(self, *stream_names: str) -> None:
        wait_until(lambda: self.drained(*stream_names), timeout=20, message=f"qe-alerts read {stream_names}")

    def alerts(self, alert_type: str | None = None) -> list[dict]:
        found = []
        for _id, fields in self.r.xrange("ev.alerts"):
            event = json.loads(fields[b"event"])
            payload = {**event["payload"], "key": event["idempotency_key"]}
            if alert_type is None or payload["alert_type"] == alert_type:
                found.append(payload)
        return found

    def states(self, alert_type: str) -> list[str]:
        return [a["data"]["state"] for a in self.alerts(alert_type)]

    def session(self, open_at: datetime, close_at: datetime) -> None:
        now = self.clock.now()
        self.publish("ev.session", Session(
            now_ns=self.clock.now_ns(), now_utc=now.isoformat(), now_ny=now.isoformat(), trading_day="2026-11-20",
            market_open=open_at <= now < close_at, regime="MID", minutes_to_close=(close_at - now).total_seconds() / 60,
            soft_derisk_active=False, hard_derisk_active=False, early_close=False,
            open_utc=open_at.astimezone(timezone.utc).isoformat(), close_utc=close_at.astimezone(timezone.utc).isoformat(),
        ))

    def stop(self) -> None:
        self.process.kill()


@pytest.fixture
def harness(redis_url, r, tmp_path):
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(redis_url, r, tmp_path, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def exposure(gross: float, potential: float, symbols: dict[str, int] | None = None) -> Exposure:
    lines = {
        symbol: SymbolExposure(qty=qty, bucket="LT", mark=25.0, mark_source="l1_mid", notional=qty * 25.0,
                               open_buy_qty=0, open_sell_qty=0, potential_notional=abs(qty) * 25.0)
        for symbol, qty in (symbols or {}).items()
    }
    return Exposure(
        equity=1_000_000, long_notional=gross * 10_000, short_notional=0, gross_pct=gross, net_pct=gross,
        potential_gross_pct=potential, symbols=lines,
        buckets={"LT": BucketExposure(current_pct=80, potential_pct=80, target_pct=80, max_pct=90),
                 "MM_PURE": BucketExposure(current_pct=20, potential_pct=20, target_pct=20, max_pct=30)},
    )


def test_cap_breach_and_broker_down_fire_once_across_sigkill_and_resolve_once(harness):
    h = harness(alerts={"broker_down_for_s": 0.5}).start()
    first_ts = h.publish("ev.exposure", exposure(125, 131))
    wait_until(lambda: h.states("hard_cap_potential") == ["firing"], message="cap breach alert")
    h.publish("ev.broker", BrokerState(connected=False, orders_allowed=False, reason="disconnected (1100)", last_code=1100))
    wait_until(lambda: h.states("broker_down") == ["firing"], message="broker down alert")
    for potential in (131.5, 132, 129.5):  # still breached, or inside the hysteresis band
        h.publish("ev.exposure", exposure(125, potential))
    h.wait_drained("ev.exposure", "ev.broker")

    h.process.kill()  # SIGKILL with two conditions active
    h.publish("ev.exposure", exposure(126, 133))
    h.publish("ev.broker", BrokerState(connected=False, orders_allowed=False, reason="still down"))
    h.process.start()
    h.wait_drained("ev.exposure", "ev.broker")
    wait_until(lambda: h.r.hget("state:daemon:alerts", "pid") == str(h.process.pid).encode(), message="restarted heartbeat")
    assert h.states("hard_cap_potential") == ["firing"] and h.states("broker_down") == ["firing"]

    h.publish("ev.exposure", exposure(120, 128.5))
    h.publish("ev.broker", BrokerState(connected=True, orders_allowed=True, account="DU1", reason="connected"))
    wait_until(lambda: h.states("hard_cap_potential") == ["firing", "resolved"], message="cap resolved")
    wait_until(lambda: h.states("broker_down") == ["firing", "resolved"], message="broker resolved")

    firing, resolved = h.alerts("hard_cap_potential")
    assert firing["severity"] == "error" and resolved["severity"] == "info"
    assert firing["key"] == f"alert:hard_cap_potential:account:{first_ts}:error"
    assert resolved["key"] == f"alert:hard_cap_potential:account:{first_ts}:resolved"
    assert firing["data"]["potential_gross_pct"] == 131 and firing["data"]["hard_cap_pct"] == 130
    assert resolved["data"]["potential_gross_pct"] == 128.5
    assert h.alerts("broker_down")[0]["severity"] == "critical"  # no session seen: assumed market hours
    assert h.alerts("hard_cap_current") == []
    assert h.r.hlen("state:alerts:conditions") == 0

    url = [line["metrics_url"] for line in h.process.log_lines() if line.get("msg") == "metrics endpoint up"][-1]
    scraped = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'qe_alerts_emitted_total{alert_type="hard_cap_potential",severity="info",state="resolved"} 1.0' in scraped
    assert h.process.terminate() == 0


def test_stale_quotes_per_symbol_then_feed_wide_then_fresh(harness):
    h = harness(alerts={"l1_stale_after_s": 3, "l1_feed_stale_after_s": 2, "stale_symbols": "held"}).start()
    now = h.clock.now()
    h.session(now - timedelta(seconds=1), now + timedelta(hours=3))
    h.publish("ev.exposure", exposure(100, 100, {"CIM PRB": 1000, "AGNCN": -500}))
    quoting = {"CIM PRB"}
    stop = threading.Event()

    def quote() -> None:
        while not stop.is_set():
            for symbol in sorted(quoting):
                h.publish("ev.l1", L1(symbol=symbol, bid=24.5, ask=24.6, bid_size=100, ask_size=100))
            stop.wait(0.3)

    feeder = threading.Thread(target=quote, daemon=True)
    feeder.start()
    try:
        wait_until(lambda: h.states("l1_stale") == ["firing"], timeout=20, message="AGNCN quotes stale")
        stale = h.alerts("l1_stale")[0]
        assert stale["symbol"] == "AGNCN" and stale["severity"] == "warning" and stale["data"]["threshold_s"] == 3
        assert h.alerts("l1_feed_stale") == []  # CIM PRB keeps the stream alive
        quoting.clear()  # the whole feed goes quiet
        wait_until(lambda: h.states("l1_feed_stale") == ["firing"], timeout=20, message="feed-wide stale")
        assert h.alerts("l1_feed_stale")[0]["severity"] == "error"
        assert h.states("l1_stale") == ["firing"]  # CIM PRB waits behind the feed-wide alert
        quoting.update({"CIM PRB", "AGNCN"})
        wait_until(lambda: h.states("l1_feed_stale") == ["firing", "resolved"], timeout=20, message="feed resolved")
        wait_until(lambda: h.states("l1_stale") == ["firing", "resolved"], timeout=20, message="AGNCN resolved")
    finally:
        stop.set()
        feeder.join()
    assert h.alerts("prints_feed_stale") == []  # 300 s threshold not reached
    assert h.process.terminate() == 0


def test_daily_high_low_and_the_etf_guard_from_prints(harness):
    h = harness(alerts={"daily_range_min_prints": 2, "etf_guard": {
        "symbols": ["PFF"], "move_vs_close_cents": 20, "move_window_cents": 10, "move_window_s": 300,
        "hysteresis_cents": 3, "max_window_prints": 2000}}).start()

    def trade(symbol: str, price: float, size: int = 100) -> None:
        h.publish("ev.prints", Print(symbol=symbol, price=price, size=size, venue="ARCA", trade_ts_ns=h.clock.now_ns()))

    for price in (24.50, 24.55, 24.60, 24.40, 24.58, 24.70):
        trade("CIM PRB", price)
    trade("CIM PRB", 24.90, size=20)  # odd lot: no new high
    trade("AGNCN", 25.00)
    trade("AGNCN", 24.98)  # a low, but only the 2nd print of the day: the range is being set
    # PFF: no previous day seen, so the previous close is the universe's ref_price 31.45.
    trade("PFF", 31.40)
    trade("PFF", 31.30)  # 15 cents down from the close: nothing; 10 cents down in the window: fast move
    trade("PFF", 31.20)  # 25 cents below the close
    h.wait_drained("ev.prints")
    wait_until(lambda: h.states("etf_move_vs_close") == ["firing"], message="ETF vs close")
    highs = [(a["symbol"], a["data"]["price"]) for a in h.alerts("new_daily_high")]
    lows = [(a["symbol"], a["data"]["price"]) for a in h.alerts("new_daily_low")]
    assert highs == [("CIM PRB", 24.6), ("CIM PRB", 24.7)]
    assert lows == [("CIM PRB", 24.4), ("PFF", 31.2)]
    assert h.alerts("new_daily_high")[0]["key"] == "alert:new_daily_high:CIM PRB:2026-11-20:24.6000"
    vs_close = h.alerts("etf_move_vs_close")[0]
    assert vs_close["data"]["previous_close"] == 31.45 and vs_close["data"]["previous_close_source"] == "universe_ref_price"
    assert vs_close["data"]["move_cents"] == -25
    fast = h.alerts("etf_move_fast")
    assert [(a["data"]["state"], a["data"]["direction"], a["data"]["move_cents"]) for a in fast] == [("firing", "down", 10)]

    h.process.kill()
    h.process.start()
    trade("PFF", 31.18)  # still breached on both triggers: nothing new after the restart
    trade("CIM PRB", 24.75)  # a third high within 15 minutes: the rate limit (kept across the restart) holds it
    trade("AGNCN", 25.10)  # a new high against the range kept across the restart
    h.wait_drained("ev.prints")
    wait_until(lambda: h.r.hget("state:daemon:alerts", "pid") == str(h.process.pid).encode(), message="restarted")
    assert h.states("etf_move_vs_close") == ["firing"] and len(h.alerts("etf_move_fast")) == 1
    highs = [(a["symbol"], a["data"]["price"], a["data"]["previous_high"]) for a in h.alerts("new_daily_high")]
    assert highs[2:] == [("AGNCN", 25.1, 25.0)]
    assert json.loads(h.r.hget("state:alerts:rates", "new_daily_high|CIM PRB"))["suppressed"] == 1
    trade("PFF", 31.35)  # 10 cents from the close: inside the clear threshold (17)
    wait_until(lambda: h.states("etf_move_vs_close") == ["firing", "resolved"], message="ETF vs close resolved")


def test_lag_and_dlq_growth_and_malformed_input_is_dead_lettered(harness, r):
    h = harness(alerts={"consumer_lag_limits": {"default": 5}, "consumer_lag_for_s": 0, "dlq_quiet_s": 2,
                        "consumer_lag_ignore_groups": ["pnl"]}).start()
    wait_until(lambda: r.hexists("state:alerts:inputs", "dlq"), message="first DLQ observation")
    # Each group on its own copy, as the runtime creates them (no daemon runs to read them).
    create_group(r, "ev.intents", "execution_service")
    create_group(r, "ev.orders", "pnl")
    for i in range(10):
        append(r, "ev.intents", {"type": "intent", "idk": f"x{i}", "event": "{}"})
        append(r, "ev.orders", {"type": "order", "idk": f"y{i}", "event": "{}"})
    wait_until(lambda: h.states("consumer_lag") == ["firing"], message="lag alert")
    lag = h.alerts("consumer_lag")[0]
    assert lag["data"]["stream"] == "ev.intents" and lag["data"]["group"] == "execution_service" and lag["data"]["lag"] == 10

    append(r, "ev.exposure", {"type": "exposure", "idk": "junk", "event": '{"not": "an exposure"}'})
    wait_until(lambda: r.xlen("ev.dlq") == 1, message="dead letter")
    dead = {k.decode(): v.decode() for k, v in r.xrange("ev.dlq")[0][1].items()}
    assert dead["origin_stream"] == "ev.exposure" and dead["group"] == "alerts" and dead["label"] == "invalid"
    wait_until(lambda: h.states("dlq_growth") == ["firing"], message="DLQ growth alert")
    assert h.alerts("dlq_growth")[0]["data"]["new_entries"] == 1
    h.publish("ev.exposure", exposure(131, 131))  # the worker carries on after the bad entry
    wait_until(lambda: h.states("hard_cap_current") == ["firing"], message="alert after the dead letter")
    wait_until(lambda: h.states("dlq_growth") == ["firing", "resolved"], timeout=20, message="DLQ quiet again")

    intents = copy("ev.intents", "execution_service")
    r.xreadgroup("execution_service", "c", {intents: ">"})
    r.xack(intents, "execution_service", *[entry_id for entry_id, _ in r.xrange(intents)])
    wait_until(lambda: h.states("consumer_lag") == ["firing", "resolved"], message="lag resolved")
    assert all(a["data"]["group"] != "pnl" for a in h.alerts("consumer_lag"))  # ignored by configuration
    assert h.process.terminate() == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ({"etf_guard": {"symbols": ["XYZ"]}}, "alerts.etf_guard.symbols: ['XYZ'] not in the universe"),
        ({"rate_limits": {"bucket_max": {"max_alerts": 1, "window_s": 60}}}, "alerts.rate_limits: rate_limits needs a 'default' entry"),
        ({"consumer_lag_limits": {"default": 10, "ev.nope": 5}}, "alerts.consumer_lag_limits: unknown stream(s) ['ev.nope']"),
        ({"etf_guard": {"hysteresis_cents": 15}}, "alerts.etf_guard: hysteresis_cents (15) must be below both move thresholds (10)"),
    ],
    ids=["etf-symbol", "rate-default", "lag-stream", "etf-hysteresis"],
)
def test_invalid_alerts_config_exits_78_naming_the_field(redis_url, tmp_path, override, message):
    rules = write_rules(tmp_path, alerts=override)
    daemon = DaemonProcess(ALERTS, daemon_env(redis_url, QE_CONFIG=rules), tmp_path / "alerts.log").start()
    assert daemon.wait(timeout=30) == config.EX_CONFIG
    assert "qe-alerts: invalid configuration:" in daemon.output()
    assert message in daemon.output()
