"""Execution's pure core: order records and their state machine, pre-trade checks,
TTL categories, the modify rule, the order-rate token bucket.

Plain data in, plain data out; no broker, no Redis. The daemon (`service.py`) maps
ib_async callbacks and stream events onto these functions and commits the results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Protocol

from qe.contracts import TERMINAL_ORDER_STATUSES, Intent
from qe.exposure_math import potential_notional
from qe.universe import liquidity_cap

LIVE_STATUSES = frozenset({"PENDING_SUBMIT", "SUBMITTED", "PARTIALLY_FILLED", "PENDING_CANCEL"})
REDUCE_ONLY_MODES = frozenset({"SOFT_DERISK", "HARD_DERISK", "CAP_RECOVERY"})
CancelReason = Literal["ttl", "intent", "halt"]

# IB order status -> ours. "Inactive" means the order is not working at the broker
# (rejected, or held): treated as a reject with the last error IB sent.
IB_STATUS = {
    "ApiPending": "PENDING_SUBMIT",
    "PendingSubmit": "PENDING_SUBMIT",
    "PreSubmitted": "SUBMITTED",
    "Submitted": "SUBMITTED",
    "PendingCancel": "PENDING_CANCEL",
    "ApiCancelled": "CANCELLED",
    "Cancelled": "CANCELLED",
    "Filled": "FILLED",
    "Inactive": "REJECTED",
}


@dataclass(frozen=True)
class OrderRecord:
    """One intent's order: written (PENDING_SUBMIT) before it is sent, advanced by the broker."""

    order_ref: str
    intent_key: str
    intent_type: str
    symbol: str
    side: str
    qty: int
    order_type: str
    limit_price: float | None
    tif: str
    bucket: str
    classification: str
    created_ns: int
    expires_ns: int
    status: str = "PENDING_SUBMIT"
    broker_order_id: int | None = None
    perm_id: int | None = None
    filled_qty: int = 0
    avg_fill_price: float | None = None
    acknowledged: bool = False  # the broker has reported the order at least once
    last_price_change_ns: int = 0
    desired_price: float | None = None  # a modify waiting for the 2.5 s rule
    cancel_reason: CancelReason | None = None
    last_error_code: int | None = None
    last_error_text: str | None = None
    reject_code: int | None = None
    reject_reason: str | None = None
    exec_ids: tuple[str, ...] = ()  # fills applied, deduplicated by IB execId

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def remaining_qty(self) -> int:
        return 0 if self.status in TERMINAL_ORDER_STATUSES else max(self.qty - self.filled_qty, 0)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "OrderRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["exec_ids"] = tuple(values.get("exec_ids", ()))
        return cls(**values)


def record_for_intent(intent: Intent, intent_key: str, order_ref: str, expires_ns: int) -> OrderRecord:
    return OrderRecord(
        order_ref=order_ref,
        intent_key=intent_key,
        intent_type=intent.intent_type,
        symbol=intent.symbol,
        side=intent.side,
        qty=intent.qty,
        order_type=intent.order_type,
        limit_price=intent.limit_price,
        tif=intent.tif,
        bucket=intent.bucket,
        classification=intent.classification,
        created_ns=intent.created_ns,
        expires_ns=expires_ns,
        last_price_change_ns=intent.created_ns,
    )


# --- TTL -------------------------------------------------------------------------------------


def ttl_category(intent_type: str, bucket: str, regime: str | None, ttl_by_category: Mapping[str, float]) -> str:
    """The intent type when it has its own TTL (HARD_DERISK, CAP_RECOVERY...); in the
    CLOSE regime every order is a close exit; otherwise the bucket (LT or MM)."""
    if intent_type in ttl_by_category:
        return intent_type
    if regime == "CLOSE" and "CLOSE_EXIT" in ttl_by_category:
        return "CLOSE_EXIT"
    category = "LT" if bucket == "LT" else "MM"
    return category if category in ttl_by_category else "default"


def expires_at_ns(intent: Intent, regime: str | None, ttl_by_category: Mapping[str, float]) -> int:
    """The earlier of the intent's own TTL and its category's."""
    category = ttl_category(intent.intent_type, intent.bucket, regime, ttl_by_category)
    ttl_s = min(intent.ttl_s, ttl_by_category.get(category, ttl_by_category["default"]))
    return intent.created_ns + int(ttl_s * 1e9)


# --- broker events ---------------------------------------------------------------------------


