"""The broker link: the one ib_async connection of the execution service.

ib_async runs an asyncio loop inside its synchronous API. Its callbacks only
append plain tuples to `inbox` (never a Redis call, never anything that blocks);
the service's loop drains the inbox between short Redis reads, so a broker
callback waits at most one read (execution.block_ms, 50 ms by default).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from datetime import datetime, timezone
from typing import Any

from qe.contracts import MAX_MONEY
from qe.ib import ib, stock

from .core import OrderRecord
from .reconcile import BrokerFill, BrokerOrder

log = logging.getLogger(__name__)

ACCOUNT_TAGS = {"NetLiquidation", "BuyingPower"}
CLIENT_ID_IN_USE = 326

# How each broker code is logged (one JSON line, by `BrokerLink._on_error`).
ORDER_CANCELLED = 202  # info after our own cancel (a TTL or a de-risk replace); warning otherwise
FARM_OK = frozenset({2104, 2106, 2158, 2107, 2108, 2119})  # data farms connected / on demand: normal
WARNING_CODES = frozenset({1101, 1102, 399, 404, 10148, 10147})  # plus every other 2100-2199 (IB's warnings)
# ib_async logs the same codes itself, at error for 202, and a whole `Trade(...)` repr
# (2 KB) when it marks an order cancelled: those lines are dropped, ours replaces them.
MAX_CANCELS_REMEMBERED = 10_000
IB_LINES_LOGGED_HERE = ("Error ", "Warning ", "Canceled order: ", "IBKR API validation warning: ")


def broker_code_level(code: int, after_own_cancel: bool) -> int:
    """The log level of one broker code: expected news at info, IB's warnings at warning."""
    if code in FARM_OK or (code == ORDER_CANCELLED and after_own_cancel):
        return logging.INFO
    if code == ORDER_CANCELLED or code in WARNING_CODES or 2100 <= code < 2200:
        return logging.WARNING
    return logging.ERROR


def _not_logged_here(record: logging.LogRecord) -> bool:
    """Filter for ib_async's wrapper logger: keep only what BrokerLink does not log itself."""
    return not (isinstance(record.msg, str) and record.msg.startswith(IB_LINES_LOGGED_HERE))


for _wrapper_logger in ("ib_async.wrapper", "ib_insync.wrapper"):
    logging.getLogger(_wrapper_logger).addFilter(_not_logged_here)


