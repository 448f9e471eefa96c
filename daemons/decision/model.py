"""Plain data the pure core works on: no Redis, no pydantic, no clock."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qe.clock import NS_PER_S as NS
from qe.contracts import TERMINAL_ORDER_STATUSES, stream_id_key
from qe.marks import MarkInputs, quote_current

from .modes import Latches

CENT = 0.01

# Bookkeeping slots: one live NEW intent per (symbol, slot). A purpose has one
# slot, except market making, which quotes both sides.
PURPOSE_OF_SLOT = {
    "CAP_RECOVERY": "CAP_RECOVERY",
    "HARD_DERISK": "HARD_DERISK",
    "SOFT_DERISK": "SOFT_DERISK",
    "MM_OVERNIGHT": "MM_OVERNIGHT",
    "LT_BAND": "LT_BAND",
    "MM_BID": "MM_QUOTE",
    "MM_ASK": "MM_QUOTE",
}
MM_SLOTS = ("MM_BID", "MM_ASK")
DERISK_SLOTS = ("CAP_RECOVERY", "HARD_DERISK", "SOFT_DERISK", "MM_OVERNIGHT")


def floor_cent(price: float) -> float:
    return math.floor(price * 100 + 1e-6) / 100


def ceil_cent(price: float) -> float:
    return math.ceil(price * 100 - 1e-6) / 100


def classification(bucket: str, direction: str, effect: str) -> str:
    return f"{'LT' if bucket == 'LT' else 'MM'}_{direction}_{effect}"


def effect_of(classification_name: str) -> str:
    return classification_name.rsplit("_", 1)[1]


@dataclass(slots=True)
class Market:
    """What the Brain knows of one symbol's market (from ev.l1 and ev.features).

    Every timestamp is on the Brain's clock at receipt (guards.received_ns).
    `quote_ts_ns` is when market data last VOUCHED for the quote (the L1 envelope's
    ts_ns: a change or a confirmation of an unchanged quote), not when it last changed
    (docs/market_data.md): a quiet quote on a confirming feed stays current. The quote
    is as received; `guards.judged` gives the copy pricing may see (an implausible
    quote removed, `quote_problem` naming why). New fields go at the end: the state
    encoding is positional."""

    bid: float | None = None
    ask: float | None = None
    quote_ts_ns: int = 0
    truth_price: float | None = None
    truth_ts_ns: int = 0
    grpan: float | None = None
    concentration_pct: float = 0.0
    print_count: int = 0
    feature_ts_ns: int = 0
    last_price: float | None = None
    bid_size: int = 0
    ask_size: int = 0
    flagged: str | None = None  # market data's quote-gate verdict, or the Brain's ingest rejection
    trusted_mark: float | None = None  # mid of the last quote that passed the gate against a reference
    trusted_ts_ns: int = 0
    quote_problem: str | None = None  # set on judged copies only

    def quote_fresh(self, now_ns: int, max_age_s: float) -> bool:
        """A usable two-sided quote: present, plausible, not crossed, and CURRENT (qe.marks:
        vouched for by the feed within max_age_s of the Brain's clock; a future time is
        not fresh)."""
        return (
            self.bid is not None
            and self.ask is not None
            and self.ask >= self.bid
            and quote_current(self.quote_ts_ns, now_ns, int(max_age_s * NS), quote_problem=self.quote_problem or self.flagged)
        )

    def truth_fresh(self, now_ns: int, max_age_s: float) -> bool:
        return self.truth_price is not None and abs(now_ns - self.truth_ts_ns) <= max_age_s * NS

    def mark_inputs(self, avg_cost: float | None, reference: float | None) -> MarkInputs[float]:
        """The marks rule's inputs (qe.marks) from this market (a judged copy: an
        implausible quote has no bid/ask and names its problem). A plausible two-sided
        quote gives the mid with its vouched time; otherwise the last trusted mark stands
        as the mid, current only while its own vouched time is."""
        problem = self.quote_problem or self.flagged or None
        if problem is None and self.bid is not None and self.ask is not None and self.ask >= self.bid:
            mid, vouched = (self.bid + self.ask) / 2, self.quote_ts_ns
        else:
            mid, vouched = self.trusted_mark, self.trusted_ts_ns
        return MarkInputs(
            mid=mid, mid_vouched_ns=vouched, quote_problem=problem,
            tick=self.truth_price, tick_ts_ns=self.truth_ts_ns, avg_cost=avg_cost, reference=reference,
        )


@dataclass(frozen=True, slots=True)
class PositionView:
    qty: int
    bucket: str
    avg_cost: float | None = None  # the broker's average cost: a fallback mark (qe.marks)


@dataclass(frozen=True, slots=True)
class SymbolSnap:
    qty: int
    bucket: str
    mark: float | None
    open_buy: int
    open_sell: int


@dataclass(frozen=True, slots=True)
class BucketSnap:
    current_pct: float
    potential_pct: float
    target_pct: float
    max_pct: float


@dataclass(frozen=True, slots=True)
class ExposureSnap:
    snapshot_id: str  # the exposure event's idempotency key
    event_id: str
    ts_ns: int
    ok: bool
    equity: float
    gross_pct: float | None
    potential_pct: float | None
    buckets: dict[str, BucketSnap]
    symbols: dict[str, SymbolSnap]
    problem: str | None = None  # why the snapshot is unusable (guards.exposure_problem); numbers then dropped
    # What it includes: the last ev.orders / ev.positions entry ids exposure had consumed.
    orders_through: str | None = None
    positions_through: str | None = None


@dataclass(frozen=True, slots=True)
class SessionSnap:
    snapshot_id: str
    event_id: str
    now_ns: int
    trading_day: str | None
    market_open: bool
    regime: str
    soft_window: bool
    hard_window: bool
    early_close: bool
    minutes_to_close: float | None


@dataclass(slots=True)
class Outstanding:
    """One NEW intent the Brain issued, followed through ev.orders until the exposure
    worker has seen its last state."""

    key: str
    slot: str
    symbol: str
    side: str
    qty: int
    bucket: str
    classification: str
    order_type: str
    limit_price: float | None
    priority: int
    intent_type: str
    ttl_s: float
    issued_ns: int
    last_change_ns: int
    status: str | None = None  # None: not yet acknowledged by execution
    filled_qty: int = 0
    last_order_ts_ns: int = 0
    cancel_sent: bool = False
    modifies: int = 0
    last_order_id: str | None = None  # ev.orders entry id of its latest order event (the Brain's read)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_ORDER_STATUSES

    @property
    def remaining_qty(self) -> int:
        return max(self.qty - self.filled_qty, 0)

    def expired(self, now_ns: int, grace_s: float) -> bool:
        """Never acknowledged and past its TTL + grace on the Brain's clock: execution
        will not place it. An issue time far ahead of the clock (a corrupt record)
        does not keep it alive: the distance counts either way."""
        return self.status is None and abs(now_ns - self.issued_ns) > (self.ttl_s + grace_s) * NS

    def live(self, now_ns: int, grace_s: float) -> bool:
        return not self.terminal and not self.expired(now_ns, grace_s)

    def counts_in_potential(self, orders_through: str | None, now_ns: int, grace_s: float) -> bool:
        """Still to be added on top of the exposure snapshot: not yet acknowledged (and not
        expired), or its latest order event is not among the ev.orders entries the
        snapshot includes (`orders_through`). Stream ids, never two processes' clocks."""
        if self.status is None:
            return not self.expired(now_ns, grace_s)
        return not included(self.last_order_id, orders_through)

    def to_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Outstanding":
        return cls(**record)


