"""Trading sessions on the XNYS calendar (pure): which phase a moment is in.

Phases (New York time, on XNYS sessions): ``pre_open`` 04:00 to the open, ``regular`` the
open (09:30) to the close (16:00, or the early close), ``after_hours`` the close to 20:00,
``closed`` otherwise (nights, weekends, holidays). Opt-in (``SimConfig.sessions``): without
it the simulator's market is always open.
"""

from __future__ import annotations

import functools
from datetime import date, datetime, time as dtime, timezone
from zoneinfo import ZoneInfo

NEW_YORK = ZoneInfo("America/New_York")
PRE_OPEN = dtime(4, 0)
AFTER_HOURS_END = dtime(20, 0)
PHASES = ("closed", "pre_open", "regular", "after_hours")


@functools.lru_cache(maxsize=1)
def _calendar():
    import exchange_calendars as xcals

    return xcals.get_calendar("XNYS")


@functools.lru_cache(maxsize=512)
def session_hours(day: date) -> tuple[int, int] | None:
    """(open, close) of an XNYS session in epoch ns, or None if ``day`` is not a session."""
    cal = _calendar()
    key = day.isoformat()
    if not cal.is_session(key):
        return None
    row = cal.schedule.loc[key]
    return int(row["open"].value), int(row["close"].value)


def _ny_ns(day: date, at: dtime) -> int:
    return int(datetime.combine(day, at, tzinfo=NEW_YORK).timestamp() * 1e9)


def phase(ts_ns: int) -> str:
    day = datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc).astimezone(NEW_YORK).date()
    hours = session_hours(day)
    if hours is None:
        return "closed"
    open_ns, close_ns = hours
    if open_ns <= ts_ns < close_ns:
        return "regular"
    if _ny_ns(day, PRE_OPEN) <= ts_ns < open_ns:
        return "pre_open"
    if close_ns <= ts_ns < _ny_ns(day, AFTER_HOURS_END):
        return "after_hours"
    return "closed"


def can_trade(ts_ns: int, outside_rth: bool) -> bool:
    """Whether an order may fill now: regular hours, or pre-open / after-hours with outsideRth."""
    now = phase(ts_ns)
    return now == "regular" or (outside_rth and now in ("pre_open", "after_hours"))
