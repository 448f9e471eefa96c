"""Event contracts: the envelope, every payload, and the stream -> model registry.

Every event on every stream is one JSON document in the entry field ``event``
(plus ``type`` and ``idk`` copies so operators and Lua can read them without
parsing JSON). Decoding validates the whole document with pydantic; an unknown
type, a missing field or a wrong value is rejected with a precise reason, which
the stream runtime puts on the dead-letter stream.

Every number from outside is hostile until checked (SPEC 9). The models are
strict: no coercion (a bool or a string is never a number, 100.0 is never an int,
1 is never a bool), no NaN or infinity anywhere, prices > 0 and at most
`max_price`, quantities whole and at most `max_quantity` (signed ones in absolute
value), every text, list and free-form dict bounded. Timestamps must lie after
2000-01-01 and at most `max_future_skew_s` ahead of the READER's clock: `decode`
takes the reader's `Limits` (built from the `plausibility:` config section) and its
clock's "now", and passes them to the validators through pydantic's validation
context. A producer constructing a payload has no reader: the absolute ceilings
apply (price <= $1,000,000, quantity <= 10**12, time before 2100), so a producer
cannot build NaN or an absurd value either.

Idempotency keys are deterministic, built from the business identity of the
event (an IB execId, a decision cycle + symbol + side + reason, ...), never
random, so a replay or a retried XADD is recognisable downstream.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .alert_types import AlertState, AlertType, state_problem

if TYPE_CHECKING:
    from .config import PlausibilityRules

SCHEMA_VERSION = 1

# --- limits: what "absurd" means ----------------------------------------------------

NS_PER_S = 1_000_000_000
EARLIEST_NS = 946_684_800 * NS_PER_S  # 2000-01-01T00:00:00Z: anything older is a broken clock or a default 0
LATEST_WITHOUT_CLOCK_NS = 4_102_444_800 * NS_PER_S  # 2100-01-01T00:00:00Z: the ceiling when no reader clock is known
ABSOLUTE_MAX_PRICE = 1_000_000.0  # the ceiling of plausibility.max_price
ABSOLUTE_MAX_QUANTITY = 10**12  # the ceiling of plausibility.max_quantity
MAX_MONEY = 1e15  # dollars: equity, notionals, commissions
MAX_PCT = 1e6  # percentages (a 45,003 % gross is representable; NaN and 1e308 are not)
MAX_COUNT = 10**9  # counters (print counts, priorities)
MAX_ID = 2**63 - 1  # broker ids

MAX_TEXT = 256  # every str without its own, larger bound (dict keys included)
MAX_MESSAGE = 4_000  # human text: alert messages, reasons, broker error strings
MAX_LIST = 64  # small lists (print conditions, causation ids)
MAX_SYMBOLS = 10_000  # per-symbol maps and lists (a whole universe)
MAX_JSON_DEPTH = 8  # free-form dicts (Alert.data, Intent.trace)
MAX_JSON_NODES = 2_000
MAX_JSON_TEXT = 16_384  # characters of all strings and keys in one free-form dict


@dataclass(frozen=True, slots=True)
class Limits:
    """The reader's bounds for decoding. `max_future_skew_ns` None: no clock bound
    (construction by a producer, or a reader that gave no clock)."""

    max_price: float = ABSOLUTE_MAX_PRICE
    max_quantity: int = ABSOLUTE_MAX_QUANTITY
    max_future_skew_ns: int | None = None
    earliest_ns: int = EARLIEST_NS

    @classmethod
    def from_rules(cls, rules: "PlausibilityRules") -> "Limits":
        return cls(
            max_price=rules.max_price,
            max_quantity=rules.max_quantity,
            max_future_skew_ns=int(rules.max_future_skew_s * NS_PER_S),
        )


# A producer building a payload in Python: absolute ceilings, no reader clock, and no
# lower time bound (a producer's own relative times are its business; readers check).
CONSTRUCTION_LIMITS = Limits(earliest_ns=0)


def _bounds(info: ValidationInfo) -> tuple[Limits, int | None]:
    context = info.context
    if isinstance(context, dict) and isinstance(context.get("limits"), Limits):
        return context["limits"], context.get("now_ns")
    return CONSTRUCTION_LIMITS, None


def _price_within_limit(value: float, info: ValidationInfo) -> float:
    limits, _now = _bounds(info)
    if value > limits.max_price:
        raise ValueError(f"price above max_price {limits.max_price:g}")
    return value


def _quantity_within_limit(value: int, info: ValidationInfo) -> int:
    limits, _now = _bounds(info)
    if abs(value) > limits.max_quantity:
        raise ValueError(f"quantity beyond max_quantity {limits.max_quantity}")
    return value


def _timestamp_within_limits(value: int, info: ValidationInfo) -> int:
    limits, now_ns = _bounds(info)
    if value < limits.earliest_ns:
        raise ValueError("timestamp before 2000-01-01")
    if value > LATEST_WITHOUT_CLOCK_NS:  # checked first: 10**400 - now does not fit a float
        raise ValueError("timestamp after 2100-01-01")
    if now_ns is not None and limits.max_future_skew_ns is not None and value > now_ns + limits.max_future_skew_ns:
        raise ValueError(
            f"timestamp {(value - now_ns) / NS_PER_S:.3g} s ahead of the reader's clock (max_future_skew_s "
            f"{limits.max_future_skew_ns / NS_PER_S:g})"
        )
    return value


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    """A free-form dict (Alert.data, Intent.trace) must be plain, small, finite JSON."""
    budget = {"nodes": MAX_JSON_NODES, "text": MAX_JSON_TEXT}

    def check(item: Any, depth: int) -> None:
        budget["nodes"] -= 1
        if budget["nodes"] < 0:
            raise ValueError(f"more than {MAX_JSON_NODES} values")
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH}")
        if item is None or isinstance(item, bool):
            return
        if isinstance(item, int):
            if abs(item) > MAX_ID:
                raise ValueError("integer out of the 64-bit range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("NaN or infinity")
        elif isinstance(item, str):
            spend(len(item))
        elif isinstance(item, (list, tuple)):
            for element in item:
                check(element, depth + 1)
        elif isinstance(item, dict):
            for key, element in item.items():
                if not isinstance(key, str):
                    raise ValueError("keys must be strings")
                spend(len(key))
                check(element, depth + 1)
        else:
            raise ValueError(f"{type(item).__name__} is not a JSON value")

    def spend(characters: int) -> None:
        budget["text"] -= characters
        if budget["text"] < 0:
            raise ValueError(f"more than {MAX_JSON_TEXT} characters of text")

    check(value, 0)
    return value


# --- field types -----------------------------------------------------------------------

Bucket = Literal["LT", "MM_PURE"]
Side = Literal["BUY", "SELL"]
Severity = Literal["info", "warning", "error", "critical"]
Regime = Literal["OPEN", "EARLY", "MID", "LATE", "CLOSE", "CLOSED"]
Mode = Literal["NORMAL", "THROTTLE", "SOFT_DERISK", "HARD_DERISK", "CAP_RECOVERY", "HALTED"]
MODES: tuple[Mode, ...] = get_args(Mode)
# The Brain's modes, by what they allow (SPEC 6 Decision modes, Execution). One place:
# execution refuses risk-increasing orders in REDUCE_ONLY_MODES and sends only
# cancels when HALTED; the Brain issues no risk-increasing intent in INCREASE_BLOCKING_MODES.
REDUCE_ONLY_MODES: frozenset[Mode] = frozenset({"SOFT_DERISK", "HARD_DERISK", "CAP_RECOVERY"})
HALTED_MODE: Mode = "HALTED"
INCREASE_BLOCKING_MODES: frozenset[Mode] = REDUCE_ONLY_MODES | {"THROTTLE", HALTED_MODE}
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
# Every status is either open (the order may still trade: it counts in potential) or
# terminal (it never will again). One place for both sets.
TERMINAL_ORDER_STATUSES: frozenset[OrderStatus] = frozenset({"FILLED", "CANCELLED", "REJECTED", "EXPIRED"})
OPEN_ORDER_STATUSES: frozenset[OrderStatus] = frozenset(get_args(OrderStatus)) - TERMINAL_ORDER_STATUSES
Classification = Literal[
    "LT_LONG_INC", "LT_LONG_DEC", "LT_SHORT_INC", "LT_SHORT_DEC",
    "MM_LONG_INC", "MM_LONG_DEC", "MM_SHORT_INC", "MM_SHORT_DEC",
]
Symbol = Annotated[str, Field(min_length=1, max_length=24, pattern=r"^[A-Z][A-Z0-9.]*( PR[A-Z])?$")]
# $/share: > 0 and at most max_price (the reader's, else the absolute ceiling).
Price = Annotated[float, Field(gt=0), AfterValidator(_price_within_limit)]
# A price difference (deviation from GRPAN): bounded like a price, either sign.
PriceDelta = Annotated[float, Field(ge=-ABSOLUTE_MAX_PRICE, le=ABSOLUTE_MAX_PRICE)]
# Shares: whole, >= 0 (or > 0), at most max_quantity; signed ones bounded in absolute value.
Quantity = Annotated[int, Field(ge=0), AfterValidator(_quantity_within_limit)]
PositiveQuantity = Annotated[int, Field(gt=0), AfterValidator(_quantity_within_limit)]
SignedQuantity = Annotated[int, AfterValidator(_quantity_within_limit)]
# Epoch nanoseconds: after 2000-01-01, at most max_future_skew_s ahead of the reader's clock.
Timestamp = Annotated[int, Field(ge=0), AfterValidator(_timestamp_within_limits)]
Money = Annotated[float, Field(ge=-MAX_MONEY, le=MAX_MONEY)]
NonNegativeMoney = Annotated[float, Field(ge=0, le=MAX_MONEY)]
Pct = Annotated[float, Field(ge=-MAX_PCT, le=MAX_PCT)]
NonNegativePct = Annotated[float, Field(ge=0, le=MAX_PCT)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
# IB order ids (manual TWS orders have negative ones) and perm ids.
BrokerOrderId = Annotated[int, Field(ge=-MAX_ID, le=MAX_ID)]
BrokerCode = Annotated[int, Field(ge=-1, le=1_000_000)]  # IB error/status codes (-1: none)
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Message = Annotated[str, Field(max_length=MAX_MESSAGE)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded_json)]
# A Redis stream entry id "<ms>-<seq>".
StreamId = Annotated[str, Field(max_length=41, pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]


def stream_id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable key: ids of one stream order its entries."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

# Strict everywhere: no coercion between types, no NaN/inf, no unknown field, and
# every str bounded (fields that need more declare their own max_length).
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, str_max_length=MAX_TEXT)


class Payload(BaseModel):
    # extra="forbid": a misspelt field is an error, not silently dropped data.
    model_config = STRICT


# --- market data -------------------------------------------------------------


class L1(Payload):
    symbol: Symbol
    bid: Price | None
    ask: Price | None
    bid_size: Quantity = 0
    ask_size: Quantity = 0
    last: Price | None = None
    last_size: Quantity | None = None
    venue: str | None = Field(default=None, max_length=16)
    quote_ts_ns: Timestamp | None = None
    # The quote gate's verdict at market data (qe.plausibility.QuoteProblem value), None
    # when it passed. Market data flags, it does not drop; consumers check again.
    implausible: str | None = Field(default=None, max_length=32)


class Print(Payload):
    symbol: Symbol
    price: Price
    size: PositiveQuantity
    venue: str = Field(min_length=1, max_length=16)
    conditions: list[Annotated[str, Field(max_length=16)]] = Field(default_factory=list, max_length=MAX_LIST)
    trade_ts_ns: Timestamp


class TruthTick(Payload):
    price: Price
    size: PositiveQuantity
    venue: str = Field(max_length=16)
    ts_ns: Timestamp


class GrpanWindow(Payload):
    grpan_price: Price | None
    concentration_pct: Annotated[float, Field(ge=0, le=100)]
    print_count: Count
    deviation: PriceDelta | None  # last price - grpan_price
    # A time window with no print within its length of now: reported empty.
    stale: bool = False
    # The per-symbol buffer cap cut this window short (it covers less time than its name says).
    truncated: bool = False


class Feature(Payload):
    symbol: Symbol
    grpan_price: Price | None
    concentration_pct: Annotated[float, Field(ge=0, le=100)]
    print_count: Count
    last_price: Price | None = None
    deviation: PriceDelta | None = None
    windows: dict[Annotated[str, Field(max_length=16)], GrpanWindow] = Field(default_factory=dict, max_length=16)
    truth_tick: TruthTick | None = None


# --- alerts, broker state, operator control ----------------------------------


class Alert(Payload):
    # One of qe.alert_types.AlertType (its value in JSON; a producer may pass the
    # enum member or its exact value, nothing else).
    alert_type: Annotated[AlertType, Field(strict=False)]
    # Explicit: a condition is raised, then resolved; a one-off event is only raised.
    state: AlertState
    severity: Severity
    symbol: Symbol | None = None
    message: Message
    data: JsonObject = Field(default_factory=dict)

    @model_validator(mode="after")
    def _state_fits_type(self) -> "Alert":
        problem = state_problem(self.alert_type, self.state)
        if problem is not None:
            raise ValueError(problem)
        return self


class BrokerState(Payload):
    connected: bool
    orders_allowed: bool = True  # False when e.g. the account interlock refuses the account
    account: str | None = Field(default=None, max_length=32)
    mode: Literal["paper", "live"] | None = None
    data_farm_ok: bool = True
    last_code: BrokerCode | None = None
    reason: Message = ""


class Control(Payload):
    command: Literal["halt", "resume"]
    reason: str = Field(min_length=1, max_length=1_000)
    operator: str = Field(min_length=1, max_length=64)


# --- positions, exposure, session ----------------------------------------------


class Position(Payload):
    account: str = Field(max_length=32)
    symbol: Symbol
    qty: SignedQuantity
    # 0 with qty 0 is a flat position, not a bad price (SPEC 9); never negative nor absurd.
    avg_cost: Annotated[float, Field(ge=0), AfterValidator(_price_within_limit)]
    bucket: Bucket


class Account(Payload):
    account: str = Field(max_length=32)
    net_liquidation: Money
    buying_power: Money | None = None
    currency: str = Field(default="USD", min_length=3, max_length=3)


class BucketExposure(Payload):
    current_pct: NonNegativePct
    potential_pct: NonNegativePct
    target_pct: NonNegativePct
    max_pct: NonNegativePct


class SymbolExposure(Payload):
    qty: SignedQuantity
    bucket: Bucket
    mark: Price | None
    # qe.marks.MarkSource: "fallback" = no market price yet (the broker's average cost or
    # the universe's reference price): counted, and no risk increase until priced.
    mark_source: Literal["l1_mid", "truth_tick", "last_known", "fallback", "none"]
    notional: Money  # signed: qty * mark
    open_buy_qty: Quantity
    open_sell_qty: Quantity
    potential_notional: NonNegativeMoney
    mark_reason: Text | None = None  # why the mark is stale or a fallback (None while current)


class Exposure(Payload):
    status: Literal["ok", "error"] = "ok"
    error: Message | None = None  # e.g. equity <= 0: no percentages can be given (and buckets is empty)
    # "full": `symbols` holds every symbol with a position or open order (periodic).
    # "changed": only the entries changed since the previous publication; a symbol
    # that went flat appears once with qty 0 and no open orders.
    detail: Literal["full", "changed"] = "full"
    equity: Money
    long_notional: NonNegativeMoney
    short_notional: NonNegativeMoney
    # Gross and potential are sums of absolute notionals: never negative (None: unknown).
    gross_pct: NonNegativePct | None
    net_pct: Pct | None
    potential_gross_pct: NonNegativePct | None
    buckets: dict[Bucket, BucketExposure]
    symbols: dict[Symbol, SymbolExposure] = Field(default_factory=dict, max_length=MAX_SYMBOLS)
    marks_stale: list[Symbol] = Field(default_factory=list, max_length=MAX_SYMBOLS)
    # What the snapshot includes: the last ev.orders / ev.positions entry ids the exposure
    # worker had consumed (every entry up to and including it). Readers compare stream ids
    # (stream_id_key), never two processes' clocks. None: nothing consumed yet.
    orders_through: StreamId | None = None
    positions_through: StreamId | None = None


class Session(Payload):
    now_ns: Timestamp
    now_utc: str = Field(max_length=64)
    now_ny: str = Field(max_length=64)
    trading_day: str | None = Field(max_length=10)  # ISO date of the current or next session
    market_open: bool
    regime: Regime
    minutes_to_close: Annotated[float, Field(ge=-10_080, le=10_080)] | None  # within a week either way
    soft_derisk_active: bool
    hard_derisk_active: bool
    early_close: bool
    open_utc: str | None = Field(default=None, max_length=64)
    close_utc: str | None = Field(default=None, max_length=64)


# --- intents and orders ----------------------------------------------------------


class Intent(Payload):
    """What the Brain wants done; execution turns a NEW intent into at most one broker
    order, ever. MODIFY (new limit price) and CANCEL act on the order of the intent
    named by `target_intent_key`; they never create an order."""

    intent_id: str = Field(min_length=1, max_length=64)
    action: Literal["NEW", "MODIFY", "CANCEL"] = "NEW"
    target_intent_key: str | None = Field(default=None, min_length=1, max_length=256)
    intent_type: str = Field(min_length=1, max_length=32)
    symbol: Symbol
    side: Side
    qty: PositiveQuantity
    order_type: Literal["LMT", "MKT"]
    limit_price: Price | None
    tif: Literal["DAY", "IOC"] = "DAY"
    bucket: Bucket
    classification: Classification
    priority: Count
    ttl_s: Annotated[float, Field(gt=0, le=86_400)]
    created_ns: Timestamp
    risk_delta_gross_pct: Pct
    reason: Message
    causation_ids: list[Text] = Field(default_factory=list, max_length=MAX_LIST)
    trace: JsonObject = Field(default_factory=dict)

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
    exec_id: str = Field(min_length=1, max_length=64)
    qty: PositiveQuantity
    price: Price
    ts_ns: Timestamp
    commission: Annotated[float, Field(ge=-1e6, le=1e6)] | None = None


class Order(Payload):
    order_ref: str = Field(min_length=1, max_length=64)
    broker_order_id: BrokerOrderId | None = None
    perm_id: BrokerOrderId | None = None
    intent_key: str | None = Field(default=None, max_length=256)  # None for external orders (not placed by us)
    symbol: Symbol
    side: Side
    qty: Quantity
    limit_price: Price | None = None
    bucket: Bucket
    status: OrderStatus
    filled_qty: Quantity = 0
    remaining_qty: Quantity = 0
    avg_fill_price: Price | None = None
    last_fill: Fill | None = None
    reject_code: BrokerCode | None = None
    reject_reason: Message | None = None
    external: bool = False


# --- P&L (SPEC 10) ---------------------------------------------------------------------


class BrokerPnL(Payload):
    """The broker's own P&L, as execution (its only client) receives it: reqPnL for the
    account (symbol None) and reqPnLSingle for one position (IB's average-cost basis:
    an opening fill's commission is in the average cost, a closing fill's in realized;
    daily is against IB's previous close, all of today's commissions included).
    A figure IB leaves unset (its "max double", NaN) is None, never a number."""

    account: str = Field(max_length=32)
    symbol: Symbol | None = None  # None: the account's figures (reqPnL)
    position: SignedQuantity | None = None  # reqPnLSingle only
    daily: Money | None = None
    unrealized: Money | None = None
    realized: Money | None = None
    value: Money | None = None  # position x IB's mark (reqPnLSingle only)


class PnLTotals(Payload):
    """A bucket's or the account's day so far (total = realized + unrealized - commissions)."""

    realized: Money
    unrealized: Money
    commissions: Money
    total: Money
    commissions_pending: Count = 0  # fills whose commission report has not arrived yet
    fills: Count = 0
    marks_stale: Count = 0
    symbols: Count = 0


class PnLReconciliation(Payload):
    """One symbol's figures against the broker's reqPnLSingle (qe.pnl.reconcile), at the
    broker's mark; diff = ours - the broker's; None: not comparable (unset, unknown)."""

    status: Literal["ok", "mismatch", "pending", "no_broker"]
    since_ns: Timestamp | None = None  # a mismatch: since when (the alert is raised after pnl.reconcile_grace_s)
    alerted: bool = False  # a pnl_mismatch alert is raised for this symbol
    broker_position: SignedQuantity | None = None
    broker_realized: Money | None = None
    broker_unrealized: Money | None = None
    broker_daily: Money | None = None
    broker_mark: Price | None = None
    broker_ts_ns: Timestamp | None = None
    position_diff: SignedQuantity | None = None
    realized_diff: Money | None = None
    unrealized_diff: Money | None = None
    daily_diff: Money | None = None
    realized_tolerance: NonNegativeMoney = 0.0
    unrealized_tolerance: NonNegativeMoney = 0.0
    daily_tolerance: NonNegativeMoney = 0.0
    problems: list[Text] = Field(default_factory=list, max_length=8)


class SymbolPnL(Payload):
    bucket: Bucket
    start_qty: SignedQuantity  # carried from the previous day
    prev_close: Price | None  # what the carried position starts from
    prev_close_source: Literal["close", "reference", "avg_cost"] | None = None
    qty: SignedQuantity
    avg_price: Annotated[float, Field(ge=0), AfterValidator(_price_within_limit)]  # the day book's (0: flat)
    mark: Price | None
    mark_source: Literal["l1_mid", "truth_tick", "last_known", "fallback", "none"]
    mark_stale: bool = False
    mark_reason: Text | None = None
    realized: Money
    unrealized: Money
    commissions: Money
    total: Money
    commissions_pending: Count = 0
    fills: Count = 0
    bought_qty: Quantity = 0
    sold_qty: Quantity = 0
    realized_vs_cost: Money | None = None  # realized against the broker's average cost (IB's basis)
    reconciliation: PnLReconciliation | None = None  # against the broker's P&L (None: not reconciled)


class PnL(Payload):
    trading_day: str = Field(max_length=10)
    account: PnLTotals
    buckets: dict[Bucket, PnLTotals]
    symbols: dict[Symbol, SymbolPnL] = Field(default_factory=dict, max_length=MAX_SYMBOLS)
    marks_stale: list[Symbol] = Field(default_factory=list, max_length=MAX_SYMBOLS)
    pending_exec_ids: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=MAX_SYMBOLS)
    final: bool = False  # the day's figures at the close
    mismatched: list[Symbol] = Field(default_factory=list, max_length=MAX_SYMBOLS)  # pnl_mismatch raised
    broker_account: BrokerPnL | None = None  # the broker's reqPnL for the account, as last received


# --- the Brain's journal ---------------------------------------------------------------


MAX_JOURNAL_STEPS = 100_000


class JournalStep(Payload):
    """One thing the Brain did, with the clock reading it used: `handle` of one input
    entry (`stream`, `id`), a `tick`, or a `load` of its state from Redis."""

    kind: Literal["handle", "tick", "load"]
    now_ns: Timestamp
    stream: str | None = Field(default=None, max_length=64)
    id: StreamId | None = None


class DecisionJournal(Payload):
    """The Brain's handling, committed atomically with the batch it describes: the steps
    in the order they ran (docs/archive.md; `qe replay` follows it)."""

    steps: list[JournalStep] = Field(min_length=1, max_length=MAX_JOURNAL_STEPS)


# --- envelope ------------------------------------------------------------------------


class Envelope(BaseModel):
    model_config = STRICT

    event_id: uuid.UUID
    ts_ns: Timestamp
    idempotency_key: str = Field(min_length=1, max_length=256)
    type: str = Field(max_length=32)
    source: str = Field(min_length=1, max_length=64)
    # A strict int, not Literal[1]: pydantic's Literal accepts true and 1.0 for 1.
    schema_version: Annotated[int, Field(ge=SCHEMA_VERSION, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    causation_id: str | None = Field(default=None, max_length=256)
    payload: Payload


def _envelope(type_name: str, payload_model: type[Payload]) -> type[Envelope]:
    return type(  # one concrete envelope class per event type
        f"{payload_model.__name__}Event",
        (Envelope,),
        {
            "__annotations__": {"type": Literal[type_name], "payload": payload_model},
            "__module__": __name__,
        },
    )


EVENT_TYPES: dict[str, type[Envelope]] = {
    name: _envelope(name, cast(type[Payload], model))  # mypy joins the classes below to ModelMetaclass
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
        "pnl": PnL,
        "journal": DecisionJournal,
        "broker_pnl": BrokerPnL,
    }.items()
}
PAYLOAD_TYPES: dict[type[Payload], str] = {cast(type[Payload], cls.model_fields["payload"].annotation): name for name, cls in EVENT_TYPES.items()}

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
    "ev.pnl": ("pnl",),
    "ev.decision_journal": ("journal",),
    "ev.broker_pnl": ("broker_pnl",),
}


def _adapter(type_names: tuple[str, ...]) -> TypeAdapter[Any]:
    classes = tuple(EVENT_TYPES[name] for name in type_names)
    if len(classes) == 1:
        return TypeAdapter(classes[0])
    return TypeAdapter(Annotated[Union[classes], Field(discriminator="type")])  # type: ignore[arg-type]  # a Union built at run time


_ADAPTERS: dict[str, TypeAdapter[Any]] = {stream: _adapter(types) for stream, types in STREAM_TYPES.items()}


class DecodeError(ValueError):
    """A stream entry that is not a valid event for its stream; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


