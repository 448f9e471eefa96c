"""The "broker": account, orders and matching against the simulated market.

Plain state machine, no I/O. Every request returns a list of events (order
updates, fills, errors, position and market changes) that the server turns into
TWS API messages for the right sessions. Orders live here, not in a session, so
they survive client disconnects and simulated gateway restarts, exactly like
orders that are live "at the broker".

Statuses are IB's: PreSubmitted, Submitted, Filled, Cancelled, Inactive (rejected).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from . import sessions
from .contracts import Catalogue
from .market import Market, PrintEvent, QuoteEvent
from .protocol import ContractInfo, ExecFields, ExecFilter, OrderFields, PlaceOrder

NEW_YORK = ZoneInfo("America/New_York")
LIVE_STATUSES = frozenset({"PreSubmitted", "Submitted"})
SUPPORTED_TIFS = frozenset({"DAY", "GTC", "IOC"})


# ----------------------------------------------------------------------- events


@dataclass(frozen=True)
class OrderUpdate:
    """openOrder (when ``open_order``) and orderStatus for one order, as of now."""

    client_id: int
    order_id: int
    perm_id: int
    snapshot: OrderFields
    open_order: bool
    ack: bool  # synchronous answer to the client's own request (subject to ack faults)


@dataclass(frozen=True)
class FillReport:
    client_id: int
    order_id: int
    perm_id: int
    contract: ContractInfo
    execution: ExecFields
    commission: float
    realized_pnl: float | None


@dataclass(frozen=True)
class OrderError:
    client_id: int
    order_id: int
    perm_id: int
    code: int
    text: str
    ack: bool


@dataclass(frozen=True)
class PositionChange:
    symbol: str


@dataclass(frozen=True)
class MarketChange:
    event: QuoteEvent | PrintEvent


BrokerEvent = OrderUpdate | FillReport | OrderError | PositionChange | MarketChange


# ---------------------------------------------------------------- domain records


@dataclass
class Order:
    client_id: int
    order_id: int
    perm_id: int
    contract: ContractInfo
    action: str  # BUY / SELL
    total_qty: int
    order_type: str  # LMT / MKT
    lmt: int | None  # cents
    tif: str
    hidden: bool
    order_ref: str
    account: str
    outside_rth: bool
    display_size: int
    parent_id: int
    status: str = "PendingSubmit"
    filled: int = 0
    notional_filled: float = 0.0
    last_fill_price: float = 0.0
    created_ns: int = 0
    updated_ns: int = 0
    held: bool = False  # forced partial fill: wait for the next market change
    transmitted: bool = True  # False: placed with transmit=False, held at the broker, not working
    reject_reason: str = ""
    history: list[dict] = field(default_factory=list)

    @property
    def symbol(self) -> str:
        return self.contract.symbol

    @property
    def is_buy(self) -> bool:
        return self.action == "BUY"

    @property
    def remaining(self) -> int:
        return self.total_qty - self.filled

    @property
    def is_live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def avg_fill_price(self) -> float:
        return self.notional_filled / self.filled if self.filled else 0.0

    def fields(self, completed_time: str = "", completed_status: str = "") -> OrderFields:
        return OrderFields(
            order_id=self.order_id,
            client_id=self.client_id,
            perm_id=self.perm_id,
            contract=self.contract,
            action=self.action,
            total_quantity=float(self.total_qty),
            order_type=self.order_type,
            lmt_price=None if self.lmt is None else self.lmt / 100,
            aux_price=0.0,
            tif=self.tif,
            account=self.account,
            order_ref=self.order_ref,
            outside_rth=self.outside_rth,
            hidden=self.hidden,
            display_size=self.display_size,
            parent_id=self.parent_id,
            status=self.status,
            filled=float(self.filled),
            remaining=float(self.remaining),
            avg_fill_price=round(self.avg_fill_price, 8),
            last_fill_price=self.last_fill_price,
            completed_time=completed_time,
            completed_status=completed_status,
        )

    def describe(self) -> dict[str, Any]:
        """Referee view: everything about the order, including its history."""
        return {
            "order_ref": self.order_ref,
            "client_id": self.client_id,
            "order_id": self.order_id,
            "perm_id": self.perm_id,
            "symbol": self.symbol,
            "action": self.action,
            "total_qty": self.total_qty,
            "order_type": self.order_type,
            "lmt_price": None if self.lmt is None else self.lmt / 100,
            "tif": self.tif,
            "hidden": self.hidden,
            "account": self.account,
            "status": self.status,
            "filled": self.filled,
            "remaining": self.remaining,
            "avg_fill_price": round(self.avg_fill_price, 6),
            "reject_reason": self.reject_reason,
            "created_ns": self.created_ns,
            "updated_ns": self.updated_ns,
            "history": list(self.history),
        }


@dataclass
class Execution:
    exec_id: str
    perm_id: int
    client_id: int
    order_id: int
    order_ref: str
    symbol: str
    side: str  # BOT / SLD
    shares: int
    price: float
    ts_ns: int
    cum_qty: int
    avg_price: float
    exchange: str
    liquidity: int  # 1 added, 2 removed
    commission: float
    realized_pnl: float | None
    account: str

    def describe(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "perm_id": self.perm_id,
            "client_id": self.client_id,
            "order_id": self.order_id,
            "order_ref": self.order_ref,
            "symbol": self.symbol,
            "side": self.side,
            "shares": self.shares,
            "price": self.price,
            "ts_ns": self.ts_ns,
            "cum_qty": self.cum_qty,
            "avg_price": round(self.avg_price, 6),
            "exchange": self.exchange,
            "liquidity": "added" if self.liquidity == 1 else "removed",
            "commission": self.commission,
            "realized_pnl": self.realized_pnl,
            "account": self.account,
        }


@dataclass
class Position:
    symbol: str
    qty: int = 0
    avg_cost: float = 0.0  # per share, commissions included (as IB reports it)
    realized_pnl: float = 0.0
    bucket: str = "LT"


@dataclass
class Faults:
    """Order-path faults armed through the control API."""

    reject_next: int = 0
    reject_code: int = 201
    reject_text: str = "Order rejected - reason:Simulated rejection"
    partial_next: int = 0  # the next n times an order trades, it fills only partially
    partial_max_qty: int | None = None
    partial_fraction: float | None = None
    delay_acks_next: int = 0
    delay_acks_seconds: float = 0.0
    drop_acks_next: int = 0
    # Order status updates (orderStatus, with its openOrder), acks or not; applied by the server.
    delay_status_next: int = 0
    delay_status_seconds: float = 0.0
    drop_status_next: int = 0
    status_fills_only: bool = False  # count only updates not answering a request (fills, expiries)
    drop_on_fill_next: int = 0  # the next n fills of resting orders drop the owner's connection first

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RefereeLog:
    """Everything the broker received and did, in order: requests, order state changes,
    fills and injected faults, each with the simulator's clock and a sequence number.

    Bounded (oldest entries go first) so a long chaos run cannot exhaust memory;
    ``total`` and ``counts`` keep counting what was evicted, so a reader can tell.
    """

    def __init__(self, cap: int = 100_000) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=max(1, cap))
        self.total = 0
        self.counts: Counter[str] = Counter()

    @property
    def cap(self) -> int:
        return self.entries.maxlen or 0

    def resize(self, cap: int) -> None:
        self.entries = deque(self.entries, maxlen=max(1, cap))

    def record(self, ts_ns: int, kind: str, entry: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append ``entry`` (the same dict object: a caller may complete it later)."""
        entry = {} if entry is None else entry
        self.total += 1
        self.counts[kind] += 1
        entry["seq"] = self.total
        entry["kind"] = kind
        entry.setdefault("ts_ns", ts_ns)
        self.entries.append(entry)
        return entry

    def read(self, after: int = 0, kind: str | None = None, order_ref: str | None = None, limit: int | None = None) -> list[dict]:
        """Entries with seq > ``after`` (oldest first), optionally of one kind / orderRef."""
        if limit is not None and limit <= 0:
            return []
        first = self.entries[0]["seq"] if self.entries else self.total + 1
        skip = max(0, after - first + 1)
        result = []
        for i in range(skip, len(self.entries)):
            entry = self.entries[i]
            if kind is not None and entry["kind"] != kind:
                continue
            if order_ref is not None and entry.get("order_ref") != order_ref:
                continue
            result.append(dict(entry))
            if limit is not None and len(result) >= limit:
                break
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "cap": self.cap,
            "size": len(self.entries),
            "total": self.total,
            "evicted": self.total - len(self.entries),
            "first_seq": self.entries[0]["seq"] if self.entries else None,
            "counts": dict(self.counts),
        }


