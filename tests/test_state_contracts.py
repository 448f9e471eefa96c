"""The contracts between daemons as code (issue 13): every cross-daemon value read
with qe.state's reader from what its REAL writer wrote, never from an imitation.

- the Brain's mode and halt (written by the real DecisionHandler) as execution reads
  them: its reduce-only and cancels-only gates fire;
- session, broker, exposure, positions, orders: written with the writer's code,
  read back typed; missing and invalid say so (unknown is not zero);
- alerts: one enumeration, an explicit raised/resolved state, and the Brain reacting
  to each correctly;
- the sets (modes, order statuses) and the orderRef format exist once.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import get_args

import pytest

import daemons.decision.service as brain
from daemons.execution import core as execution_core
from daemons.execution.service import ExecutionService, _IntentView
from qe import config, state
from qe.alert_types import CONDITION_TYPES, EVENT_TYPES, AlertType
from qe.clock import Clock
from qe.contracts import (
    INCREASE_BLOCKING_MODES,
    L1,
    MODES,
    OPEN_ORDER_STATUSES,
    REDUCE_ONLY_MODES,
    TERMINAL_ORDER_STATUSES,
    Alert,
    BrokerState,
    BucketExposure,
    Control,
    Exposure,
    Intent,
    OrderStatus,
    Session,
    SymbolExposure,
    intent_id_for,
    is_our_order_ref,
    make_event,
    order_ref_for,
)
from qe.daemon import Context
from qe.streams import Effects, StreamPolicy
from tests.support.brain import NS, T0
from tests.support.processes import REPO

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")


class FixedClock(Clock):
    def __init__(self, now_ns: int) -> None:
        self.now = now_ns

    def now_ns(self) -> int:  # type: ignore[override]
        return self.now


def context(tmp_path, daemon: str) -> Context:
    universe = tmp_path / "universe.csv"
    universe.write_text("symbol,bucket_hint,adv,group,ref_price\nCIM PRB,LT,50000,G,25.00\nCIM PRC,MM_PURE,50000,G,25.00\n")
    settings = config.Settings(redis_url="redis://127.0.0.1:1/0", universe_path=universe)
    return Context(daemon, settings, RULES, FixedClock(T0), None, logging.getLogger("test"))  # type: ignore[arg-type]


@pytest.fixture
def the_brain(tmp_path):
    return brain.DecisionHandler(context(tmp_path, "decision"))


@pytest.fixture
def execution(tmp_path):
    service = ExecutionService(context(tmp_path, "execution"), broker=None)  # type: ignore[arg-type]
    service.view.account_ok = True  # the account interlock is not what these tests are about
    return service


def effects() -> Effects:
    return Effects(StreamPolicy(RULES.streams))


def commit(r, done: Effects) -> None:
    """Apply a handler's effects to Redis as the stream runtime would (state writes only)."""
    for op in done.ops:
        if op[0] in ("HSET", "HDEL", "DEL"):
            r.execute_command(*op)


def event(payload, key: str, ts_ns: int = T0):
    return make_event(payload, idempotency_key=key, source="test", ts_ns=ts_ns)


def session(now_ns: int = T0, soft: bool = True, hard: bool = False) -> Session:
    iso = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).isoformat()
    return Session(now_ns=now_ns, now_utc=iso, now_ny=iso, trading_day="2026-11-20", market_open=True, regime="CLOSE",
                   minutes_to_close=10.0, soft_derisk_active=soft, hard_derisk_active=hard, early_close=False)


def exposure(gross_pct: float = 112.0) -> Exposure:
    notional = gross_pct * 10_000
    line = SymbolExposure(qty=int(notional / 25), bucket="LT", mark=25.0, mark_source="l1_mid", notional=notional,
                          open_buy_qty=0, open_sell_qty=0, potential_notional=notional)
    return Exposure(equity=1_000_000.0, long_notional=notional, short_notional=0.0, gross_pct=gross_pct,
                    net_pct=gross_pct, potential_gross_pct=gross_pct,
                    buckets={"LT": BucketExposure(current_pct=gross_pct, potential_pct=gross_pct, target_pct=80.0, max_pct=200.0),
                             "MM_PURE": BucketExposure(current_pct=0.0, potential_pct=0.0, target_pct=20.0, max_pct=30.0)},
                    symbols={"CIM PRB": line})


def intent(classification: str = "LT_LONG_INC", side: str = "BUY") -> _IntentView:
    return _IntentView(symbol="CIM PRB", side=side, qty=100, limit_price=25.0, classification=classification)


