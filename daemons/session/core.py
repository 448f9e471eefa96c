"""The trading session at one instant: a pure function of the time, the exchange
calendar's sessions around it (precomputed open/close) and the rules.

Regimes are anchored to the open and to the day's actual close and clipped to it
(SPEC 6, Session). With the default rules on a 16:00 close:

    OPEN  [09:30, 10:00)  EARLY [10:00, 12:00)  MID [12:00, 15:00)
    LATE  [15:00, 15:45)  CLOSE [15:45, 16:00)  CLOSED otherwise

and on a 13:00 early close: EARLY to 12:00, MID 12:00-12:45, no LATE, CLOSE
12:45-13:00. The soft de-risk window is [close - 15 min, close), the hard one
[close - 2 min, close).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo

from qe.config import SessionRules

CLOSED = "CLOSED"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SessionTimes:
    """One exchange session as the calendar defines it."""

    day: date
    open_utc: datetime
    close_utc: datetime
    early_close: bool

    def __post_init__(self) -> None:
        if self.open_utc.tzinfo is None or self.close_utc.tzinfo is None:
            raise ValueError("session open/close must be timezone-aware")
        if not self.open_utc < self.close_utc:
            raise ValueError(f"session {self.day}: open {self.open_utc} is not before close {self.close_utc}")


@dataclass(frozen=True)
class CalendarDay:
    """The calendar around one local date: that date's session (None on a weekend or
    holiday) and the first session after that date."""

    today: SessionTimes | None
    next: SessionTimes


@dataclass(frozen=True)
class RegimeWindow:
    regime: str
    start_utc: datetime
    end_utc: datetime


@dataclass(frozen=True)
class SessionState:
    now_utc: datetime
    now_local: datetime
    trading_day: date  # the current session's date, or the next session's when closed
    market_open: bool
    regime: str
    minutes_to_close: float | None  # None while closed
    soft_derisk_active: bool
    hard_derisk_active: bool
    early_close: bool  # of the session named by trading_day
    open_utc: datetime
    close_utc: datetime


@lru_cache(maxsize=8)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _local_time_utc(day: date, local: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, local, tzinfo=zone).astimezone(timezone.utc)


def local_date(now_utc: datetime, rules: SessionRules) -> date:
    """The exchange's local date at `now_utc` (what the calendar is asked about)."""
    return now_utc.astimezone(_zone(rules.timezone)).date()


def utc_from_ns(now_ns: int) -> datetime:
    """Exact to the microsecond (no float rounding of epoch nanoseconds)."""
    return _EPOCH + timedelta(microseconds=now_ns // 1000)


def regime_windows(session: SessionTimes, rules: SessionRules) -> tuple[RegimeWindow, ...]:
    """The session's regimes in order; windows clipped to nothing are left out."""
    zone = _zone(rules.timezone)
    open_, close = session.open_utc, session.close_utc
    close_start = max(open_, close - timedelta(minutes=rules.close_regime_minutes))
    open_end = min(open_ + timedelta(minutes=rules.open_regime_minutes), close_start)
    early_end = min(max(_local_time_utc(session.day, rules.early_regime_end, zone), open_end), close_start)
    mid_end = min(max(_local_time_utc(session.day, rules.mid_regime_end, zone), early_end), close_start)
    windows = (
        RegimeWindow("OPEN", open_, open_end),
        RegimeWindow("EARLY", open_end, early_end),
        RegimeWindow("MID", early_end, mid_end),
        RegimeWindow("LATE", mid_end, close_start),
        RegimeWindow("CLOSE", close_start, close),
    )
    return tuple(window for window in windows if window.start_utc < window.end_utc)


def session_state(now_utc: datetime, day: CalendarDay, rules: SessionRules) -> SessionState:
    """Everything ev.session says about `now_utc`; `day` is the calendar around the
    local date of `now_utc`."""
    if now_utc.tzinfo is None:
        raise ValueError("now_utc must be timezone-aware")
    now_utc = now_utc.astimezone(timezone.utc)
    today = day.today
    # Before today's close (also before its open) the day's session is the relevant one;
    # after it, or on a day without a session, the next one.
    session = today if today is not None and now_utc < today.close_utc else day.next
    market_open = session.open_utc <= now_utc < session.close_utc
    regime = CLOSED
    minutes_to_close = None
    soft = hard = False
    if market_open:
        regime = next(w.regime for w in regime_windows(session, rules) if w.start_utc <= now_utc < w.end_utc)
        to_close = session.close_utc - now_utc
        minutes_to_close = to_close.total_seconds() / 60
        soft = to_close <= timedelta(minutes=rules.soft_derisk_minutes_before_close)
        hard = to_close <= timedelta(minutes=rules.hard_derisk_minutes_before_close)
    return SessionState(
        now_utc=now_utc,
        now_local=now_utc.astimezone(_zone(rules.timezone)),
        trading_day=session.day,
        market_open=market_open,
        regime=regime,
        minutes_to_close=minutes_to_close,
        soft_derisk_active=soft,
        hard_derisk_active=hard,
        early_close=session.early_close,
        open_utc=session.open_utc,
        close_utc=session.close_utc,
    )
