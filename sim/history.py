"""Market history (pure): bars and ticks the simulated market recorded as it ran, and earlier
sessions synthesized deterministically from the seed and the previous closes.

* Recorded: every quote and print updates 5-second base bars per symbol (TRADES from prints;
  BID, ASK, MIDPOINT from quotes) and bounded tick lists (prints, quotes). Requests aggregate
  base bars to the asked bar size. Base bars are kept for ``max_base_bars`` per symbol.
* Synthesized: regular-hours 1-minute bars for the XNYS sessions before the simulator's first
  day (up to ``LOOKBACK_SESSIONS``). Closes chain backwards from the previous close
  (``Random(f"{seed}:{symbol}:closes")``), each day's path is a bridge from its open to its
  close (``Random(f"{seed}:{symbol}:{yyyymmdd}")``), so the same seed gives the same history.
  MIDPOINT is the path, BID / ASK one cent either side.

Prices are cents internally; times epoch seconds (New York for calendars and bar labels).
"""

from __future__ import annotations

import functools
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timedelta, timezone
from typing import Iterable
from zoneinfo import ZoneInfo

NEW_YORK = ZoneInfo("America/New_York")
BASE_S = 5
LOOKBACK_SESSIONS = 260
RTH_OPEN = dtime(9, 30)
RTH_CLOSE = dtime(16, 0)
HMDS = "Historical Market Data Service error message:"
WHAT_TO_SHOW = ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK")

# IB's bar size settings (reqHistoricalData) -> seconds. "1 secs" bars are not kept (the base is 5 s).
BAR_SIZES: dict[str, int] = {
    "5 secs": 5, "10 secs": 10, "15 secs": 15, "30 secs": 30,
    "1 min": 60, "2 mins": 120, "3 mins": 180, "5 mins": 300, "10 mins": 600, "15 mins": 900,
    "20 mins": 1200, "30 mins": 1800, "1 hour": 3600, "2 hours": 7200, "3 hours": 10800,
    "4 hours": 14400, "8 hours": 28800, "1 day": 86400, "1 week": 7 * 86400, "1 month": 30 * 86400,
}
ALL_BAR_SIZES = ("1 secs",) + tuple(BAR_SIZES)


class HistoryError(ValueError):
    """A request IB would refuse. Always 162 with the HMDS prefix: IB answers some of these with
    321, which ib_async treats as a warning, so the request would wait forever."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class Bar:
    t: int  # start, epoch seconds
    open: float
    high: float
    low: float
    close: float
    volume: int = 0
    notional: float = 0.0
    count: int = 0

    def add(self, price: float, size: int = 0) -> None:
        if price > self.high:
            self.high = price
        if price < self.low:
            self.low = price
        self.close = price
        self.volume += size
        self.notional += price * size
        self.count += 1

    def merge(self, other: "Bar") -> None:
        self.high = max(self.high, other.high)
        self.low = min(self.low, other.low)
        self.close = other.close
        self.volume += other.volume
        self.notional += other.notional
        self.count += other.count

    @property
    def wap(self) -> float:
        return self.notional / self.volume if self.volume else self.close


@dataclass(frozen=True)
class OutBar:
    """One bar as sent: label (IB's date text) and prices in dollars."""

    t: int
    label: str
    open: float
    high: float
    low: float
    close: float
    volume: float
    wap: float
    count: int


@functools.lru_cache(maxsize=1)
def _calendar():
    import exchange_calendars as xcals

    return xcals.get_calendar("XNYS")


def is_session(day: date) -> bool:
    return bool(_calendar().is_session(day.isoformat()))


def sessions_before(day: date, n: int) -> list[date]:
    """The ``n`` XNYS sessions before ``day`` (oldest first)."""
    cal = _calendar()
    start = day - timedelta(days=int(n * 1.6) + 10)
    first = max(start, cal.first_session.date())
    sessions = [s.date() for s in cal.sessions_in_range(first.isoformat(), (day - timedelta(days=1)).isoformat())]
    return sessions[-n:]


def ny_day(epoch_s: float) -> date:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).astimezone(NEW_YORK).date()


