"""Request handlers and fan-out: contract details, reqMktData, tick-by-tick, and the market
timer that moves the simulated market and lets resting orders trade.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from . import protocol as P
from .broker import NEW_YORK
from .market import PrintEvent, QuoteEvent
from .session import MarketSub

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger("sim.server")

# Generic tick types IB accepts for a stock (its 321 text names them); 233 and 236 are served.
LEGAL_GENERIC_TICKS = (
    (100, "Option Volume"), (101, "Option Open Interest"), (104, "Historical Volatility"), (105, "Average Opt Volume"),
    (106, "impvolat"), (107, "climpvolat"), (125, "Bond analytic data"), (165, "Misc. Stats"), (166, "CScreen"),
    (225, "Auction"), (232, "Mark Price"), (221, "Mark Price"), (233, "RTVolume"), (236, "inventory"),
    (258, "Fundamentals"), (47, "Fundamentals"), (291, "ivclose"), (293, "TradeCount"), (294, "TradeRate"),
    (295, "VolumeRate"), (318, "LastRTHTrade"), (375, "RTTrdVolume"), (411, "rthistvol"), (456, "IBDividends"),
    (59, "IBDividends"), (460, "Bond Factor Multiplier"), (499, "Fee and Rebate Rate"), (506, "midptiv"),
    (577, "EtfNavLast"), (578, "EtfNavFrozenLast"), (586, "IPOHLMPRC"), (588, "Futures Open Interest"),
    (595, "Short-Term Volume X Mins"), (614, "EtfNavMisc"), (619, "Creditman Slow Mark Price"),
)
LEGAL_GENERIC_IDS = frozenset(code for code, _ in LEGAL_GENERIC_TICKS)
RT_VOLUME = 48
SHORTABLE = 46
SHORTABLE_SHARES = 89
SHORTABLE_VALUE = 3.0  # IB: above 2.5 = at least 1000 shares available to borrow
SHORTABLE_SHARE_COUNT = 1_000_000


def parse_generic_ticks(text: str) -> frozenset[int] | None:
    """The generic tick list as IB validates it (None: invalid)."""
    codes = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) not in LEGAL_GENERIC_IDS:
            return None
        codes.add(int(part))
    return frozenset(codes)


def generic_ticks_error(text: str) -> str:
    legal = ",".join(f"{code}({name})" for code, name in LEGAL_GENERIC_TICKS)
    return f"Error validating request.-'bO' : cause - Incorrect generic tick list of {text}.  Legal ones for (STK) are: {legal}"


class MarketDataHandlers:
    """Contract details and market data."""

    def on_ReqContractDetails(self, s: Session, r: P.ReqContractDetails) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        exchange = r.contract.exchange or "SMART"
        s.send(P.contract_details(r.req_id, info, exchange, *self._trading_hours()))
        s.send(P.contract_details_end(r.req_id))

    def _trading_hours(self) -> tuple[str, str]:
        day = datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=timezone.utc).astimezone(NEW_YORK).strftime("%Y%m%d")
        return f"{day}:0400-{day}:2000", f"{day}:0930-{day}:1600"

    def on_ReqMktData(self, s: Session, r: P.ReqMktData) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        if r.req_id in s.mkt_subs:
            s.error(r.req_id, 322, f"Error processing request.-'{r.req_id}' : cause - Duplicate ticker id")
            return
        generic = parse_generic_ticks(r.generic_ticks)
        if generic is None:
            s.error(r.req_id, 321, generic_ticks_error(r.generic_ticks))
            return
        if not r.snapshot and self.mkt_count() >= self.config.max_market_data_lines:
            s.error(r.req_id, 101, f"Max number of tickers has been reached ({self.config.max_market_data_lines})")
            return
        s.send(P.tick_req_params(r.req_id, info.min_tick, "9c0001", 3))
        s.send(P.market_data_type(r.req_id, 1))
        if self.data_farm_ok and self.ib_connected:
            self._send_snapshot(s, r.req_id, info.symbol)
            if 236 in generic:
                s.send(P.tick_generic(r.req_id, SHORTABLE, SHORTABLE_VALUE))
                s.send(P.tick_size(r.req_id, SHORTABLE_SHARES, SHORTABLE_SHARE_COUNT))
        if r.snapshot or r.regulatory_snapshot:
            s.send(P.tick_snapshot_end(r.req_id))
            return
        sub = MarketSub(s, r.req_id, "mkt", generic=generic)
        s.mkt_subs[r.req_id] = sub
        self.mkt_by_symbol.setdefault(info.symbol, []).append(sub)

    def _send_snapshot(self, s: Session, req_id: int, symbol: str) -> None:
        book = self.market.book(symbol)
        send = s.send
        send(P.tick_price(req_id, P.BID, P.price_text(book.bid), book.bid_size, 1))
        send(P.tick_price(req_id, P.ASK, P.price_text(book.ask), book.ask_size, 1))
        if book.last:
            send(P.tick_price(req_id, P.LAST, P.price_text(book.last), book.last_size, 0))
        if book.high:
            send(P.tick_price(req_id, P.HIGH, P.price_text(book.high), 0, 0))
            send(P.tick_price(req_id, P.LOW, P.price_text(book.low), 0, 0))
        send(P.tick_size(req_id, P.VOLUME, book.volume))
        send(P.tick_price(req_id, P.CLOSE, P.price_text(book.ref), 0, 0))
        if book.last_ts_ns:
            send(P.tick_string(req_id, P.LAST_TIMESTAMP, str(book.last_ts_ns // 1_000_000_000)))
        if book.last_venue:
            send(P.tick_string(req_id, P.LAST_EXCHANGE, book.last_venue))
        send(P.tick_generic(req_id, P.HALTED, 1 if symbol in self.broker.halted else 0))

    def on_CancelMktData(self, s: Session, r: P.CancelMktData) -> None:
        sub = s.mkt_subs.pop(r.req_id, None)
        if sub is None:
            s.error(r.req_id, 300, f"Can't find EId with tickerId:{r.req_id}")
            return
        self._remove_sub(self.mkt_by_symbol, sub)

    def on_ReqTickByTick(self, s: Session, r: P.ReqTickByTick) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        if r.tick_type not in P.TBT_TYPES:
            s.error(r.req_id, 10189, f"Failed to request tick-by-tick data:Invalid tick type '{r.tick_type}'")
            return
        if r.req_id in s.tbt_subs:
            s.error(r.req_id, 322, f"Error processing request.-'{r.req_id}' : cause - Duplicate ticker id")
            return
        if self.tbt_count() >= self.config.max_tick_by_tick:
            s.error(r.req_id, 10190, "Max number of tick-by-tick requests has been reached.")
            return
        if r.number_of_ticks > 0:  # IB sends that many historical ticks first
            what = {"Last": "TRADES", "AllLast": "TRADES", "BidAsk": "BID_ASK", "MidPoint": "MIDPOINT"}[r.tick_type]
            rows = self.history.ticks(info.symbol, what, None, None, min(r.number_of_ticks, 1000))
            self._send_historical_ticks(s, r.req_id, what, rows)
        sub = MarketSub(s, r.req_id, r.tick_type, r.ignore_size)
        s.tbt_subs[r.req_id] = sub
        self.tbt_by_symbol.setdefault(info.symbol, []).append(sub)
        if r.tick_type == "BidAsk" and self.data_farm_ok and self.ib_connected:
            book = self.market.book(info.symbol)
            s.send(
                P.tick_by_tick_bid_ask(
                    r.req_id, self.clock.now_ns() // 1_000_000_000, P.price_text(book.bid), P.price_text(book.ask),
                    book.bid_size, book.ask_size,
                )
            )

    def on_CancelTickByTick(self, s: Session, r: P.CancelTickByTick) -> None:
        sub = s.tbt_subs.pop(r.req_id, None)
        if sub is None:
            log.info("cancel of unknown tick-by-tick request", extra={"req_id": r.req_id, "client_id": s.client_id})
            return
        self._remove_sub(self.tbt_by_symbol, sub)

    def publish_market(self, event: QuoteEvent | PrintEvent) -> None:
        self.market_events += 1
        if isinstance(event, QuoteEvent):
            self.history.on_quote(event.symbol, event.ts_ns, event.bid, event.ask, event.bid_size, event.ask_size)
        else:
            self.history.on_print(event.symbol, event.ts_ns, event.price, event.size, event.venue, event.conditions)
        if not (self.data_farm_ok and self.ib_connected):
            if isinstance(event, QuoteEvent):
                self.last_quote[event.symbol] = (event.bid, event.ask, event.bid_size, event.ask_size)
            return
        symbol = event.symbol
        mkt = self.mkt_by_symbol.get(symbol)
        tbt = self.tbt_by_symbol.get(symbol)
        if isinstance(event, QuoteEvent):
            prev = self.last_quote.get(symbol, (0, 0, 0, 0))
            self.last_quote[symbol] = (event.bid, event.ask, event.bid_size, event.ask_size)
            if mkt:
                self._publish_quote(mkt, event, prev)
            if tbt:
                epoch_s = event.ts_ns // 1_000_000_000
                bid, ask = P.price_text(event.bid), P.price_text(event.ask)
                price_changed = (event.bid, event.ask) != prev[:2]
                for sub in tbt:
                    if sub.kind == "BidAsk":
                        if sub.ignore_size and not price_changed:
                            continue
                        sub.session.send_market(P.tick_by_tick_bid_ask(sub.req_id, epoch_s, bid, ask, event.bid_size, event.ask_size))
                        self.ticks_sent += 1
                    elif sub.kind == "MidPoint" and price_changed:
                        sub.session.send_market(P.tick_by_tick_mid_point(sub.req_id, epoch_s, (event.bid + event.ask) / 200))
                        self.ticks_sent += 1
        else:
            if mkt:
                self._publish_print(mkt, event)
            if tbt:
                epoch_s = event.ts_ns // 1_000_000_000
                price = P.price_text(event.price)
                for sub in tbt:
                    if sub.kind in ("AllLast", "Last"):
                        tick_type = P.TBT_ALL_LAST if sub.kind == "AllLast" else P.TBT_LAST
                        sub.session.send_market(
                            P.tick_by_tick_last(sub.req_id, tick_type, epoch_s, price, event.size, 0, event.venue, event.conditions)
                        )
                        self.ticks_sent += 1

    def _publish_quote(self, subs: list[MarketSub], q: QuoteEvent, prev: tuple[int, int, int, int]) -> None:
        # Only what changed, like TWS: a price tick carries its size; a size-only change is a size tick.
        parts: list[tuple[int, str, int, bool]] = []  # (tick type, price text or "", size, is price)
        if q.bid != prev[0]:
            parts.append((P.BID, P.price_text(q.bid), q.bid_size, True))
        elif q.bid_size != prev[2]:
            parts.append((P.BID_SIZE, "", q.bid_size, False))
        if q.ask != prev[1]:
            parts.append((P.ASK, P.price_text(q.ask), q.ask_size, True))
        elif q.ask_size != prev[3]:
            parts.append((P.ASK_SIZE, "", q.ask_size, False))
        if not parts:
            return
        for sub in subs:
            for tick_type, price, size, is_price in parts:
                if is_price:
                    sub.session.send_market(P.tick_price(sub.req_id, tick_type, price, size, 1))
                else:
                    sub.session.send_market(P.tick_size(sub.req_id, tick_type, size))
                self.ticks_sent += 1

    def _publish_print(self, subs: list[MarketSub], t: PrintEvent) -> None:
        book = self.market.book(t.symbol)
        price = P.price_text(t.price)
        epoch = str(t.ts_ns // 1_000_000_000)
        new_high = t.price == book.high
        new_low = t.price == book.low
        vwap = book.notional / book.volume / 100 if book.volume else t.price / 100
        rt_volume = f"{price};{t.size};{t.ts_ns // 1_000_000};{book.volume};{vwap:.8f};true"
        venue_changed = self.last_venue.get(t.symbol) != t.venue
        self.last_venue[t.symbol] = t.venue
        for sub in subs:
            send = sub.session.send_market
            rid = sub.req_id
            send(P.tick_price(rid, P.LAST, price, t.size, 0))
            send(P.tick_size(rid, P.VOLUME, book.volume))
            send(P.tick_string(rid, P.LAST_TIMESTAMP, epoch))
            self.ticks_sent += 2
            if venue_changed:
                send(P.tick_string(rid, P.LAST_EXCHANGE, t.venue))
            if new_high:
                send(P.tick_price(rid, P.HIGH, price, 0, 0))
                self.ticks_sent += 1
            if new_low:
                send(P.tick_price(rid, P.LOW, price, 0, 0))
                self.ticks_sent += 1
            if 233 in sub.generic:
                send(P.tick_string(rid, RT_VOLUME, rt_volume))
                self.ticks_sent += 1

    def market_event(self, event: QuoteEvent | PrintEvent) -> None:
        """A market event from the model or a control command: publish it, then let orders react."""
        self.publish_market(event)
        events = self.broker.on_market(event)
        if events:
            self._drop_owner_mid_fill(events)
            self.dispatch(events)

    async def _market_loop(self) -> None:
        interval = self.config.tick_interval_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            dt, last = now - last, now
            if self.broker.phase == "closed":
                continue  # sessions on: no quotes or prints at night, weekends and holidays
            try:
                for event in self.market.advance(min(dt, 1.0)):
                    self.market_event(event)
            except Exception:  # the timer must survive anything
                log.exception("market step failed")

    async def _session_loop(self) -> None:
        """Sessions on: follow the phase (open, close: DAY expiry) on the shared clock."""
        while True:
            await asyncio.sleep(0.25)
            try:
                events = self.broker.on_clock()
                if events:
                    self.dispatch(events)
            except Exception:
                log.exception("session step failed")

    def halt(self, symbol: str, halted: bool) -> None:
        """A trading halt (or its end) for one symbol: IB's halted tick (49) to its subscribers."""
        if halted:
            self.broker.halt(symbol)
        else:
            self.dispatch(self.broker.resume(symbol))
        for sub in self.mkt_by_symbol.get(symbol, ()):
            sub.session.send(P.tick_generic(sub.req_id, P.HALTED, 1 if halted else 0))

    def tbt_count(self) -> int:
        return sum(len(s.tbt_subs) for s in self.sessions)

    def mkt_count(self) -> int:
        return sum(len(s.mkt_subs) for s in self.sessions)

    def _drop_market_subs(self, session: Session) -> None:
        for sub in list(session.mkt_subs.values()):
            self._remove_sub(self.mkt_by_symbol, sub)
        for sub in list(session.tbt_subs.values()):
            self._remove_sub(self.tbt_by_symbol, sub)
        session.mkt_subs.clear()
        session.tbt_subs.clear()

    def _remove_sub(self, index: dict[str, list[MarketSub]], sub: MarketSub) -> None:
        for subs in index.values():
            if sub in subs:
                subs.remove(sub)
