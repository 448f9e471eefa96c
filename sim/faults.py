"""Fault injection on command (control API): dropped and refused connections, gateway
restart, status codes, quote shocks, set quotes and injected prints.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .broker import FillReport
from .market import PrintEvent, QuoteEvent
from .session import MarketSub

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger("sim.server")

CODE_TEXT = {
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
    2103: "Market data farm connection is broken:usfarm",
    2104: "Market data farm connection is OK:usfarm",
    2105: "HMDS data farm connection is broken:ushmds",
    2106: "HMDS data farm connection is OK:ushmds",
    2110: "Connectivity between Trader Workstation and server is broken. It will be restored automatically.",
    2158: "Sec-def data farm connection is OK:secdefnj",
}


class FaultControls:
    """Faults on command."""

    def drop_connections(self, client_id: int | None = None) -> int:
        victims = [s for s in list(self.sessions) if client_id is None or s.client_id == client_id]
        for session in victims:
            session.abort()
            self.forget_session(session)
        log.warning("connections dropped (fault)", extra={"count": len(victims), "client_id": client_id})
        return len(victims)

    def refuse_connections(self, seconds: float) -> None:
        """Close the listening socket for ``seconds``: connects get ECONNREFUSED."""
        assert self.loop is not None
        self._close_listener()
        self.refusing_until = time.monotonic() + seconds
        log.warning("refusing connections (fault)", extra={"seconds": seconds})
        self.loop.call_later(seconds, lambda: asyncio.ensure_future(self._reopen()))

    async def _reopen(self) -> None:
        if self.listener is not None or time.monotonic() < self.refusing_until - 0.01:
            return
        for attempt in range(50):
            try:
                await self._listen()
                log.info("accepting connections again", extra={"port": self.port})
                return
            except OSError as exc:  # pragma: no cover - port briefly unavailable
                log.warning("re-listen failed, retrying", extra={"error": str(exc), "attempt": attempt})
                await asyncio.sleep(0.1)

    def restart(self, down_seconds: float) -> None:
        """Gateway restart: every client dropped, no connections for a while; orders live on."""
        log.warning("simulated gateway restart", extra={"down_seconds": down_seconds})
        self.drop_connections()
        self.refuse_connections(down_seconds)

    def send_code(self, code: int, text: str | None = None, client_id: int | None = None, req_id: int = -1) -> int:
        text = text or CODE_TEXT.get(code, f"Simulated status code {code}")
        if code in (1100, 2110):
            self.ib_connected = False
        elif code in (1101, 1102):
            self.ib_connected = True
        elif code == 2103:
            self.data_farm_ok = False
        elif code == 2104:
            self.data_farm_ok = True
        targets = [s for s in self.api_sessions() if client_id is None or s.client_id == client_id]
        for session in targets:
            session.error(req_id, code, text)
            if code == 1101:
                # "data lost": market data subscriptions are gone; clients must resubscribe.
                self._drop_market_subs(session)
        if code in (1101, 1102, 2104):
            # Data is flowing again: refresh every subscriber from the current book.
            for session in targets:
                for req_id, sub in session.mkt_subs.items():
                    symbol = self._symbol_of(sub)
                    if symbol:
                        self._send_snapshot(session, req_id, symbol)
        log.warning("status code sent (fault)", extra={"code": code, "clients": len(targets)})
        return len(targets)

    def _symbol_of(self, sub: MarketSub) -> str | None:
        for symbol, subs in self.mkt_by_symbol.items():
            if sub in subs:
                return symbol
        return None

    def shock(self, symbol: str | None, pct: float) -> list[str]:
        symbols = list(self.universe) if symbol in (None, "", "all", "ALL") else [symbol]
        for s in symbols:
            if s not in self.universe:
                raise KeyError(s)
        for event in self.market.shock(symbols, pct):
            self.market_event(event)
        return symbols

    def set_quote(self, symbol: str, bid: float, ask: float, bid_size: int | None, ask_size: int | None, freeze: bool) -> QuoteEvent:
        event = self.market.set_quote(symbol, bid, ask, bid_size, ask_size, freeze)
        self.market_event(event)
        return event

    def glitch_quote(self, symbol: str, bid: float, ask: float, bid_size: int, ask_size: int) -> QuoteEvent:
        """A feed glitch: subscribers are sent this quote as it is (crossed, zero, stub), while
        the book, the broker's marks and every order ignore it; the next real quote change
        replaces it at the subscribers."""
        event = QuoteEvent(symbol, round(bid * 100), round(ask * 100), int(bid_size), int(ask_size), self.clock.now_ns())
        prev = self.last_quote.get(symbol, (0, 0, 0, 0))
        self.last_quote[symbol] = (event.bid, event.ask, event.bid_size, event.ask_size)
        subs = self.mkt_by_symbol.get(symbol)
        if subs and self.data_farm_ok and self.ib_connected:
            self._publish_quote(subs, event, prev)
        return event

    def inject_print(self, symbol: str, price: float, size: int, venue: str, conditions: str) -> PrintEvent:
        event = self.market.inject_print(symbol, price, size, venue, conditions)
        self.market_event(event)
        return event

    def _drop_owner_mid_fill(self, events: list) -> None:
        """Fault: a resting order just filled (booked at the broker); its client's connection
        drops before the execDetails / orderStatus go out, so it must reconcile to learn of it."""
        faults = self.broker.faults
        if faults.drop_on_fill_next <= 0:
            return
        fill = next((e for e in events if isinstance(e, FillReport)), None)
        if fill is None or self.session_for(fill.client_id) is None:
            return  # nobody to cut off: the fault waits for the next fill
        faults.drop_on_fill_next -= 1
        self.broker.log_fault(
            "connection_dropped_mid_fill", client_id=fill.client_id, order_id=fill.order_id, perm_id=fill.perm_id,
            order_ref=fill.execution.order_ref, exec_id=fill.execution.exec_id,
        )
        self.drop_connections(fill.client_id)
