"""IB as the market data source, through ib_async's synchronous API.

* L1: `reqMktData` for every symbol of the universe; quotes are read in the
  `pendingTickersEvent` callback (events, not a `waitOnUpdate` loop, so no
  update is missed).
* Prints: `reqTickByTickData(..., "AllLast")` (venue + conditions) for at most
  `max_tick_by_tick` symbols (IB allows only a few): symbols with open positions
  or orders first, the other slots rotate through the universe every
  `tick_by_tick_rotation_s` (core.plan_tick_by_tick).
* Callbacks only append to `self.items`; the service loop drives the asyncio
  loop with `ib.sleep(timeout)` and flushes to Redis in between (no Redis call
  inside a callback).

Trade time: ib_async stamps tick-by-tick ticks with the local receive time; the
trade time IB sent (epoch seconds) is taken from the wrapper call itself.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from qe import metrics
from qe.clock import Clock
from qe.config import IbkrFeed as IbkrConfig
from qe.contracts import L1
from qe.ib import ib, stock

from .core import NS_PER_S, IB_FARM_BROKEN, IB_FARM_OK, IB_RESTORED, OccurrenceCounter, RawTick, plan_tick_by_tick
from .feed import FeedDisconnected, FeedError, Halt, Item, Malformed, Notice, Quote, Trade

log = logging.getLogger(__name__)

NOTICE_CODES = set(IB_FARM_BROKEN) | set(IB_FARM_OK) | IB_RESTORED
TBT_LIMIT = 10190  # max number of tick-by-tick requests reached


def _number(value: Any) -> float | None:
    """A finite or infinite real number, or None for what ib_async uses for "no value"
    (None, NaN) and for anything that is not a number at all (a bool included)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # ib_async sizes may be Decimal
    except (TypeError, ValueError, OverflowError):
        return None
    return None if math.isnan(number) else number


def _price(value: Any) -> float | None:
    """IB's absent side (-1, 0, NaN) is None. +inf is kept: the L1 contract refuses it and
    the quote is skipped as malformed rather than published without that side."""
    number = _number(value)
    return None if number is None or number <= 0 else number


def _size(value: Any) -> int:
    """Absent (NaN, -1) is 0 shares. An infinite size cannot be a quote size: ValueError
    (the quote is skipped as malformed). Sizes above the limits are judged by the gate."""
    number = _number(value)
    if number is None or number <= 0:
        return 0
    if not math.isfinite(number):
        raise ValueError(f"size {number}")
    return int(number)


