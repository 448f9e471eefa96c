"""Thin adapter over exchange_calendars: the sessions around a local date.

Building an ExchangeCalendar is slow (a default one spans decades), so one is
built per process over a bounded range around the first date asked for, and
rebuilt only if the clock leaves that range (a simulated clock may run years
away from today). Answers are cached per local date.
"""

from __future__ import annotations

import warnings
from datetime import date, timedelta

import exchange_calendars
import pandas as pd

from .core import CalendarDay, SessionTimes

# The range built around a date, and how close to its ends a date may come before
# the calendar is rebuilt (next_session needs room after the date: holidays, weekends).
_SPAN_BEFORE = timedelta(days=366)
_SPAN_AFTER = timedelta(days=2 * 366)
_MARGIN = timedelta(days=31)
_CACHED_DAYS = 16


class UnknownCalendar(ValueError):
    pass


class ExchangeCalendarAdapter:
    def __init__(self, name: str) -> None:
        if name not in exchange_calendars.get_calendar_names(include_aliases=True):
            raise UnknownCalendar(f"unknown exchange calendar {name!r}")
        self.name = name
        self._calendar: exchange_calendars.ExchangeCalendar | None = None
        self._first: date | None = None
        self._last: date | None = None
        self._days: dict[date, CalendarDay] = {}
        self.builds = 0  # how often a calendar object was built (tests, logs)

    def day(self, local_date: date) -> CalendarDay:
        cached = self._days.get(local_date)
        if cached is None:
            with warnings.catch_warnings():
                # exchange_calendars' own use of a pandas API pandas 3 deprecates; not ours to fix.
                warnings.simplefilter("ignore", DeprecationWarning)
                cached = self._compute(local_date)
            if len(self._days) >= _CACHED_DAYS:
                self._days.clear()
            self._days[local_date] = cached
        return cached

    def _calendar_for(self, local_date: date) -> exchange_calendars.ExchangeCalendar:
        covered = (
            self._calendar is not None
            and self._first is not None
            and self._last is not None
            and self._first + _MARGIN <= local_date <= self._last - _MARGIN
        )
        if not covered:
            start, end = local_date - _SPAN_BEFORE, local_date + _SPAN_AFTER
            self._calendar = exchange_calendars.get_calendar(self.name, start=start.isoformat(), end=end.isoformat())
            self._first, self._last = start, end
            self.builds += 1
        assert self._calendar is not None
        return self._calendar

    def _session(self, calendar: exchange_calendars.ExchangeCalendar, label: pd.Timestamp) -> SessionTimes:
        return SessionTimes(
            day=label.date(),
            open_utc=calendar.session_open(label).to_pydatetime(),
            close_utc=calendar.session_close(label).to_pydatetime(),
            early_close=label in calendar.early_closes,
        )

    def _compute(self, local_date: date) -> CalendarDay:
        calendar = self._calendar_for(local_date)
        label = pd.Timestamp(local_date)
        today = self._session(calendar, label) if calendar.is_session(label) else None
        following = calendar.date_to_session(label + pd.Timedelta(days=1), direction="next")
        return CalendarDay(today=today, next=self._session(calendar, following))