def check(service: ExecutionService, request: _IntentView) -> execution_core.Rejection | None:
    risk = execution_core.RiskView(1_000_000.0, {"CIM PRB": 44_800}, {}, {}, {"CIM PRB": 25.0}, 1_120_000.0)
    return execution_core.check_new_order(request, risk, service.limits, service._gate(), 50_000, reference=25.0)


# --- the Brain's mode and halt, as execution reads them ------------------------------------------


def test_the_brains_soft_derisk_reaches_execution_as_reduce_only(the_brain, execution, r):
    """The bug of issue 13: the Brain stored '"SOFT_DERISK"' (JSON) and execution read it
    raw, so the reduce-only gate never fired. Real writer -> Redis -> real reader."""
    done = effects()
    the_brain.handle(event(session(), "s1"), done)
    the_brain.handle(event(exposure(112.0), "e1"), done)
    the_brain.tick(T0, done)  # the evaluation (paced after the last one)
    commit(r, done)
    assert r.hget(state.DECISION, "mode") == b'"SOFT_DERISK"'  # the writer's encoding: JSON
    execution._read_brain(r)
    assert execution.brain.value is not None and execution.brain.value.mode == "SOFT_DERISK"
    assert execution.brain.value.reduce_only and not execution.brain.value.cancels_only
    refused = check(execution, intent())
    assert refused is not None and refused.rule == "reduce_only" and "SOFT_DERISK" in refused.reason
    assert check(execution, intent("LT_LONG_DEC", "SELL")) is None  # decreases still go out


def test_the_brains_halt_reaches_execution_as_cancels_only(the_brain, execution, r):
    done = effects()
    the_brain.handle(event(session(), "s1"), done)
    the_brain.handle(event(exposure(95.0), "e1"), done)
    the_brain.handle(event(Control(command="halt", reason="test", operator="tester"), "c1"), done)
    commit(r, done)
    assert r.hget(state.DECISION, "mode") == b'"HALTED"'
    execution._read_brain(r)
    decision = execution.brain.value
    assert decision is not None and decision.halted and decision.cancels_only and decision.halt_operator == "tester"
    for request in (intent(), intent("LT_LONG_DEC", "SELL")):
        refused = check(execution, request)
        assert refused is not None and refused.rule == "halted"
    # Resumed: the Brain's next mode is its own again, and so is execution's gate.
    done = effects()
    the_brain.handle(event(Control(command="resume", reason="done", operator="tester"), "c2"), done)
    commit(r, done)
    execution._read_brain(r)
    assert execution.brain.value is not None and not execution.brain.value.cancels_only
    assert check(execution, intent("LT_LONG_DEC", "SELL")) is None


def test_the_halt_flag_alone_stops_orders_before_the_mode_follows(execution, r):
    """The Brain writes the halt at once and the mode at its next evaluation: the flag counts."""
    r.hset(state.DECISION, mapping=state.decision_fields(state.DecisionState(mode="NORMAL")))
    r.hset(state.DECISION, mapping=state.halt_fields(True, "test", "tester"))
    execution._read_brain(r)
    refused = check(execution, intent("LT_LONG_DEC", "SELL"))
    assert refused is not None and refused.rule == "halted"


def test_an_unknown_mode_allows_no_increase(execution, r):
    execution._read_brain(r)  # nothing written yet
    assert execution.brain.missing
    refused = check(execution, intent())
    assert refused is not None and refused.rule == "reduce_only" and "unknown" in refused.reason
    assert check(execution, intent("LT_LONG_DEC", "SELL")) is None
    # A hostile value (not the writer's encoding) is invalid, not a mode.
    r.hset(state.DECISION, "mode", "NORMAL")
    execution._read_brain(r)
    assert execution.brain.problem is not None and execution.brain.problem.startswith("invalid")
    assert check(execution, intent()) is not None


@pytest.mark.parametrize("fields, problem", [
    ({}, "missing"),
    ({b"mode": b'"SOFT"'}, "invalid: mode"),
    ({b"mode": b'"NORMAL"', b"halted": b'"false"'}, "invalid: halted"),  # a string is not a bool
    ({b"mode": b'"NORMAL"', b"since_ns": b"1e400"}, "invalid: since_ns"),
])
def test_decision_reader_says_missing_or_invalid(fields, problem):
    reading = state.parse_decision(fields)
    assert reading.value is None and reading.problem is not None and reading.problem.startswith(problem)


def test_the_brain_reloads_its_public_state_through_the_contract(the_brain, r):
    done = effects()
    the_brain.handle(event(session(), "s1"), done)
    the_brain.handle(event(exposure(112.0), "e1"), done)
    the_brain.tick(T0, done)  # the evaluation (paced after the last one)
    commit(r, done)
    the_brain.load(r)
    assert the_brain.view.state.mode == "SOFT_DERISK" and the_brain.view.state.trading_day == "2026-11-20"