def on_broker_status(record: OrderRecord, ib_status: str, broker_filled: float) -> OrderRecord | None:
    """Advance a record with a status the *broker* sent (never a client-side guess).
    Returns the new record, or None when nothing changes. Terminal states are final."""
    if record.status in TERMINAL_ORDER_STATUSES:
        return None
    status = IB_STATUS.get(ib_status)
    if status is None:
        return None
    changes: dict = {"acknowledged": record.acknowledged or status != "PENDING_SUBMIT"}
    if status == "SUBMITTED" and (broker_filled > 0 or record.filled_qty > 0):
        status = "PARTIALLY_FILLED"
    if status == "SUBMITTED" and record.status == "PENDING_CANCEL":
        status = "PENDING_CANCEL"  # a cancel in flight: the next word is Cancelled or Filled
    if status == "CANCELLED":
        if record.cancel_reason == "ttl":
            status = "EXPIRED"
        elif record.cancel_reason is None and record.last_error_code is not None:
            # Not cancelled by us: the broker refused or killed the order.
            status = "REJECTED"
    if status == "REJECTED":
        changes["reject_code"] = record.last_error_code
        changes["reject_reason"] = record.last_error_text or f"broker status {ib_status}"
    if status == record.status and changes["acknowledged"] == record.acknowledged:
        return None
    return dataclasses.replace(record, status=status, **changes)


def on_fill(record: OrderRecord, exec_id: str, qty: int, price: float) -> OrderRecord | None:
    """Apply one execution; None if this execId was applied already. Fills can trail
    a terminal status (IB may send Filled before the last execDetails)."""
    if exec_id in record.exec_ids:
        return None
    filled = record.filled_qty + qty
    notional = (record.avg_fill_price or 0.0) * record.filled_qty + price * qty
    status = record.status
    if status not in TERMINAL_ORDER_STATUSES:
        status = "FILLED" if filled >= record.qty else "PARTIALLY_FILLED"
    elif status in ("CANCELLED", "EXPIRED") and filled >= record.qty:
        status = "FILLED"  # the fill raced the cancel and won
    return dataclasses.replace(
        record,
        filled_qty=filled,
        avg_fill_price=round(notional / filled, 6),
        status=status,
        acknowledged=True,
        exec_ids=(*record.exec_ids, exec_id),
    )


def on_error(record: OrderRecord, code: int, text: str) -> OrderRecord:
    """Remember the broker's error; the status changes only when the broker confirms."""
    return dataclasses.replace(record, last_error_code=code, last_error_text=text)


def rejected(record: OrderRecord, code: int | None, reason: str) -> OrderRecord:
    return dataclasses.replace(record, status="REJECTED", reject_code=code, reject_reason=reason)


# --- modify -----------------------------------------------------------------------------------


def modify_decision(
    record: OrderRecord, new_price: float, now_ns: int, min_change: float, min_interval_s: float
) -> Literal["apply", "wait", "ignore"]:
    """SPEC: same broker order id, only if the price moved by at least a cent and at
    least 2.5 s passed since the last change. A modify too early waits (the desired
    price is kept and applied when allowed); one that does not move the price is ignored."""
    if not record.live or record.status == "PENDING_CANCEL" or record.limit_price is None:
        return "ignore"
    if abs(new_price - record.limit_price) < min_change - 1e-9:
        return "ignore"
    if now_ns - record.last_price_change_ns < min_interval_s * 1e9:
        return "wait"
    return "apply"


# --- pre-trade checks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    hard_cap_pct: float
    max_order_notional: float
    min_order_qty: int
    liquidity_adv_divisor: int
    liquidity_min_shares: int


@dataclass(frozen=True)
class RiskView:
    """Execution's own view: broker positions, its own live orders, marks, equity."""

    equity: float | None
    positions: Mapping[str, int]
    open_buy: Mapping[str, int]
    open_sell: Mapping[str, int]
    marks: Mapping[str, float]
    potential_gross_notional: float  # Σ potential_notional over symbols, kept incrementally


@dataclass(frozen=True)
class Rejection:
    rule: str
    reason: str


@dataclass(frozen=True)
class Gate:
    """Whether orders may be sent at all, and in which mode."""

    account_ok: bool
    account_reason: str
    halted: bool
    mode: str | None


def symbol_potential(view: RiskView, symbol: str, extra_buy: int = 0, extra_sell: int = 0, mark: float | None = None) -> float:
    price = view.marks.get(symbol) if mark is None else mark
    if price is None:
        return 0.0
    return potential_notional(
        view.positions.get(symbol, 0),
        view.open_buy.get(symbol, 0) + extra_buy,
        view.open_sell.get(symbol, 0) + extra_sell,
        price,
    )


class OrderRequest(Protocol):
    """What the checks read of a new order: an Intent, or a record waiting to be sent."""

    symbol: str
    side: str
    qty: int
    limit_price: float | None
    classification: str


