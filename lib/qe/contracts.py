"""Event contracts: the envelope, every payload, and the stream -> model registry.

Every event on every stream is one JSON document in the entry field ``event``
(plus ``type`` and ``idk`` copies so operators and Lua can read them without
parsing JSON). Decoding validates the whole document with pydantic; an unknown
type, a missing field or a wrong value is rejected with a precise reason, which
the stream runtime puts on the dead-letter stream.

Idempotency keys are deterministic, built from the business identity of the
event (an IB execId, a decision cycle + symbol + side + reason, ...), never
random, so a replay or a retried XADD is recognisable downstream.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

Bucket = Literal["LT", "MM_PURE"]
Side = Literal["BUY", "SELL"]
Severity = Literal["info", "warning", "error", "critical"]
Regime = Literal["OPEN", "EARLY", "MID", "LATE", "CLOSE", "CLOSED"]
Mode = Literal["NORMAL", "THROTTLE", "SOFT_DERISK", "HARD_DERISK", "CAP_RECOVERY", "HALTED"]
OrderStatus = Literal[
    "PENDING_SUBMIT",
    "SUBMITTED",
    "PARTIALLY_FILLED",
    "FILLED",
    "PENDING_CANCEL",
    "CANCELLED",
    "REJECTED",
    "EXPIRED",
]
TERMINAL_ORDER_STATUSES = frozenset({"FILLED", "CANCELLED", "REJECTED", "EXPIRED"})
Classification = Literal[
    "LT_LONG_INC", "LT_LONG_DEC", "LT_SHORT_INC", "LT_SHORT_DEC",
    "MM_LONG_INC", "MM_LONG_DEC", "MM_SHORT_INC", "MM_SHORT_DEC",
]
Symbol = Annotated[str, Field(min_length=1, max_length=24, pattern=r"^[A-Z][A-Z0-9.]*( PR[A-Z])?$")]
Price = Annotated[float, Field(gt=0, lt=1_000_000, allow_inf_nan=False)]


class Payload(BaseModel):
    # extra="forbid": a misspelt field is an error, not silently dropped data.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- market data -------------------------------------------------------------


class L1(Payload):
    symbol: Symbol
    bid: Price | None
    ask: Price | None
    bid_size: NonNegativeInt = 0
    ask_size: NonNegativeInt = 0
    last: Price | None = None
    last_size: NonNegativeInt | None = None
    venue: str | None = None
    quote_ts_ns: NonNegativeInt | None = None
    # The quote gate's verdict at market data (qe.plausibility.QuoteProblem value), None
    # when it passed. Market data flags, it does not drop; consumers check again.
    implausible: str | None = Field(default=None, max_length=32)


class Print(Payload):
    symbol: Symbol
    price: Price
    size: PositiveInt
    venue: str = Field(min_length=1, max_length=16)
    conditions: list[str] = Field(default_factory=list)
    trade_ts_ns: NonNegativeInt


class TruthTick(Payload):
    price: Price
    size: PositiveInt
    venue: str
    ts_ns: NonNegativeInt


class GrpanWindow(Payload):
    grpan_price: Price | None
    concentration_pct: NonNegativeFloat
    print_count: NonNegativeInt
    deviation: float | None  # last price - grpan_price
    # A time window with no print within its length of now: reported empty.
    stale: bool = False
    # The per-symbol buffer cap cut this window short (it covers less time than its name says).
    truncated: bool = False


class Feature(Payload):
    symbol: Symbol
    grpan_price: Price | None
    concentration_pct: NonNegativeFloat
    print_count: NonNegativeInt
    last_price: Price | None = None
    deviation: float | None = None
    windows: dict[str, GrpanWindow] = Field(default_factory=dict)
    truth_tick: TruthTick | None = None


# --- alerts, broker state, operator control ----------------------------------


class Alert(Payload):
    alert_type: str = Field(min_length=1, max_length=64)
    severity: Severity
    symbol: Symbol | None = None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class BrokerState(Payload):
    connected: bool
    orders_allowed: bool = True  # False when e.g. the account interlock refuses the account
    account: str | None = None
    mode: Literal["paper", "live"] | None = None
    data_farm_ok: bool = True
    last_code: int | None = None
    reason: str = ""


class Control(Payload):
    command: Literal["halt", "resume"]
    reason: str = Field(min_length=1)
    operator: str = Field(min_length=1)


# --- positions, exposure, session ----------------------------------------------


class Position(Payload):
    account: str
    symbol: Symbol
    qty: int
    avg_cost: float
    bucket: Bucket


class Account(Payload):
    account: str
    net_liquidation: float
    buying_power: float | None = None
    currency: str = "USD"


class BucketExposure(Payload):
    current_pct: float
    potential_pct: float
    target_pct: float
    max_pct: float


class SymbolExposure(Payload):
    qty: int
    bucket: Bucket
    mark: float | None
    mark_source: Literal["l1_mid", "truth_tick", "last_known", "none"]
    notional: float  # signed: qty * mark
    open_buy_qty: NonNegativeInt
    open_sell_qty: NonNegativeInt
    potential_notional: NonNegativeFloat


class Exposure(Payload):
    status: Literal["ok", "error"] = "ok"
    error: str | None = None  # e.g. equity <= 0: no percentages can be given (and buckets is empty)
    # "full": `symbols` holds every symbol with a position or open order (periodic).
    # "changed": only the entries changed since the previous publication; a symbol
    # that went flat appears once with qty 0 and no open orders.
    detail: Literal["full", "changed"] = "full"
    equity: float
    long_notional: NonNegativeFloat
    short_notional: NonNegativeFloat
    gross_pct: float | None
    net_pct: float | None
    potential_gross_pct: float | None
    buckets: dict[Bucket, BucketExposure]
    symbols: dict[str, SymbolExposure] = Field(default_factory=dict)
    marks_stale: list[str] = Field(default_factory=list)


class Session(Payload):
    now_ns: NonNegativeInt
    now_utc: str
    now_ny: str
    trading_day: str | None  # ISO date of the current or next session
    market_open: bool
    regime: Regime
    minutes_to_close: float | None
    soft_derisk_active: bool
    hard_derisk_active: bool
    early_close: bool
    open_utc: str | None = None
    close_utc: str | None = None


# --- intents and orders ----------------------------------------------------------


class Intent(Payload):
    """What the Brain wants done; execution turns a NEW intent into at most one broker
    order, ever. MODIFY (new limit price) and CANCEL act on the order of the intent
    named by `target_intent_key`; they never create an order."""

    intent_id: str
    action: Literal["NEW", "MODIFY", "CANCEL"] = "NEW"
    target_intent_key: str | None = None
    intent_type: str = Field(min_length=1, max_length=32)
    symbol: Symbol
    side: Side
    qty: PositiveInt
    order_type: Literal["LMT", "MKT"]
    limit_price: Price | None
    tif: Literal["DAY", "IOC"] = "DAY"
    bucket: Bucket
    classification: Classification
    priority: NonNegativeInt
    ttl_s: PositiveFloat
    created_ns: NonNegativeInt
    risk_delta_gross_pct: float
    reason: str
    causation_ids: list[str] = Field(default_factory=list)
    trace: dict[str, Any] = Field(default_factory=dict)

    @field_validator("limit_price")
    @classmethod
    def _on_cent_grid(cls, value: float | None) -> float | None:
        if value is not None and abs(value * 100 - round(value * 100)) > 1e-6:
            raise ValueError(f"limit_price {value} is not on the $0.01 grid")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Intent":
        if (self.action == "NEW") == (self.target_intent_key is not None):
            raise ValueError("target_intent_key is required for MODIFY/CANCEL and forbidden for NEW")
        if self.order_type == "LMT" and self.limit_price is None and self.action != "CANCEL":
            raise ValueError("a LMT intent needs a limit_price")
        # The classification's direction must agree with the side: a long is increased
        # by a BUY and decreased by a SELL; a short the other way round.
        _bucket, direction, effect = self.classification.split("_")
        increases_long = direction == "LONG" and effect == "INC"
        decreases_short = direction == "SHORT" and effect == "DEC"
        expected_side = "BUY" if (increases_long or decreases_short) else "SELL"
        if self.side != expected_side:
            raise ValueError(f"classification {self.classification} needs side {expected_side}, got {self.side}")
        expected_bucket = "LT" if self.classification.startswith("LT_") else "MM_PURE"
        if self.bucket != expected_bucket:
            raise ValueError(f"classification {self.classification} belongs to bucket {expected_bucket}, got {self.bucket}")
        return self

    @property
    def is_risk_increasing(self) -> bool:
        return self.action == "NEW" and self.classification.endswith("_INC")


class Fill(Payload):
    exec_id: str
    qty: PositiveInt
    price: Price
    ts_ns: NonNegativeInt
    commission: float | None = None


class Order(Payload):
    order_ref: str
    broker_order_id: int | None = None
    perm_id: int | None = None
    intent_key: str | None = None  # None for external orders (not placed by us)
    symbol: Symbol
    side: Side
    qty: NonNegativeInt
    limit_price: Price | None = None
    bucket: Bucket
    status: OrderStatus
    filled_qty: NonNegativeInt = 0
    remaining_qty: NonNegativeInt = 0
    avg_fill_price: float | None = None
    last_fill: Fill | None = None
    reject_code: int | None = None
    reject_reason: str | None = None
    external: bool = False


# --- envelope ------------------------------------------------------------------------


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID
    ts_ns: NonNegativeInt
    idempotency_key: str = Field(min_length=1, max_length=256)
    type: str
    source: str = Field(min_length=1, max_length=64)
    schema_version: Literal[1] = SCHEMA_VERSION
    causation_id: str | None = None
    payload: Payload


def _envelope(type_name: str, payload_model: type[Payload]) -> type[Envelope]:
    return type(  # one concrete envelope class per event type
        f"{payload_model.__name__}Event",
        (Envelope,),
        {
            "__annotations__": {"type": Literal[type_name], "payload": payload_model},  # type: ignore[valid-type]
            "__module__": __name__,
        },
    )


EVENT_TYPES: dict[str, type[Envelope]] = {
    name: _envelope(name, model)
    for name, model in {
        "l1": L1,
        "print": Print,
        "feature": Feature,
        "alert": Alert,
        "position": Position,
        "account": Account,
        "exposure": Exposure,
        "session": Session,
        "intent": Intent,
        "order": Order,
        "broker": BrokerState,
        "control": Control,
    }.items()
}
PAYLOAD_TYPES: dict[type[Payload], str] = {cls.model_fields["payload"].annotation: name for name, cls in EVENT_TYPES.items()}

DLQ_STREAM = "ev.dlq"

# Stream -> the event types it may carry. One place; the runtime refuses anything else.
STREAM_TYPES: dict[str, tuple[str, ...]] = {
    "ev.l1": ("l1",),
    "ev.prints": ("print",),
    "ev.features": ("feature",),
    "ev.alerts": ("alert",),
    "ev.positions": ("position", "account"),
    "ev.exposure": ("exposure",),
    "ev.session": ("session",),
    "ev.orders": ("order",),
    "ev.intents": ("intent",),
    "ev.broker": ("broker",),
    "ev.control": ("control",),
}


def _adapter(type_names: tuple[str, ...]) -> TypeAdapter[Any]:
    classes = tuple(EVENT_TYPES[name] for name in type_names)
    if len(classes) == 1:
        return TypeAdapter(classes[0])
    return TypeAdapter(Annotated[Union[classes], Field(discriminator="type")])  # type: ignore[valid-type]


_ADAPTERS: dict[str, TypeAdapter[Any]] = {stream: _adapter(types) for stream, types in STREAM_TYPES.items()}


class DecodeError(ValueError):
    """A stream entry that is not a valid event for its stream; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def decode(stream: str, fields: dict[bytes, bytes]) -> Envelope:
    """Validate one stream entry into its typed envelope, or raise DecodeError."""
    adapter = _ADAPTERS.get(stream)
    if adapter is None:
        raise DecodeError(f"no contract for stream {stream!r}")
    raw = fields.get(b"event")
    if raw is None:
        raise DecodeError("entry has no 'event' field")
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        raise DecodeError(_describe(exc)) from None


