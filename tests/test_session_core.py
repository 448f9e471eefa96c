"""The session core over real dates of the XNYS calendar (exchange_calendars):
every boundary minute of a normal day, early closes, a holiday, a weekend, DST."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from daemons.session.calendar import ExchangeCalendarAdapter, UnknownCalendar
from daemons.session.core import CalendarDay, SessionTimes, local_date, regime_windows, session_state, utc_from_ns
from qe import config
from qe.clock import to_ns
from tests.support.processes import REPO

NY = ZoneInfo("America/New_York")
UTC = timezone.utc
RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml").session


@pytest.fixture(scope="module")
def calendar() -> ExchangeCalendarAdapter:
    return ExchangeCalendarAdapter("XNYS")


def state_at(calendar: ExchangeCalendarAdapter, moment: datetime, rules=RULES):
    return session_state(moment, calendar.day(local_date(moment, rules)), rules)


def ny(day: str, hhmmss: str) -> datetime:
    return datetime.combine(date.fromisoformat(day), time.fromisoformat(hhmmss), tzinfo=NY)


# (local time, regime, market_open, soft, hard, minutes_to_close, trading_day)
NORMAL_DAY = "2026-11-18"  # a Wednesday, 09:30-16:00 EST
NORMAL_ROWS = [
    ("00:00", "CLOSED", False, False, False, None, "2026-11-18"),
    ("09:29", "CLOSED", False, False, False, None, "2026-11-18"),
    ("09:29:59", "CLOSED", False, False, False, None, "2026-11-18"),
    ("09:30", "OPEN", True, False, False, 390, "2026-11-18"),
    ("09:59", "OPEN", True, False, False, 361, "2026-11-18"),
    ("09:59:59", "OPEN", True, False, False, 360 + 1 / 60, "2026-11-18"),
    ("10:00", "EARLY", True, False, False, 360, "2026-11-18"),
    ("11:59", "EARLY", True, False, False, 241, "2026-11-18"),
    ("12:00", "MID", True, False, False, 240, "2026-11-18"),
    ("14:59", "MID", True, False, False, 61, "2026-11-18"),
    ("15:00", "LATE", True, False, False, 60, "2026-11-18"),
    ("15:44", "LATE", True, False, False, 16, "2026-11-18"),
    ("15:44:59", "LATE", True, False, False, 15 + 1 / 60, "2026-11-18"),
    ("15:45", "CLOSE", True, True, False, 15, "2026-11-18"),
    ("15:57", "CLOSE", True, True, False, 3, "2026-11-18"),
    ("15:57:59", "CLOSE", True, True, False, 2 + 1 / 60, "2026-11-18"),
    ("15:58", "CLOSE", True, True, True, 2, "2026-11-18"),
    ("15:59:59", "CLOSE", True, True, True, 1 / 60, "2026-11-18"),
    ("16:00", "CLOSED", False, False, False, None, "2026-11-19"),
    ("23:59", "CLOSED", False, False, False, None, "2026-11-19"),
]


@pytest.mark.parametrize("hhmm, regime, is_open, soft, hard, minutes, trading_day", NORMAL_ROWS, ids=[r[0] for r in NORMAL_ROWS])
def test_normal_day_at_every_boundary(calendar, hhmm, regime, is_open, soft, hard, minutes, trading_day):
    state = state_at(calendar, ny(NORMAL_DAY, hhmm))
    assert state.regime == regime
    assert state.market_open is is_open
    assert (state.soft_derisk_active, state.hard_derisk_active) == (soft, hard)
    assert state.minutes_to_close == (None if minutes is None else pytest.approx(minutes))
    assert state.trading_day == date.fromisoformat(trading_day)
    assert state.early_close is False
    session_day = date.fromisoformat(trading_day)
    assert state.open_utc == ny(trading_day, "09:30").astimezone(UTC)
    assert state.close_utc == ny(trading_day, "16:00").astimezone(UTC)
    assert state.now_local.tzinfo is not None and state.now_local.utcoffset() == timedelta(hours=-5)
    assert session_day >= date.fromisoformat(NORMAL_DAY)


def test_every_minute_of_a_normal_day_has_the_right_regime_durations(calendar):
    start = ny(NORMAL_DAY, "00:00")
    minutes_in: dict[str, int] = {}
    transitions = []
    previous = None
    for minute in range(24 * 60):
        moment = start + timedelta(minutes=minute)
        regime = state_at(calendar, moment).regime
        minutes_in[regime] = minutes_in.get(regime, 0) + 1
        if regime != previous:
            transitions.append((moment.astimezone(NY).strftime("%H:%M"), regime))
            previous = regime
    assert minutes_in == {"CLOSED": 1050, "OPEN": 30, "EARLY": 120, "MID": 180, "LATE": 45, "CLOSE": 15}
    assert transitions == [
        ("00:00", "CLOSED"), ("09:30", "OPEN"), ("10:00", "EARLY"), ("12:00", "MID"),
        ("15:00", "LATE"), ("15:45", "CLOSE"), ("16:00", "CLOSED"),
    ]


# Early closes at 13:00: LATE disappears, CLOSE and the de-risk windows move with the close.
EARLY_ROWS = [
    ("09:29", "CLOSED", False, False, False, None),
    ("09:30", "OPEN", True, False, False, 210),
    ("10:00", "EARLY", True, False, False, 180),
    ("11:59", "EARLY", True, False, False, 61),
    ("12:00", "MID", True, False, False, 60),
    ("12:44", "MID", True, False, False, 16),
    ("12:45", "CLOSE", True, True, False, 15),
    ("12:57", "CLOSE", True, True, False, 3),
    ("12:58", "CLOSE", True, True, True, 2),
    ("12:59:59", "CLOSE", True, True, True, 1 / 60),
    ("13:00", "CLOSED", False, False, False, None),
    ("15:00", "CLOSED", False, False, False, None),  # LATE on a normal day
    ("15:58", "CLOSED", False, False, False, None),  # the normal hard window: not today
]


@pytest.mark.parametrize("day, next_day", [("2026-11-27", "2026-11-30"), ("2026-12-24", "2026-12-28")])
@pytest.mark.parametrize("hhmm, regime, is_open, soft, hard, minutes", EARLY_ROWS, ids=[r[0] for r in EARLY_ROWS])
def test_early_close_days(calendar, day, next_day, hhmm, regime, is_open, soft, hard, minutes):
    state = state_at(calendar, ny(day, hhmm))
    assert state.regime == regime
    assert state.market_open is is_open
    assert (state.soft_derisk_active, state.hard_derisk_active) == (soft, hard)
    assert state.minutes_to_close == (None if minutes is None else pytest.approx(minutes))
    if ny(day, hhmm) < ny(day, "13:00"):
        assert state.trading_day == date.fromisoformat(day)
        assert state.early_close is True
        assert state.close_utc == ny(day, "13:00").astimezone(UTC)
    else:  # after the early close the next (normal) session is the one described
        assert state.trading_day == date.fromisoformat(next_day)
        assert state.early_close is False
        assert state.close_utc == ny(next_day, "16:00").astimezone(UTC)


def test_early_close_day_regime_windows(calendar):
    session = calendar.day(date(2026, 11, 27)).today
    windows = [(w.regime, w.start_utc.astimezone(NY).strftime("%H:%M"), w.end_utc.astimezone(NY).strftime("%H:%M"))
               for w in regime_windows(session, RULES)]
    assert windows == [("OPEN", "09:30", "10:00"), ("EARLY", "10:00", "12:00"), ("MID", "12:00", "12:45"), ("CLOSE", "12:45", "13:00")]


@pytest.mark.parametrize(
    "moment, trading_day, early_close",
    [
        (ny("2026-11-26", "10:30"), "2026-11-27", True),   # Thanksgiving: closed; next session closes early
        (ny("2026-11-26", "15:59"), "2026-11-27", True),
        (ny("2026-12-25", "12:00"), "2026-12-28", False),  # Christmas (a Friday)
        (ny("2026-11-28", "12:00"), "2026-11-30", False),  # Saturday
        (ny("2026-11-29", "23:59"), "2026-11-30", False),  # Sunday night
        (ny("2026-03-08", "12:00"), "2026-03-09", False),  # the Sunday DST starts
    ],
)
def test_holidays_and_weekends_are_closed(calendar, moment, trading_day, early_close):
    state = state_at(calendar, moment)
    assert state.regime == "CLOSED"
    assert state.market_open is False
    assert state.minutes_to_close is None
    assert not state.soft_derisk_active and not state.hard_derisk_active
    assert state.trading_day == date.fromisoformat(trading_day)
    assert state.early_close is early_close
    assert state.open_utc == ny(trading_day, "09:30").astimezone(UTC)


# DST: the exchange opens at 09:30 New York time, so the UTC open moves by an hour.
DST_ROWS = [
    # Friday before DST starts (EST, UTC-5) and the Monday after (EDT, UTC-4)
    ("2026-03-06T13:30", "CLOSED"), ("2026-03-06T14:29", "CLOSED"), ("2026-03-06T14:30", "OPEN"),
    ("2026-03-06T20:45", "CLOSE"), ("2026-03-06T21:00", "CLOSED"),
    ("2026-03-09T13:29", "CLOSED"), ("2026-03-09T13:30", "OPEN"), ("2026-03-09T14:00", "EARLY"),
    ("2026-03-09T16:00", "MID"), ("2026-03-09T19:00", "LATE"), ("2026-03-09T19:45", "CLOSE"),
    ("2026-03-09T19:58", "CLOSE"), ("2026-03-09T20:00", "CLOSED"),
    # Friday before DST ends (EDT) and the Monday after (EST)
    ("2026-10-30T13:30", "OPEN"), ("2026-10-30T19:59", "CLOSE"), ("2026-10-30T20:00", "CLOSED"),
    ("2026-11-02T13:30", "CLOSED"), ("2026-11-02T14:29", "CLOSED"), ("2026-11-02T14:30", "OPEN"),
    ("2026-11-02T17:00", "MID"), ("2026-11-02T20:00", "LATE"), ("2026-11-02T20:45", "CLOSE"),
    ("2026-11-02T21:00", "CLOSED"),
]


@pytest.mark.parametrize("utc_text, regime", DST_ROWS, ids=[r[0] for r in DST_ROWS])
def test_dst_change_days(calendar, utc_text, regime):
    moment = datetime.fromisoformat(utc_text).replace(tzinfo=UTC)
    state = state_at(calendar, moment)
    assert state.regime == regime
    assert state.now_utc == moment


def test_dst_open_and_close_in_utc(calendar):
    assert state_at(calendar, datetime(2026, 3, 9, 12, tzinfo=UTC)).open_utc == datetime(2026, 3, 9, 13, 30, tzinfo=UTC)
    assert state_at(calendar, datetime(2026, 3, 6, 12, tzinfo=UTC)).open_utc == datetime(2026, 3, 6, 14, 30, tzinfo=UTC)
    monday = state_at(calendar, datetime(2026, 11, 2, 15, tzinfo=UTC))
    assert (monday.open_utc, monday.close_utc) == (datetime(2026, 11, 2, 14, 30, tzinfo=UTC), datetime(2026, 11, 2, 21, tzinfo=UTC))
    assert monday.now_local.utcoffset() == timedelta(hours=-5)
    assert state_at(calendar, datetime(2026, 10, 30, 15, tzinfo=UTC)).now_local.utcoffset() == timedelta(hours=-4)


def test_local_date_not_utc_date_picks_the_session(calendar):
    # 2026-11-19 01:00 UTC is still the evening of 11-18 in New York: after the close.
    state = state_at(calendar, datetime(2026, 11, 19, 1, tzinfo=UTC))
    assert state.regime == "CLOSED"
    assert state.trading_day == date(2026, 11, 19)
    assert local_date(datetime(2026, 11, 19, 1, tzinfo=UTC), RULES) == date(2026, 11, 18)


def test_boundaries_follow_the_rules(calendar):
    rules = RULES.model_copy(
        update={"open_regime_minutes": 15, "close_regime_minutes": 30, "soft_derisk_minutes_before_close": 20,
                "hard_derisk_minutes_before_close": 5, "early_regime_end": time(11, 0), "mid_regime_end": time(14, 0)}
    )
    at = lambda hhmm: state_at(calendar, ny(NORMAL_DAY, hhmm), rules)  # noqa: E731
    assert [at(t).regime for t in ("09:44", "09:45", "10:59", "11:00", "13:59", "14:00", "15:29", "15:30")] == [
        "OPEN", "EARLY", "EARLY", "MID", "MID", "LATE", "LATE", "CLOSE"]
    assert (at("15:39").soft_derisk_active, at("15:40").soft_derisk_active) == (False, True)
    assert (at("15:54").hard_derisk_active, at("15:55").hard_derisk_active) == (False, True)


def test_pure_core_with_a_hand_made_calendar_day():
    """The core needs no calendar library: a late open (11:00) shrinks OPEN/EARLY."""
    day = date(2031, 6, 4)
    session = SessionTimes(day, ny("2031-06-04", "11:00").astimezone(UTC), ny("2031-06-04", "16:00").astimezone(UTC), False)
    following = SessionTimes(date(2031, 6, 5), ny("2031-06-05", "09:30"), ny("2031-06-05", "16:00"), False)
    calendar_day = CalendarDay(today=session, next=following)
    assert [w.regime for w in regime_windows(session, RULES)] == ["OPEN", "EARLY", "MID", "LATE", "CLOSE"]
    assert session_state(ny("2031-06-04", "10:59"), calendar_day, RULES).regime == "CLOSED"
    assert session_state(ny("2031-06-04", "11:29"), calendar_day, RULES).regime == "OPEN"
    assert session_state(ny("2031-06-04", "11:30"), calendar_day, RULES).regime == "EARLY"
    with pytest.raises(ValueError, match="timezone-aware"):
        session_state(datetime(2031, 6, 4, 12), calendar_day, RULES)
    with pytest.raises(ValueError, match="not before close"):
        SessionTimes(day, session.close_utc, session.open_utc, False)


def test_utc_from_ns_is_exact():
    moment = datetime(2026, 11, 27, 17, 59, 59, 999_999, tzinfo=UTC)
    assert utc_from_ns(to_ns(moment) + 999) == moment


def test_calendar_is_built_once_and_follows_a_clock_years_away():
    adapter = ExchangeCalendarAdapter("XNYS")
    for offset in range(0, 200):
        adapter.day(date(2026, 11, 1) + timedelta(days=offset))
    assert adapter.builds == 1
    far = adapter.day(date(2041, 11, 28))  # Thanksgiving 2041 is Nov 28: closed
    assert far.today is None and far.next.day == date(2041, 11, 29) and far.next.early_close is True
    assert adapter.builds == 2
    assert adapter.day(date(1999, 12, 31)).today is not None  # and back in time
    with pytest.raises(UnknownCalendar, match="unknown exchange calendar 'NOPE'"):
        ExchangeCalendarAdapter("NOPE")


# --- the session: section of risk_rules.yaml --------------------------------------------

INVALID_SESSION = [
    ({"hard_derisk_minutes_before_close": 15}, "session: hard_derisk_minutes_before_close (15) must be below soft_derisk_minutes_before_close (15)"),
    ({"early_regime_end": "15:30"}, "session: early_regime_end (15:30) must be before mid_regime_end (15:00)"),
    ({"early_regime_end": 720}, "session.early_regime_end: must be a quoted 'HH:MM' local time"),
    ({"mid_regime_end": "25:00"}, "session.mid_regime_end: must be 'HH:MM' (24 h), got '25:00'"),
    ({"timezone": "America/Nowhere"}, "session.timezone: unknown time zone 'America/Nowhere'"),
    ({"open_regime_minutes": 0}, "session.open_regime_minutes: Input should be greater than 0"),
    ({"regimes": {"OPEN": {"gross_tolerance_pct": 125, "derisk_allowed": False}}}, "session.regimes: missing regime(s) ['EARLY', 'MID', 'LATE', 'CLOSE']"),
    ({"regimes": {"LUNCH": {"gross_tolerance_pct": 1, "derisk_allowed": False}}}, "session.regimes: unknown regime(s) ['LUNCH']"),
    ({"publish_interval_s": -1}, "session.publish_interval_s: Input should be greater than 0"),
    ({"surprise": 1}, "session.surprise: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("override, message", INVALID_SESSION, ids=[next(iter(o)) for o, _ in INVALID_SESSION])
def test_invalid_session_rules_are_named(tmp_path: Path, override, message):
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    document["session"] = {**document["session"], **override}
    path = tmp_path / "risk_rules.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(config.ConfigError) as raised:
        config.load_rules(path)
    assert message in str(raised.value)


def test_regime_tolerance_cannot_exceed_the_hard_cap(tmp_path: Path):
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    document["session"]["regimes"]["OPEN"]["gross_tolerance_pct"] = 140
    path = tmp_path / "risk_rules.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(config.ConfigError, match=r"session.regimes.OPEN.gross_tolerance_pct \(140\) is above exposure.hard_cap_pct \(130\)"):
        config.load_rules(path)


def test_shipped_session_rules_are_the_spec_numbers():
    assert (RULES.calendar, RULES.timezone) == ("XNYS", "America/New_York")
    assert (RULES.open_regime_minutes, RULES.close_regime_minutes) == (30, 15)
    assert (RULES.early_regime_end, RULES.mid_regime_end) == (time(12), time(15))
    assert (RULES.soft_derisk_minutes_before_close, RULES.hard_derisk_minutes_before_close) == (15, 2)
    assert {name: (r.gross_tolerance_pct, r.derisk_allowed) for name, r in RULES.regimes.items()} == {
        "OPEN": (125, False), "EARLY": (125, False), "MID": (120, True), "LATE": (115, True), "CLOSE": (100, True)}
    assert config.SessionRules() == RULES  # code defaults == the shipped file
