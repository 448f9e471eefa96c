"""The execution service as a real subprocess, against the IB gateway simulator
through the real ib_async client, and a real Redis. Every test asserts the
simulator's own record of what it received (the referee) as well as Redis."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from qe import config, state, streams
from qe.contracts import L1, Control, Feature, Intent, TruthTick, intent_id_for, make_event, order_ref_for
from sim.testing import start_in_thread
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.support.raw_streams import append

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
SYMBOL = "CIM PRB"  # the demo account is long 3,200 CIM PRB (LT)


@pytest.fixture
def sim():
    running = start_in_thread(quote_rate=0.0, print_rate=0.0)  # a still market: tests set quotes
    yield running
    running.stop()


class Execution:
    """One execution daemon (restartable) and helpers to talk to it."""

    def __init__(self, redis_url: str, r, sim, tmp_path: Path, **env: str) -> None:
        self.r, self.sim, self.tmp_path = r, sim, tmp_path
        self.env = daemon_env(redis_url, QE_IB_PORT=str(sim.port), QE_CONSUMER_NAME="execution-1", **env)
        self.process = DaemonProcess(console_script("qe-execution"), self.env, tmp_path / "execution.log")
        self.publisher = streams.Publisher(r, RULES)

    def start(self, **env: str) -> "Execution":
        self.process.env = {**self.env, **env}
        self.process.start()
        return self

    def brain_mode(self, mode: str) -> None:
        """The Brain's mode as the Brain writes it (qe.state's writer: the contract execution reads)."""
        self.r.hset(state.DECISION, mapping=state.decision_fields(state.DecisionState(mode=mode, since_ns=time.time_ns())))
        time.sleep(1.0)  # execution re-reads the Brain's mode twice a second

    def wait_connected(self) -> None:
        wait_until(lambda: self.r.hget("state:broker", "connected") == b"true", timeout=30, message="broker connected")

    def publish_market(self, stream: str, payload, key: str) -> None:
        self.publisher.publish(stream, make_event(payload, idempotency_key=key, source="test", ts_ns=time.time_ns()))

    def saved_prices(self, symbol: str) -> dict:
        raw = self.r.hget("state:execution:prices", symbol)
        return json.loads(raw) if raw else {}

    def market(self, bid: float, ask: float, symbol: str = SYMBOL, size: int = 1000) -> None:
        """The market everywhere at once, as the producers publish it: the simulator's quote,
        a truth tick / GRPAN at the mid (prints worker's Feature) and the L1 (market data's),
        then wait until execution has taken both as its own trusted prices."""
        freeze(self.sim, bid, ask, size, symbol)
        tick = round((bid + ask) / 2, 2)
        now = time.time_ns()
        self.publish_market("ev.features", Feature(
            symbol=symbol, grpan_price=tick, concentration_pct=80.0, print_count=10, last_price=tick,
            truth_tick=TruthTick(price=tick, size=100, venue="NYSE", ts_ns=now)), f"test:feature:{symbol}:{tick}:{now}")
        wait_until(lambda: self.saved_prices(symbol).get("truth_tick") == tick, timeout=15, message=f"{symbol} truth tick {tick}")
        self.quote(bid, ask, symbol, size)
        mid = round((bid + ask) / 2, 4)
        wait_until(lambda: self.saved_prices(symbol).get("trusted_mid") == pytest.approx(mid), timeout=15, message=f"{symbol} mid {mid}")

    def price_the_book(self) -> None:
        """A truth tick at the simulator's quote for every held symbol (as the prints worker
        publishes it), then wait until execution holds each as its own price."""
        now = time.time_ns()
        ticks = {}
        for position in self.sim.control.state()["positions"]:
            symbol = position["symbol"]
            quote = self.sim.control.quote(symbol)
            tick = round((quote["bid"] + quote["ask"]) / 2, 2)
            ticks[symbol] = tick
            self.publish_market("ev.features", Feature(
                symbol=symbol, grpan_price=tick, concentration_pct=80.0, print_count=10, last_price=tick,
                truth_tick=TruthTick(price=tick, size=100, venue="NYSE", ts_ns=now)), f"test:feature:{symbol}:{tick}:{now}")
        wait_until(lambda: all(self.saved_prices(s).get("truth_tick") == t for s, t in ticks.items()), timeout=15,
                   message="every held symbol priced")

    def quote(self, bid: float, ask: float, symbol: str = SYMBOL, size: int = 1000, implausible: str | None = None) -> None:
        """An L1 as market data publishes it (with its quote-gate verdict)."""
        now = time.time_ns()
        self.publish_market("ev.l1", L1(symbol=symbol, bid=bid, ask=ask, bid_size=size, ask_size=size, quote_ts_ns=now,
                                        implausible=implausible), f"test:l1:{symbol}:{bid}:{ask}:{now}")

    def denial(self, key: str) -> dict | None:
        """The REJECTED order execution publishes for a refused intent (NEW or MODIFY)."""
        rejected = [o for o in self.orders(key) if o["status"] == "REJECTED"]
        return rejected[-1] if rejected else None

    def intent(self, key: str, **fields) -> Intent:
        base = dict(
            intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol=SYMBOL, side="SELL", qty=200,
            order_type="LMT", limit_price=24.80, bucket="LT", classification="LT_LONG_DEC", priority=60,
            ttl_s=600, created_ns=time.time_ns(), risk_delta_gross_pct=-0.5, reason="test",
        )
        base.update(fields)
        intent = Intent(**base)
        self.publisher.publish("ev.intents", make_event(intent, idempotency_key=key, source="test", ts_ns=time.time_ns()))
        return intent

    def orders(self, key: str | None = None) -> list[dict]:
        events = [json.loads(fields[b"event"])["payload"] for _id, fields in self.r.xrange("ev.orders")]
        return [e for e in events if key is None or e["order_ref"] == order_ref_for(key)]

    def statuses(self, key: str) -> list[str]:
        return [e["status"] for e in self.orders(key)]

    def wait_status(self, key: str, status: str, timeout: float = 20) -> None:
        wait_until(lambda: status in self.statuses(key), timeout=timeout, message=f"{key} {status}: {self.statuses(key)}")

    def fills(self, key: str) -> list[dict]:
        return [e["last_fill"] for e in self.orders(key) if e.get("last_fill")]

    def referee(self, key: str) -> list[dict]:
        """The simulator's record of place/modify/cancel requests for this intent's orderRef."""
        return self.sim.control.requests(order_ref_for(key))

    def placed(self, key: str) -> int:
        return sum(1 for request in self.referee(key) if request["event"] == "place")

    def alerts(self, alert_type: str) -> list[dict]:
        events = [json.loads(fields[b"event"])["payload"] for _id, fields in self.r.xrange("ev.alerts")]
        return [e for e in events if e["alert_type"] == alert_type]


@pytest.fixture
def execution(redis_url, r, sim, tmp_path):
    harness = Execution(redis_url, r, sim, tmp_path)
    yield harness
    if harness.process.alive():
        assert harness.process.terminate() == 0


def freeze(sim, bid: float, ask: float, size: int = 1000, symbol: str = SYMBOL) -> None:
    sim.control.set_quote(symbol, bid=bid, ask=ask, bid_size=size, ask_size=size)


# --- one intent, one order, ever --------------------------------------------------------------------

def test_duplicate_and_redelivered_intents_make_one_broker_order(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    intent = execution.intent("intent:dup:1", limit_price=24.80)
    execution.intent("intent:dup:1", limit_price=24.80)  # the same key again
    # A redelivery at stream level: the very same entry appended once more.
    raw = r.xrange("ev.intents")[0][1]
    append(r, "ev.intents", raw)
    execution.wait_status("intent:dup:1", "FILLED")
    time.sleep(1.0)
    assert execution.placed("intent:dup:1") == 1
    assert len(sim.control.orders(order_ref_for("intent:dup:1"))) == 1
    fills = execution.fills("intent:dup:1")
    assert [f["qty"] for f in fills] == [intent.qty]
    assert len(sim.control.fills(order_ref_for("intent:dup:1"))) == 1


@pytest.mark.parametrize("failpoint", ["execution.before_send", "execution.after_send"])
def test_sigkill_around_the_send_never_makes_a_second_order(execution, sim, r, failpoint):
    execution.start(QE_FAILPOINT=failpoint).wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:crash:1", limit_price=24.80)
    assert execution.process.wait(timeout=20) == -9  # SIGKILL at the failpoint
    record = json.loads(r.hget("state:orders", order_ref_for("intent:crash:1")))
    assert record["status"] == "PENDING_SUBMIT" and record["broker_order_id"] is not None
    placed_before_restart = execution.placed("intent:crash:1")
    assert placed_before_restart == (0 if failpoint == "execution.before_send" else 1)
    execution.start(QE_FAILPOINT="")
    execution.wait_status("intent:crash:1", "FILLED")
    time.sleep(1.0)
    # Exactly one order at the broker: resubmitted if it never arrived, adopted if it did.
    assert execution.placed("intent:crash:1") == 1
    assert len(sim.control.orders(order_ref_for("intent:crash:1"))) == 1
    assert len(execution.fills("intent:crash:1")) == 1


def test_sigkill_after_a_fill_before_its_event_publishes_it_once(execution, sim, r):
    execution.start(QE_FAILPOINT="execution.before_fill_commit").wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:fillcrash:1", limit_price=24.80)
    assert execution.process.wait(timeout=20) == -9
    assert len(sim.control.fills(order_ref_for("intent:fillcrash:1"))) == 1  # the broker filled it
    assert execution.fills("intent:fillcrash:1") == []  # ... and we had not published it
    execution.start(QE_FAILPOINT="")
    execution.wait_status("intent:fillcrash:1", "FILLED")
    time.sleep(1.0)
    execution.process.restart()  # a third start must not publish it again
    execution.wait_connected()
    time.sleep(2.0)
    fills = execution.fills("intent:fillcrash:1")
    assert len(fills) == 1 and fills[0]["exec_id"] == sim.control.fills(order_ref_for("intent:fillcrash:1"))[0]["exec_id"]
    assert execution.placed("intent:fillcrash:1") == 1


# --- broker faults ------------------------------------------------------------------------------------

def test_connection_dropped_mid_order_and_fill_while_down(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:drop:1", limit_price=25.00)  # rests above the ask
    execution.wait_status("intent:drop:1", "SUBMITTED")
    sim.control.restart(down_seconds=3.0)  # gateway gone; the order lives on at the "broker"
    wait_until(lambda: r.hget("state:broker", "connected") == b"false", timeout=10, message="broker down seen")
    freeze(sim, 25.00, 25.02)  # the market crosses our limit while we are away: it fills
    wait_until(lambda: sim.control.fills(order_ref_for("intent:drop:1")), timeout=10, message="filled at the broker")
    execution.wait_status("intent:drop:1", "FILLED", timeout=40)
    time.sleep(1.0)
    assert len(execution.fills("intent:drop:1")) == 1
    assert execution.placed("intent:drop:1") == 1
    broker = [json.loads(fields[b"event"])["payload"]["connected"] for _id, fields in r.xrange("ev.broker")]
    assert broker[0] is True and False in broker and broker[-1] is True  # down, then up again, on ev.broker
    position = json.loads(r.hget("state:positions", SYMBOL))
    assert position["qty"] == 3000 and position["bucket"] == "LT"


def cross(sim, bid: float, size: int = 100) -> None:
    """The market crosses our resting SELL at 25.00: one fill of `size` shares (one
    displayed level per market change)."""
    freeze(sim, bid, round(bid + 0.02, 2), size)


def sim_fills(sim, key: str) -> list[dict]:
    return sim.control.fills(order_ref_for(key))


@pytest.mark.parametrize("cut_off", ["drop_on_fill", "restart", "sigkill"])
def test_every_fill_missed_while_cut_off_is_published_once(execution, sim, r, cut_off):
    """A resting order fills once while execution listens, then twice more while it is
    cut off; after it is back, ev.orders holds exactly one fill event per execId at the
    broker (no more, no fewer, also after a further restart) and the quantities add up."""
    key = f"intent:multifill:{cut_off}"
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    execution.intent(key, qty=200, limit_price=25.00)  # rests above the ask (200: the liquidity cap)
    execution.wait_status(key, "SUBMITTED")
    cross(sim, 25.00)  # a first fill, heard live
    wait_until(lambda: len(execution.fills(key)) == 1, timeout=15, message="first fill published live")
    freeze(sim, 24.80, 24.82)
    if cut_off == "drop_on_fill":
        sim.control.refuse_connections(5)  # the next fill aborts our connection; no reconnect for 5 s
        sim.control.drop_on_fill(1)
    elif cut_off == "restart":
        sim.control.restart(down_seconds=5)
    else:
        execution.process.kill()
    if cut_off != "drop_on_fill":
        wait_until(lambda: cut_off == "sigkill" or r.hget("state:broker", "connected") == b"false", timeout=10, message="cut off")
    cross(sim, 25.01, size=50)
    wait_until(lambda: len(sim_fills(sim, key)) == 2, timeout=10, message="second fill at the broker")
    if cut_off == "drop_on_fill":
        wait_until(lambda: r.hget("state:broker", "connected") == b"false", timeout=10, message="dropped on the fill")
    freeze(sim, 24.80, 24.82)
    cross(sim, 25.00, size=50)
    wait_until(lambda: len(sim_fills(sim, key)) == 3, timeout=10, message="third fill at the broker")
    assert len(execution.fills(key)) == 1  # nothing heard while cut off
    if cut_off == "sigkill":
        execution.start()
    execution.wait_status(key, "FILLED", timeout=40)
    time.sleep(1.5)
    execution.process.restart()  # a further start reconciles the same executions again
    execution.wait_connected()
    time.sleep(2.0)
    at_broker = sorted(f["exec_id"] for f in sim_fills(sim, key))
    published = execution.fills(key)
    assert sorted(f["exec_id"] for f in published) == at_broker  # each execId exactly once
    assert [f["qty"] for f in published] == [100, 50, 50]
    last = execution.orders(key)[-1]
    assert last["status"] == "FILLED" and last["filled_qty"] == 200
    filled_by_event = [o["filled_qty"] for o in execution.orders(key) if o.get("last_fill")]
    assert filled_by_event == [100, 150, 200]  # in order, one step per execution
    assert execution.placed(key) == 1
    assert json.loads(r.hget("state:positions", SYMBOL))["qty"] == 3000


def test_refused_connections_then_orders_flow_after_reconnect(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    sim.control.refuse_connections(4)
    sim.control.drop_connections()
    wait_until(lambda: r.hget("state:broker", "connected") == b"false", timeout=10, message="broker down")
    execution.intent("intent:refused:1", limit_price=24.80)
    time.sleep(1.0)
    assert execution.statuses("intent:refused:1") == ["PENDING_SUBMIT"]  # waits; not rejected
    assert execution.placed("intent:refused:1") == 0
    execution.wait_status("intent:refused:1", "FILLED", timeout=40)
    assert execution.placed("intent:refused:1") == 1
    log = [line.get("msg") for line in execution.process.log_lines()]
    assert "broker connect failed" in log


def test_a_local_cancelled_after_an_error_is_confirmed_with_the_broker(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:localcancel:1", limit_price=25.00)
    execution.wait_status("intent:localcancel:1", "SUBMITTED")
    order_id = sim.control.orders(order_ref_for("intent:localcancel:1"))[0]["order_id"]
    # A non-fatal error about the live order: ib_async marks it Cancelled on its own.
    sim.control.send_code(161, "Cancel attempted when order is not in a cancellable state", client_id=7, req_id=order_id)
    time.sleep(3.0)  # execution confirms with the broker (reconciliation) instead of trusting it
    assert "CANCELLED" not in execution.statuses("intent:localcancel:1")
    record = json.loads(r.hget("state:orders", order_ref_for("intent:localcancel:1")))
    assert record["status"] == "SUBMITTED" and record["last_error_code"] == 161
    freeze(sim, 25.00, 25.02)  # it really was live: it fills
    execution.wait_status("intent:localcancel:1", "FILLED")
    assert execution.placed("intent:localcancel:1") == 1


def test_broker_reject_201_is_published_with_code_and_not_retried(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    sim.control.reject_next(1, code=201, text="Order rejected - reason: test margin")
    execution.intent("intent:reject:1", limit_price=24.80)
    execution.wait_status("intent:reject:1", "REJECTED")
    rejected = [o for o in execution.orders("intent:reject:1") if o["status"] == "REJECTED"][0]
    assert rejected["reject_code"] == 201 and "test margin" in rejected["reject_reason"]
    time.sleep(2.5)  # reconciliation after the error must not resubmit
    assert execution.placed("intent:reject:1") == 1
    assert execution.alerts("order_rejected")


def test_delayed_acks_make_no_duplicate(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    sim.control.delay_acks(1, seconds=3.0)
    execution.intent("intent:slowack:1", limit_price=25.00)
    time.sleep(1.5)
    assert execution.statuses("intent:slowack:1") == ["PENDING_SUBMIT"]
    execution.wait_status("intent:slowack:1", "SUBMITTED", timeout=15)
    assert execution.placed("intent:slowack:1") == 1


@pytest.mark.parametrize("ack_delay_s", [None, 0.5, 3.0])
def test_a_normal_place_is_one_request_at_the_broker(execution, sim, r, ack_delay_s):
    """No check re-sends an order before its acknowledgement could arrive: one `place`
    and nothing else per orderRef, also when acks are slow (the broker would treat a
    repeat as a modify: harmless, but noise). Each intent arrives together with IB's
    "connectivity restored" (1102), so execution reconciles in the very loop that
    placed it (before the order can be at the broker, let alone acknowledged)."""
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    keys = [f"intent:oneplace:{n}" for n in range(4)]
    for key in keys:
        if ack_delay_s:
            sim.control.delay_acks(1, seconds=ack_delay_s)
        sim.control.send_code(1102, "Connectivity between IB and TWS has been restored - data maintained.")
        execution.intent(key, limit_price=25.00)  # rests
        execution.wait_status(key, "SUBMITTED", timeout=15)
    time.sleep(2.0)
    for key in keys:
        requests = execution.referee(key)
        assert [request["event"] for request in requests] == ["place"], (key, requests)
        assert len(sim.control.orders(order_ref_for(key))) == 1
    reconciled = [line for line in execution.process.log_lines() if line.get("msg") == "reconciled with the broker"]
    assert len(reconciled) >= 1 + len(keys)  # the start, then once per 1102


# --- lifecycle -------------------------------------------------------------------------------------------

def test_modify_keeps_the_order_id_and_waits_2_5_seconds_then_ttl_cancels(execution, sim, r, tmp_path):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:mod:1", limit_price=25.10, ttl_s=8)
    execution.wait_status("intent:mod:1", "SUBMITTED")
    execution.intent("intent:mod:1:modify", action="MODIFY", target_intent_key="intent:mod:1", limit_price=25.05)
    time.sleep(1.0)
    assert [r_["event"] for r_ in execution.referee("intent:mod:1")] == ["place"]  # too early: waiting
    wait_until(lambda: [q["event"] for q in execution.referee("intent:mod:1")] == ["place", "modify"], timeout=10, message="modify sent")
    requests = execution.referee("intent:mod:1")
    assert requests[0]["order_id"] == requests[1]["order_id"]
    assert requests[1]["lmt_price"] == 25.05
    # The same price again: not a change, nothing sent.
    execution.intent("intent:mod:1:same", action="MODIFY", target_intent_key="intent:mod:1", limit_price=25.05)
    execution.wait_status("intent:mod:1", "EXPIRED", timeout=20)  # ttl_s=8
    assert [q["event"] for q in execution.referee("intent:mod:1")] == ["place", "modify", "cancel"]
    assert sim.control.orders(order_ref_for("intent:mod:1"))[0]["status"] == "Cancelled"


def test_reduce_only_in_derisk_modes_and_cancels_only_when_halted(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    # No Brain state yet: its mode is unknown, and unknown is not NORMAL.
    execution.intent("intent:ro:unknown", side="BUY", classification="LT_LONG_INC", limit_price=24.70, risk_delta_gross_pct=0.5)
    execution.wait_status("intent:ro:unknown", "REJECTED")
    assert "reduce_only: mode unknown" in execution.orders("intent:ro:unknown")[-1]["reject_reason"]
    execution.brain_mode("SOFT_DERISK")
    execution.intent("intent:ro:inc", side="BUY", classification="LT_LONG_INC", limit_price=24.70, risk_delta_gross_pct=0.5)
    execution.intent("intent:ro:dec", limit_price=25.20)
    execution.wait_status("intent:ro:inc", "REJECTED")
    execution.wait_status("intent:ro:dec", "SUBMITTED")
    assert "reduce_only" in execution.orders("intent:ro:inc")[-1]["reject_reason"]
    assert execution.placed("intent:ro:inc") == 0
    # The operator halts: nothing new, but cancels still go out.
    control = Control(command="halt", reason="test", operator="tester")
    execution.publisher.publish("ev.control", make_event(control, idempotency_key="control:halt:1", source="qe", ts_ns=time.time_ns()))
    time.sleep(0.5)
    execution.intent("intent:ro:dec2", qty=100, limit_price=25.30)
    execution.wait_status("intent:ro:dec2", "REJECTED")
    assert "halted" in execution.orders("intent:ro:dec2")[-1]["reject_reason"]
    execution.intent("intent:ro:cancel", action="CANCEL", target_intent_key="intent:ro:dec", limit_price=None, order_type="LMT")
    execution.wait_status("intent:ro:dec", "CANCELLED")
    assert [q["event"] for q in execution.referee("intent:ro:dec")] == ["place", "cancel"]
    assert execution.placed("intent:ro:dec2") == 0


def test_held_symbols_without_a_market_price_block_increases(execution, sim, r):
    """Issue 13: until the market prices every held symbol, they count at their fallback
    marks (average cost) and no risk-increasing order goes out; decreases still do."""
    execution.brain_mode("NORMAL")  # the Brain allows increases: only the unpriced book refuses it
    execution.start().wait_connected()
    execution.market(31.44, 31.46, symbol="PFF")  # only PFF is priced
    execution.intent("intent:unpriced:1", symbol="PFF", side="SELL", qty=200, limit_price=31.45,
                     classification="LT_SHORT_INC", intent_type="LT_BAND", risk_delta_gross_pct=0.6)
    execution.wait_status("intent:unpriced:1", "REJECTED")
    reason = execution.orders("intent:unpriced:1")[-1]["reject_reason"]
    assert reason.startswith("unpriced_positions: 22 symbol(s) not priced by the market") and "average cost" in reason
    execution.intent("intent:unpriced:dec", symbol="PFF", side="BUY", qty=200, limit_price=31.46,
                     classification="LT_SHORT_DEC", intent_type="SOFT_DERISK")
    execution.wait_status("intent:unpriced:dec", "FILLED")
    assert execution.placed("intent:unpriced:1") == 0 and execution.placed("intent:unpriced:dec") == 1


def test_hard_cap_rejects_an_order_that_would_break_130_percent(execution, sim, r):
    execution.start().wait_connected()
    execution.brain_mode("NORMAL")
    execution.market(31.44, 31.46, symbol="PFF")
    execution.price_the_book()
    # Demo portfolio: ~125 % potential gross of ~$1M, short 5,700 PFF. Shorting 4,000 more
    # (~$126k) would take it past 130 %. (Buying 4,000 would not: it only covers the short.)
    execution.intent("intent:cap:1", symbol="PFF", side="SELL", qty=4000, limit_price=31.45,
                     classification="LT_SHORT_INC", intent_type="LT_BAND", risk_delta_gross_pct=12.6)
    execution.wait_status("intent:cap:1", "REJECTED")
    reason = execution.orders("intent:cap:1")[-1]["reject_reason"]
    assert reason.startswith("hard_cap: potential gross would be") and "> hard cap 130%" in reason
    assert execution.placed("intent:cap:1") == 0


def test_live_mode_refuses_a_paper_account(redis_url, r, sim, tmp_path):
    harness = Execution(redis_url, r, sim, tmp_path, QE_IB_MODE="live", QE_IB_LIVE_ACCOUNTS="U1111111")
    harness.start()
    wait_until(lambda: r.hget("state:broker", "orders_allowed") == b"false", timeout=30, message="interlock published")
    assert "account interlock" in json.loads(r.hget("state:broker", "reason"))
    harness.market(24.80, 24.82)
    harness.intent("intent:live:1", limit_price=24.80)
    harness.wait_status("intent:live:1", "REJECTED")
    assert "account_interlock" in harness.orders("intent:live:1")[-1]["reject_reason"]
    assert sim.control.orders() == []
    assert harness.process.terminate() == 0


# --- price collar, modifies, TTL: execution's own checks (SPEC 9; issue 12) ----------------------------

def wait_denied(execution, key: str, timeout: float = 15) -> dict:
    wait_until(lambda: execution.denial(key) is not None, timeout=timeout, message=f"{key} denied: {execution.statuses(key)}")
    return execution.denial(key)


def test_orders_outside_the_collar_never_reach_the_broker(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)  # trusted reference 24.81: collar 23.57 .. 26.05
    sell_cheap = execution.intent("intent:collar:sell", side="SELL", classification="LT_LONG_DEC", limit_price=0.01)
    buy_dear = execution.intent("intent:collar:buy", side="BUY", classification="LT_LONG_INC", limit_price=2400.00,
                                risk_delta_gross_pct=0.5)
    execution.intent("intent:collar:good", limit_price=24.80)  # the same market, a sane price: it fills
    for key, intent in (("intent:collar:sell", sell_cheap), ("intent:collar:buy", buy_dear)):
        denied = wait_denied(execution, key)
        assert denied["reject_code"] is None
        assert denied["reject_reason"].startswith(f"collar: price {intent.limit_price:.2f} outside 23.57..26.05")
        assert execution.statuses(key) == ["REJECTED"]  # never PENDING_SUBMIT at the broker either
    execution.wait_status("intent:collar:good", "FILLED")
    assert execution.alerts("order_rejected")
    time.sleep(0.5)
    assert {o["order_ref"] for o in sim.control.orders()} == {order_ref_for("intent:collar:good")}
    assert execution.placed("intent:collar:sell") == execution.placed("intent:collar:buy") == 0


def test_a_stub_quote_moves_neither_the_reference_nor_the_marks(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    before = execution.saved_prices(SYMBOL)
    # A stub quote as market data forwarded it before the gate (its ask below max_price, so
    # the contract lets it through and execution's own gate must catch it).
    execution.quote(0.01, 9_999.00)
    wait_until(lambda: (execution.saved_prices(SYMBOL).get("implausible") or "").startswith("wide_spread"), timeout=15,
               message="stub quote seen as implausible")
    execution.quote(0.01, 0.02, implausible="jump")  # flagged by market data: honoured as is
    wait_until(lambda: execution.saved_prices(SYMBOL).get("implausible") == "flagged by market data: jump", timeout=15,
               message="flag honoured")
    after = execution.saved_prices(SYMBOL)
    assert (after["trusted_mid"], after["truth_tick"]) == (before["trusted_mid"], before["truth_tick"])
    # A de-risk SELL priced off the stub is refused; one priced off the real market goes out.
    execution.intent("intent:stub:cheap", limit_price=0.01)
    execution.intent("intent:stub:fair", limit_price=24.80)
    assert wait_denied(execution, "intent:stub:cheap")["reject_reason"].startswith("collar: price 0.01 outside 23.57..26.05")
    execution.wait_status("intent:stub:fair", "FILLED")
    assert execution.placed("intent:stub:cheap") == 0 and execution.placed("intent:stub:fair") == 1


def test_without_any_trusted_price_nothing_is_sent(execution, sim, r):
    execution.start().wait_connected()
    # No truth tick, GRPAN or quote for NLY PRF has reached execution: neither an increase
    # nor a decrease can be checked against a collar.
    execution.intent("intent:noref:inc", symbol="NLY PRF", side="BUY", classification="LT_LONG_INC", limit_price=25.15,
                     risk_delta_gross_pct=0.5)
    execution.intent("intent:noref:dec", symbol="NLY PRF", side="SELL", classification="LT_LONG_DEC", limit_price=25.15)
    for key in ("intent:noref:inc", "intent:noref:dec"):
        assert "collar: no trusted reference for NLY PRF" in wait_denied(execution, key)["reject_reason"]
    time.sleep(0.5)
    assert sim.control.orders() == []


def test_modifies_outside_the_collar_never_reach_the_broker(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    execution.intent("intent:cmod:1", limit_price=25.20)  # rests above the ask
    execution.wait_status("intent:cmod:1", "SUBMITTED")
    execution.intent("intent:cmod:1:far", action="MODIFY", target_intent_key="intent:cmod:1", limit_price=2400.00)
    denied = wait_denied(execution, "intent:cmod:1:far")
    assert denied["reject_code"] is None and denied["broker_order_id"] is None
    assert denied["reject_reason"].startswith(f"collar: modify of {order_ref_for('intent:cmod:1')} 25.2 -> 2400.0: price 2400.00 outside")
    # The absurd price: refused by execution, or already by the contract (ev.dlq); never sent.
    execution.intent("intent:cmod:1:absurd", action="MODIFY", target_intent_key="intent:cmod:1", limit_price=999_999.99)
    wait_until(lambda: execution.denial("intent:cmod:1:absurd") is not None
               or any(b"intent:cmod:1:absurd" in fields[b"fields"] for _id, fields in r.xrange("ev.dlq")),
               timeout=15, message="absurd modify refused")
    time.sleep(3.0)  # past the 2.5 s modify interval: still nothing sent
    assert [q["event"] for q in execution.referee("intent:cmod:1")] == ["place"]
    assert [o["lmt_price"] for o in sim.control.orders(order_ref_for("intent:cmod:1"))] == [25.20]
    assert execution.statuses("intent:cmod:1")[-1] == "SUBMITTED"  # the order itself keeps working
    # A sane re-price still goes through, with the same broker order id.
    execution.intent("intent:cmod:1:near", action="MODIFY", target_intent_key="intent:cmod:1", limit_price=25.15)
    wait_until(lambda: [q["event"] for q in execution.referee("intent:cmod:1")] == ["place", "modify"], timeout=15,
               message="sane modify sent")
    assert execution.referee("intent:cmod:1")[1]["lmt_price"] == 25.15


def write_universe(tmp_path: Path, adv: int) -> Path:
    """etc/universe.csv with CIM PRB's ADV replaced (its liquidity cap is max(ADV/1000, 200))."""
    lines = (REPO / "etc" / "universe.csv").read_text().splitlines()
    lines = [f"CIM PRB,LT,{adv},CIM,24.85" if line.startswith("CIM PRB,") else line for line in lines]
    path = tmp_path / f"universe-{adv}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_modify_that_breaks_the_notional_or_the_liquidity_cap_is_refused(redis_url, r, sim, tmp_path):
    rules = write_rules(tmp_path, execution={"max_order_notional": 25_000})
    harness = Execution(redis_url, r, sim, tmp_path, QE_CONFIG=str(rules), QE_UNIVERSE=str(write_universe(tmp_path, 1_000_000)))
    try:
        harness.start().wait_connected()
        harness.market(24.80, 24.82)
        harness.intent("intent:lim:1", qty=1000, limit_price=24.85)  # 24,850 <= 25,000; 1,000 <= ADV/1000
        harness.wait_status("intent:lim:1", "SUBMITTED")
        # 25.05 is inside the collar (23.57 .. 26.05), but 1,000 x 25.05 = 25,050 > 25,000.
        harness.intent("intent:lim:1:up", action="MODIFY", target_intent_key="intent:lim:1", qty=1000, limit_price=25.05)
        denied = wait_denied(harness, "intent:lim:1:up")
        assert denied["reject_reason"].startswith("max_order_notional: modify of")
        assert "notional 25,050.00 above 25,000.00" in denied["reject_reason"]
        # The universe's ADV is refreshed lower (cap 200 shares); execution restarts with it.
        assert harness.process.terminate() == 0
        seen = r.xlen("ev.broker")
        harness.start(QE_UNIVERSE=str(write_universe(tmp_path, 61_000)))
        wait_until(lambda: any(state["connected"] for state in broker_states(r)[seen:]), timeout=30, message="reconnected")
        harness.intent("intent:lim:1:down", action="MODIFY", target_intent_key="intent:lim:1", qty=1000, limit_price=24.90)
        denied = wait_denied(harness, "intent:lim:1:down")
        assert denied["reject_reason"].startswith("liquidity_cap: modify of") and "qty 1000 above" in denied["reject_reason"]
        time.sleep(3.0)
        assert [q["event"] for q in harness.referee("intent:lim:1")] == ["place"]
        assert [o["lmt_price"] for o in sim.control.orders(order_ref_for("intent:lim:1"))] == [24.85]
    finally:
        if harness.process.alive():
            assert harness.process.terminate() == 0