def pnl_figure(value: Any, ceiling: float = MAX_MONEY) -> float | None:
    """One reqPnL / reqPnLSingle figure as a finite number, else None: IB sends its
    "max double" (1.7976931348623157e308) for a figure it has not set, ib_async starts
    each at NaN; anything beyond the contract's money ceiling is not a figure either."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or abs(number) > ceiling:
        return None
    return number


def _ns(moment: Any) -> int:
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(moment.timestamp() * 1e9)
    return 0


def _broker_fill(fill: Any, order_ref: str = "") -> BrokerFill:
    """An ib_async Fill as plain data (orderRef from the execution, else the order's)."""
    execution = fill.execution
    return BrokerFill(
        exec_id=execution.execId,
        order_ref=execution.orderRef or order_ref,
        order_id=execution.orderId,
        perm_id=execution.permId,
        symbol=fill.contract.symbol,
        side="BUY" if execution.side in ("BOT", "BUY") else "SELL",
        qty=int(execution.shares),
        price=float(execution.price),
        ts_ns=_ns(execution.time),
    )


class OrderDone(Exception):
    """A modify of an order the broker already reported filled or cancelled: not sent
    (the gateway would refuse it); the order's final status reaches the service anyway."""


class BrokerLink:
    def __init__(
        self,
        host: str,
        port: int,
        client_id: int,
        connect_timeout_s: float,
        reconnect_base_s: float,
        reconnect_cap_s: float,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_base_s, self.reconnect_cap_s = reconnect_base_s, reconnect_cap_s
        self.ib = ib.IB()
        self.ib.RaiseRequestErrors = False
        self.inbox: deque[tuple] = deque()
        self.failures = 0
        self.next_attempt_s = 0.0
        self.last_error = ""
        self.last_code: int | None = None
        # Order ids we asked to cancel, oldest first (their 202 is expected news).
        self.cancels_sent: dict[int, None] = {}
        # The broker's P&L: contract ids learnt from positions (reqPnLSingle needs one),
        # the account and the symbols subscribed on this connection.
        self.con_ids: dict[str, int] = {}
        self.pnl_account: str | None = None
        self.pnl_symbols: dict[str, int] = {}
        self._wire_events()

    # -- callbacks: plain data into the inbox -------------------------------------------------
    def _wire_events(self) -> None:
        events = self.ib
        events.orderStatusEvent += self._on_status
        events.execDetailsEvent += self._on_exec
        events.commissionReportEvent += self._on_commission
        events.errorEvent += self._on_error
        events.disconnectedEvent += lambda: self.inbox.append(("disconnected",))
        events.positionEvent += self._on_position
        events.accountValueEvent += self._on_account_value
        events.openOrderEvent += self._on_open_order
        events.pnlEvent += self._on_pnl
        events.pnlSingleEvent += self._on_pnl_single

    def _on_status(self, trade: Any) -> None:
        # ib_async also emits this event when it *locally* marks an order Cancelled
        # after an error; such entries carry the error code in the trade log.
        local_error = trade.log[-1].errorCode if trade.log else 0
        status = trade.orderStatus
        self.inbox.append(
            ("status", trade.order.orderRef, trade.order.orderId, trade.order.permId, status.status, status.filled, local_error)
        )

    def _on_exec(self, trade: Any, fill: Any) -> None:
        self.inbox.append(("fill", _broker_fill(fill, trade.order.orderRef)))

    def _on_commission(self, trade: Any, fill: Any, report: Any) -> None:
        self.inbox.append(("commission", report.execId, float(report.commission)))

    def _on_error(self, req_id: int, code: int, text: str, contract: Any = None) -> None:
        if req_id == -1:
            self.last_code = code  # e.g. 326 during a connect attempt, which then times out
        self._log_broker_code(req_id, code, text)
        self.inbox.append(("error", req_id, code, text))

    def _log_broker_code(self, req_id: int, code: int, text: str) -> None:
        """One JSON line per broker code, plain fields only (never an object's repr)."""
        level = broker_code_level(code, after_own_cancel=req_id in self.cancels_sent)
        fields: dict[str, Any] = {"code": code, "req_id": req_id, "text": str(text)[:300]}
        trade = self._trade(req_id) if req_id > 0 else None
        if trade is not None:
            fields.update(order_ref=trade.order.orderRef, symbol=getattr(trade.contract, "symbol", None))
        if code == ORDER_CANCELLED:
            self.cancels_sent.pop(req_id, None)
        log.log(level, "broker message", extra=fields)

    def _on_pnl(self, pnl: Any) -> None:
        self.inbox.append(("broker_pnl", pnl.account, None, None, pnl_figure(pnl.dailyPnL), pnl_figure(pnl.unrealizedPnL),
                           pnl_figure(pnl.realizedPnL), None))

    def _on_pnl_single(self, pnl: Any) -> None:
        symbol = next((s for s, con_id in self.pnl_symbols.items() if con_id == pnl.conId), None)
        if symbol is None:
            return  # a subscription cancelled since
        self.inbox.append(("broker_pnl", pnl.account, symbol, pnl_figure(pnl.position), pnl_figure(pnl.dailyPnL),
                           pnl_figure(pnl.unrealizedPnL), pnl_figure(pnl.realizedPnL), pnl_figure(pnl.value)))

    def _on_position(self, position: Any) -> None:
        if getattr(position.contract, "conId", 0):
            self.con_ids[position.contract.symbol] = position.contract.conId
        # Raw numbers: the service checks them (an int() of an infinite size would raise here).
        self.inbox.append(("position", position.account, position.contract.symbol, float(position.position), float(position.avgCost)))

    def _on_account_value(self, value: Any) -> None:
        if value.tag in ACCOUNT_TAGS and value.currency in ("USD", "BASE", ""):
            try:
                amount = float(value.value)
            except ValueError:
                return
            self.inbox.append(("account_value", value.account, value.tag, amount))

    def _on_open_order(self, trade: Any) -> None:
        self.inbox.append(("open_order", self._broker_order(trade, open_=True)))

    # -- connection -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.ib.isConnected()

    def try_connect(self, now_s: float) -> bool:
        """One attempt if its time has come; capped exponential backoff with full jitter."""
        if self.connected or now_s < self.next_attempt_s:
            return False
        self.last_code = None
        try:
            self.ib.connect(self.host, self.port, clientId=self.client_id, timeout=self.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - refused, timeout, 326 client id in use...
            self.failures += 1
            ceiling = min(self.reconnect_cap_s, self.reconnect_base_s * 2 ** (self.failures - 1))
            self.next_attempt_s = now_s + random.uniform(ceiling / 2, ceiling)
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.last_code == CLIENT_ID_IN_USE:
                self.last_error = f"client id {self.client_id} in use (IB 326)"
            log.warning(
                "broker connect failed",
                extra={"error": self.last_error, "failures": self.failures, "retry_in_s": round(self.next_attempt_s - now_s, 2)},
            )
            self.ib.disconnect()
            return False
        self.failures = 0
        return True

    def disconnect(self) -> None:
        self.ib.disconnect()
        self.forget_pnl()

    # -- the broker's P&L (reqPnL / reqPnLSingle) ---------------------------------------------
    def forget_pnl(self) -> None:
        """After a disconnect: no subscription survives (ib_async resets its own on connect)."""
        self.pnl_account = None
        self.pnl_symbols = {}

    def subscribe_pnl(self, account: str) -> None:
        if self.pnl_account == account:
            return
        if self.pnl_account is not None:
            self.ib.cancelPnL(self.pnl_account)
        self.ib.reqPnL(account)
        self.pnl_account = account

    def subscribe_pnl_single(self, account: str, symbol: str) -> bool:
        """reqPnLSingle for one held symbol; False while its contract id is unknown."""
        if symbol in self.pnl_symbols:
            return True
        con_id = self.con_ids.get(symbol)
        if not con_id:
            return False
        self.ib.reqPnLSingle(account, "", con_id)
        self.pnl_symbols[symbol] = con_id
        return True

    def cancel_pnl_single(self, account: str, symbol: str) -> None:
        con_id = self.pnl_symbols.pop(symbol, None)
        if con_id is not None:
            self.ib.cancelPnLSingle(account, "", con_id)

    def pump(self) -> None:
        """Let ib_async read the socket and run its callbacks."""
        self.ib.sleep(0)

    def account(self, configured: str | None) -> str | None:
        accounts = self.ib.managedAccounts() if self.connected else []
        if configured:
            return configured if configured in accounts else None
        return accounts[0] if accounts else None

    def reserve_order_id(self, at_least: int) -> int:
        self.ib.client.updateReqId(at_least)
        return self.ib.client.getReqId()

    # -- orders -------------------------------------------------------------------------------------
    def place(self, record: OrderRecord, account: str, hidden: bool, price: float | None = None) -> None:
        """Place (or, with the same order id, modify) the order of a record."""
        assert record.broker_order_id is not None
        trade = self._trade(record.broker_order_id)
        if trade is not None and trade.orderStatus.status in ib.OrderStatus.DoneStates:
            raise OrderDone(f"order {record.order_ref} is already {trade.orderStatus.status} at the broker")
        limit = record.limit_price if price is None else price
        if record.order_type == "MKT":
            order = ib.MarketOrder(record.side, record.qty)
        else:
            order = ib.LimitOrder(record.side, record.qty, limit)
        order.orderId = record.broker_order_id
        order.orderRef = record.order_ref
        order.tif = record.tif
        order.hidden = hidden
        order.account = account
        self.ib.placeOrder(stock(record.symbol), order)

    def flush(self) -> None:
        """Hand what ib_async queued to the socket now (it writes from its event loop)."""
        self.ib.sleep(0)

    def _trade(self, order_id: int) -> Any:
        """ib_async's Trade for one of this client's order ids, if it has one (the key
        ib_async itself files it under, so other clients' orders never match)."""
        wrapper = self.ib.wrapper
        return wrapper.trades.get(wrapper.orderKey(wrapper.clientId, order_id, 0))

    def cancel(self, order_id: int) -> None:
        self.cancels_sent[order_id] = None
        if len(self.cancels_sent) > MAX_CANCELS_REMEMBERED:
            del self.cancels_sent[next(iter(self.cancels_sent))]
        trade = self._trade(order_id)
        if trade is not None:
            self.ib.cancelOrder(trade.order)
        else:  # an order of ours from an earlier session: cancel by id all the same
            self.ib.client.cancelOrder(order_id, "")

    # -- reconciliation snapshot ----------------------------------------------------------------------
    def snapshot(self, session_start: datetime) -> tuple[list[BrokerOrder], list[BrokerFill]]:
        """Open orders of all clients, completed orders, executions since the session start."""
        open_trades = self.ib.reqAllOpenOrders()
        completed = self.ib.reqCompletedOrders(apiOnly=True)
        fills = self.ib.reqExecutions(ib.ExecutionFilter(time=session_start.astimezone(timezone.utc).strftime("%Y%m%d-%H:%M:%S")))
        orders = [self._broker_order(t, open_=True) for t in open_trades]
        orders += [self._broker_order(t, open_=False) for t in completed]
        return orders, [_broker_fill(fill) for fill in fills]

    def positions(self) -> list[tuple[str, str, float, float]]:
        positions = self.ib.reqPositions()
        for p in positions:
            if getattr(p.contract, "conId", 0):
                self.con_ids[p.contract.symbol] = p.contract.conId
        return [(p.account, p.contract.symbol, float(p.position), float(p.avgCost)) for p in positions]

    def account_values(self) -> list[tuple[str, str, float]]:
        values = []
        for value in self.ib.accountValues():
            if value.tag in ACCOUNT_TAGS and value.currency in ("USD", "BASE", ""):
                try:
                    values.append((value.account, value.tag, float(value.value)))
                except ValueError:
                    continue
        return values

    @staticmethod
    def _broker_order(trade: Any, open_: bool) -> BrokerOrder:
        order, status = trade.order, trade.orderStatus
        return BrokerOrder(
            order_ref=order.orderRef or "",
            order_id=order.orderId,
            perm_id=order.permId,
            client_id=order.clientId,
            status=status.status,
            filled=float(status.filled or 0),
            symbol=trade.contract.symbol,
            side=order.action,
            qty=float(order.totalQuantity),
            limit_price=float(order.lmtPrice) if order.orderType == "LMT" else None,
            open=open_,
        )
