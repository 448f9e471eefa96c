"""qe-decision as a real subprocess on a real Redis with a simulated clock: synthetic
event streams -> mode transitions (alerts + state:decision) and intents with
deterministic keys; SIGKILL + restart -> same mode, no duplicate intents; halt and
resume through `qe`; malformed events dead-lettered."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from datetime import datetime

import pytest

from qe import clock as clock_module
from qe import config, streams
from qe.contracts import (
    L1,
    Account,
    BrokerState,
    BucketExposure,
    Exposure,
    Feature,
    Order,
    Position,
    Session,
    SymbolExposure,
    TruthTick,
    make_event,
)
from tests.support.processes import REPO, VENV_BIN, DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.support.raw_streams import append, copy

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
EQUITY = 1_000_000.0
DAY = "2026-11-20"
# A 125 % portfolio: LT longs in CIM PRB and AGNCN, MM inventory in CIM PRC.
POSITIONS = {"CIM PRB": (20000, "LT"), "AGNCN": (20000, "LT"), "CIM PRC": (10000, "MM_PURE")}
MARK = 25.0


class World:
    """Plays the other daemons: session, exposure, market data, broker."""

    def __init__(self, r, clock):
        self.r = r
        self.clock = clock
        self.publisher = streams.Publisher(r, RULES)
        self.seq = 0

    def publish(self, stream, payload, key=None):
        self.seq += 1
        now = self.clock.now_ns()
        event = make_event(payload, idempotency_key=key or f"test:{stream}:{self.seq}", source="test", ts_ns=now)
        self.publisher.publish(stream, event)
        return event

    def session(self, *, soft=False, hard=False, regime="LATE", market_open=True):
        now = self.clock.now_ns()
        iso = datetime.fromtimestamp(now / 1e9).isoformat()
        self.publish("ev.session", Session(now_ns=now, now_utc=iso, now_ny=iso, trading_day=DAY, market_open=market_open,
                                           regime=regime, minutes_to_close=10.0, soft_derisk_active=soft,
                                           hard_derisk_active=hard, early_close=False))

    def exposure(self, positions=POSITIONS):
        gross = sum(abs(q) * MARK for q, _b in positions.values())
        buckets = {}
        for bucket in ("LT", "MM_PURE"):
            pct = sum(abs(q) * MARK for q, b in positions.values() if b == bucket) / EQUITY * 100
            target, maximum = (80.0, 90.0) if bucket == "LT" else (20.0, 30.0)
            buckets[bucket] = BucketExposure(current_pct=pct, potential_pct=pct, target_pct=target, max_pct=maximum)
        symbols = {s: SymbolExposure(qty=q, bucket=b, mark=MARK, mark_source="l1_mid", notional=q * MARK, open_buy_qty=0,
                                     open_sell_qty=0, potential_notional=abs(q) * MARK) for s, (q, b) in positions.items()}
        self.publish("ev.exposure", Exposure(equity=EQUITY, long_notional=gross, short_notional=0, gross_pct=gross / EQUITY * 100,
                                             net_pct=gross / EQUITY * 100, potential_gross_pct=gross / EQUITY * 100,
                                             buckets=buckets, symbols=symbols))

    def market(self):
        now = self.clock.now_ns()
        for symbol in POSITIONS:
            self.publish("ev.l1", L1(symbol=symbol, bid=24.99, ask=25.01, bid_size=500, ask_size=500))
            self.publish("ev.features", Feature(symbol=symbol, grpan_price=25.0, concentration_pct=70, print_count=12,
                                                truth_tick=TruthTick(price=25.00, size=100, venue="NYSE", ts_ns=now)))

    def setup(self):
        self.publish("ev.broker", BrokerState(connected=True, account="DU123", mode="paper"))
        self.publish("ev.positions", Account(account="DU123", net_liquidation=EQUITY))
        for symbol, (qty, bucket) in POSITIONS.items():
            self.publish("ev.positions", Position(account="DU123", symbol=symbol, qty=qty, avg_cost=24.5, bucket=bucket))
        self.market()


def state(r):
    return {k.decode(): json.loads(v) for k, v in r.hgetall("state:decision").items()}


def intents(r):
    return [json.loads(fields[b"event"]) for _id, fields in r.xrange("ev.intents")]


def mode_alerts(r):
    return [json.loads(f[b"event"])["payload"] for _id, f in r.xrange("ev.alerts")
            if json.loads(f[b"event"])["payload"]["alert_type"] == "mode_change"]


@pytest.fixture
def setup(redis_url, r, tmp_path):
    rules = write_rules(tmp_path, runtime={"block_ms": 100, "batch_size": 50, "claim_min_idle_s": 5},
                        decision={"tick_interval_s": 0.1, "evaluate_min_gap_s": 0.05},
                        strategies={"mm": {"enabled": False}, "lt_band": {"enabled": False}})
    env = daemon_env(redis_url, QE_CONFIG=rules, QE_CONSUMER_NAME="decision-1",
                     **clock_module.sim_env(datetime.fromisoformat("2026-11-20T15:44:00-05:00"), speed=1.0))
    clock = clock_module.from_env(env)
    world = World(r, clock)
    brain = DaemonProcess(console_script("qe-decision"), env, tmp_path / "decision.log")
    yield world, brain, env
    brain.kill()


def keep_session_fresh(world, until, **flags):
    """Publish session ticks (1 s cadence like the session worker) until `until()` is true."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        world.session(**flags)
        next_tick = time.monotonic() + 0.3
        while time.monotonic() < next_tick:  # the Brain drains the tick in between (a busy machine is slow)
            if until():
                return
            time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {until}; last trace: {state(world.r).get('last_trace')}")