class PotentialGross:
    """Broker-side worst case of the account (SPEC §6, Exposure): per symbol
    max(|pos + open buys|, |pos - open sells|) x mark, summed, over NetLiquidation.

    Kept incrementally: touching a symbol replaces its (potential value, market value)
    in two running sums, so a market tick costs O(orders in that symbol), not O(symbols).
    NetLiquidation = cash + sum of market values, as in ``Account.values``.
    """

    RESUM_EVERY = 100_000  # re-add the sums from scratch now and then (float drift)

    def __init__(self) -> None:
        self.by_symbol: dict[str, tuple[float, float]] = {}  # symbol -> (potential, market value)
        self.potential_sum = 0.0
        self.market_value_sum = 0.0
        self.updates = 0
        self.evaluations = 0
        self.current: dict[str, Any] = {"pct": None}
        self.max: dict[str, Any] | None = None

    def set_symbol(self, symbol: str, potential: float, market_value: float) -> None:
        old_potential, old_value = self.by_symbol.pop(symbol, (0.0, 0.0))
        if potential or market_value:
            self.by_symbol[symbol] = (potential, market_value)
        self.updates += 1
        if self.updates % self.RESUM_EVERY == 0:
            self.potential_sum = math.fsum(p for p, _ in self.by_symbol.values())
            self.market_value_sum = math.fsum(v for _, v in self.by_symbol.values())
        else:
            self.potential_sum += potential - old_potential
            self.market_value_sum += market_value - old_value

    def observe(self, cash: float, ts_ns: int, event: str, context: dict[str, Any]) -> None:
        """The account as of now; remember it if it is the worst seen."""
        self.evaluations += 1
        net_liq = cash + self.market_value_sum
        pct = 100.0 * self.potential_sum / net_liq if net_liq > 0 else None
        self.current = {
            "pct": pct,
            "potential": self.potential_sum,
            "net_liquidation": net_liq,
            "ts_ns": ts_ns,
            "event": event,
            **context,
        }
        if pct is not None and (self.max is None or self.max["pct"] is None or pct > self.max["pct"]):
            self.max = dict(self.current)

    def reset_max(self, ts_ns: int) -> None:
        self.max = dict(self.current, ts_ns=ts_ns, event="reset")

    def describe(self) -> dict[str, Any]:
        def rounded(view: dict[str, Any] | None) -> dict[str, Any] | None:
            if view is None:
                return None
            out = dict(view)
            for key, digits in (("pct", 6), ("potential", 2), ("net_liquidation", 2)):
                if out.get(key) is not None:
                    out[key] = round(out[key], digits)
            return out

        return {
            "current": rounded(self.current),
            "max": rounded(self.max),
            "symbols": len(self.by_symbol),
            "evaluations": self.evaluations,
        }


@dataclass(frozen=True)
class CommissionModel:
    """IB fixed-rate style: per share, with a per-execution minimum and a 1 % cap."""

    per_share: float = 0.005
    minimum: float = 1.0
    max_pct_of_value: float = 0.01

    def commission(self, shares: int, price: float) -> float:
        fee = max(self.minimum, self.per_share * shares)
        fee = min(fee, self.max_pct_of_value * shares * price) if shares * price > 0 else fee
        return round(fee, 4)


@dataclass
class Precautions:
    """IB's pre-trade checks for the account (account file ``checks:``, POST /config).

    ``price_cap_pct``: a limit more aggressive than the far touch by more than this
    percentage is refused (IB's precautionary "Percentage constraint", code 163);
    ``max_order_size`` / ``max_order_value``: IB's Size Limit (383) and Total Value Limit
    (451); ``margin``: Reg-T initial margin after the order must not exceed equity with
    loan value (201 "YOUR ORDER IS NOT ACCEPTED..."). None switches a check off.
    """

    price_cap_pct: float | None = 3.0
    max_order_size: int | None = None
    max_order_value: float | None = None
    margin: bool = True

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Reg-T for stocks: 50 % initial on both sides; maintenance 25 % long, 30 % short.
REG_T_INITIAL = 0.50
MAINT_LONG = 0.25
MAINT_SHORT = 0.30


@dataclass(frozen=True)
class MarginFigures:
    equity_with_loan: float
    init_margin: float
    maint_margin: float


def margin_figures(cash: float, quantities: dict[str, int], marks: dict[str, float]) -> MarginFigures:
    """Reg-T figures of an account holding ``quantities`` (signed shares) at ``marks``."""
    long_mv = short_mv = 0.0
    for symbol, qty in quantities.items():
        if not qty:
            continue
        value = qty * marks[symbol]
        if qty > 0:
            long_mv += value
        else:
            short_mv -= value
    equity = cash + long_mv - short_mv
    return MarginFigures(equity, REG_T_INITIAL * (long_mv + short_mv), MAINT_LONG * long_mv + MAINT_SHORT * short_mv)


@dataclass(frozen=True)
class WhatIf:
    """The effect of an order if it filled completely (IB's what-if OrderState)."""

    before: MarginFigures
    after: MarginFigures
    commission: float
    price: float

    def order_state(self) -> dict[str, str | float]:
        def money(v: float) -> str:
            return f"{v:.2f}"

        b, a = self.before, self.after
        return {
            "initMarginBefore": money(b.init_margin),
            "maintMarginBefore": money(b.maint_margin),
            "equityWithLoanBefore": money(b.equity_with_loan),
            "initMarginChange": money(a.init_margin - b.init_margin),
            "maintMarginChange": money(a.maint_margin - b.maint_margin),
            "equityWithLoanChange": money(a.equity_with_loan - b.equity_with_loan),
            "initMarginAfter": money(a.init_margin),
            "maintMarginAfter": money(a.maint_margin),
            "equityWithLoanAfter": money(a.equity_with_loan),
            "commission": self.commission,
            "minCommission": self.commission,
            "maxCommission": self.commission,
            "commissionCurrency": "USD",
        }