MAX_EVENT_BYTES = 8 * 1024 * 1024  # a full exposure of a whole universe is well below this


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        # A document that is not JSON at all has no location inside it: the entry field is the culprit.
        location = ".".join(str(part) for part in error["loc"]) or "event"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def decode(
    stream: str, fields: dict[bytes, bytes], limits: Limits | None = None, now_ns: int | None = None
) -> Envelope:
    """Validate one stream entry into its typed envelope, or raise DecodeError.

    `limits` and `now_ns` are the READER's: its plausibility limits and its own clock
    (simulated in the demo and tests, the recorded day's in a replay), so archived and
    replayed events stay valid. Without them the absolute ceilings apply and only
    timestamps after 2100 count as "in the future"."""
    adapter = _ADAPTERS.get(stream)
    if adapter is None:
        raise DecodeError(f"no contract for stream {stream!r}")
    raw = fields.get(b"event")
    if raw is None:
        raise DecodeError("entry has no 'event' field")
    if len(raw) > MAX_EVENT_BYTES:
        raise DecodeError(f"event: {len(raw)} bytes, above the limit of {MAX_EVENT_BYTES}")
    context = {"limits": limits or Limits(), "now_ns": now_ns}
    try:
        event: Envelope = adapter.validate_json(raw, context=context)
    except ValidationError as exc:
        raise DecodeError(_describe(exc)) from None
    except Exception as exc:  # noqa: BLE001 - whatever the input does to the parser, it is this entry's fault
        raise DecodeError(f"event: not decodable ({type(exc).__name__})") from None
    copy = fields.get(b"type")
    if copy is not None and copy != event.type.encode():
        # Operators and Lua read the copy; it must not say something else than the event.
        raise DecodeError(f"type: entry field says {copy[:32]!r}, the event is {event.type!r}")
    return event


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


ORDER_REF_PREFIX = "qe-"  # every orderRef quant-engine sends starts with it; nothing else does


def order_ref_for(intent_key: str) -> str:
    """The short IB orderRef of an intent: stable, so a restarted service finds its orders."""
    return ORDER_REF_PREFIX + hashlib.sha256(intent_key.encode()).hexdigest()[:20]


def is_our_order_ref(order_ref: str | None) -> bool:
    """An orderRef quant-engine made (order_ref_for); anything else is external."""
    return order_ref is not None and order_ref.startswith(ORDER_REF_PREFIX)


def intent_id_for(intent_key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "qe-intent:" + intent_key))