# --- session, broker, exposure, positions, orders ------------------------------------------------


def test_session_broker_and_exposure_read_back_typed_from_their_writers(r):
    s = event(session(), "session:1")
    r.hset(state.SESSION, mapping=state.snapshot_fields(s))  # the session daemon's writer
    b = event(BrokerState(connected=False, orders_allowed=False, reason="IB lost connectivity (1100)"), "broker:1")
    r.hset(state.BROKER, mapping=state.snapshot_fields(b))  # execution's writer
    e = event(exposure(112.0), "exposure:1")
    totals, lines = state.exposure_fields(e)  # the exposure daemon's writer
    r.hset(state.EXPOSURE, mapping=totals)
    r.hset(state.EXPOSURE_SYMBOLS, mapping=lines)

    read_session = state.read_session(r).value
    assert read_session is not None and read_session.payload == s.payload and read_session.idempotency_key == "session:1"
    read_broker = state.read_broker(r).value
    assert read_broker is not None and read_broker.payload.connected is False and read_broker.ts_ns == T0
    read_exposure = state.read_exposure(r).value
    assert read_exposure is not None and read_exposure.payload.gross_pct == 112.0 and read_exposure.payload.symbols == {}
    symbols = state.read_exposure_symbols(r)
    assert symbols.problems == {} and symbols.values["CIM PRB"] == e.payload.symbols["CIM PRB"]


def test_state_readers_are_strict(r):
    r.hset(state.SESSION, mapping=state.snapshot_fields(event(session(), "session:1")))
    r.hset(state.SESSION, "market_open", '"true"')  # a string where a bool belongs
    assert state.read_session(r).problem.startswith("invalid: market_open")
    r.hset(state.EXPOSURE, mapping=state.exposure_fields(event(exposure(), "exposure:1"))[0])
    r.hset(state.EXPOSURE, "gross_pct", "NaN")
    assert state.read_exposure(r).problem.startswith("invalid")
    r.hset(state.EXPOSURE_SYMBOLS, "CIM PRB", '{"qty": 5}')
    assert "CIM PRB" in state.read_exposure_symbols(r).problems
    assert state.read_broker(r).missing


def test_positions_and_orders_as_execution_writes_them(r):
    r.hset(state.POSITIONS, "CIM PRB", state.position_value(state.PositionState(qty=-300, avg_cost=24.5, bucket="LT", account="DU1")))
    r.hset(state.POSITIONS, "AGNCN", '{"qty": 1.5, "avg_cost": 1, "bucket": "LT", "account": "DU1"}')  # hostile
    positions = state.read_positions(r)
    assert positions.values["CIM PRB"].qty == -300 and list(positions.problems) == ["AGNCN"]

    key = "intent:k1"
    new = Intent(intent_id=intent_id_for(key), intent_type="LT_BAND", symbol="CIM PRB", side="BUY", qty=200,
                 order_type="LMT", limit_price=24.5, bucket="LT", classification="LT_SHORT_DEC", priority=20, ttl_s=120,
                 created_ns=T0, risk_delta_gross_pct=-0.5, reason="test")
    record = execution_core.record_for_intent(new, key, order_ref_for(key), T0 + 120 * NS, T0)
    record = execution_core.on_fill(record, "exec-1", 50, 24.5)
    r.hset(state.ORDERS, record.order_ref, state.order_value(record.to_json()))  # execution's writer
    orders = state.read_orders(r)
    order = orders.values[order_ref_for(key)]
    assert order.open and order.remaining_qty == 150 and order.symbol == "CIM PRB" and orders.problems == {}


# --- alerts: one enumeration, explicit state, the Brain's reaction ---------------------------------


def test_every_alert_type_is_either_a_condition_or_an_event():
    assert EVENT_TYPES | CONDITION_TYPES == set(AlertType) and not EVENT_TYPES & CONDITION_TYPES
    with pytest.raises(ValueError, match="never resolved"):
        Alert(alert_type=AlertType.MODE_CHANGE, state="resolved", severity="info", message="m")
    with pytest.raises(ValueError):
        Alert(alert_type="stale_l1", state="raised", severity="warning", message="a guessed spelling")


def test_every_alert_a_daemon_publishes_is_in_the_enumeration():
    """Grep the producers: every alert_type literal passed to Alert/Finding/Occurrence/alert()."""
    spelled = set()
    for path in (REPO / "daemons").rglob("*.py"):
        text = path.read_text()
        spelled |= set(re.findall(r'AlertType\.([A-Z0-9_]+)', text))
        for literal in re.findall(r'(?:Finding|Occurrence)\(\s*"([a-z_]+)"', text):
            assert literal in {t.value for t in AlertType}, (path, literal)
    assert spelled <= {t.name for t in AlertType}