@dataclass(frozen=True)
class PnLFigures:
    """IB's P&L for a position or the account (reqPnL / reqPnLSingle)."""

    position: int
    daily: float
    unrealized: float
    realized: float
    value: float

    def describe(self) -> dict[str, float]:
        return {
            "position": self.position,
            "daily": round(self.daily, 4),
            "unrealized": round(self.unrealized, 4),
            "realized": round(self.realized, 4),
            "value": round(self.value, 4),
        }


class Account:
    """Cash, positions and P&L of the one simulated account.

    P&L as IB reports it (average-cost method): an opening fill's commission goes into the
    average cost (so into unrealized P&L), a closing fill's into its realized P&L. For the
    trading day: ``realized`` is what today's closing fills realized; ``unrealized`` is the
    open quantity at the mark against its average cost; ``daily`` is the change in value
    since the previous close: qty now x mark - qty at the start of the day x previous close
    + today's trade cash flows (proceeds - cost - commissions).
    """

    def __init__(self, account_id: str, cash: float, currency: str = "USD") -> None:
        self.account_id = account_id
        self.currency = currency
        self.cash = cash
        self.positions: dict[str, Position] = {}
        self.realized_pnl = 0.0
        self.commissions = 0.0
        # The trading day (start_day): previous closes, quantities at the start, today's flows.
        self.prev_close: dict[str, float] = {}
        self.day_start_qty: dict[str, int] = {}
        self.day_cash_flow: dict[str, float] = {}  # per symbol: proceeds - cost - commissions today
        self.day_realized: dict[str, float] = {}
        self.day_commissions = 0.0

    def start_day(self, closes: dict[str, float]) -> None:
        """A new trading day: ``closes`` are the previous closes (per symbol, dollars)."""
        self.prev_close = dict(closes)
        self.day_start_qty = {s: p.qty for s, p in self.positions.items() if p.qty}
        self.day_cash_flow = {}
        self.day_realized = {}
        self.day_commissions = 0.0

    def pnl_single(self, symbol: str, mark: float) -> PnLFigures:
        pos = self.positions.get(symbol)
        qty = pos.qty if pos is not None else 0
        start = self.day_start_qty.get(symbol, 0)
        daily = qty * mark - start * self.prev_close.get(symbol, mark) + self.day_cash_flow.get(symbol, 0.0)
        unrealized = qty * (mark - pos.avg_cost) if pos is not None and qty else 0.0
        return PnLFigures(qty, daily, unrealized, self.day_realized.get(symbol, 0.0), qty * mark)

    def pnl(self, mark: Callable[[str], float]) -> PnLFigures:
        """The account: the sum over every symbol held now, at the day's start or traded today."""
        symbols = set(self.day_start_qty) | set(self.day_cash_flow) | {s for s, p in self.positions.items() if p.qty}
        parts = [self.pnl_single(s, mark(s)) for s in sorted(symbols)]
        return PnLFigures(
            0,
            math.fsum(p.daily for p in parts),
            math.fsum(p.unrealized for p in parts),
            math.fsum(p.realized for p in parts),
            math.fsum(p.value for p in parts),
        )

    def set_position(self, symbol: str, qty: int, avg_cost: float, bucket: str) -> None:
        self.positions[symbol] = Position(symbol, qty, avg_cost, 0.0, bucket)

    def apply_fill(self, symbol: str, buy: bool, qty: int, price: float, commission: float, bucket: str) -> float | None:
        """Book one execution; returns the realized P&L it produced (None if it only opened)."""
        pos = self.positions.get(symbol)
        if pos is None:
            pos = self.positions[symbol] = Position(symbol, bucket=bucket)
        signed = qty if buy else -qty
        self.cash -= signed * price + commission
        self.commissions += commission
        self.day_commissions += commission
        self.day_cash_flow[symbol] = self.day_cash_flow.get(symbol, 0.0) - signed * price - commission
        realized: float | None = None
        closing = 0
        if pos.qty and (pos.qty > 0) != buy:
            closing = min(qty, abs(pos.qty))
        opening = qty - closing
        if closing:
            closing_fee = commission * closing / qty
            if pos.qty > 0:
                realized = (price - pos.avg_cost) * closing - closing_fee
            else:
                realized = (pos.avg_cost - price) * closing - closing_fee
            pos.qty += closing if buy else -closing
            pos.realized_pnl += realized
            self.realized_pnl += realized
            self.day_realized[symbol] = self.day_realized.get(symbol, 0.0) + realized
            if pos.qty == 0:
                pos.avg_cost = 0.0
        if opening:
            opening_fee = commission * opening / qty
            # Long cost includes fees; short "cost" is proceeds net of fees (IB convention).
            unit = price + opening_fee / opening if buy else price - opening_fee / opening
            held = abs(pos.qty)
            pos.avg_cost = (pos.avg_cost * held + unit * opening) / (held + opening)
            pos.qty += opening if buy else -opening
        return None if realized is None else round(realized, 4)

    def values(self, marks: dict[str, float]) -> dict[str, float]:
        long_mv = short_mv = unrealized = 0.0
        for symbol, pos in self.positions.items():
            if not pos.qty:
                continue
            mark = marks.get(symbol, pos.avg_cost)
            value = pos.qty * mark
            if pos.qty > 0:
                long_mv += value
            else:
                short_mv += -value
            unrealized += pos.qty * (mark - pos.avg_cost)
        net_liq = self.cash + long_mv - short_mv
        gross = long_mv + short_mv
        # Reg T style: 50 % initial on both sides; 25 % / 30 % maintenance long / short.
        init_margin = REG_T_INITIAL * gross
        maint_margin = MAINT_LONG * long_mv + MAINT_SHORT * short_mv
        available = net_liq - init_margin
        excess = net_liq - maint_margin
        return {
            "NetLiquidation": net_liq,
            "EquityWithLoanValue": net_liq,
            "TotalCashValue": self.cash,
            "CashBalance": self.cash,
            "GrossPositionValue": gross,
            "StockMarketValue": long_mv - short_mv,
            "LongMarketValue": long_mv,
            "ShortMarketValue": -short_mv,
            "InitMarginReq": init_margin,
            "MaintMarginReq": maint_margin,
            "FullInitMarginReq": init_margin,
            "FullMaintMarginReq": maint_margin,
            "AvailableFunds": available,
            "FullAvailableFunds": available,
            "ExcessLiquidity": excess,
            "FullExcessLiquidity": excess,
            "BuyingPower": max(0.0, 4 * available),
            "Cushion": excess / net_liq if net_liq else 0.0,
            "Leverage": gross / net_liq if net_liq else 0.0,
            "UnrealizedPnL": unrealized,
            "RealizedPnL": math.fsum(self.day_realized.values()),  # today's, as IB's account value
        }


# ------------------------------------------------------------------------ broker


