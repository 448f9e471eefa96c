"""Latest state in Redis hashes (`state:*`): the contracts between daemons as code.

Every cross-daemon hash has exactly one writer daemon, and this module owns its
encoding: the writer builds its fields with the `*_fields` / `encode_*` functions
here, every other daemon reads it with the `read_*` functions here, never with
`hget` + `json.loads` of its own. (docs/contracts.md lists every value, its writer
and its readers.)

Encoding: one hash field per top-level attribute, each value JSON, so
`redis-cli HGETALL state:exposure` is readable. Readers validate strictly with the
event contracts' models (qe.contracts: no coercion, no NaN, bounded) and return a
`Reading`: the value, or why there is none ("missing" or "invalid: ..."). Unknown
is not zero: a caller that gets no value must act as if it knows nothing.

| key                      | writer     | value                                              |
|--------------------------|------------|----------------------------------------------------|
| state:decision           | decision   | DecisionState (mode, reason, since, halt) + the Brain's private fields |
| state:session            | session    | the latest Session event                           |
| state:broker             | execution  | the latest BrokerState event                       |
| state:exposure           | exposure   | the latest Exposure event's totals                 |
| state:exposure:symbols   | exposure   | field per symbol: its SymbolExposure               |
| state:positions          | execution  | field per symbol: PositionState (flat: deleted)    |
| state:orders             | execution  | field per orderRef: execution's order record (OrderState: its public part) |
| state:pnl                | pnl        | the latest PnL event (the day so far: account, buckets, symbols) |
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import redis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import to_json

from .redis_types import Fields
from .contracts import (
    ABSOLUTE_MAX_PRICE,
    HALTED_MODE,
    LATEST_WITHOUT_CLOCK_NS,
    OPEN_ORDER_STATUSES,
    INCREASE_BLOCKING_MODES,
    REDUCE_ONLY_MODES,
    STRICT,
    Bucket,
    BrokerOrderId,
    BrokerState,
    Envelope,
    Exposure,
    Limits,
    Message,
    Mode,
    OrderStatus,
    PnL,
    Price,
    Quantity,
    Session,
    Side,
    SignedQuantity,
    Symbol,
    SymbolExposure,
    Timestamp,
)

EXPOSURE = "state:exposure"
EXPOSURE_SYMBOLS = "state:exposure:symbols"  # field per symbol: its SymbolExposure JSON
POSITIONS = "state:positions"
SESSION = "state:session"
ORDERS = "state:orders"
DECISION = "state:decision"
BROKER = "state:broker"
PNL = "state:pnl"

META_FIELDS = ("_event_id", "_ts_ns", "_idempotency_key")  # where a snapshot came from

T = TypeVar("T")


# --- the reading: a value, or why there is none -------------------------------------------


@dataclass(frozen=True)
class Reading(Generic[T]):
    """What a reader found. `value` is None exactly when `problem` says why:
    "missing" (never written, or deleted) or "invalid: <reason>"."""

    key: str
    value: T | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def missing(self) -> bool:
        return self.problem == "missing"

    def describe(self) -> str:
        return f"{self.key}: {self.problem}" if self.problem else f"{self.key}: ok"


def _missing(key: str) -> Reading[Any]:
    return Reading(key, problem="missing")


def _invalid(key: str, reason: str) -> Reading[Any]:
    return Reading(key, problem=f"invalid: {reason}"[:500])


def _reason(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        location = ".".join(str(part) for part in error["loc"]) or "value"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def _context(limits: Limits | None, now_ns: int | None) -> dict[str, Any]:
    return {"limits": limits or Limits(), "now_ns": now_ns}


# --- encoding (the writer's side) -----------------------------------------------------------


def _compact(value: Any) -> str:
    # pydantic-core's encoder: compact JSON, several times faster than json.dumps.
    return to_json(value).decode()


def snapshot_fields(event: Envelope) -> dict[str, str]:
    """Hash fields for an event's payload, plus where it came from."""
    fields = {name: _compact(value) for name, value in event.payload.model_dump(mode="json").items()}
    fields["_event_id"] = json.dumps(str(event.event_id))
    fields["_ts_ns"] = json.dumps(event.ts_ns)
    fields["_idempotency_key"] = json.dumps(event.idempotency_key)
    return fields


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value, separators=(",", ":"), default=str) for name, value in values.items()}