def encode(event: Envelope) -> dict[str, str]:
    """Stream entry fields for an event."""
    return {"type": event.type, "idk": event.idempotency_key, "event": event.model_dump_json()}


def make_event(
    payload: Payload,
    *,
    idempotency_key: str,
    source: str,
    ts_ns: int,
    causation_id: str | None = None,
) -> Envelope:
    """Wrap a payload in its envelope (the type follows from the payload's class)."""
    type_name = PAYLOAD_TYPES[type(payload)]
    return EVENT_TYPES[type_name](
        event_id=uuid.uuid4(),
        ts_ns=ts_ns,
        idempotency_key=idempotency_key,
        type=type_name,
        source=source,
        causation_id=causation_id,
        payload=payload,
    )


def check_stream_type(stream: str, event: Envelope) -> None:
    allowed = STREAM_TYPES.get(stream)
    if allowed is None or event.type not in allowed:
        raise ValueError(f"event type {event.type!r} does not belong on stream {stream!r}")


# --- deterministic idempotency keys ----------------------------------------------------

_MAX_PLAIN_KEY = 200


def idempotency_key(kind: str, *parts: object) -> str:
    """`kind:part:part...` from the business identity; long keys keep a readable prefix + digest."""
    key = ":".join([kind, *(str(part) for part in parts)])
    if len(key) <= _MAX_PLAIN_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{key[:120]}~{digest}"


def order_ref_for(intent_key: str) -> str:
    """The short IB orderRef of an intent: stable, so a restarted service finds its orders."""
    return "qe-" + hashlib.sha256(intent_key.encode()).hexdigest()[:20]


def intent_id_for(intent_key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "qe-intent:" + intent_key))