def brain_with_quote(the_brain, now_ns: int = T0) -> None:
    the_brain.clock.now = now_ns
    the_brain.handle(event(L1(symbol="CIM PRB", bid=24.80, ask=24.82, bid_size=500, ask_size=500), f"l1:{now_ns}", now_ns), effects())


def alert(kind: AlertType, alert_state: str, symbol: str | None = None, ts_ns: int = T0):
    payload = Alert(alert_type=kind, state=alert_state, severity="warning" if alert_state == "raised" else "info",
                    symbol=symbol, message="m")
    return make_event(payload, idempotency_key=f"alert:{kind}:{alert_state}:{ts_ns}", source="alerts", ts_ns=ts_ns)


def quote_current(the_brain) -> bool:
    market = the_brain.view.markets["CIM PRB"]
    return market.quote_fresh(the_brain.clock.now, RULES.exposure.l1_max_age_s)


def test_a_resolved_symbol_alert_never_zeroes_a_fresh_quote(the_brain):
    brain_with_quote(the_brain, T0 + 5 * NS)
    the_brain.handle(alert(AlertType.L1_STALE, "resolved", "CIM PRB", ts_ns=T0 + 6 * NS), effects())
    assert quote_current(the_brain)
    # Raised: the quote received before the alert is no longer current; a newer one is.
    the_brain.handle(alert(AlertType.L1_STALE, "raised", "CIM PRB", ts_ns=T0 + 7 * NS), effects())
    assert not quote_current(the_brain)
    brain_with_quote(the_brain, T0 + 8 * NS)
    assert quote_current(the_brain)


@pytest.mark.parametrize("kind", [AlertType.L1_FEED_STALE, AlertType.FEED_STALE, AlertType.FEED_DISCONNECTED])
def test_a_feed_wide_stale_alert_makes_every_quote_not_current_while_raised(the_brain, r, kind):
    brain_with_quote(the_brain, T0)
    done = effects()
    the_brain.handle(alert(kind, "raised", ts_ns=T0 + NS), done)
    assert not quote_current(the_brain)
    # Arrives while the feed is stale, vouched for before the raise: not current. (A quote
    # vouched for after it ends a feed_disconnected / l1_feed_stale episode, resolve or
    # not: tests/test_decision_feed_episodes.py.)
    the_brain.clock.now = T0 + 2 * NS
    late = L1(symbol="CIM PRB", bid=24.80, ask=24.82, bid_size=500, ask_size=500)
    the_brain.handle(event(late, f"l1:late:{T0}", T0 + NS // 2), effects())
    assert not quote_current(the_brain)
    commit(r, done)
    the_brain.load(r)  # a restart keeps the episode
    assert the_brain.stale_feeds == {kind.value: T0 + NS}
    done = effects()
    the_brain.handle(alert(kind, "resolved", ts_ns=T0 + 3 * NS), done)
    assert not quote_current(the_brain)  # resolving revives nothing by itself ...
    brain_with_quote(the_brain, T0 + 4 * NS)
    assert quote_current(the_brain)  # ... the next confirmed quote is current


# --- one place for each set and format -------------------------------------------------------------


def test_mode_and_order_status_sets():
    assert OPEN_ORDER_STATUSES | TERMINAL_ORDER_STATUSES == set(get_args(OrderStatus))
    assert not OPEN_ORDER_STATUSES & TERMINAL_ORDER_STATUSES
    assert REDUCE_ONLY_MODES < INCREASE_BLOCKING_MODES < set(MODES) and "NORMAL" not in INCREASE_BLOCKING_MODES
    assert is_our_order_ref(order_ref_for("intent:x")) and not is_our_order_ref("ext-1") and not is_our_order_ref(None)


SHARED_KEYS = re.compile(r'"state:(decision|session|exposure|exposure:symbols|broker|orders|positions)"')
SHARED_SETS = re.compile(r'^\s*(REDUCE_ONLY_MODES|TERMINAL_ORDER_STATUSES|OPEN_ORDER_STATUSES|LIVE_STATUSES)\s*=\s*frozenset\(\{')


def test_each_key_name_and_set_is_spelled_in_one_place():
    """No daemon or lib/qe module spells a shared state key or a shared set itself."""
    offenders = []
    for path in [*(REPO / "daemons").rglob("*.py"), *(REPO / "lib" / "qe").glob("*.py")]:
        if path.name == "state.py" and path.parent.name == "qe":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SHARED_KEYS.search(line) or (SHARED_SETS.search(line) and path.name != "contracts.py"):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            if '"qe-" +' in line or 'startswith("qe-")' in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