def ny_epoch(day: date, at: dtime) -> int:
    return int(datetime.combine(day, at, tzinfo=NEW_YORK).timestamp())


def in_rth(epoch_s: int) -> bool:
    local = datetime.fromtimestamp(epoch_s, tz=timezone.utc).astimezone(NEW_YORK).time()
    return RTH_OPEN <= local < RTH_CLOSE


def parse_duration(text: str) -> tuple[int, str]:
    parts = text.strip().upper().split()
    if len(parts) != 2 or not parts[0].isdigit() or parts[1] not in ("S", "D", "W", "M", "Y") or int(parts[0]) <= 0:
        raise HistoryError(162, f"{HMDS}Historical data duration {text!r} is invalid "
                                "(integer followed by S, D, W, M or Y)")
    return int(parts[0]), parts[1]


def bar_label(epoch_s: int, daily: bool, format_date: int) -> str:
    if daily:
        return datetime.fromtimestamp(epoch_s, tz=timezone.utc).astimezone(NEW_YORK).strftime("%Y%m%d")
    if format_date == 2:
        return str(epoch_s)
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).astimezone(NEW_YORK).strftime("%Y%m%d %H:%M:%S") + " US/Eastern"


class SymbolHistory:
    def __init__(self, max_base_bars: int, max_ticks: int) -> None:
        self.bars: dict[str, OrderedDict[int, Bar]] = {k: OrderedDict() for k in ("TRADES", "BID", "ASK", "MIDPOINT")}
        self.prints: deque[tuple[int, int, int, str, str]] = deque(maxlen=max_ticks)  # ts_ns, cents, size, venue, cond
        self.quotes: deque[tuple[int, int, int, int, int]] = deque(maxlen=max_ticks)  # ts_ns, bid, ask, sizes
        self.max_base_bars = max_base_bars

    def _add(self, kind: str, t: int, price: float, size: int = 0) -> None:
        bars = self.bars[kind]
        bucket = t - t % BASE_S
        bar = bars.get(bucket)
        if bar is None:
            bars[bucket] = Bar(bucket, price, price, price, price, size, price * size, 1)
            if len(bars) > self.max_base_bars:
                bars.popitem(last=False)
        else:
            bar.add(price, size)


