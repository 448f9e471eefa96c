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

from qe.contracts import OPEN_ORDER_STATUSES, REDUCE_ONLY_MODES, TERMINAL_ORDER_STATUSES, Intent
from qe.exposure_math import potential_notional
from qe.marks import Mark
from qe.plausibility import collar_bounds, within_collar
from qe.universe import liquidity_cap

LIVE_STATUSES = OPEN_ORDER_STATUSES
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
    desired_by: str | None = None  # the MODIFY intent that asked for desired_price
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


def record_for_intent(intent: Intent, intent_key: str, order_ref: str, expires_ns: int, received_ns: int) -> OrderRecord:
    """The record of a NEW intent. Its times are execution's own (received_ns, from
    execution's clock): the intent's created_ns is the Brain's claim, never trusted."""
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
        created_ns=received_ns,
        expires_ns=expires_ns,
        last_price_change_ns=received_ns,
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


def expires_at_ns(intent: Intent, regime: str | None, ttl_by_category: Mapping[str, float], received_ns: int) -> int:
    """The earlier of the intent's own TTL and its category's, measured on execution's
    clock from the moment it received the intent. The intent's created_ns can only make
    the life shorter (an intent that waited in the stream while execution was down is
    as old as it says), never longer: a created_ns "in 2100" is ignored."""
    category = ttl_category(intent.intent_type, intent.bucket, regime, ttl_by_category)
    ttl_s = min(intent.ttl_s, ttl_by_category.get(category, ttl_by_category["default"]))
    return min(received_ns, intent.created_ns) + int(ttl_s * 1e9)


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


def modify_denial(target: OrderRecord, modify_key: str, modify_ref: str, price: float, reason: str, now_ns: int) -> OrderRecord:
    """The record of a refused MODIFY: REJECTED under the MODIFY intent's own orderRef
    (never sent, no broker id), so the target order itself is not reported terminal."""
    return OrderRecord(
        order_ref=modify_ref,
        intent_key=modify_key,
        intent_type=target.intent_type,
        symbol=target.symbol,
        side=target.side,
        qty=target.qty,
        order_type=target.order_type,
        limit_price=price,
        tif=target.tif,
        bucket=target.bucket,
        classification=target.classification,
        created_ns=now_ns,
        expires_ns=now_ns,
        status="REJECTED",
        last_price_change_ns=now_ns,
        reject_reason=reason,
    )


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
    collar_pct: float  # every price sent (new or modify) within this % of the trusted reference


@dataclass(frozen=True)
class RiskView:
    """Execution's own view: every broker position, every open order at the broker (its
    own and external ones), marks by the one rule (qe.marks), equity."""

    equity: float | None
    positions: Mapping[str, int]
    open_buy: Mapping[str, int]
    open_sell: Mapping[str, int]
    marks: Mapping[str, float]
    potential_gross_notional: float  # Σ potential_notional over symbols, kept incrementally
    # Symbols with a position or open order the market has not priced (a fallback mark,
    # or no price at all) -> why: no risk increase until it does (SPEC 6, Marks).
    unpriced: Mapping[str, str] = field(default_factory=dict)


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
    mode: str | None  # the Brain's; None: unknown (no risk increase)


def risk_view(
    equity: float | None,
    positions: Mapping[str, int],
    open_buy: Mapping[str, int],
    open_sell: Mapping[str, int],
    marks: Mapping[str, "Mark[float]"],
) -> RiskView:
    """The view from its parts; every symbol with a position or an open order counts at
    its mark, fallback included; a symbol without any price is listed as unpriced."""
    symbols = set(positions) | set(open_buy) | set(open_sell)
    prices = {s: m.price for s, m in marks.items() if m.price is not None}
    total = sum(
        potential_notional(positions.get(s, 0), open_buy.get(s, 0), open_sell.get(s, 0), prices[s])
        for s in symbols
        if s in prices
    )
    unpriced = {s: marks[s].reason if s in marks else "no mark" for s in symbols if s not in marks or not marks[s].market_priced}
    return RiskView(equity, positions, open_buy, open_sell, prices, total, unpriced)


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