class IbkrFeed:
    name = "ibkr"

    def __init__(
        self, host: str, port: int, client_id: int, symbols: Sequence[str], config: IbkrConfig, clock: Clock
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.symbols = list(symbols)
        self.config = config
        self.clock = clock
        self.ib: Any = None
        self.contracts: dict[str, Any] = {}  # display symbol -> qualified contract (kept across reconnects)
        self.symbol_by_con_id: dict[int, str] = {}
        self.tick_by_tick: set[str] = set()
        self.rotation_index = 0
        self.next_rotation_ns = 0
        self.priority: set[str] = set()
        self.counter = OccurrenceCounter()
        self.last_quote: dict[str, tuple] = {}
        self.halted: set[str] = set()  # symbols whose IB halted tick (49) says halted
        self.items: list[Item] = []
        self.disconnected = False
        self.data_lost = False  # IB 1101: subscriptions are gone

    # -- connection --------------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        client = ib.IB()
        client.errorEvent += self._on_error
        client.disconnectedEvent += self._on_disconnected
        client.pendingTickersEvent += self._on_tickers
        self._hook_tick_by_tick(client)
        # Market data needs no positions, orders or account downloads at connect
        # (ib_async only; ib_insync has no fetchFields).
        extra = {"fetchFields": ib.StartupFetchNONE} if hasattr(ib, "StartupFetchNONE") else {}
        try:
            client.connect(
                self.host, self.port, clientId=self.client_id, timeout=self.config.connect_timeout_s,
                readonly=True, **extra,
            )
        except Exception as exc:  # noqa: BLE001 - refused, timed out, client id in use (326), ...
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001
                pass
            raise FeedError(f"cannot connect to IB at {self.host}:{self.port} as client {self.client_id}: "
                            f"{type(exc).__name__}: {exc}") from None
        self.ib = client
        self.disconnected = False
        self.data_lost = False
        self.last_quote.clear()
        self.halted.clear()
        self.tick_by_tick.clear()
        try:
            client.reqMarketDataType(self.config.market_data_type)
            self._qualify()
            for _symbol, contract in self.contracts.items():
                client.reqMktData(contract)
            self._plan_tick_by_tick(force=True)
        except (ConnectionError, OSError) as exc:
            self.close()
            raise FeedError(f"IB connection lost while subscribing: {exc}") from None
        log.info(
            "ib feed ready",
            extra={"symbols": len(self.contracts), "tick_by_tick": sorted(self.tick_by_tick), "client_id": self.client_id},
        )

    def _qualify(self) -> None:
        missing = [symbol for symbol in self.symbols if symbol not in self.contracts]
        if not missing:
            return
        contracts = [stock(symbol) for symbol in missing]
        self.ib.qualifyContracts(*contracts)
        for symbol, contract in zip(missing, contracts):
            if contract.conId:
                self.contracts[symbol] = contract
                self.symbol_by_con_id[contract.conId] = symbol
            else:
                log.error("IB does not know this symbol; it gets no market data", extra={"symbol": symbol})
        if self.ib is None or not self.ib.isConnected():
            raise ConnectionError("disconnected while qualifying contracts")

    def add_symbols(self, symbols: list[str]) -> list[str]:
        """Symbols outside the universe file (held at the broker or with open orders):
        qualified like the universe's and subscribed now if connected (and on every later
        connect, since they join `self.symbols`). A symbol IB does not know is logged by
        `_qualify` and left out of the result."""
        new = [symbol for symbol in dict.fromkeys(symbols) if symbol not in self.symbols]
        self.symbols.extend(new)
        if self.ib is None:
            return new
        try:
            self._qualify()
            added = [symbol for symbol in new if symbol in self.contracts]
            for symbol in added:
                self.ib.reqMktData(self.contracts[symbol])
        except (ConnectionError, OSError) as exc:
            raise FeedDisconnected(f"IB connection lost while subscribing: {exc}") from None
        return added

    def close(self) -> None:
        if self.ib is not None:
            client, self.ib = self.ib, None
            client.errorEvent -= self._on_error
            client.disconnectedEvent -= self._on_disconnected
            client.pendingTickersEvent -= self._on_tickers
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001
                pass
        self.tick_by_tick.clear()

    def resubscribe(self) -> None:
        """Everything again (IB 1101/1102, or a silent feed). Unless IB said the
        subscriptions were lost (1101), cancel first, so a subscription IB kept
        is not doubled (a doubled tick-by-tick stream would look like twin prints)."""
        if self.ib is None:
            return
        cancel_first, self.data_lost = not self.data_lost, False
        for contract in self.contracts.values():
            if cancel_first:
                self.ib.cancelMktData(contract)
            self.ib.reqMktData(contract)
        for symbol in sorted(self.tick_by_tick):
            contract = self.contracts[symbol]
            if cancel_first:
                self.ib.cancelTickByTickData(contract, "AllLast")
            self.ib.reqTickByTickData(contract, "AllLast", 0, False)
        self.last_quote.clear()
        if not self.ib.isConnected():
            raise FeedDisconnected("disconnected while re-subscribing")

    def maintain(self, now_ns: int, priority: set[str]) -> None:
        self.priority = priority & set(self.contracts)
        if now_ns >= self.next_rotation_ns:
            self.rotation_index += 1
            self.next_rotation_ns = now_ns + int(self.config.tick_by_tick_rotation_s * NS_PER_S)
            self._plan_tick_by_tick()
        elif self.priority - self.tick_by_tick:
            self._plan_tick_by_tick()  # a new position or order takes a slot at once

    def _plan_tick_by_tick(self, force: bool = False) -> None:
        if self.ib is None:
            return
        wanted = set(plan_tick_by_tick(list(self.contracts), self.priority, self.config.max_tick_by_tick, self.rotation_index))
        if force:
            self.next_rotation_ns = self.clock.now_ns() + int(self.config.tick_by_tick_rotation_s * NS_PER_S)
        for symbol in sorted(self.tick_by_tick - wanted):
            self.ib.cancelTickByTickData(self.contracts[symbol], "AllLast")
            self.tick_by_tick.discard(symbol)
        for symbol in sorted(wanted - self.tick_by_tick):
            self.ib.reqTickByTickData(self.contracts[symbol], "AllLast", 0, False)
            self.tick_by_tick.add(symbol)
        metrics.feed_tick_by_tick.set(len(self.tick_by_tick))

    # -- streaming ------------------------------------------------------------------------------------
    def pump(self, timeout_s: float) -> list[Item]:
        if self.ib is None or self.disconnected:
            raise FeedDisconnected("not connected to IB")
        try:
            self.ib.sleep(timeout_s)  # runs ib_async's loop: callbacks fill self.items
        except (ConnectionError, OSError) as exc:
            raise FeedDisconnected(f"IB connection lost: {exc}") from None
        if self.disconnected or not self.ib.isConnected():
            raise FeedDisconnected("IB connection closed")
        items, self.items = self.items, []
        return items

    # -- callbacks: memory only, never Redis ------------------------------------------------------------
    def _on_disconnected(self) -> None:
        self.disconnected = True

    def _on_error(self, req_id: int, code: int, message: str, contract: Any = None) -> None:
        if code in NOTICE_CODES:
            if code == 1101:
                self.data_lost = True
            self.items.append(Notice(code, message))
        elif code == TBT_LIMIT:
            symbol = self.symbol_by_con_id.get(getattr(contract, "conId", 0), "")
            self.tick_by_tick.discard(symbol)
            self.items.append(Malformed("tick_by_tick_limit", f"{symbol}: {message}"))
        elif code == 300 or code == 2119:
            pass  # cancel of an id IB no longer knows (after 1101); market data farm connecting
        else:
            log.info("ib message", extra={"code": code, "req_id": req_id, "text": message})

    def _hook_tick_by_tick(self, client: Any) -> None:
        wrapper = client.wrapper
        original = wrapper.tickByTickAllLast

        def tick_by_tick_all_last(req_id, tick_type, time, price, size, attrib, exchange, conditions):
            try:
                ticker = wrapper.reqId2Ticker.get(req_id)
                symbol = self.symbol_by_con_id.get(ticker.contract.conId) if ticker is not None else None
                trade_price, trade_size = _price(price), _size(size)  # NaN / -1 / 0: no trade
                if symbol is not None and symbol in self.tick_by_tick and trade_price is not None and trade_size > 0:
                    tick = RawTick(
                        symbol=symbol,
                        ts_ns=int(time) * NS_PER_S,  # bounded against our clock by the service
                        price=round(trade_price, 4),
                        size=trade_size,
                        venue=(str(exchange).strip().upper() or "UNKNOWN")[:16],
                        conditions=tuple(str(conditions or "").split()),
                    )
                    self.items.append(Trade(tick, self.counter.key(tick)))
            except Exception as exc:  # noqa: BLE001 - a bad tick must not break ib_async's loop
                self.items.append(Malformed("bad_tick", f"{type(exc).__name__}: {str(exc)[:160]}"))
            original(req_id, tick_type, time, price, size, attrib, exchange, conditions)

        wrapper.tickByTickAllLast = tick_by_tick_all_last

    def _on_tickers(self, tickers: Any) -> None:
        now_ns = self.clock.now_ns()
        for ticker in tickers:
            try:
                self._on_ticker(ticker, now_ns)
            except Exception as exc:  # noqa: BLE001 - one bad ticker must not break ib_async's loop
                self.items.append(Malformed("bad_l1", f"{type(exc).__name__}: {str(exc)[:160]}"))

    def _on_ticker(self, ticker: Any, now_ns: int) -> None:
        symbol = self.symbol_by_con_id.get(ticker.contract.conId)
        if symbol is None:
            return
        halted = _number(getattr(ticker, "halted", None))  # tick 49: NaN unknown, 0 trading, 1/2 halted
        if halted is not None and (halted > 0) != (symbol in self.halted):
            if halted > 0:
                self.halted.add(symbol)
            else:
                self.halted.discard(symbol)
            self.items.append(Halt(symbol, halted > 0))
        last = _price(ticker.last)
        values = (
            _price(ticker.bid), _price(ticker.ask), _size(ticker.bidSize), _size(ticker.askSize),
            last, _size(ticker.lastSize) if last is not None else None,
        )
        if values == self.last_quote.get(symbol) or values[:2] == (None, None) and values[4] is None:
            return
        self.last_quote[symbol] = values
        bid, ask, bid_size, ask_size, last, last_size = values
        try:
            quote = L1(
                symbol=symbol, bid=bid, ask=ask, bid_size=bid_size, ask_size=ask_size,
                last=last, last_size=last_size, quote_ts_ns=now_ns,
            )
        except ValueError as exc:
            self.items.append(Malformed("bad_l1", f"{symbol}: {str(exc).splitlines()[0][:160]}"))
            return
        self.items.append(Quote(quote))