class History:
    def __init__(self, seed: int, start_ns: int, prev_closes: dict[str, int], max_base_bars: int = 17_280,
                 max_ticks: int = 5_000) -> None:
        self.seed = seed
        self.first_day = ny_day(start_ns / 1e9)
        self.prev_closes = dict(prev_closes)  # cents, the close before the first day
        self.symbols: dict[str, SymbolHistory] = {s: SymbolHistory(max_base_bars, max_ticks) for s in prev_closes}
        self._days: OrderedDict[tuple[str, date], list[Bar]] = OrderedDict()
        self._daily: dict[tuple[str, date], Bar] = {}
        self._chains: dict[str, list[int]] = {}
        self._sessions: list[date] | None = None

    # ------------------------------------------------------------- recording

    def on_quote(self, symbol: str, ts_ns: int, bid: int, ask: int, bid_size: int, ask_size: int) -> None:
        h = self.symbols.get(symbol)
        if h is None:
            return
        t = ts_ns // 1_000_000_000
        h._add("BID", t, bid)
        h._add("ASK", t, ask)
        h._add("MIDPOINT", t, (bid + ask) / 2)
        h.quotes.append((ts_ns, bid, ask, bid_size, ask_size))

    def on_print(self, symbol: str, ts_ns: int, price: int, size: int, venue: str, conditions: str) -> None:
        h = self.symbols.get(symbol)
        if h is None:
            return
        h._add("TRADES", ts_ns // 1_000_000_000, price, size)
        h.prints.append((ts_ns, price, size, venue, conditions))

    # ------------------------------------------------------------ synthesis

    def past_sessions(self) -> list[date]:
        if self._sessions is None:
            self._sessions = sessions_before(self.first_day, LOOKBACK_SESSIONS)
        return self._sessions

    def _closes(self, symbol: str) -> list[int]:
        """Closes of the past sessions, newest first (index 0 = the previous close)."""
        chain = self._chains.get(symbol)
        if chain is None:
            rng = random.Random(f"{self.seed}:{symbol}:closes")
            chain = [self.prev_closes[symbol]]
            for _ in range(len(self.past_sessions())):
                chain.append(max(1, round(chain[-1] * (1 + rng.gauss(0, 0.004)))))
            self._chains[symbol] = chain
        return chain

    def synthetic_day(self, symbol: str, day: date) -> list[Bar]:
        """Regular-hours 1-minute TRADES bars of a past session (cents)."""
        key = (symbol, day)
        cached = self._days.get(key)
        if cached is not None:
            return cached
        sessions = self.past_sessions()
        back = len(sessions) - sessions.index(day)  # 1 = the previous session
        closes = self._closes(symbol)
        close, before = closes[back - 1], closes[back]
        rng = random.Random(f"{self.seed}:{symbol}:{day:%Y%m%d}")
        open_ = max(1, round(before * (1 + rng.gauss(0, 0.002))))
        minutes = 390
        walk = [0]
        for _ in range(minutes):
            walk.append(walk[-1] + rng.choice((-1, 0, 0, 1)))
        drift = (close - open_) - walk[-1]
        path = [max(1, round(open_ + walk[i] + drift * i / minutes)) for i in range(minutes + 1)]
        t0 = ny_epoch(day, RTH_OPEN)
        bars = []
        for i in range(minutes):
            o, c = path[i], path[i + 1]
            hi, lo = max(o, c) + (rng.random() < 0.2), max(1, min(o, c) - (rng.random() < 0.2))
            volume = 100 * rng.choice((0, 0, 1, 1, 2, 3, 5)) + rng.choice((0, 0, 0, 7, 35))
            bar = Bar(t0 + 60 * i, o, hi, lo, c, volume, volume * (o + c) / 2, (volume + 99) // 100)
            bars.append(bar)
        self._days[key] = bars
        if len(self._days) > 64:
            self._days.popitem(last=False)
        return bars

    def head_timestamp(self) -> int:
        sessions = self.past_sessions()
        return ny_epoch(sessions[0], RTH_OPEN) if sessions else ny_epoch(self.first_day, RTH_OPEN)

    # -------------------------------------------------------------- queries

    def synthetic_daily(self, symbol: str, day: date) -> Bar:
        """The whole past session as one bar (cached: daily requests over a year stay cheap)."""
        key = (symbol, day)
        bar = self._daily.get(key)
        if bar is None:
            minutes = self.synthetic_day(symbol, day)
            bar = Bar(minutes[0].t, minutes[0].open, minutes[0].high, minutes[0].low, minutes[0].close,
                      minutes[0].volume, minutes[0].notional, minutes[0].count)
            for minute in minutes[1:]:
                bar.merge(minute)
            self._daily[key] = bar
        return bar

    def _base(self, symbol: str, kind: str, start: int, end: int, use_rth: bool, daily: bool = False) -> Iterable[Bar]:
        """Base bars (synthesized minutes or whole past sessions, then recorded 5 s bars) with
        start <= t < end, in time order."""
        for day in self.past_sessions():
            day_open, day_close = ny_epoch(day, RTH_OPEN), ny_epoch(day, RTH_CLOSE)
            if day_close <= start or day_open >= end:
                continue
            shift = {"BID": -1, "ASK": 1}.get(kind, 0)
            whole = daily and start <= day_open and day_close <= end
            for bar in [self.synthetic_daily(symbol, day)] if whole else self.synthetic_day(symbol, day):
                if start <= bar.t < end:
                    if kind == "TRADES":
                        yield Bar(bar.t, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.notional, bar.count)
                    else:
                        yield Bar(bar.t, bar.open + shift, bar.high + shift, bar.low + shift, bar.close + shift)
        for t, bar in self.symbols[symbol].bars[kind].items():
            if start <= t < end and (not use_rth or in_rth(t)):
                yield Bar(t, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.notional, bar.count)

    def window(self, end: int, duration: str, use_rth: bool = False) -> int:
        """Start of the window ``duration`` before ``end``. D counts sessions, as IB: today's
        counts once it has begun (04:00 pre-open; 09:30 for regular hours only)."""
        n, unit = parse_duration(duration)
        if unit == "S":
            return end - n
        if unit == "D":
            days = [d for d in self.past_sessions() if ny_epoch(d, RTH_OPEN) < end]
            today = ny_day(end)
            if today >= self.first_day and end > ny_epoch(today, RTH_OPEN if use_rth else dtime(4, 0)):
                days.append(today)
            days = days[-n:] or [today]
            return ny_epoch(days[0], dtime(0, 0))
        return end - n * {"W": 7, "M": 30, "Y": 365}[unit] * 86400

    def bars(self, symbol: str, what: str, end: int, duration: str, bar_size: str, use_rth: bool,
             format_date: int = 1) -> list[OutBar]:
        if bar_size not in BAR_SIZES:
            legal = ", ".join(ALL_BAR_SIZES[1:])
            raise HistoryError(162, f"{HMDS}Historical data bar size setting "
                                    f"{bar_size!r} is invalid. Legal ones are: {legal}")
        kind = what.upper()
        if kind not in ("TRADES", "MIDPOINT", "BID", "ASK"):
            raise HistoryError(162, f"Historical Market Data Service error message:whatToShow {what!r} is not "
                                    "offered for this request (TRADES, MIDPOINT, BID, ASK)")
        start = self.window(end, duration, use_rth)
        step = BAR_SIZES[bar_size]
        daily = step >= 86400
        groups: OrderedDict[int, Bar] = OrderedDict()
        for bar in self._base(symbol, kind, start, end, use_rth, daily):
            if daily:
                day = ny_day(bar.t)
                if step == 86400:
                    key = ny_epoch(day, dtime(0, 0))
                elif step == 7 * 86400:
                    key = ny_epoch(day - timedelta(days=day.weekday()), dtime(0, 0))
                else:
                    key = ny_epoch(day.replace(day=1), dtime(0, 0))
            else:
                midnight = ny_epoch(ny_day(bar.t), dtime(0, 0))
                key = bar.t - (bar.t - midnight) % step
            group = groups.get(key)
            if group is None:
                groups[key] = Bar(key, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.notional, bar.count)
            else:
                group.merge(bar)
        trades = kind == "TRADES"
        out = []
        for key, bar in groups.items():
            out.append(OutBar(
                key, bar_label(key, daily, format_date), bar.open / 100, bar.high / 100, bar.low / 100, bar.close / 100,
                bar.volume if trades else -1, round(bar.wap / 100, 6) if trades else -1, bar.count if trades else -1,
            ))
        return out

    def ticks(self, symbol: str, what: str, start_ns: int | None, end_ns: int | None, n: int) -> list[tuple]:
        """Recorded prints (TRADES) or quotes (BID_ASK, MIDPOINT): the first ``n`` at or after
        start, or the last ``n`` up to end."""
        h = self.symbols[symbol]
        source = h.prints if what == "TRADES" else h.quotes
        if start_ns is not None:
            rows = [row for row in source if row[0] >= start_ns and (end_ns is None or row[0] <= end_ns)]
            return rows[:n]
        rows = [row for row in source if end_ns is None or row[0] <= end_ns]
        return rows[-n:] if n else []