def decode_fields(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A daemon's OWN hash (never another daemon's: use the typed readers below)."""
    return {name.decode(): json.loads(value) for name, value in raw.items()}


def read(r: redis.Redis, key: str) -> dict[str, Any]:
    """A daemon's OWN hash, decoded (never another daemon's: use the typed readers)."""
    return decode_fields(cast(Fields, r.hgetall(key)))


def _json_object(raw: Mapping[bytes, bytes], names: frozenset[str] | None = None) -> bytes:
    """The hash as one JSON object (each field value is already JSON), optionally only
    the named fields: validated in one pass by the contract's strict JSON mode."""
    items = []
    for name, value in raw.items():
        text = name.decode("utf-8", errors="replace")
        if names is not None and text not in names:
            continue
        items.append(json.dumps(text).encode() + b":" + value)
    return b"{" + b",".join(items) + b"}"


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """A payload kept in a hash by `snapshot_fields`, with where it came from."""

    payload: T
    ts_ns: int | None  # the event's ts_ns (the writer's clock); None if not recorded
    event_id: str | None
    idempotency_key: str | None


class _Meta(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    ts_ns: Timestamp | None = Field(default=None, alias="_ts_ns")
    event_id: str | None = Field(default=None, alias="_event_id", max_length=64)
    idempotency_key: str | None = Field(default=None, alias="_idempotency_key", max_length=256)


def _read_snapshot(
    key: str, raw: Mapping[bytes, bytes], model: type[BaseModel], defaults: dict[str, Any] | None = None,
    limits: Limits | None = None, now_ns: int | None = None,
) -> Reading[Snapshot[Any]]:
    if not raw:
        return _missing(key)
    body = {k: v for k, v in raw.items() if k.decode("utf-8", errors="replace") not in META_FIELDS}
    meta = {k: v for k, v in raw.items() if k.decode("utf-8", errors="replace") in META_FIELDS}
    # Fields the writer leaves out of the hash (per-symbol detail kept elsewhere).
    filled = {**{name.encode(): _compact(value).encode() for name, value in (defaults or {}).items()}, **body}
    try:
        payload = model.model_validate_json(_json_object(filled), context=_context(limits, now_ns))
        where = _Meta.model_validate_json(_json_object(meta), context=_context(limits, now_ns))
    except ValidationError as exc:
        return _invalid(key, _reason(exc))
    return Reading(key, Snapshot(payload, where.ts_ns, where.event_id, where.idempotency_key))


# --- state:decision (writer: decision) ------------------------------------------------------


class DecisionState(BaseModel):
    """What other daemons may read of the Brain's `state:decision`: its mode, why and
    since when, and the operator halt. The Brain keeps more fields there (latches,
    numbers, ...): its own, read only by itself."""

    model_config = STRICT
    mode: Mode
    since_ns: int = Field(default=0, ge=0, le=LATEST_WITHOUT_CLOCK_NS)  # 0: no transition yet
    reason: Message = ""
    halted: bool = False
    halt_reason: Message = ""
    halt_operator: str = Field(default="", max_length=64)
    trading_day: str | None = Field(default=None, max_length=10)  # the day the Brain is on
    broker_connected: bool | None = None  # the Brain's view of the broker (None: not heard yet)

    @property
    def reduce_only(self) -> bool:
        """Execution refuses risk-increasing orders (SPEC 6 Execution)."""
        return self.mode in REDUCE_ONLY_MODES

    @property
    def increases_blocked(self) -> bool:
        """No new risk-increasing intent in this mode."""
        return self.mode in INCREASE_BLOCKING_MODES

    @property
    def cancels_only(self) -> bool:
        """Only cancels reach the broker: the operator halt (the Brain's HALTED mode or
        its halt flag, which leads the mode by at most one evaluation)."""
        return self.halted or self.mode == HALTED_MODE


DECISION_FIELDS = frozenset(DecisionState.model_fields)


def decision_fields(decision: DecisionState) -> dict[str, str]:
    """The Brain's encoding of its public state (one JSON value per field); it writes
    these with its private fields in the same HSET."""
    return {name: _compact(value) for name, value in decision.model_dump(mode="json").items()}


def halt_fields(halted: bool, reason: str, operator: str) -> dict[str, str]:
    """The halt part alone (the Brain applies an operator control before it evaluates)."""
    return {"halted": _compact(halted), "halt_reason": _compact(reason), "halt_operator": _compact(operator)}


def parse_decision(raw: Mapping[bytes, bytes]) -> Reading[DecisionState]:
    if not raw:
        return _missing(DECISION)
    try:
        return Reading(DECISION, DecisionState.model_validate_json(_json_object(raw, DECISION_FIELDS)))
    except ValidationError as exc:
        return _invalid(DECISION, _reason(exc))


def read_decision(r: redis.Redis) -> Reading[DecisionState]:
    """The Brain's mode and halt. Missing: the Brain has not evaluated yet (its start
    mode, THROTTLE, allows no increase either)."""
    return parse_decision(cast(Fields, r.hgetall(DECISION)))


# --- state:session (writer: session) --------------------------------------------------------


def read_session(r: redis.Redis, limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[Session]]:
    return parse_session(cast(Fields, r.hgetall(SESSION)), limits, now_ns)


def parse_session(raw: Mapping[bytes, bytes], limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[Session]]:
    return _read_snapshot(SESSION, raw, Session, limits=limits, now_ns=now_ns)


# --- state:broker (writer: execution) -------------------------------------------------------


def read_broker(r: redis.Redis, limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[BrokerState]]:
    return parse_broker(cast(Fields, r.hgetall(BROKER)), limits, now_ns)


def parse_broker(raw: Mapping[bytes, bytes], limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[BrokerState]]:
    return _read_snapshot(BROKER, raw, BrokerState, limits=limits, now_ns=now_ns)


# --- state:exposure, state:exposure:symbols (writer: exposure) ------------------------------


def exposure_fields(event: Envelope) -> tuple[dict[str, str], dict[str, str]]:
    """(state:exposure fields: the totals, state:exposure:symbols fields: one per symbol
    in this publication)."""
    totals = snapshot_fields(event)
    del totals["symbols"], totals["detail"]
    payload = event.payload
    assert isinstance(payload, Exposure)
    return totals, {symbol: line.model_dump_json() for symbol, line in payload.symbols.items()}


def read_exposure(r: redis.Redis, limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[Exposure]]:
    """The latest totals (no per-symbol detail: `read_exposure_symbols`)."""
    return parse_exposure(cast(Fields, r.hgetall(EXPOSURE)), limits, now_ns)


def parse_exposure(raw: Mapping[bytes, bytes], limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[Exposure]]:
    return _read_snapshot(EXPOSURE, raw, Exposure, defaults={"symbols": {}, "detail": "full"}, limits=limits, now_ns=now_ns)


_SYMBOL = TypeAdapter(Symbol)


def _per_symbol(key: str, raw: Mapping[bytes, bytes], model: type[BaseModel],
                limits: Limits | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(symbol -> validated value, symbol -> why it is unreadable)."""
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    context = _context(limits, None)
    for name, value in raw.items():
        text = name.decode("utf-8", errors="replace")
        try:
            symbol = _SYMBOL.validate_python(text)
            values[symbol] = model.model_validate_json(value, context=context)
        except ValidationError as exc:
            problems[text[:40]] = f"{key}[{text[:40]!r}] invalid: {_reason(exc)}"
    return values, problems


@dataclass(frozen=True)
class PerSymbol(Generic[T]):
    """A hash with one field per symbol: the readable values and the unreadable ones
    (never silently dropped: a caller treats those symbols as unknown)."""

    key: str
    values: dict[str, T]
    problems: dict[str, str]


def read_exposure_symbols(r: redis.Redis, limits: Limits | None = None) -> PerSymbol[SymbolExposure]:
    values, problems = _per_symbol(EXPOSURE_SYMBOLS, cast(Fields, r.hgetall(EXPOSURE_SYMBOLS)), SymbolExposure, limits)
    return PerSymbol(EXPOSURE_SYMBOLS, values, problems)


# --- state:positions (writer: execution) ----------------------------------------------------


class PositionState(BaseModel):
    """A `state:positions` value (the symbol is the field name). A flat position is
    deleted, never written with qty 0."""

    model_config = STRICT
    qty: SignedQuantity
    avg_cost: float = Field(ge=0, le=ABSOLUTE_MAX_PRICE)
    bucket: Bucket
    account: str = Field(max_length=32)


def position_value(position: PositionState) -> str:
    return position.model_dump_json()


def parse_positions(raw: Mapping[bytes, bytes], limits: Limits | None = None) -> PerSymbol[PositionState]:
    values, problems = _per_symbol(POSITIONS, raw, PositionState, limits)
    return PerSymbol(POSITIONS, values, problems)


def read_positions(r: redis.Redis, limits: Limits | None = None) -> PerSymbol[PositionState]:
    return parse_positions(cast(Fields, r.hgetall(POSITIONS)), limits)


# --- state:orders (writer: execution) -------------------------------------------------------


class OrderState(BaseModel):
    """What other daemons may read of a `state:orders` value (field: orderRef). The
    value is execution's whole order record; the rest is execution's own bookkeeping."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, allow_inf_nan=False)
    order_ref: str = Field(min_length=1, max_length=64)
    intent_key: str = Field(max_length=256)
    symbol: Symbol
    side: Side
    qty: Quantity
    limit_price: Price | None = None
    bucket: Bucket
    status: OrderStatus
    filled_qty: Quantity = 0
    broker_order_id: BrokerOrderId | None = None

    @property
    def open(self) -> bool:
        return self.status in OPEN_ORDER_STATUSES

    @property
    def remaining_qty(self) -> int:
        return max(self.qty - self.filled_qty, 0) if self.open else 0


def order_value(record: Mapping[str, Any]) -> str:
    """Execution's encoding of one order record (its full bookkeeping, compact JSON)."""
    return json.dumps(record, separators=(",", ":"))


@dataclass(frozen=True)
class Orders:
    values: dict[str, OrderState]  # orderRef -> order
    problems: dict[str, str]  # orderRef -> why unreadable


def parse_orders(raw: Mapping[bytes, bytes], limits: Limits | None = None) -> Orders:
    values: dict[str, OrderState] = {}
    problems: dict[str, str] = {}
    context = _context(limits, None)
    for name, value in raw.items():
        ref = name.decode("utf-8", errors="replace")
        try:
            order = OrderState.model_validate_json(value, context=context)
        except ValidationError as exc:
            problems[ref[:64]] = f"{ORDERS}[{ref[:40]!r}] invalid: {_reason(exc)}"
            continue
        if order.order_ref != ref:
            problems[ref[:64]] = f"{ORDERS}[{ref[:40]!r}] invalid: field and order_ref {order.order_ref!r} differ"
            continue
        values[ref] = order
    return Orders(values, problems)


def read_orders(r: redis.Redis, limits: Limits | None = None) -> Orders:
    return parse_orders(cast(Fields, r.hgetall(ORDERS)), limits)


# --- state:pnl (writer: pnl) ----------------------------------------------------------------


def pnl_fields(event: Envelope) -> dict[str, str]:
    """The pnl worker's encoding of its latest PnL event (replaces the whole hash)."""
    assert isinstance(event.payload, PnL)
    return snapshot_fields(event)


def parse_pnl(raw: Mapping[bytes, bytes], limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[PnL]]:
    return _read_snapshot(PNL, raw, PnL, limits=limits, now_ns=now_ns)


def read_pnl(r: redis.Redis, limits: Limits | None = None, now_ns: int | None = None) -> Reading[Snapshot[PnL]]:
    """The day's P&L so far. Missing: qe-pnl has not published yet."""
    return parse_pnl(cast(Fields, r.hgetall(PNL)), limits, now_ns)
