"""The Brain's codecs: its own Redis hashes (`state:decision*`) and the plain model.

Redis layout (all values JSON, except the public fields of `state:decision`, which are
in qe.state's encoding: the contract with execution and the CLI):
  state:decision                  mode, since_ns, reason, numbers, latches, halt, broker, ...
  state:decision:outstanding      intent key -> bookkeeping record of a NEW intent
  state:decision:generations      "day|slot|symbol|side" -> intents issued so far (idempotency keys)
  state:decision:inputs           latest session / exposure snapshot / account equity / stale feeds
  state:decision:positions        symbol -> [qty, bucket, avg_cost]
  state:decision:markets          symbol -> quote, truth tick, GRPAN (flushed on the tick)
  state:decision:settling         symbol -> ns of a fill whose position update is awaited
  state:decision:rejected         symbol -> ns of execution's last reject (cool-down)
  state:decision:quarantine       symbol -> why its last position update was rejected (absurd)
  state:decision:skips            "day|symbol|slot|reason" reported once
  state:decision:why:<day>        intent key -> intent (with its trace); order_ref -> intent key

Also the two events the Brain keeps as snapshots (exposure, session), converted to
the plain model as received. Pure: no Redis client, no clock.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from operator import attrgetter
from typing import Any

from qe import state as qe_state
from qe.contracts import Envelope

from . import guards
from .model import BrainState, BucketSnap, ExposureSnap, Market, Outstanding, SessionSnap, SymbolSnap
from .modes import Latches

log = logging.getLogger("qe.decision")

STATE = qe_state.DECISION
OUTSTANDING = "state:decision:outstanding"
GENERATIONS = "state:decision:generations"
INPUTS = "state:decision:inputs"
POSITIONS = "state:decision:positions"
MARKETS = "state:decision:markets"
SETTLING = "state:decision:settling"
REJECTED = "state:decision:rejected"
QUARANTINE = "state:decision:quarantine"
SKIPS = "state:decision:skips"
WHY = "state:decision:why:{day}"
WHY_TTL_S = 7 * 86_400

dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode


def public_state(state: BrainState) -> qe_state.DecisionState:
    """What other daemons read of the Brain (mode, reason, since, halt): qe.state's contract."""
    return qe_state.DecisionState(
        mode=state.mode, since_ns=state.since_ns, reason=state.reason,  # type: ignore[arg-type]
        halted=state.halted, halt_reason=state.halt_reason, halt_operator=state.halt_operator,
        trading_day=state.trading_day, broker_connected=state.broker_connected,
    )


def encode_state(state: BrainState) -> dict[str, str]:
    """The public fields in qe.state's encoding (the contract with execution and the
    CLI), the Brain's private ones (latches, numbers, ...) in its own."""
    values = asdict(state)
    values["latches"] = asdict(state.latches)
    private = {name: dumps(value) for name, value in values.items() if name not in qe_state.DECISION_FIELDS}
    return {**private, **qe_state.decision_fields(public_state(state))}


def initial_state() -> BrainState:
    """A Brain with no saved state has judged nothing yet: THROTTLE (no risk increase),
    never a claimed NORMAL. The first evaluation with a usable exposure snapshot decides."""
    return BrainState(mode="THROTTLE", rule="start", reason="no evaluation yet: no risk increase")


def decode_state(raw: dict[bytes, bytes]) -> BrainState:
    if not raw:
        return initial_state()
    public = qe_state.parse_decision(raw)
    if public.value is None:
        # Unknown is not zero: start from "no risk increase", loudly.
        log.error("state:decision unreadable; starting from THROTTLE", extra={"problem": public.problem})
        return initial_state()
    known = {f.name for f in fields(BrainState)} - qe_state.DECISION_FIELDS
    values: dict[str, Any] = public.value.model_dump()
    for name, value in raw.items():
        key = name.decode()
        if key in known:
            values[key] = json.loads(value)
    if "latches" in values:
        values["latches"] = Latches(**values["latches"])
    return BrainState(**values)


_MARKET_FIELDS = attrgetter(*(f.name for f in fields(Market)))


def encode_market(market: Market) -> str:
    return dumps(_MARKET_FIELDS(market))


def decode_market(raw: bytes) -> Market:
    return Market(*json.loads(raw))


def encode_snap(snap: ExposureSnap | SessionSnap) -> str:
    return dumps(asdict(snap))


def decode_exposure(raw: bytes) -> ExposureSnap:
    values = json.loads(raw)
    values["buckets"] = {name: BucketSnap(**b) for name, b in values["buckets"].items()}
    values["symbols"] = {name: SymbolSnap(**s) for name, s in values["symbols"].items()}
    return ExposureSnap(**values)


def decode_session(raw: bytes) -> SessionSnap:
    return SessionSnap(**json.loads(raw))


def decode_value(raw: bytes) -> Any:
    """A plain JSON value (account equity, the raised stale feeds)."""
    return json.loads(raw)


def encode_record(record: Outstanding) -> str:
    return dumps(record.to_record())


def decode_record(raw: bytes) -> Outstanding:
    return Outstanding.from_record(json.loads(raw))


def encode_position(qty: int, bucket: str, avg_cost: float | None) -> str:
    return dumps([qty, bucket, avg_cost])


def decode_position(raw: bytes) -> tuple[Any, Any, Any]:
    """(qty, bucket, avg_cost) as saved, unchecked (load() applies the guards); a
    position saved before issue 13 has no average cost (None)."""
    qty, bucket, *rest = json.loads(raw)
    return qty, bucket, rest[0] if rest else None


def exposure_snap(event: Envelope, now_ns: int | None = None) -> ExposureSnap:
    """The snapshot as the Brain keeps it, timed by the Brain's clock at receipt. Check
    it with guards.exposure_problem before use (see DecisionHandler._on_exposure)."""
    p = event.payload
    ok = p.status == "ok" and guards.finite(p.equity) and p.equity > 0 and p.gross_pct is not None \
        and p.potential_gross_pct is not None
    return ExposureSnap(
        snapshot_id=event.idempotency_key,
        event_id=str(event.event_id),
        ts_ns=event.ts_ns if now_ns is None else guards.received_ns(event.ts_ns, now_ns),
        ok=ok,
        equity=p.equity,
        gross_pct=p.gross_pct,
        potential_pct=p.potential_gross_pct,
        buckets={
            name: BucketSnap(b.current_pct, b.potential_pct, b.target_pct, b.max_pct) for name, b in p.buckets.items()
        },
        symbols={
            name: SymbolSnap(s.qty, s.bucket, s.mark, s.open_buy_qty, s.open_sell_qty) for name, s in p.symbols.items()
        },
        problem=(p.error or "exposure status error")[:200] if p.status != "ok" else None,
        orders_through=p.orders_through,
        positions_through=p.positions_through,
    )


def session_snap(event: Envelope, now_ns: int | None = None) -> SessionSnap:
    p = event.payload
    minutes = p.minutes_to_close if guards.finite(p.minutes_to_close) else None
    return SessionSnap(
        snapshot_id=event.idempotency_key,
        event_id=str(event.event_id),
        now_ns=p.now_ns if now_ns is None else guards.received_ns(p.now_ns, now_ns),
        trading_day=p.trading_day,
        market_open=p.market_open,
        regime=p.regime,
        soft_window=p.soft_derisk_active,
        hard_window=p.hard_derisk_active,
        early_close=p.early_close,
        minutes_to_close=minutes,
    )