def check_new_order(
    intent: OrderRequest, view: RiskView, limits: Limits, gate: Gate, adv: int | None, *, reference: float | None
) -> Rejection | None:
    """Every check before a new order; the first that fails names its rule. `reference`
    is execution's own trusted price for the symbol (None: nothing market-confirmed)."""
    if not gate.account_ok:
        return Rejection("account_interlock", gate.account_reason)
    if gate.halted:
        return Rejection("halted", "trading is HALTED by the operator: only cancels are sent")
    position = view.positions.get(intent.symbol, 0)
    buy = intent.side == "BUY"
    increases = intent.classification.endswith("_INC")
    if increases and (gate.mode is None or gate.mode in REDUCE_ONLY_MODES):
        return Rejection("reduce_only", f"mode {gate.mode or 'unknown'} allows only risk-reducing orders")
    if increases and view.unpriced:
        named = ", ".join(f"{symbol} ({why})" for symbol, why in sorted(view.unpriced.items())[:5])
        return Rejection("unpriced_positions", f"{len(view.unpriced)} symbol(s) not priced by the market: {named}; no risk increase")
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
    size = check_size(intent.qty, limits, adv)
    if size is not None:
        return size
    priced = check_order_price(intent, reference, limits)
    if priced is not None:
        return priced
    price = intent.limit_price
    # Hard cap on potential gross, with this order added to the working orders.
    mark = view.marks.get(intent.symbol, price)
    before = symbol_potential(view, intent.symbol, mark=mark)
    after = symbol_potential(view, intent.symbol, extra_buy=intent.qty if buy else 0, extra_sell=0 if buy else intent.qty, mark=mark)
    if not after <= before:  # (NaN counts as an increase)
        if view.equity is None or not math.isfinite(view.equity) or view.equity <= 0:
            return Rejection("hard_cap", "equity unknown or not positive: no order may add potential exposure")
        potential_pct = (view.potential_gross_notional - before + after) / view.equity * 100
        if not potential_pct <= limits.hard_cap_pct + 1e-9:  # NaN: unknown, refused
            return Rejection(
                "hard_cap",
                f"potential gross would be {potential_pct:.2f}% > hard cap {limits.hard_cap_pct:g}%",
            )
    return None


def check_size(qty: int, limits: Limits, adv: int | None) -> Rejection | None:
    """The liquidity cap: at most max(ADV/1000, 200) shares per order. A symbol without
    a known ADV gets the floor (unknown is not "unlimited")."""
    cap = liquidity_cap(adv or 0, limits.liquidity_adv_divisor, limits.liquidity_min_shares)
    if qty > cap:
        return Rejection("liquidity_cap", f"qty {qty} above max(ADV/{limits.liquidity_adv_divisor}, {limits.liquidity_min_shares}) = {cap}")
    return None


def check_order_price(intent: OrderRequest, reference: float | None, limits: Limits) -> Rejection | None:
    """The price checks of a new order (collar, notional): they need no broker and no
    position, so they also run at receipt, before the intent is even recorded."""
    if intent.limit_price is None:
        # A market order has no price the collar could bound: on a stub quote it fills at $0.01.
        return Rejection("collar", f"{intent.side} {intent.symbol} has no limit price: only limit orders within the collar are sent")
    return check_price(intent.symbol, intent.qty, intent.limit_price, reference, limits)


def check_price(symbol: str, qty: int, price: float, reference: float | None, limits: Limits) -> Rejection | None:
    """The price collar around execution's own trusted reference, then the order notional.
    Without a reference the price cannot be checked, so the order is refused whichever
    way it goes: a decrease at $0.01 moves money as surely as an increase at $2,400."""
    if not (isinstance(price, (int, float)) and math.isfinite(price) and price > 0):
        return Rejection("collar", f"price {price!r} is not a positive finite number")
    if reference is None:
        return Rejection(
            "collar",
            f"no trusted reference for {symbol} (no truth tick, GRPAN or plausible quote yet): price {price:.2f} cannot be checked",
        )
    if not within_collar(price, reference, limits.collar_pct):
        low, high = collar_bounds(reference, limits.collar_pct)
        return Rejection(
            "collar",
            f"price {price:.2f} outside {low:.2f}..{high:.2f} ({limits.collar_pct:g}% around the trusted reference {reference:.2f})",
        )
    notional = qty * price
    if notional > limits.max_order_notional:
        return Rejection("max_order_notional", f"notional {notional:,.2f} above {limits.max_order_notional:,.2f}")
    return None


def check_modify(
    record: OrderRecord,
    new_price: float,
    qty: int,
    limits: Limits,
    gate: Gate,
    adv: int | None,
    *,
    reference: float | None,
) -> Rejection | None:
    """A modify is checked like a new order of the same shares at the new price (collar,
    notional, liquidity cap); only the position checks do not apply, the price does not
    change the shares. A modify changes the price only: a different quantity is refused."""
    if not gate.account_ok:
        return Rejection("account_interlock", gate.account_reason)
    if gate.halted:
        return Rejection("halted", "trading is HALTED by the operator: only cancels are sent")
    if qty != record.qty:
        return Rejection("modify_qty", f"a modify changes the price only: qty {qty} differs from the order's {record.qty}")
    size = check_size(record.qty, limits, adv)
    if size is not None:
        return size
    return check_price(record.symbol, record.qty, new_price, reference, limits)


def broker_position_problem(qty: float, avg_cost: float, max_qty: int) -> str | None:
    """Why a position the broker reported cannot be used, or None. Even the broker's
    numbers are checked: a size of 1e400 once took the Brain down and stuck in state."""
    if not math.isfinite(qty) or qty != int(qty):
        return f"quantity {qty!r} is not a whole number of shares"
    if abs(qty) > max_qty:
        return f"quantity {qty:,.0f} is beyond {max_qty:,} shares"
    if not math.isfinite(avg_cost):
        return f"average cost {avg_cost!r} is not a finite number"
    return None


def usable_equity(value: float) -> float | None:
    """NetLiquidation as a number the checks may use; NaN/inf is unknown (None)."""
    return value if math.isfinite(value) else None


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