def test_soft_window_transition_intents_and_restart_without_duplicates(setup, r):
    world, brain, env = setup
    world.setup()
    world.exposure()
    brain.start()
    # 125 % in LATE (tolerance 115): SOFT_DERISK by the tolerance rule first.
    keep_session_fresh(world, lambda: state(r).get("mode") == "SOFT_DERISK", regime="LATE")
    assert state(r)["rule"] == "tolerance_derisk"
    keep_session_fresh(world, lambda: state(r).get("rule") == "soft_window", soft=True, regime="CLOSE")
    keep_session_fresh(world, lambda: len(intents(r)) >= 2, soft=True, regime="CLOSE")
    first = intents(r)
    alerts = mode_alerts(r)
    # A Brain without saved state starts in THROTTLE (nothing judged yet, and its first
    # evaluation may come before the backlog's exposure event): never a claimed NORMAL.
    assert [(a["data"]["from"], a["data"]["to"]) for a in alerts] == [("THROTTLE", "SOFT_DERISK")]
    assert alerts[0]["data"]["numbers"]["gross_pct"] == 125.0 and alerts[0]["severity"] == "warning"
    keys = [e["idempotency_key"] for e in first]
    assert all(k.startswith(f"intent:{DAY}:SOFT_DERISK:") for k in keys)
    by_symbol = {e["payload"]["symbol"]: e["payload"] for e in first}
    assert by_symbol["CIM PRC"]["side"] == "SELL" and by_symbol["CIM PRC"]["limit_price"] == 24.99  # MM first, truth - 0.01
    assert by_symbol["CIM PRC"]["trace"]["mode"] == "SOFT_DERISK"

    # SIGKILL at an arbitrary moment, restart, keep the world going: same mode, no duplicates.
    for _ in range(3):
        brain.kill()
        world.session(soft=True, regime="CLOSE")
        brain.start()
        keep_session_fresh(world, lambda: r.xpending(copy("ev.session", "decision_engine"), "decision_engine")["pending"] == 0
                           and r.xinfo_groups(copy("ev.session", "decision_engine"))[0]["lag"] == 0, soft=True, regime="CLOSE")
    time.sleep(1.0)
    keep_session_fresh(world, lambda: True, soft=True, regime="CLOSE")
    assert state(r)["mode"] == "SOFT_DERISK"
    after = intents(r)
    duplicates = {k: n for k, n in Counter(e["idempotency_key"] for e in after).items() if n > 1}
    assert duplicates == {}
    assert [e["idempotency_key"] for e in after if e["payload"]["action"] == "NEW"] == keys  # nothing new: orders are live
    assert len(mode_alerts(r)) == 1  # restarts reload the state and the last good snapshot: no new transition

    # Execution acknowledges and fills CIM PRC; exposure drops below the target; live orders are cancelled.
    cim = by_symbol["CIM PRC"]
    for status, filled in (("SUBMITTED", 0), ("FILLED", cim["qty"])):
        world.publish("ev.orders", Order(order_ref="qe-x", intent_key=next(k for k in keys if "CIM PRC" in k), symbol="CIM PRC",
                                         side="SELL", qty=cim["qty"], limit_price=24.99, bucket="MM_PURE", status=status,
                                         filled_qty=filled, remaining_qty=cim["qty"] - filled))
    smaller = {"CIM PRB": (18000, "LT"), "AGNCN": (18000, "LT"), "CIM PRC": (3000, "MM_PURE")}  # 97.5 %
    world.publish("ev.positions", Position(account="DU123", symbol="CIM PRC", qty=3000, avg_cost=24.5, bucket="MM_PURE"))
    world.exposure(smaller)
    keep_session_fresh(world, lambda: state(r).get("mode") == "NORMAL", soft=True, regime="CLOSE")
    cancels = [e["payload"] for e in intents(r) if e["payload"]["action"] == "CANCEL"]
    assert sorted(c["target_intent_key"] for c in cancels) == sorted(k for k in keys if "CIM PRC" not in k)
    assert brain.terminate() == 0