class Broker:
    def __init__(
        self,
        account: Account,
        market: Market,
        catalogue: Catalogue,
        *,
        buckets: dict[str, str] | None = None,
        now_ns: Callable[[], int],
        exec_id_prefix: str,
        perm_id_base: int,
        commission: CommissionModel | None = None,
        fill_on_prints: bool = True,
        referee_log_cap: int = 100_000,
        precautions: Precautions | None = None,
        trading_sessions: bool = False,
    ) -> None:
        self.account = account
        self.market = market
        self.catalogue = catalogue
        self.buckets = buckets or {}
        self.now_ns = now_ns
        self.exec_id_prefix = exec_id_prefix
        self.next_perm_id = perm_id_base
        self.exec_seq = 0
        self.commission_model = commission or CommissionModel()
        self.fill_on_prints = fill_on_prints
        self.precautions = precautions or Precautions()
        self.faults = Faults()
        # Trading sessions (opt-in, sim/sessions.py): fills only in regular hours (outside them
        # with outsideRth), DAY orders expire at the close; halts per symbol on command.
        self.trading_sessions = trading_sessions
        self.phase = sessions.phase(self.now_ns()) if trading_sessions else "regular"
        self.halted: set[str] = set()
        self.orders: dict[tuple[int, int], Order] = {}  # (client_id, order_id)
        self.max_order_id = 0  # highest order id seen from any client (seeded from the order-id file)
        self.by_perm_id: dict[int, Order] = {}
        self.rejected: list[Order] = []  # placeOrder requests refused outright
        self.executions: list[Execution] = []
        self.live_by_symbol: dict[str, list[Order]] = {}
        # Every order-path request in arrival order, with its outcome.
        self.requests: list[dict[str, Any]] = []
        # The referee: one ordered log of requests, order states, fills and faults, and
        # the worst-case potential gross after every event that can change it.
        self.log = RefereeLog(referee_log_cap)
        self.faults_fired: Counter[str] = Counter()  # by fault, never evicted (sim/metrics.py)
        self.trading_day = trading_day_of(self.now_ns())
        self.previous_day_equity = self.account_values()["EquityWithLoanValue"]
        self.account.start_day({symbol: book.ref / 100 for symbol, book in self.market.books.items()})
        self.exposure = PotentialGross()
        for symbol in self.account.positions:
            self.exposure.set_symbol(symbol, *self._exposure_of(symbol))
        self.exposure.observe(self.account.cash, self.now_ns(), "start", {})

    # ---------------------------------------------------------------- queries

    def next_order_id(self, client_id: int | None = None) -> int:
        """IB's nextValidId: one sequence for the account, above every order id any client
        has used (placed, rejected or what-if), in this process or a previous one."""
        return self.max_order_id + 1

    def saw_order_id(self, order_id: int) -> None:
        if order_id > self.max_order_id:
            self.max_order_id = order_id

    def marks(self) -> dict[str, float]:
        return {symbol: self.mark(symbol) for symbol in self.market.books}

    def mark(self, symbol: str) -> float:
        """IB's mark price for a stock: the last trade, bounded by the current bid and ask
        (so one stub quote does not revalue the account; a crossed book falls back to the mid)."""
        book = self.market.books[symbol]
        if book.last <= 0 or book.bid >= book.ask:
            return book.mid / 100
        return min(max(book.last, book.bid), book.ask) / 100

    # ------------------------------------------------------------- sessions

    def _tradable(self, order: Order) -> bool:
        """May the order fill now: not halted, and in regular hours (outside them with outsideRth)."""
        if order.symbol in self.halted:
            return False
        if not self.trading_sessions:
            return True
        return self.phase == "regular" or (order.outside_rth and self.phase in ("pre_open", "after_hours"))

    def on_clock(self) -> list[BrokerEvent]:
        """The session phase as of now. At the regular close DAY orders expire (IB: orderStatus
        Cancelled), DAY orders with outsideRth at the end of after-hours; at the open held
        (PreSubmitted) orders become Submitted."""
        if not self.trading_sessions:
            return []
        now = self.now_ns()
        new = sessions.phase(now)
        old, self.phase = self.phase, new
        if new == old:
            return []
        self.log.record(now, "session", {"from": old, "to": new})
        events: list[BrokerEvent] = []
        for order in self.open_orders():
            if not order.transmitted:
                continue
            if order.tif == "DAY" and ((old == "regular" and not order.outside_rth) or new == "closed"):
                order.status = "Cancelled"
                order.updated_ns = now
                order.held = False
                self._drop_live(order)
                order.history.append({"ts_ns": now, "event": "expired", "filled": order.filled})
                self._referee_touch(order.symbol, "expiry", order, now)
                events.append(self._update(order, open_order=False, ack=False))
            elif order.status == "PreSubmitted" and self._tradable(order):
                order.status = "Submitted"
                order.updated_ns = now
                events.append(self._update(order, open_order=True, ack=False))
        return events

    def halt(self, symbol: str) -> None:
        self.halted.add(symbol)
        self.market.books[symbol].halted = True
        self.log.record(self.now_ns(), "session", {"halt": symbol})

    def resume(self, symbol: str) -> list[BrokerEvent]:
        """Trading resumes: orders held PreSubmitted by the halt are Submitted again."""
        self.halted.discard(symbol)
        self.market.books[symbol].halted = False
        now = self.now_ns()
        self.log.record(now, "session", {"resume": symbol})
        events: list[BrokerEvent] = []
        for order in self.open_orders():
            if order.symbol == symbol and order.transmitted and order.status == "PreSubmitted" and self._tradable(order):
                order.status = "Submitted"
                order.updated_ns = now
                events.append(self._update(order, open_order=True, ack=False))
        return events

    # ------------------------------------------------------------------ P&L

    def roll_day(self) -> bool:
        """At the first look on a new New York date: today's closes (the marks) become the
        previous closes, and the day's P&L, volume and high/low start again."""
        today = trading_day_of(self.now_ns())
        if today == self.trading_day:
            return False
        closes = {symbol: self.mark(symbol) for symbol in self.market.books}
        self.previous_day_equity = self.account_values()["EquityWithLoanValue"]
        self.market.roll_day({symbol: round(price * 100) for symbol, price in closes.items()})
        self.account.start_day(closes)
        self.trading_day = today
        return True

    def pnl(self) -> PnLFigures:
        """reqPnL: the account's daily, unrealized and realized P&L at the broker's marks."""
        return self.account.pnl(lambda symbol: self.mark(symbol) if symbol in self.market.books else 0.0)

    def pnl_single(self, symbol: str) -> PnLFigures:
        """reqPnLSingle: one position's P&L (position, daily, unrealized, realized, value)."""
        return self.account.pnl_single(symbol, self.mark(symbol))

    def open_orders(self, client_id: int | None = None) -> list[Order]:
        return [
            o
            for o in sorted(self.orders.values(), key=lambda o: o.perm_id)
            if o.is_live and (client_id is None or o.client_id == client_id)
        ]

    def completed_orders(self) -> list[Order]:
        done = [o for o in self.orders.values() if not o.is_live]
        return sorted(done + self.rejected, key=lambda o: (o.updated_ns, o.perm_id))

    def all_orders(self) -> list[Order]:
        return sorted(list(self.orders.values()) + self.rejected, key=lambda o: (o.created_ns, o.perm_id))

    def find_executions(self, flt: ExecFilter) -> list[Execution]:
        since_ns = parse_exec_filter_time(flt.time) if flt.time else None
        result = []
        for e in self.executions:
            if flt.client_id and e.client_id != flt.client_id:
                continue
            if flt.account and flt.account != e.account:
                continue
            if flt.symbol and flt.symbol.upper() != e.symbol:
                continue
            if flt.sec_type and flt.sec_type.upper() != "STK":
                continue
            if flt.exchange and flt.exchange.upper() not in (e.exchange, "SMART"):
                continue
            if flt.side and flt.side.upper()[0] != ("B" if e.side == "BOT" else "S"):
                continue
            if since_ns is not None and e.ts_ns < since_ns:
                continue
            result.append(e)
        return result

    def portfolio(self) -> list[tuple[ContractInfo, Position, float]]:
        rows = []
        for symbol, pos in self.account.positions.items():
            info = self.catalogue.get(symbol)
            if info is not None:
                rows.append((info, pos, self.mark(symbol)))
        return rows

    def account_values(self) -> dict[str, float]:
        return self.account.values(self.marks())

    # ---------------------------------------------------------------- referee

    def _exposure_of(self, symbol: str) -> tuple[float, float]:
        """(potential value, market value) of one symbol at the broker's own mark."""
        pos = self.account.positions.get(symbol)
        qty = pos.qty if pos is not None else 0
        buys = sells = 0
        for order in self.live_by_symbol.get(symbol, ()):
            if order.is_live:
                if order.is_buy:
                    buys += order.remaining
                else:
                    sells += order.remaining
        if not (qty or buys or sells):
            return 0.0, 0.0
        if symbol in self.market.books:
            mark = self.mark(symbol)
        else:  # as Account.values does for a symbol without a market
            mark = pos.avg_cost if pos is not None else 0.0
        return max(abs(qty + buys), abs(qty - sells)) * mark, qty * mark

    def _referee_touch(self, symbol: str, event: str, order: Order | None = None, now: int | None = None) -> None:
        """Re-evaluate potential gross after ``event`` changed ``symbol`` (or the cash)."""
        self.exposure.set_symbol(symbol, *self._exposure_of(symbol))
        context: dict[str, Any] = {"symbol": symbol}
        if order is not None:
            context.update(order_ref=order.order_ref, perm_id=order.perm_id, client_id=order.client_id, order_id=order.order_id)
        self.exposure.observe(self.account.cash, now if now is not None else self.now_ns(), event, context)

    def potential_gross_full(self) -> dict[str, float | None]:
        """The same figure recomputed from scratch (reference for the incremental one)."""
        symbols = set(self.live_by_symbol) | set(self.account.positions)
        parts = [self._exposure_of(symbol) for symbol in symbols]
        potential = math.fsum(p for p, _ in parts)
        net_liq = self.account_values()["NetLiquidation"]
        return {
            "pct": 100.0 * potential / net_liq if net_liq > 0 else None,
            "potential": potential,
            "net_liquidation": net_liq,
        }

    def reset_potential_max(self) -> None:
        self.exposure.reset_max(self.now_ns())

    def referee(self) -> dict[str, Any]:
        """Summary for the control API: potential gross (current and max) and counts."""
        live = sum(1 for o in self.orders.values() if o.is_live)
        return {
            "potential_gross": self.exposure.describe(),
            "counts": {
                "requests": len(self.requests),
                "orders": len(self.orders) + len(self.rejected),
                "open_orders": live,
                "rejected": len(self.rejected),
                "fills": len(self.executions),
                "filled_shares": sum(e.shares for e in self.executions),
            },
            "log": self.log.describe(),
        }

    def log_fault(self, fault: str, **detail: Any) -> None:
        self.faults_fired[fault] += 1
        self.log.record(self.now_ns(), "fault", {"fault": fault, **detail})

    # --------------------------------------------------------------- requests

    def place(self, client_id: int, req: PlaceOrder, info: ContractInfo | None) -> list[BrokerEvent]:
        now = self.now_ns()
        self.saw_order_id(req.order_id)
        key = (client_id, req.order_id)
        existing = self.orders.get(key)
        record = self._open_request(self._request_record("modify" if existing is not None else "place", req, now), client_id, req.order_id)
        if existing is not None:
            events = self._modify(existing, req, info, now)
        else:
            events = self._new_order(client_id, req, info, now)
        self._close_request(record, client_id, req.order_id, events)
        return events

    def _open_request(self, record: dict[str, Any], client_id: int, order_id: int) -> dict[str, Any]:
        """Log a request on arrival (so it precedes what it causes); the outcome is filled in after."""
        record = dict(record, client_id=client_id, order_id=order_id, result="pending")
        self.requests.append(record)
        return self.log.record(record["ts_ns"], "request", record)

    def _close_request(self, record: dict[str, Any], client_id: int, order_id: int, events: list[BrokerEvent]) -> None:
        errors = [(e.code, e.text) for e in events if isinstance(e, OrderError) and e.order_id == order_id and e.code != 202]
        record["result"] = "error" if errors else "ok"
        if errors:
            record["code"], record["text"] = errors[0]
        order = self.orders.get((client_id, order_id))
        if order is not None:
            if not record.get("order_ref"):
                record["order_ref"] = order.order_ref
            record["perm_id"] = order.perm_id

    def _request_record(self, event: str, req: PlaceOrder, now: int) -> dict[str, Any]:
        return {
            "ts_ns": now,
            "event": event,
            "action": req.action,
            "qty": req.total_quantity,
            "order_type": req.order_type,
            "lmt_price": None if req.lmt_price >= 1e300 else req.lmt_price,
            "tif": req.tif,
            "hidden": req.hidden,
            "order_ref": req.order_ref,
            "symbol": req.contract.symbol,
        }

    def _reject(self, client_id: int, req: PlaceOrder, info: ContractInfo | None, code: int, text: str, now: int) -> list[BrokerEvent]:
        placeholder = info or ContractInfo(con_id=0, symbol=req.contract.symbol or "?")
        order = Order(
            client_id=client_id,
            order_id=req.order_id,
            perm_id=0,
            contract=placeholder,
            action=req.action,
            total_qty=int(req.total_quantity) if math.isfinite(req.total_quantity) else 0,
            order_type=req.order_type,
            lmt=None,
            tif=req.tif,
            hidden=req.hidden,
            order_ref=req.order_ref,
            account=req.account or self.account.account_id,
            outside_rth=req.outside_rth,
            display_size=req.display_size,
            parent_id=req.parent_id,
            status="Inactive",
            created_ns=now,
            updated_ns=now,
            reject_reason=f"{code} {text}",
        )
        order.history.append(self._request_record("place", req, now))
        order.history.append({"ts_ns": now, "event": "rejected", "code": code, "text": text})
        self.rejected.append(order)
        self._log_order_state(order)
        return [OrderError(client_id, req.order_id, 0, code, text, ack=True)]

    def _validate(self, req: PlaceOrder, info: ContractInfo | None) -> tuple[int, str] | None:
        if info is None:
            return 200, "No security definition has been found for the request"
        if req.action not in ("BUY", "SELL", "SSHORT"):
            return 321, f"Error validating request.-'bN' : cause - Invalid side: {req.action!r}"
        qty = req.total_quantity
        if not math.isfinite(qty) or qty == 0:
            return 434, "The order size cannot be zero."
        if qty < 0 or not float(qty).is_integer():
            return 321, f"Error validating request.-'bO' : cause - Invalid order size: {qty}"
        if req.order_type not in ("LMT", "MKT"):
            return 387, f"Unsupported order type for this exchange and security type: {req.order_type!r}"
        if req.order_type == "LMT":
            if req.lmt_price >= 1e300 or req.lmt_price <= 0:
                return 201, "Order rejected - reason:The limit price is missing or not positive"
            cents = req.lmt_price * 100
            if abs(cents - round(cents)) > 1e-6:
                return 110, "The price does not conform to the minimum price variation for this contract."
        tif = req.tif or "DAY"
        if tif not in SUPPORTED_TIFS:
            return 201, f"Order rejected - reason:Time in force {tif!r} is not supported"
        if req.account and req.account != self.account.account_id:
            return 201, f"Order rejected - reason:Invalid account code {req.account!r}"
        return None

    # ------------------------------------------------------- pre-trade checks

    def _estimated_price(self, symbol: str, buy: bool, lmt_cents: int | None) -> float:
        """The price an order would trade at now: the far touch, capped by its limit."""
        book = self.market.books[symbol]
        touch = book.ask if buy else book.bid
        if lmt_cents is None or touch <= 0:
            return (touch if touch > 0 else (lmt_cents or book.mid)) / 100
        return (min(lmt_cents, touch) if buy else max(lmt_cents, touch)) / 100

    def _margin_after(self, symbol: str, signed_qty: int, price: float) -> tuple[MarginFigures, MarginFigures, float]:
        marks = self.marks()
        quantities = {s: p.qty for s, p in self.account.positions.items() if p.qty}
        before = margin_figures(self.account.cash, quantities, marks)
        commission = self.commission_model.commission(abs(signed_qty), price)
        quantities[symbol] = quantities.get(symbol, 0) + signed_qty
        after = margin_figures(self.account.cash - signed_qty * price - commission, quantities, marks)
        return before, after, commission

    def what_if(self, req: PlaceOrder, info: ContractInfo | None) -> WhatIf | tuple[int, str]:
        """IB's what-if preview: margin before / change / after and commission if the order
        filled completely now (the far touch, capped by the limit). Nothing is booked."""
        self.saw_order_id(req.order_id)
        problem = self._validate(req, info)
        if problem is not None:
            return problem
        assert info is not None
        buy = req.action == "BUY"
        lmt = round(req.lmt_price * 100) if req.order_type == "LMT" else None
        price = self._estimated_price(info.symbol, buy, lmt)
        qty = int(req.total_quantity)
        before, after, commission = self._margin_after(info.symbol, qty if buy else -qty, price)
        return WhatIf(before, after, commission, price)

    def _precaution(self, order_id: int, symbol: str, buy: bool, qty: int, lmt_cents: int | None) -> tuple[int, str] | None:
        """IB's precautionary settings and margin check for an order of ``qty`` more shares."""
        rules = self.precautions
        where = "Restriction is specified in Precautionary Settings of Global Configuration/Presets."
        book = self.market.books[symbol]
        if rules.price_cap_pct is not None and lmt_cents is not None:
            touch = book.ask if buy else book.bid
            if touch > 0:
                limit = touch * (1 + rules.price_cap_pct / 100) if buy else touch * (1 - rules.price_cap_pct / 100)
                if (buy and lmt_cents > limit + 1e-9) or (not buy and lmt_cents < limit - 1e-9):
                    return 163, (f'The following order "ID:{order_id}" price exceeds the Percentage constraint of '
                                 f"{rules.price_cap_pct:g}%. {where}")
        if rules.max_order_size is not None and qty > rules.max_order_size:
            return 383, f'The following order "ID:{order_id}" size exceeds the Size Limit of {rules.max_order_size}. {where}'
        price = self._estimated_price(symbol, buy, lmt_cents)
        if rules.max_order_value is not None and qty * price > rules.max_order_value:
            return 451, (f'The following order "ID:{order_id}" value estimate of {qty * price:,.2f} USD exceeds the '
                         f"Total Value Limit of {rules.max_order_value:,.0f} USD. {where}")
        if rules.margin and qty > 0:
            before, after, _ = self._margin_after(symbol, qty if buy else -qty, price)
            if after.init_margin > after.equity_with_loan and after.init_margin > before.init_margin:
                return 201, ("Order rejected - reason:YOUR ORDER IS NOT ACCEPTED. IN ORDER TO OBTAIN THE DESIRED POSITION "
                             f"YOUR EQUITY WITH LOAN VALUE [{after.equity_with_loan:.2f} USD] MUST EXCEED THE INITIAL "
                             f"MARGIN [{after.init_margin:.2f} USD]")
        return None

    def _transmit(self, order: Order) -> None:
        """The order goes to the exchange: it can trade from now on."""
        order.transmitted = True
        self.live_by_symbol.setdefault(order.symbol, []).append(order)

    def _new_order(self, client_id: int, req: PlaceOrder, info: ContractInfo | None, now: int) -> list[BrokerEvent]:
        if req.order_id <= 0:
            return self._reject(client_id, req, info, 321, "Error validating request.-'bO' : cause - Invalid order id", now)
        problem = self._validate(req, info)
        if problem is not None:
            return self._reject(client_id, req, info, *problem, now)
        if self.faults.reject_next > 0:
            self.faults.reject_next -= 1
            return self._reject(client_id, req, info, self.faults.reject_code, self.faults.reject_text, now)
        assert info is not None
        buy = req.action == "BUY"
        lmt = round(req.lmt_price * 100) if req.order_type == "LMT" else None
        problem = self._precaution(req.order_id, info.symbol, buy, int(req.total_quantity), lmt)
        if problem is not None:
            return self._reject(client_id, req, info, *problem, now)
        order = Order(
            client_id=client_id,
            order_id=req.order_id,
            perm_id=self.next_perm_id,
            contract=info,
            action="SELL" if req.action == "SSHORT" else req.action,
            total_qty=int(req.total_quantity),
            order_type=req.order_type,
            lmt=round(req.lmt_price * 100) if req.order_type == "LMT" else None,
            tif=req.tif or "DAY",
            hidden=req.hidden,
            order_ref=req.order_ref,
            account=self.account.account_id,
            outside_rth=req.outside_rth,
            display_size=req.display_size,
            parent_id=req.parent_id,
            created_ns=now,
            updated_ns=now,
        )
        self.next_perm_id += 1
        order.history.append(self._request_record("place", req, now))
        self.orders[(client_id, req.order_id)] = order
        self.by_perm_id[order.perm_id] = order
        events: list[BrokerEvent] = []
        if not req.transmit:
            # Held at the broker (IB: the order is created but not transmitted); a later
            # placeOrder with the same id and transmit=True sends it to the exchange.
            order.transmitted = False
            order.status = "PreSubmitted"
            order.history.append({"ts_ns": now, "event": "held_untransmitted"})
            events.append(self._update(order, open_order=True, ack=True))
            return events
        self._transmit(order)

        # Like the real gateway: PreSubmitted first, then Submitted once "at the exchange".
        order.status = "PreSubmitted"
        events.append(self._update(order, open_order=True, ack=True))
        if self._tradable(order):
            order.status = "Submitted"
            events.append(self._update(order, open_order=True, ack=True))
        self._referee_touch(order.symbol, "place", order, now)

        if self._tradable(order):
            events += self._trade(order, lambda cap: self._match_aggressive(order, cap=cap))
        events += self._expire_ioc(order)
        return events

    def _trade(self, order: Order, match: Callable[[int | None], list[BrokerEvent]]) -> list[BrokerEvent]:
        """Let ``order`` trade (``match(cap)``), under the armed partial-fill fault if any.

        The fault is used up by the next order that actually trades — new, modified or
        resting — not by an order that merely arrives: it cuts that fill to the cap and
        holds the rest until the next market change.
        """
        if self.faults.partial_next <= 0 or not order.is_live:
            return match(None)
        before = order.filled
        events = match(self._partial_cap(order.remaining))
        if order.filled > before:
            self.faults.partial_next -= 1
            now = self.now_ns()
            if order.is_live:
                order.held = True
                order.history.append({"ts_ns": now, "event": "forced_partial", "filled": order.filled})
            self.log_fault("forced_partial", order_ref=order.order_ref, perm_id=order.perm_id,
                           qty=order.filled - before, remaining=order.remaining)
        return events

    def _partial_cap(self, qty: int) -> int:
        cap = qty
        if self.faults.partial_max_qty is not None:
            cap = min(cap, int(self.faults.partial_max_qty))
        if self.faults.partial_fraction is not None:
            cap = min(cap, int(qty * float(self.faults.partial_fraction)))
        return max(1, min(cap, qty - 1)) if qty > 1 else qty

    def _modify(self, order: Order, req: PlaceOrder, info: ContractInfo | None, now: int) -> list[BrokerEvent]:
        order.history.append(self._request_record("modify", req, now))
        if not order.is_live:
            if order.status == "Filled":
                code, text = 104, "Can't modify a filled order."
            else:
                code, text = 103, f"Duplicate order id {req.order_id} (order is {order.status})"
            order.history.append({"ts_ns": now, "event": "modify_rejected", "code": code, "text": text})
            return [OrderError(order.client_id, order.order_id, order.perm_id, code, text, ack=True)]
        problem = self._validate(req, info)
        if problem is None and info is not None and info.con_id != order.contract.con_id:
            problem = (105, "Order being modified does not match original order.")
        action = "SELL" if req.action == "SSHORT" else req.action
        if problem is None and action != order.action:
            problem = (105, "Order being modified does not match original order.")
        if problem is None and int(req.total_quantity) <= order.filled:
            problem = (105, f"Order being modified does not match original order: quantity {req.total_quantity} is not above filled {order.filled}")
        if problem is None:
            lmt = round(req.lmt_price * 100) if req.order_type == "LMT" else None
            problem = self._precaution(order.order_id, order.symbol, order.is_buy, int(req.total_quantity) - order.filled, lmt)
        if problem is not None:
            code, text = problem
            order.history.append({"ts_ns": now, "event": "modify_rejected", "code": code, "text": text})
            return [OrderError(order.client_id, order.order_id, order.perm_id, code, text, ack=True)]
        order.total_qty = int(req.total_quantity)
        order.order_type = req.order_type
        order.lmt = round(req.lmt_price * 100) if req.order_type == "LMT" else None
        order.tif = req.tif or order.tif
        order.hidden = req.hidden
        order.display_size = req.display_size
        order.outside_rth = req.outside_rth
        if req.order_ref:
            order.order_ref = req.order_ref
        order.updated_ns = now
        if not order.transmitted:
            if not req.transmit:
                return [self._update(order, open_order=True, ack=True)]  # still held
            self._transmit(order)
            order.history.append({"ts_ns": now, "event": "transmitted"})
        order.status = "Submitted" if self._tradable(order) else "PreSubmitted"
        events: list[BrokerEvent] = [self._update(order, open_order=True, ack=True)]
        self._referee_touch(order.symbol, "modify", order, now)
        if not order.held and self._tradable(order):
            events += self._trade(order, lambda cap: self._match_aggressive(order, cap=cap))
        events += self._expire_ioc(order)
        return events

    def cancel(self, client_id: int, order_id: int, reason: str = "cancel") -> list[BrokerEvent]:
        record = self._open_request({"ts_ns": self.now_ns(), "event": reason}, client_id, order_id)
        events = self._cancel(client_id, order_id, reason)
        self._close_request(record, client_id, order_id, events)
        return events

    def _cancel(self, client_id: int, order_id: int, reason: str) -> list[BrokerEvent]:
        now = self.now_ns()
        order = self.orders.get((client_id, order_id))
        if order is None:
            return [OrderError(client_id, order_id, 0, 10147, f"OrderId {order_id} that needs to be cancelled is not found.", ack=True)]
        order.history.append({"ts_ns": now, "event": reason})
        if not order.is_live:
            text = f"OrderId {order_id} that needs to be cancelled cannot be cancelled, state: {order.status}."
            return [OrderError(client_id, order_id, order.perm_id, 10148, text, ack=True)]
        return self._cancelled(order, now, ack=True, cause=reason)

    def _cancelled(
        self, order: Order, now: int, ack: bool, text: str = "Order Canceled - reason:", cause: str = "cancel"
    ) -> list[BrokerEvent]:
        order.status = "Cancelled"
        order.updated_ns = now
        order.held = False
        self._drop_live(order)
        order.history.append({"ts_ns": now, "event": "cancelled", "filled": order.filled})
        self._referee_touch(order.symbol, cause, order, now)
        return [
            OrderError(order.client_id, order.order_id, order.perm_id, 202, text, ack=ack),
            self._update(order, open_order=False, ack=ack),
        ]

    def global_cancel(self, client_id: int = -1) -> list[BrokerEvent]:
        events: list[BrokerEvent] = []
        now = self.now_ns()
        record = {"ts_ns": now, "event": "global_cancel", "client_id": client_id,
                  "cancelled": [o.perm_id for o in self.open_orders()], "result": "ok"}
        self.requests.append(record)
        self.log.record(now, "request", record)
        for order in self.open_orders():
            order.history.append({"ts_ns": now, "event": "global_cancel"})
            events += self._cancelled(order, now, ack=True, cause="global_cancel")
        return events

    # ----------------------------------------------------------------- market

    def on_market(self, event: QuoteEvent | PrintEvent) -> list[BrokerEvent]:
        """A market change from outside the broker: resting orders may now trade."""
        if event.symbol in self.exposure.by_symbol:  # held or with live orders: its mark may have moved
            self._referee_touch(event.symbol, "market")
        resting = self.live_by_symbol.get(event.symbol)
        if not resting or event.symbol in self.halted:
            return []
        events: list[BrokerEvent] = []
        if isinstance(event, QuoteEvent):
            for order in list(resting):
                if not order.is_live or not self._tradable(order):
                    continue
                if order.held:
                    order.held = False  # the market moved: the forced partial is over
                events += self._trade(order, lambda cap, order=order: self._match_passive(order, cap))
        elif self.fill_on_prints and not event.own_fill:
            for order in list(resting):
                if not order.is_live or order.held or order.lmt is None or not self._tradable(order):
                    continue
                through = event.price <= order.lmt if order.is_buy else event.price >= order.lmt
                if through:
                    events += self._trade(order, lambda cap, order=order: self._fill_from_print(order, event, cap))
        return events

    def _fill_from_print(self, order: Order, event: PrintEvent, cap: int | None) -> list[BrokerEvent]:
        qty = min(order.remaining, event.size, cap if cap is not None else order.remaining)
        return self._execute(order, [(order.lmt or 0, qty)], liquidity=1, exchange=event.venue)

    def _match_aggressive(self, order: Order, cap: int | None = None) -> list[BrokerEvent]:
        """A new or modified order takes what the displayed book offers up to its limit."""
        if not order.is_live:
            return []
        qty = order.remaining if cap is None else min(cap, order.remaining)
        slices, quote = self.market.consume(order.symbol, order.is_buy, qty, order.lmt)
        if not slices:
            return []
        events: list[BrokerEvent] = []
        if quote is not None:
            events.append(MarketChange(quote))
        events += self._execute(order, slices, liquidity=2)
        return events

    def _match_passive(self, order: Order, cap: int | None = None) -> list[BrokerEvent]:
        """A resting order the market has come to: fills at its own limit, against the
        displayed size of the one level that crossed it (the rest waits for the next change)."""
        qty = order.remaining if cap is None else min(cap, order.remaining)
        slices, quote = self.market.consume(order.symbol, order.is_buy, qty, order.lmt, max_levels=1)
        if not slices:
            return []
        events: list[BrokerEvent] = []
        if quote is not None:
            events.append(MarketChange(quote))
        if order.lmt is not None:
            slices = [(order.lmt, qty) for _, qty in slices]
            liquidity = 1
        else:
            liquidity = 2
        events += self._execute(order, slices, liquidity=liquidity)
        return events

    def _expire_ioc(self, order: Order) -> list[BrokerEvent]:
        if order.tif == "IOC" and order.is_live:
            return self._cancelled(order, self.now_ns(), ack=False, text="Order Canceled - reason:IOC remainder", cause="expiry")
        return []

    def _execute(self, order: Order, slices: list[tuple[int, int]], liquidity: int, exchange: str | None = None) -> list[BrokerEvent]:
        events: list[BrokerEvent] = []
        for price_c, qty in slices:
            if qty <= 0 or not order.is_live:
                continue
            qty = min(qty, order.remaining)
            now = self.now_ns()
            price = price_c / 100
            tape = self.market.fill_print(order.symbol, price_c, qty)
            venue = exchange or tape.venue
            if exchange:
                tape = None  # the print that filled us is already on the tape
            commission = self.commission_model.commission(qty, price)
            bucket = self.buckets.get(order.symbol, "LT")
            realized = self.account.apply_fill(order.symbol, order.is_buy, qty, price, commission, bucket)
            order.filled += qty
            order.notional_filled += qty * price
            order.last_fill_price = price
            order.updated_ns = now
            self.exec_seq += 1
            execution = Execution(
                exec_id=f"{self.exec_id_prefix}.{self.exec_seq:08x}.01.01",
                perm_id=order.perm_id,
                client_id=order.client_id,
                order_id=order.order_id,
                order_ref=order.order_ref,
                symbol=order.symbol,
                side="BOT" if order.is_buy else "SLD",
                shares=qty,
                price=price,
                ts_ns=now,
                cum_qty=order.filled,
                avg_price=order.avg_fill_price,
                exchange=venue,
                liquidity=liquidity,
                commission=commission,
                realized_pnl=realized,
                account=self.account.account_id,
            )
            self.executions.append(execution)
            order.history.append(
                {"ts_ns": now, "event": "fill", "exec_id": execution.exec_id, "qty": qty, "price": price, "venue": venue}
            )
            self.log.record(now, "fill", execution.describe())
            if order.remaining == 0:
                order.status = "Filled"
                self._drop_live(order)
            self._referee_touch(order.symbol, "fill", order, now)
            events.append(
                FillReport(order.client_id, order.order_id, order.perm_id, order.contract, exec_fields(execution), commission, realized)
            )
            events.append(self._update(order, open_order=order.status == "Filled", ack=False))
            events.append(PositionChange(order.symbol))
            if tape is not None:
                events.append(MarketChange(tape))
        return events

    def _drop_live(self, order: Order) -> None:
        resting = self.live_by_symbol.get(order.symbol)
        if resting and order in resting:
            resting.remove(order)

    def _update(self, order: Order, open_order: bool, ack: bool) -> OrderUpdate:
        """The order as of now, to its client; and the same state into the referee log."""
        self._log_order_state(order)
        return OrderUpdate(order.client_id, order.order_id, order.perm_id, order.fields(), open_order, ack)

    def _log_order_state(self, order: Order) -> None:
        self.log.record(
            order.updated_ns,
            "order",
            {
                "client_id": order.client_id,
                "order_id": order.order_id,
                "perm_id": order.perm_id,
                "order_ref": order.order_ref,
                "symbol": order.symbol,
                "action": order.action,
                "status": order.status,
                "total_qty": order.total_qty,
                "filled": order.filled,
                "remaining": order.remaining,
                "lmt_price": None if order.lmt is None else order.lmt / 100,
            },
        )