def test_an_intent_created_in_2100_still_expires_by_its_ttl_from_receipt(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    in_2100 = 4_102_444_800 * 1_000_000_000
    received = time.monotonic()
    execution.intent("intent:future:1", limit_price=25.20, ttl_s=3, created_ns=in_2100)  # rests above the ask
    time.sleep(1.0)
    dead = [f for _id, f in r.xrange("ev.dlq") if b"intent:future:1" in f[b"fields"]]
    if dead:  # the contract bounds created_ns against the reader's clock: refused before execution
        assert b"created_ns" in dead[0][b"reason"] and sim.control.orders() == []
        return
    execution.wait_status("intent:future:1", "SUBMITTED")
    execution.wait_status("intent:future:1", "EXPIRED", timeout=20)
    assert time.monotonic() - received < 15
    assert [q["event"] for q in execution.referee("intent:future:1")] == ["place", "cancel"]
    assert sim.control.orders(order_ref_for("intent:future:1"))[0]["status"] == "Cancelled"


# --- bad input -----------------------------------------------------------------------------------------------

def test_bad_intents_never_reach_the_broker(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.84, 24.86)
    good = execution.intent("intent:template", limit_price=25.50).model_dump(mode="json")
    envelope = json.loads(r.xrange("ev.intents")[0][1][b"event"])

    def raw(key: str, **changes) -> None:
        payload = {**good, **changes}
        payload = {k: v for k, v in payload.items() if v is not ...}
        append(r, "ev.intents", {"event": json.dumps({**envelope, "idempotency_key": key, "payload": payload})})

    raw("bad:missing", qty=...)
    raw("bad:zero", qty=0)
    raw("bad:fraction", qty=200.5)
    raw("bad:grid", limit_price=24.805)
    raw("bad:side", side="BUY")  # LT_LONG_DEC must be a SELL
    execution.intent("bad:symbol", symbol="ZZZ PRA")
    wait_until(lambda: r.xlen("ev.dlq") >= 5, timeout=15, message="dead letters")
    reasons = Counter()
    for _id, fields in r.xrange("ev.dlq"):
        reason = fields[b"reason"].decode()
        assert fields[b"origin_stream"] == b"ev.intents"
        reasons[reason.split(":")[1].strip() if ":" in reason else reason] += 1
    dead = " | ".join(fields[b"reason"].decode() for _id, fields in r.xrange("ev.dlq"))
    assert "payload.qty: Field required" in dead
    assert "payload.qty: Input should be greater than 0" in dead
    assert "payload.qty: Input should be a valid integer" in dead  # strict contracts: 200.5 is not an int
    assert "limit_price 24.805 is not on the $0.01 grid" in dead
    assert "classification LT_LONG_DEC needs side SELL, got BUY" in dead
    execution.wait_status("bad:symbol", "REJECTED")
    assert "unknown_symbol" in execution.orders("bad:symbol")[-1]["reject_reason"]
    time.sleep(0.5)
    refs = {o["order_ref"] for o in sim.control.orders()}
    assert refs == {order_ref_for("intent:template")}  # only the good one reached the broker
    assert execution.process.alive()


def broker_states(r) -> list[dict]:
    return [json.loads(fields[b"event"])["payload"] for _id, fields in r.xrange("ev.broker")]


def test_connectivity_codes_stop_and_resume_sending_and_farm_codes_are_published(execution, sim, r):
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    sim.control.send_code(1100)  # IB lost its connection: nothing may be sent
    wait_until(lambda: r.hget("state:broker", "connected") == b"false", timeout=15, message="1100 published")
    assert "1100" in json.loads(r.hget("state:broker", "reason"))
    execution.intent("intent:conn:1", limit_price=24.80)
    time.sleep(1.5)
    assert execution.statuses("intent:conn:1") == ["PENDING_SUBMIT"] and execution.placed("intent:conn:1") == 0
    sim.control.send_code(1102)  # restored, data kept: reconcile, then send
    execution.wait_status("intent:conn:1", "FILLED")
    assert execution.placed("intent:conn:1") == 1
    sim.control.send_code(2103)
    wait_until(lambda: broker_states(r)[-1]["data_farm_ok"] is False, timeout=15, message="2103 published")
    sim.control.send_code(2104)
    wait_until(lambda: broker_states(r)[-1]["data_farm_ok"] is True, timeout=15, message="2104 published")
    assert broker_states(r)[-1]["connected"] is True


def test_client_id_in_use_is_backed_off_until_free(execution, sim, r, ib_client_factory):
    squatter = ib_client_factory(7)  # execution's client id, taken by someone else
    execution.start()
    wait_until(lambda: "broker connect failed" in [l.get("msg") for l in execution.process.log_lines()], timeout=30,
               message="a refused connect attempt")
    assert r.hget("state:broker", "connected") == b"false"
    squatter.disconnect()
    execution.wait_connected()
    failures = [l for l in execution.process.log_lines() if l.get("msg") == "broker connect failed"]
    assert failures and all(f.get("retry_in_s", 0) > 0 for f in failures)
    assert failures[0]["error"] == "client id 7 in use (IB 326)"


@pytest.fixture
def ib_client_factory(sim):
    from ib_async import IB

    clients = []

    def connect(client_id: int):
        client = IB()
        client.connect("127.0.0.1", sim.port, clientId=client_id, timeout=10)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.disconnect()


# --- the broker link on its own ---------------------------------------------------------------------

def test_a_modify_of_an_order_the_broker_already_cancelled_is_not_sent(sim):
    """A modify queued while the broker cancels the order (e.g. IB 202) is not sent:
    ib_async would send it and then fail its own assertion, and the gateway would
    refuse it. The order's final status still reaches the service's inbox."""
    from daemons.execution.broker import BrokerLink, OrderDone
    from daemons.execution.core import OrderRecord
    from sim.testing import wait_until as pump_until

    freeze(sim, 24.80, 24.82)
    link = BrokerLink("127.0.0.1", sim.port, 41, connect_timeout_s=5, reconnect_base_s=0.1, reconnect_cap_s=1)
    try:
        assert link.try_connect(0.0)
        record = OrderRecord(
            order_ref="qe-modify-after-cancel", intent_key="intent:modify-after-cancel", intent_type="OPEN",
            symbol=SYMBOL, side="BUY", qty=100, order_type="LMT", limit_price=24.50, tif="DAY", bucket="LT",
            classification="LT_LONG_INC", created_ns=0, expires_ns=0, broker_order_id=link.reserve_order_id(1),
        )
        account = link.account(None)
        link.place(record, account, hidden=False)
        link.flush()
        pump_until(link.ib, lambda: [o for o in sim.control.orders(record.order_ref) if o["status"] == "Submitted"])
        link.cancel(record.broker_order_id)
        pump_until(link.ib, lambda: ("status", record.order_ref, record.broker_order_id) in
                   {entry[:3] for entry in link.inbox if entry[0] == "status" and entry[4] == "Cancelled"})
        sent = len(sim.control.requests(record.order_ref))

        with pytest.raises(OrderDone, match="already Cancelled"):
            link.place(record, account, hidden=False, price=24.55)
        link.flush()
        link.ib.sleep(0.3)
        assert len(sim.control.requests(record.order_ref)) == sent
        assert [o["status"] for o in sim.control.orders(record.order_ref)] == ["Cancelled"]
    finally:
        link.disconnect()


def test_cancels_beyond_the_message_burst_are_sent_soon_not_left_to_the_ttl(execution, sim, r):
    """More cancels at once than the rate limit's burst: the rest wait for tokens and go
    out within seconds, never at the orders' TTL (a pulled quote must stop working)."""
    execution.start().wait_connected()
    execution.market(24.80, 24.82)
    keys = [f"intent:burst:{n}" for n in range(14)]
    for key in keys:
        execution.intent(key, limit_price=25.20, qty=100, ttl_s=600)  # rests above the ask for ten minutes
    for key in keys:
        execution.wait_status(key, "SUBMITTED")
    time.sleep(1.0)  # the token bucket refills after the places
    asked = time.monotonic()
    for key in keys:
        execution.intent(f"{key}:cancel", action="CANCEL", target_intent_key=key, limit_price=None)
    for key in keys:
        execution.wait_status(key, "CANCELLED", timeout=20)
    assert time.monotonic() - asked < 15  # within seconds, far from the 600 s TTL
    assert all([q["event"] for q in execution.referee(key)] == ["place", "cancel"] for key in keys)