def included(entry_id: str | None, through: str | None) -> bool:
    """Is the stream entry `entry_id` among those a snapshot consumed up to `through`?
    Unknown either way is "not included" (counted again: conservative)."""
    if entry_id is None or through is None:
        return False
    return stream_id_key(entry_id) <= stream_id_key(through)


@dataclass(slots=True)
class BrainState:
    """The Brain's own scalar state, persisted in `state:decision`."""

    mode: str = "NORMAL"
    since_ns: int = 0
    rule: str = "start"
    reason: str = "no evaluation yet"
    numbers: dict[str, Any] = field(default_factory=dict)
    latches: Latches = Latches()
    trading_day: str | None = None
    halted: bool = False
    halt_reason: str = ""
    halt_operator: str = ""
    transitions: int = 0
    hard_steps: int = 0
    hard_excess_notional: float = 0.0
    hard_last_step_ns: int = 0
    mm_overnight_active: bool = False
    mm_overnight_checked_day: str | None = None
    broker_connected: bool | None = None
    broker_reason: str = ""
    broker_ts_ns: int = 0
    exposure_unknown: str = ""  # why the exposure is unknown ("" = known); alerted once per episode


@dataclass(frozen=True, slots=True)
class Candidate:
    """A wanted order, before arbitration and the hard-cap filter."""

    slot: str
    purpose: str
    symbol: str
    side: str
    qty: int
    order_type: str
    limit_price: float | None
    bucket: str
    classification: str
    priority: int
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    keep_key: str | None = None  # continuation of this live intent: only its price may change

    @property
    def effect(self) -> str:
        return effect_of(self.classification)

    @property
    def direction(self) -> str:
        return self.classification.split("_")[1]

    @property
    def is_increase(self) -> bool:
        return self.effect == "INC"


@dataclass(frozen=True, slots=True)
class Skip:
    symbol: str
    slot: str
    reason: str  # machine-readable: stale_l1, stale_prints, below_min_qty, settling, ...
    numbers: dict[str, Any] = field(default_factory=dict)