def trading_day_of(ts_ns: int) -> str:
    """The New York date of a moment (yyyymmdd): the trading day P&L belongs to."""
    return datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc).astimezone(NEW_YORK).strftime("%Y%m%d")


def exec_time_text(ts_ns: int) -> str:
    moment = datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc).astimezone(NEW_YORK)
    return moment.strftime("%Y%m%d %H:%M:%S") + " America/New_York"


def exec_fields(e: Execution) -> ExecFields:
    return ExecFields(
        exec_id=e.exec_id,
        time_text=exec_time_text(e.ts_ns),
        account=e.account,
        exchange=e.exchange,
        side=e.side,
        shares=float(e.shares),
        price=e.price,
        perm_id=e.perm_id,
        client_id=e.client_id,
        order_id=e.order_id,
        cum_qty=float(e.cum_qty),
        avg_price=round(e.avg_price, 8),
        order_ref=e.order_ref,
        last_liquidity=e.liquidity,
    )


def parse_exec_filter_time(text: str) -> int | None:
    """ExecutionFilter.time: "yyyymmdd hh:mm:ss [zone]" or "yyyymmdd-hh:mm:ss" (UTC).

    Without a zone the time is New York time (the gateway's zone here).
    Returns epoch ns, or None when the text is not a time (filter ignored).
    """
    text = text.strip()
    try:
        if "-" in text[:9] and len(text) >= 17 and text[8] == "-":
            moment = datetime.strptime(text[:17], "%Y%m%d-%H:%M:%S").replace(tzinfo=timezone.utc)
        else:
            parts = text.split()
            moment = datetime.strptime(parts[0] + parts[1], "%Y%m%d%H:%M:%S")
            zone = ZoneInfo(parts[2]) if len(parts) > 2 else NEW_YORK
            moment = moment.replace(tzinfo=zone)
    except (ValueError, IndexError, KeyError):
        return None
    return int(moment.timestamp() * 1e9)
