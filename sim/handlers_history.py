"""Request handlers: historical bars (with keepUpToDate), head timestamp and historical ticks,
all from the simulated market's own history (sim/history.py).

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from . import protocol as P
from .broker import NEW_YORK, parse_exec_filter_time
from .history import BAR_SIZES, HistoryError

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger("sim.server")

NO_SECURITY = "No security definition has been found for the request"
HMDS = "Historical Market Data Service error message:"


@dataclass
class HistorySub:
    """A keepUpToDate reqHistoricalData: the last bar is re-sent when it changes."""

    req_id: int
    symbol: str
    what: str
    bar_size: str
    use_rth: bool
    format_date: int
    last: Any = None


def _ib_time(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).astimezone(NEW_YORK).strftime("%Y%m%d %H:%M:%S")


class HistoryHandlers:
    def _history_end(self, s: Session, req_id: int, text: str) -> int | None:
        if not text.strip():
            return self.clock.now_ns() // 1_000_000_000
        ns = parse_exec_filter_time(text)
        if ns is None:
            s.error(req_id, 162, f"{HMDS}Invalid end date/time {text!r}")
            return None
        return ns // 1_000_000_000

    def on_ReqHistoricalData(self, s: Session, r: P.ReqHistoricalData) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, NO_SECURITY)
            return
        if r.keep_up_to_date and r.end.strip():
            s.error(r.req_id, 162, f"{HMDS}End date not supported with live updates")
            return
        if r.keep_up_to_date and BAR_SIZES.get(r.bar_size, 5) < 5:
            s.error(r.req_id, 162, f"{HMDS}Bar size not supported with live updates")
            return
        end = self._history_end(s, r.req_id, r.end)
        if end is None:
            return
        try:
            bars = self.history.bars(info.symbol, r.what_to_show, end + 1, r.duration, r.bar_size, r.use_rth, r.format_date)
            start = self.history.window(end + 1, r.duration, r.use_rth)
        except HistoryError as exc:
            s.error(r.req_id, exc.code, exc.text)
            return
        s.send(P.historical_data(r.req_id, _ib_time(start), _ib_time(end), bars))
        if r.keep_up_to_date:
            sub = HistorySub(r.req_id, info.symbol, r.what_to_show.upper(), r.bar_size, r.use_rth, r.format_date,
                             bars[-1] if bars else None)
            s.history_subs[r.req_id] = sub

    def cancel_historical_data(self, s: Session, req_id: int) -> None:
        s.history_subs.pop(req_id, None)

    def _history_update(self, s: Session, sub: HistorySub) -> None:
        step = BAR_SIZES[sub.bar_size]
        now = self.clock.now_ns() // 1_000_000_000
        duration = "1 D" if step >= 86400 else f"{2 * step} S"
        bars = self.history.bars(sub.symbol, sub.what, now + 1, duration, sub.bar_size, sub.use_rth, sub.format_date)
        if bars and bars[-1] != sub.last:
            sub.last = bars[-1]
            s.send(P.historical_data_update(sub.req_id, bars[-1]))

    async def _history_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                for session in self.api_sessions():
                    for sub in list(session.history_subs.values()):
                        self._history_update(session, sub)
            except Exception:
                log.exception("history update failed")

    def on_ReqHeadTimeStamp(self, s: Session, r: P.ReqHeadTimeStamp) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, NO_SECURITY)
            return
        if r.what_to_show.upper() not in ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK"):
            s.error(r.req_id, 162, f"{HMDS}whatToShow {r.what_to_show!r} is not offered for this request")
            return
        head = self.history.head_timestamp()
        text = str(head) if r.format_date == 2 else datetime.fromtimestamp(head, tz=timezone.utc).astimezone(
            NEW_YORK).strftime("%Y%m%d-%H:%M:%S")
        s.send(P.head_timestamp(r.req_id, text))

    def on_ReqHistoricalTicks(self, s: Session, r: P.ReqHistoricalTicks) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, NO_SECURITY)
            return
        what = r.what_to_show.upper()
        if what not in ("TRADES", "BID_ASK", "MIDPOINT"):
            s.error(r.req_id, 162, f"{HMDS}whatToShow {r.what_to_show!r} is not offered (TRADES, BID_ASK, MIDPOINT)")
            return
        if bool(r.start.strip()) == bool(r.end.strip()):
            s.error(r.req_id, 162, f"{HMDS}Exactly one of start and end date/time must be specified")
            return
        if not 0 < r.number_of_ticks <= 1000:
            s.error(r.req_id, 162, f"{HMDS}numberOfTicks must be between 1 and 1000")
            return
        start = end = None
        if r.start.strip():
            start = parse_exec_filter_time(r.start)
        else:
            end = parse_exec_filter_time(r.end)
        if start is None and end is None:
            s.error(r.req_id, 162, f"{HMDS}Invalid date/time {r.start or r.end!r}")
            return
        rows = self.history.ticks(info.symbol, what, start, end, r.number_of_ticks)
        self._send_historical_ticks(s, r.req_id, what, rows)

    def _send_historical_ticks(self, s: Session, req_id: int, what: str, rows: list[tuple]) -> None:
        if what == "TRADES":
            s.send(P.historical_ticks_last(req_id, [(ts // 1_000_000_000, P.price_text(price), size, venue, cond)
                                                    for ts, price, size, venue, cond in rows]))
        elif what == "BID_ASK":
            s.send(P.historical_ticks_bid_ask(req_id, [(ts // 1_000_000_000, P.price_text(bid), P.price_text(ask), bs, asz)
                                                       for ts, bid, ask, bs, asz in rows]))
        else:
            s.send(P.historical_ticks_mid(req_id, [(ts // 1_000_000_000, (bid + ask) / 200) for ts, bid, ask, _, _ in rows]))