def check_new_order(intent: OrderRequest, view: RiskView, limits: Limits, gate: Gate, adv: int | None) -> Rejection | None:
    """Every check before a new order; the first that fails names its rule."""
    if not gate.account_ok:
        return Rejection("account_interlock", gate.account_reason)
    if gate.halted:
        return Rejection("halted", "trading is HALTED by the operator: only cancels are sent")
    position = view.positions.get(intent.symbol, 0)
    buy = intent.side == "BUY"
    increases = intent.classification.endswith("_INC")
    if increases and gate.mode in REDUCE_ONLY_MODES:
        return Rejection("reduce_only", f"mode {gate.mode} allows only risk-reducing orders")
    if not increases:
        # A decrease may bring the position to zero, never across it, counting the
        # other live orders that reduce the same position.
        reducible = position if not buy else -position
        already = view.open_sell.get(intent.symbol, 0) if not buy else view.open_buy.get(intent.symbol, 0)
        if reducible <= 0:
            return Rejection("reduce_only", f"no {'long' if not buy else 'short'} position in {intent.symbol} to decrease")
        if intent.qty + already > reducible:
            return Rejection(
                "reduce_only",
                f"{intent.side} {intent.qty} with {already} already working would cross zero (position {position})",
            )
    closes_position = not increases and intent.qty == abs(position)
    if intent.qty < limits.min_order_qty and not closes_position:
        return Rejection("min_order_qty", f"qty {intent.qty} below the minimum order of {limits.min_order_qty}")
    if adv is not None:
        cap = liquidity_cap(adv, limits.liquidity_adv_divisor, limits.liquidity_min_shares)
        if intent.qty > cap:
            return Rejection("liquidity_cap", f"qty {intent.qty} above max(ADV/{limits.liquidity_adv_divisor}, {limits.liquidity_min_shares}) = {cap}")
    price = intent.limit_price or view.marks.get(intent.symbol)
    if price is None:
        return Rejection("no_price", f"no limit price and no mark for {intent.symbol}")
    notional = intent.qty * price
    if notional > limits.max_order_notional:
        return Rejection("max_order_notional", f"notional {notional:,.2f} above {limits.max_order_notional:,.2f}")
    # Hard cap on potential gross, with this order added to the working orders.
    mark = view.marks.get(intent.symbol, price)
    before = symbol_potential(view, intent.symbol, mark=mark)
    after = symbol_potential(view, intent.symbol, extra_buy=intent.qty if buy else 0, extra_sell=0 if buy else intent.qty, mark=mark)
    if after > before:
        if view.equity is None or view.equity <= 0:
            return Rejection("hard_cap", "equity unknown or not positive: no order may add potential exposure")
        potential_pct = (view.potential_gross_notional - before + after) / view.equity * 100
        if potential_pct > limits.hard_cap_pct + 1e-9:
            return Rejection(
                "hard_cap",
                f"potential gross would be {potential_pct:.2f}% > hard cap {limits.hard_cap_pct:g}%",
            )
    return None


def check_modify(gate: Gate) -> Rejection | None:
    if not gate.account_ok:
        return Rejection("account_interlock", gate.account_reason)
    if gate.halted:
        return Rejection("halted", "trading is HALTED by the operator: only cancels are sent")
    return None


# --- account interlock -----------------------------------------------------------------------------


def account_interlock(account: str | None, mode: str, live_allow_list: frozenset[str]) -> tuple[bool, str]:
    """Refuse to send unless the connected account matches the configured mode: paper
    accounts start with "DU"; live needs QE_IB_MODE=live and the account on the allow-list."""
    if not account:
        return False, "no managed account reported by the broker"
    if mode == "paper":
        if account.startswith("DU"):
            return True, f"paper account {account}"
        return False, f"configured for paper but connected to {account} (paper accounts start with DU)"
    if account.startswith("DU"):
        return False, f"configured for live but connected to paper account {account}"
    if account not in live_allow_list:
        return False, f"live account {account} is not on the allow-list (QE_IB_LIVE_ACCOUNTS)"
    return True, f"live account {account} (allow-listed)"


# --- order rate ---------------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """Messages to the broker (place, modify, cancel) stay under IB's 50 msg/s."""

    rate_per_s: float
    burst: int
    tokens: float = field(default=-1.0)
    updated_s: float = 0.0

    def take(self, now_s: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.updated_s = float(self.burst), now_s
        self.tokens = min(float(self.burst), self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate_per_s


def on_cent_grid(price: float) -> bool:
    return math.isclose(price * 100, round(price * 100), abs_tol=1e-6)