def test_halt_and_resume_through_qe_and_dead_letters(setup, r, redis_url):
    world, brain, env = setup
    world.setup()
    world.exposure()
    brain.start()
    keep_session_fresh(world, lambda: len(intents(r)) >= 1, soft=True, regime="CLOSE")  # CIM PRC covers it all
    live = [e["idempotency_key"] for e in intents(r) if e["payload"]["action"] == "NEW"]

    qe_env = {**env}
    halted = subprocess.run([str(VENV_BIN / "qe"), "halt", "--reason", "fat finger drill", "--operator", "alice",
                             "--require", "decision"],
                            env=qe_env, capture_output=True, text=True, timeout=60)
    assert halted.returncode == 0, halted.stderr
    keep_session_fresh(world, lambda: state(r).get("mode") == "HALTED", soft=True, regime="CLOSE")
    st = state(r)
    assert st["halted"] is True and st["halt_operator"] == "alice" and st["halt_reason"] == "fat finger drill"
    keep_session_fresh(world, lambda: len([e for e in intents(r) if e["payload"]["action"] == "CANCEL"]) == len(live),
                       soft=True, regime="CLOSE")
    cancels = [e["payload"] for e in intents(r) if e["payload"]["action"] == "CANCEL"]
    assert sorted(c["target_intent_key"] for c in cancels) == sorted(live)
    halt_alert = mode_alerts(r)[-1]
    assert halt_alert["data"]["to"] == "HALTED" and "alice" in halt_alert["message"] and halt_alert["severity"] == "critical"
    count = len(intents(r))
    for _ in range(5):
        world.session(soft=True, regime="CLOSE")
        time.sleep(0.2)
    assert len(intents(r)) == count  # nothing but the cancels while halted

    # `qe why` explains an order by its orderRef.
    from qe.contracts import order_ref_for
    why = subprocess.run([str(VENV_BIN / "qe"), "why", order_ref_for(live[0])], env=qe_env, capture_output=True, text=True,
                         timeout=60)
    assert why.returncode == 0, why.stderr
    assert live[0] in why.stdout and "SOFT_DERISK" in why.stdout and "exposure snapshot" in why.stdout

    resumed = subprocess.run([str(VENV_BIN / "qe"), "resume", "--reason", "drill over", "--operator", "alice",
                              "--require", "decision"],
                             env=qe_env, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    keep_session_fresh(world, lambda: state(r).get("mode") == "SOFT_DERISK", soft=True, regime="CLOSE")
    status = json.loads(subprocess.run([str(VENV_BIN / "qe"), "--json", "status"], env=qe_env, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert status["decision"]["mode"] == "SOFT_DERISK" and status["decision"]["halted"] is False

    # A malformed session event is dead-lettered; the Brain keeps going.
    append(r, "ev.session", {"type": "session", "event": b'{"not": "a session"}'})
    wait_until(lambda: r.xlen("ev.dlq") == 1, message="dead letter")
    dead = r.xrange("ev.dlq")[0][1]
    assert dead[b"origin_stream"] == b"ev.session" and dead[b"label"] == b"invalid"
    assert brain.alive()
    assert brain.terminate() == 0


# --- issue 12: bad data never becomes an order ----------------------------------------------------

COLLAR_LOW, COLLAR_HIGH = 23.75, 26.25  # 5 % around the $25.00 truth tick


@pytest.fixture
def fast_hard(redis_url, r, tmp_path):
    rules = write_rules(tmp_path, runtime={"block_ms": 100, "batch_size": 50, "claim_min_idle_s": 5},
                        decision={"tick_interval_s": 0.1, "evaluate_min_gap_s": 0.05},
                        derisk={"hard_step_interval_s": 1},
                        strategies={"mm": {"enabled": False}, "lt_band": {"enabled": False}})
    env = daemon_env(redis_url, QE_CONFIG=rules, QE_CONSUMER_NAME="decision-1",
                     **clock_module.sim_env(datetime.fromisoformat("2026-11-20T15:58:30-05:00"), speed=1.0))
    world = World(r, clock_module.from_env(env))
    brain = DaemonProcess(console_script("qe-decision"), env, tmp_path / "decision.log")
    yield world, brain
    brain.kill()


def alerts_of(r, alert_type):
    return [p for p in (json.loads(f[b"event"])["payload"] for _id, f in r.xrange("ev.alerts")) if p["alert_type"] == alert_type]


def test_bad_data_in_the_hard_window_never_becomes_an_order(fast_hard, r):
    world, brain = fast_hard
    world.setup()
    world.exposure()
    brain.start()
    hard = {"hard": True, "soft": True, "regime": "CLOSE"}
    keep_session_fresh(world, lambda: state(r).get("mode") == "HARD_DERISK" and len(intents(r)) >= 1, **hard)

    # Stub quotes on every held symbol while the truth tick is $25.00 (issue 12's cases).
    world.publish("ev.l1", L1(symbol="CIM PRB", bid=0.01, ask=25.01, bid_size=100, ask_size=100))
    world.publish("ev.l1", L1(symbol="AGNCN", bid=1.00, ask=25.01, bid_size=100, ask_size=100))
    world.publish("ev.l1", L1(symbol="CIM PRC", bid=0.01, ask=0.02, bid_size=100, ask_size=100))
    keep_session_fresh(world, lambda: "implausible_quote" in (state(r).get("last_trace") or {}).get("skips", {}), **hard)
    deadline = time.monotonic() + 4  # four hard-step intervals
    while time.monotonic() < deadline:
        world.session(**hard)
        time.sleep(0.3)
    skipped = {a["symbol"] for a in alerts_of(r, "decision_symbol_skipped") if a["data"]["reason"] == "implausible_quote"}
    assert skipped == {"CIM PRB", "AGNCN", "CIM PRC"}

    # An absurd position (10**400 shares): quarantined by the Brain, or refused by the contract.
    world.publish("ev.positions", Position.model_construct(account="DU123", symbol="CIM PRC", qty=10**400, avg_cost=24.5, bucket="MM_PURE"))
    # Exposure unknown (gross missing) twice: de-risk goes on from the last good snapshot.
    unknown = Exposure(equity=EQUITY, long_notional=0, short_notional=0, gross_pct=None, net_pct=None,
                       potential_gross_pct=None, buckets={})
    world.publish("ev.exposure", unknown)
    keep_session_fresh(world, lambda: "exposure unknown" in state(r).get("reason", ""), **hard)
    world.publish("ev.exposure", unknown)
    for _ in range(10):
        world.session(**hard)
        time.sleep(0.2)
    wait_until(lambda: all(r.xpending(copy(s, "decision_engine"), "decision_engine")["pending"] == 0 for s in ("ev.session", "ev.positions",
                                                                                      "ev.exposure", "ev.l1")),
               message="pending lists drained")

    st = state(r)
    assert brain.alive()
    assert st["mode"] == "HARD_DERISK" and "exposure unknown" in st["reason"]  # never NORMAL
    assert "exposure_unknown" in st["last_trace"]["increases_blocked"]
    # Once per episode: the start (no snapshot yet), then the missing gross (published twice).
    episodes = [(a["state"], a["data"].get("why")) for a in alerts_of(r, "exposure_unknown")]
    assert episodes == [("raised", "no exposure snapshot"), ("resolved", None), ("raised", "gross_pct missing")], episodes
    saved = json.loads(r.hget("state:decision:inputs", "exposure"))
    assert saved["gross_pct"] is None and saved["problem"] == "gross_pct missing"
    # The absurd quantity reached no saved state; the symbol is reported and skipped.
    assert json.loads(r.hget("state:decision:positions", "CIM PRC")) == [10000, "MM_PURE", 24.5]
    assert all(len(v) < 200 for v in r.hgetall("state:decision:positions").values())
    dead = [f for _id, f in r.xrange("ev.dlq")]
    quarantined = r.hget("state:decision:quarantine", "CIM PRC")
    assert quarantined == b"absurd_quantity" or any(f[b"origin_stream"] == b"ev.positions" and b"qty" in f[b"reason"]
                                                    for f in dead)
    if quarantined:
        assert "CIM PRC" in st["last_trace"]["symbol_errors"]
    assert [f for f in dead if f[b"origin_stream"] != b"ev.positions"] == []  # no good event dead-lettered

    # Every price the Brain ever sent lies inside the collar; nothing at the stubs.
    priced = [e["payload"] for e in intents(r) if e["payload"]["action"] in ("NEW", "MODIFY")]
    assert priced and all(COLLAR_LOW <= p["limit_price"] <= COLLAR_HIGH for p in priced), priced
    assert all(p["created_ns"] <= world.clock.now_ns() for p in priced)
    assert brain.terminate() == 0
