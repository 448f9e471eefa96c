"""The alerts worker's pure core: rules over plain data and the dedupe / hysteresis /
rate-limit book. No Redis, no clock: every call is given `now_ns`."""

from __future__ import annotations

import pytest

from daemons.alerts.core import (
    AlertBook,
    BrokerWatch,
    DailyRanges,
    DlqWatch,
    EtfGuard,
    Finding,
    GroupLag,
    MarketHours,
    Occurrence,
    exposure_findings,
    iso_to_ns,
    lag_findings,
    new_york_day,
    stale_findings,
)
from qe.config import AlertsRules, EtfGuardRules, RateLimit
from qe.contracts import BucketExposure, Exposure

S = 1_000_000_000
T0 = 1_790_000_000 * S  # some instant; everything below is relative to it
RULES = AlertsRules()


def book(max_alerts: int = 3, window_s: float = 300) -> AlertBook:
    return AlertBook(lambda _type: RateLimit(max_alerts=max_alerts, window_s=window_s))


def cond(level: str, severity: str = "warning", for_s: float = 0, since: int | None = None, subject: str = "X",
         alert_type: str = "thing", data: dict | None = None) -> Finding:
    return Finding(alert_type, subject, level, severity, f"{alert_type} {subject} {level}", data or {"n": 1},
                   since_ns=since, for_s=for_s)


# --- the book ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, expected",
    [
        # (level at t seconds) -> states of the alerts published
        ([("set", 0)], ["firing"]),
        ([("set", 0), ("set", 1), ("set", 2)], ["firing"]),  # deduplicated while active
        ([("set", 0), ("clear", 1)], ["firing", "resolved"]),
        ([("set", 0), ("clear", 1), ("clear", 2)], ["firing", "resolved"]),  # one resolved only
        ([("set", 0), ("hold", 1), ("hold", 2)], ["firing"]),  # hysteresis band: still active
        ([("hold", 0), ("clear", 1)], []),  # in the band without having fired: nothing
        ([("clear", 0)], []),
        ([("set", 0), ("clear", 1), ("set", 2)], ["firing", "resolved", "firing"]),  # a new episode
    ],
    ids=["fire", "dedupe", "resolve", "one-resolve", "hysteresis-hold", "hold-only", "clear-only", "new-episode"],
)
def test_book_dedupes_and_resolves(steps, expected):
    alerts = book()
    published = []
    for level, t in steps:
        published += alerts.apply([cond(level)], T0 + t * S)
    assert [a.data["state"] for a in published] == expected
    assert [a.severity for a in published] == ["info" if s == "resolved" else "warning" for s in expected]


def test_keys_name_the_condition_and_its_start():
    alerts = book()
    fired = alerts.apply([cond("set", since=T0 - 5 * S)], T0)
    resolved = alerts.apply([cond("clear")], T0 + 7 * S)
    assert fired[0].idempotency_key == f"alert:thing:X:{T0 - 5 * S}:warning"
    assert resolved[0].idempotency_key == f"alert:thing:X:{T0 - 5 * S}:resolved"
    assert resolved[0].data["duration_s"] == 12.0 and resolved[0].data["since_ns"] == T0 - 5 * S
    # The same episode replayed into a fresh book gives the same keys (deterministic).
    again = book()
    assert again.apply([cond("set", since=T0 - 5 * S)], T0 + 3 * S)[0].idempotency_key == fired[0].idempotency_key


def test_for_s_holds_a_condition_back_until_it_lasted():
    alerts = book()
    assert alerts.apply([cond("set", for_s=10, since=T0)], T0 + 3 * S) == []
    assert alerts.apply([cond("set", for_s=10, since=T0)], T0 + 9 * S) == []
    fired = alerts.apply([cond("set", for_s=10, since=T0)], T0 + 10 * S)
    assert [a.data["state"] for a in fired] == ["firing"]


def test_a_blip_shorter_than_for_s_leaves_no_trace():
    alerts = book()
    assert alerts.apply([cond("set", for_s=10)], T0) == []
    assert alerts.apply([cond("clear")], T0 + 2 * S) == []  # pending, never announced: no resolved
    assert alerts.conditions == {}


def test_rising_severity_is_announced_once_more():
    alerts = book()
    first = alerts.apply([cond("set", "warning", since=T0)], T0)
    same = alerts.apply([cond("set", "warning", since=T0)], T0 + S)
    higher = alerts.apply([cond("set", "critical", since=T0)], T0 + 2 * S)
    lower_again = alerts.apply([cond("set", "warning", since=T0)], T0 + 3 * S)
    back_up = alerts.apply([cond("set", "critical", since=T0)], T0 + 4 * S)
    assert [len(first), len(same), len(higher), len(lower_again), len(back_up)] == [1, 0, 1, 0, 0]
    assert higher[0].severity == "critical" and higher[0].data["escalated"] is True
    assert higher[0].idempotency_key.endswith(":critical")


def test_flapping_condition_is_rate_limited_and_the_count_reported():
    alerts = book(max_alerts=2, window_s=60)
    published = []
    for i in range(6):  # set/clear every 5 s: six episodes within a minute
        published += alerts.apply([cond("set", since=T0 + 10 * i * S)], T0 + 10 * i * S)
        published += alerts.apply([cond("clear")], T0 + (10 * i + 5) * S)
    firing = [a for a in published if a.data["state"] == "firing"]
    resolved = [a for a in published if a.data["state"] == "resolved"]
    assert len(firing) == 2 and len(resolved) == 2  # a resolved pairs only with an announced firing
    assert alerts.suppressed == {"thing": 4}
    # The window has room again a minute after the first: the next firing says how many were held back.
    later = alerts.apply([cond("set", since=T0 + 100 * S)], T0 + 100 * S)
    assert later[0].data["suppressed_before"] == 4


def test_a_held_back_condition_is_announced_when_the_window_allows():
    alerts = book(max_alerts=1, window_s=60)
    alerts.apply([cond("set", since=T0)], T0)
    alerts.apply([cond("clear")], T0 + S)
    assert alerts.apply([cond("set", since=T0 + 2 * S)], T0 + 2 * S) == []  # limited
    assert alerts.apply([cond("set", since=T0 + 2 * S)], T0 + 30 * S) == []  # still limited, counted once
    assert alerts.suppressed == {"thing": 1}
    late = alerts.apply([cond("set", since=T0 + 2 * S)], T0 + 61 * S)
    assert [a.data["state"] for a in late] == ["firing"]
    assert late[0].data["suppressed_before"] == 1 and late[0].data["since_ns"] == T0 + 2 * S


def test_rate_limit_is_per_type_and_subject():
    alerts = book(max_alerts=1, window_s=60)
    published = []
    for subject in ("A", "B"):
        for i in range(3):
            published += alerts.apply([cond("set", subject=subject, since=T0 + i)], T0 + 2 * i * S)
            published += alerts.apply([cond("clear", subject=subject)], T0 + (2 * i + 1) * S)
    assert [(a.alert_type, a.data["state"]) for a in published].count(("thing", "firing")) == 2


def test_complete_types_clear_what_was_not_reported():
    alerts = book()
    alerts.apply([cond("set", subject="A"), cond("set", subject="B"), cond("set", subject="C", alert_type="other")], T0)
    out = alerts.apply([cond("set", subject="A")], T0 + S, complete={"thing": "no longer watched"})
    assert [(a.alert_type, a.data["state"], a.message) for a in out] == [("thing", "resolved", "thing B: no longer watched")]
    assert set(alerts.conditions) == {"thing|A", "other|C"}


def test_state_round_trips_so_a_restart_does_not_refire():
    alerts = book(max_alerts=2, window_s=60)
    alerts.apply([cond("set", since=T0), cond("set", subject="P", for_s=30, since=T0)], T0)
    cond_set, cond_del, rate_set, rate_del = alerts.take_changes()
    assert set(cond_set) == {"thing|X", "thing|P"} and cond_del == [] and rate_del == []
    restarted = book(max_alerts=2, window_s=60)
    assert restarted.restore(cond_set, rate_set) == []
    assert restarted.apply([cond("set", since=T0 + 5 * S)], T0 + 5 * S) == []  # already announced
    pending = restarted.apply([cond("set", subject="P", for_s=30)], T0 + 31 * S)  # pending kept its start
    assert [a.data["since_ns"] for a in pending] == [T0]
    resolved = restarted.apply([cond("clear")], T0 + 40 * S)
    assert resolved[0].idempotency_key == f"alert:thing:X:{T0}:resolved"
    assert restarted.take_changes()[1] == ["thing|X"]


def test_unreadable_state_is_reported_not_fatal():
    alerts = book()
    bad = alerts.restore({"thing|X": b"{not json", "thing|Y": cond_json()}, {"thing|X": b"[]"})
    assert sorted(bad) == ["thing|X", "thing|X"]
    assert list(alerts.conditions) == ["thing|Y"]


def cond_json() -> str:
    alerts = book()
    alerts.apply([cond("set", subject="Y")], T0)
    return alerts.take_changes()[0]["thing|Y"]


def test_occurrences_are_rate_limited_with_distinct_keys():
    alerts = book(max_alerts=2, window_s=600)
    outs = [alerts.occur(Occurrence("new_daily_high", "PFF", f"d:{p}", "info", "m", {"price": p}, "PFF"), T0 + i * S)
            for i, p in enumerate((31.5, 31.6, 31.7, 31.8))]
    assert [o is not None for o in outs] == [True, True, False, False]
    assert outs[0].idempotency_key == "alert:new_daily_high:PFF:d:31.5" and outs[0].data["state"] == "event"
    later = alerts.occur(Occurrence("new_daily_high", "PFF", "d:31.9", "info", "m", {}, "PFF"), T0 + 700 * S)
    assert later.data["suppressed_before"] == 2


def test_empty_rate_windows_are_forgotten():
    alerts = book(max_alerts=1, window_s=10)
    alerts.apply([cond("set")], T0)
    alerts.take_changes()
    alerts.prune_rates(T0 + 5 * S)
    assert "thing|X" in alerts.rates
    alerts.prune_rates(T0 + 11 * S)
    assert alerts.rates == {} and alerts.take_changes()[3] == ["thing|X"]


# --- exposure -----------------------------------------------------------------------------


def exposure(gross: float | None, potential: float | None, lt: float = 60, mm: float = 20, status: str = "ok") -> Exposure:
    buckets = {} if status != "ok" else {
        "LT": BucketExposure(current_pct=lt, potential_pct=lt + 1, target_pct=80, max_pct=90),
        "MM_PURE": BucketExposure(current_pct=mm, potential_pct=mm + 1, target_pct=20, max_pct=30),
    }
    return Exposure(status=status, error=None if status == "ok" else "equity unknown", equity=1_000_000,
                    long_notional=0, short_notional=0, gross_pct=gross, net_pct=0, potential_gross_pct=potential,
                    buckets=buckets)


def levels(findings, alert_type, subject=None):
    return [f.level for f in findings if f.alert_type == alert_type and (subject is None or f.subject == subject)]


@pytest.mark.parametrize(
    "gross, potential, current_level, potential_level",
    [
        (120, 125, "clear", "clear"),
        (120, 130, "clear", "set"),  # potential AT the cap is a breach (never above 130: >= alerts)
        (129.5, 129.5, "hold", "hold"),  # within 1 point below: hysteresis
        (129.0, 128.0, "clear", "clear"),
        (131, 135, "set", "set"),
    ],
)
def test_hard_cap_on_current_and_potential(gross, potential, current_level, potential_level):
    findings = exposure_findings(exposure(gross, potential), 130, RULES, T0)
    assert levels(findings, "hard_cap_current") == [current_level]
    assert levels(findings, "hard_cap_potential") == [potential_level]
    current = next(f for f in findings if f.alert_type == "hard_cap_current")
    assert current.severity == "critical" and current.data["gross_pct"] == gross and current.data["hard_cap_pct"] == 130


@pytest.mark.parametrize(
    "lt, mm, lt_level, mm_level",
    [(90, 30, "hold", "hold"), (90.5, 29, "set", "clear"), (89.2, 31, "hold", "set"), (88, 28.9, "clear", "clear")],
)
def test_bucket_above_its_max(lt, mm, lt_level, mm_level):
    findings = exposure_findings(exposure(100, 100, lt=lt, mm=mm), 130, RULES, T0)
    assert levels(findings, "bucket_max", "LT") == [lt_level]
    assert levels(findings, "bucket_max", "MM_PURE") == [mm_level]


def test_cap_breach_episode_through_the_book():
    alerts = book()
    published = []
    for t, (gross, potential) in enumerate([(125, 128), (126, 131), (126, 132), (126, 129.5), (126, 128.9)]):
        published += alerts.apply(exposure_findings(exposure(gross, potential), 130, RULES, T0 + t * S), T0 + t * S)
    assert [(a.alert_type, a.data["state"]) for a in published] == [
        ("hard_cap_potential", "firing"), ("hard_cap_potential", "resolved")]
    assert published[0].data["potential_gross_pct"] == 131 and published[0].data["since_ns"] == T0 + S
    assert published[1].data["potential_gross_pct"] == 128.9


def test_exposure_error_is_its_own_alert_and_keeps_cap_state():
    findings = exposure_findings(exposure(None, None, status="error"), 130, RULES, T0)
    assert [(f.alert_type, f.level) for f in findings] == [("exposure_unavailable", "set")]
    assert "equity unknown" in findings[0].message


# --- broker ----------------------------------------------------------------------------------


def test_broker_down_waits_for_s_and_is_critical_in_market_hours():
    watch = BrokerWatch()
    alerts = book()
    watch.update(False, False, "disconnected (connecting)", None, None, T0)
    assert alerts.apply(watch.findings(True, RULES), T0 + 2 * S) == []  # shorter than broker_down_for_s (5)
    fired = alerts.apply(watch.findings(True, RULES), T0 + 5 * S)
    assert [(a.alert_type, a.severity) for a in fired] == [("broker_down", "critical")]
    watch.update(True, True, "connected", "DU123", None, T0 + 9 * S)
    resolved = alerts.apply(watch.findings(True, RULES), T0 + 9 * S)
    assert [(a.alert_type, a.data["state"]) for a in resolved] == [("broker_down", "resolved")]


def test_broker_down_overnight_is_a_warning_escalated_at_the_open():
    watch, alerts = BrokerWatch(), book()
    watch.update(False, False, "disconnected", None, 1100, T0)
    night = alerts.apply(watch.findings(False, RULES), T0 + 10 * S)
    still = alerts.apply(watch.findings(False, RULES), T0 + 20 * S)
    opened = alerts.apply(watch.findings(True, RULES), T0 + 30 * S)
    assert [a.severity for a in night] == ["warning"] and still == []
    assert [a.severity for a in opened] == ["critical"]


def test_a_short_blip_is_not_alerted():
    watch, alerts = BrokerWatch(), book()
    watch.update(True, True, "connected", "DU1", None, T0)
    watch.update(False, False, "disconnected", "DU1", None, T0 + S)
    assert alerts.apply(watch.findings(True, RULES), T0 + 2 * S) == []
    watch.update(True, True, "connected", "DU1", None, T0 + 3 * S)
    assert alerts.apply(watch.findings(True, RULES), T0 + 7 * S) == []


def test_orders_refused_while_connected():
    watch, alerts = BrokerWatch(), book()
    watch.update(True, False, "account interlock: live account", "U1", None, T0)
    out = alerts.apply(watch.findings(True, RULES), T0)
    assert [(a.alert_type, a.severity) for a in out] == [("broker_orders_refused", "error")]
    assert BrokerWatch.from_json(watch.to_json()) == watch


# --- stale market data ----------------------------------------------------------------------------

OPEN = MarketHours(T0, T0 + 390 * 60 * S, "2026-11-20")


def stale(now_s: float, seen: dict, feed: float | None, symbols=("A", "B"), market=OPEN, caught_up=True):
    return stale_findings(
        "l1", {k: T0 + int(v * S) for k, v in seen.items()}, None if feed is None else T0 + int(feed * S),
        symbols, T0 + int(now_s * S), market, caught_up, symbol_after_s=120, feed_after_s=30,
    )


@pytest.mark.parametrize(
    "now_s, seen, feed, expected",
    [
        # silence counts from the open: yesterday's last quote does not make 09:30:05 stale
        (5, {}, None, {"l1_feed_stale|ev.l1": "clear", "l1_stale|A": "clear", "l1_stale|B": "clear"}),
        (200, {"A": 190, "B": 60}, 190, {"l1_feed_stale|ev.l1": "clear", "l1_stale|A": "clear", "l1_stale|B": "set"}),
        (200, {"A": 150, "B": 150}, 150, {"l1_feed_stale|ev.l1": "set", "l1_stale|A": "hold", "l1_stale|B": "hold"}),
        (200, {}, None, {"l1_feed_stale|ev.l1": "set", "l1_stale|A": "hold", "l1_stale|B": "hold"}),
    ],
    ids=["just-opened", "one-symbol-stale", "whole-feed-stale", "nothing-today"],
)
def test_stale_per_symbol_and_feed_wide(now_s, seen, feed, expected):
    findings, complete = stale(now_s, seen, feed)
    assert {f.key: f.level for f in findings} == expected
    assert complete == ({} if expected["l1_feed_stale|ev.l1"] == "set" else {"l1_stale": "no longer watched"})


def test_a_worker_started_mid_session_counts_silence_from_its_own_start():
    # Started at 15:35 (21,900 s after the open) with nothing seen yet: no claim of a
    # six-hour silence; the clock starts when it began watching.
    start = T0 + 21_900 * S
    findings, _ = stale_findings("l1", {}, None, ("A",), start + 10 * S, OPEN, True, 120, 30, watching_since_ns=start)
    assert {f.key: f.level for f in findings} == {"l1_feed_stale|ev.l1": "clear", "l1_stale|A": "clear"}
    findings, _ = stale_findings("l1", {}, None, ("A",), start + 40 * S, OPEN, True, 120, 30, watching_since_ns=start)
    feed = next(f for f in findings if f.subject == "ev.l1")
    assert feed.level == "set" and feed.since_ns == start + 30 * S and feed.data["silent_s"] == 40


def test_stale_start_is_derived_from_the_data():
    findings, _ = stale(200, {"A": 190, "B": 60}, 190)
    b = next(f for f in findings if f.subject == "B")
    assert b.since_ns == T0 + 180 * S and b.data["silent_s"] == 140 and b.severity == "warning"


def test_closed_market_ends_staleness_and_unknown_state_judges_nothing():
    after_close = MarketHours(T0 - 1000 * S, T0 - 10 * S, "2026-11-20")
    assert stale(200, {}, None, market=after_close) == ([], {"l1_stale": "market closed", "l1_feed_stale": "market closed"})
    assert stale(200, {}, None, market=None) == ([], {})
    assert stale(200, {}, None, caught_up=False) == ([], {})


def test_market_hours_from_session_times():
    market = MarketHours(iso_to_ns("2026-11-20T14:30:00+00:00"), iso_to_ns("2026-11-20T21:00:00+00:00"), "2026-11-20")
    assert market.is_open(iso_to_ns("2026-11-20T14:30:00+00:00"))
    assert not market.is_open(iso_to_ns("2026-11-20T21:00:00+00:00"))
    assert new_york_day(iso_to_ns("2026-11-21T04:59:59+00:00")) == "2026-11-20"
    assert new_york_day(iso_to_ns("2026-11-21T05:00:00+00:00")) == "2026-11-21"


# --- consumer lag and DLQ ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream, group, lag, level, severity",
    [
        ("ev.intents", "execution_service", 1001, "set", "warning"),
        ("ev.intents", "execution_service", 1000, "hold", "warning"),
        ("ev.intents", "execution_service", 500, "clear", "warning"),
        ("ev.intents", "execution_service", 10_000, "set", "error"),
        ("ev.l1", "decision_engine", 5000, "clear", "warning"),  # ev.l1 has its own limit (20000)
        ("ev.l1", "decision_engine", 20_001, "set", "warning"),
        ("ev.orders", "decision_engine", None, "hold", None),  # Redis cannot tell
        ("ev.orders", "workers", 10**6, None, None),  # monitoring group: ignored
    ],
)
def test_lag_thresholds(stream, group, lag, level, severity):
    findings, complete = lag_findings([GroupLag(stream, group, lag, 0)], RULES)
    assert complete == {"consumer_lag": "group no longer exists"}
    if level is None:
        assert findings == []
        return
    assert [f.level for f in findings] == [level]
    assert findings[0].subject == f"{stream}/{group}"
    if severity:
        assert findings[0].severity == severity and findings[0].for_s == RULES.consumer_lag_for_s


def test_dlq_growth_episode():
    watch, alerts, published = DlqWatch(), book(), []
    checks = [(0, 7), (1, 7), (2, 9), (3, 12), (30, 12), (64, 12), (70, 13)]
    for t, added in checks:
        published += alerts.apply(watch.observe(added, added, T0 + t * S, RULES), T0 + t * S)
    assert [(a.data["state"], a.data.get("new_entries")) for a in published] == [
        ("firing", 2), ("resolved", 5), ("firing", 1)]
    assert published[0].data["since_ns"] == T0 + 2 * S  # first growth; the 7 already there are not growth


def test_dlq_growth_escalates_and_a_recreated_stream_resets():
    watch, alerts = DlqWatch(), book()
    alerts.apply(watch.observe(0, 0, T0, RULES), T0)
    first = alerts.apply(watch.observe(10, 10, T0 + S, RULES), T0 + S)
    big = alerts.apply(watch.observe(60, 60, T0 + 2 * S, RULES), T0 + 2 * S)
    assert [a.severity for a in first + big] == ["warning", "error"]
    reset = alerts.apply(watch.observe(3, 3, T0 + 3 * S, RULES), T0 + 3 * S)
    assert [a.data["state"] for a in reset] == ["resolved"]
    assert DlqWatch.from_json(watch.to_json()) == watch


# --- daily high / low ---------------------------------------------------------------------------------


def test_daily_high_low_after_the_minimum_prints_and_reset_at_a_new_day():
    ranges = DailyRanges(min_size=100, min_prints=3)
    day1, day2 = "2026-11-19", "2026-11-20"
    steps = [
        (25.00, 100, day1, []),
        (25.10, 200, day1, []),  # a new high, but only the 2nd print of the day
        (24.90, 100, day1, []),  # 3rd print: range now established
        (25.20, 50, day1, []),  # odd lot: ignored
        (25.15, 300, day1, ["new_daily_high"]),
        (25.15, 100, day1, []),  # equal to the high is not new
        (24.80, 100, day1, ["new_daily_low"]),
        (26.00, 100, day2, []),  # new trading day: fresh range, no alert
        (26.10, 100, day2, []),
        (25.00, 100, day1, []),  # a late print of yesterday: ignored
        (26.20, 100, day2, []),  # 3rd print of day 2
        (26.30, 100, day2, ["new_daily_high"]),
    ]
    for price, size, day, expected in steps:
        got = ranges.on_print("CIM PRB", price, size, day)
        assert [o.alert_type for o in got] == expected, (price, size, day)
    day2_range = ranges.ranges["CIM PRB"]
    assert (day2_range.day, day2_range.high, day2_range.low) == (day2, 26.30, 26.00)


def test_daily_high_identity_is_day_and_price():
    ranges = DailyRanges(min_size=1, min_prints=1)
    ranges.on_print("PFF", 31.0, 100, "2026-11-20")
    (high,) = ranges.on_print("PFF", 31.05, 100, "2026-11-20")
    assert high.identity == "2026-11-20:31.0500" and high.data["previous_high"] == 31.0 and high.severity == "info"


# --- ETF guard -------------------------------------------------------------------------------------------

GUARD_RULES = EtfGuardRules(symbols=["PFF"], move_vs_close_cents=20, move_window_cents=10, move_window_s=300,
                            hysteresis_cents=3)


def guard_levels(findings):
    return {f.alert_type: f.level for f in findings}


def test_etf_guard_vs_previous_close_from_ref_price_then_last_print():
    guard = EtfGuard(GUARD_RULES, {"PFF": 31.45})
    day1, day2 = "2026-11-19", "2026-11-20"
    # No previous day seen: the universe's ref_price is the previous close.
    first = guard.on_print("PFF", 31.20, T0, day1)
    assert guard_levels(first)["etf_move_vs_close"] == "set"
    vs_close = next(f for f in first if f.alert_type == "etf_move_vs_close")
    assert vs_close.data["previous_close_source"] == "universe_ref_price" and vs_close.data["move_cents"] == -25
    guard.on_print("PFF", 31.30, T0 + 3600 * S, day1)  # day 1 closes at 31.30
    # Day 2: the previous close is day 1's last print.
    f = {x.alert_type: x for x in guard.on_print("PFF", 31.48, T0 + 86_400 * S, day2)}
    assert f["etf_move_vs_close"].level == "hold"  # 18 cents: inside the hysteresis band (17, 20)
    assert f["etf_move_vs_close"].data["previous_close"] == 31.30
    assert f["etf_move_vs_close"].data["previous_close_source"] == "previous_day_last_print"
    assert f["etf_move_vs_close"].data["previous_close_day"] == day1
    assert guard_levels(guard.on_print("PFF", 31.50, T0 + 86_401 * S, day2))["etf_move_vs_close"] == "set"
    assert guard_levels(guard.on_print("PFF", 31.47, T0 + 86_402 * S, day2))["etf_move_vs_close"] == "hold"
    assert guard_levels(guard.on_print("PFF", 31.46, T0 + 86_403 * S, day2))["etf_move_vs_close"] == "clear"


def test_etf_guard_fast_move_within_the_window_and_ageing_out():
    guard = EtfGuard(GUARD_RULES, {"PFF": 31.00})
    day = "2026-11-20"
    alerts, published = book(), []
    for t, price in [(0, 31.00), (60, 30.97), (120, 30.92), (180, 30.89)]:  # 11 cents down in 3 minutes
        published += alerts.apply(guard.on_print("PFF", price, T0 + t * S, day), T0 + t * S)
    fast = [a for a in published if a.alert_type == "etf_move_fast"]
    assert [(a.data["state"], a.data["direction"], a.data["move_cents"]) for a in fast] == [("firing", "down", 11)]
    assert fast[0].data["since_ns"] == T0 + 180 * S
    # Still inside the window 4 minutes later? 31.00 was at t=0: it leaves the window at t=300.
    assert guard_levels(guard.evaluate(T0 + 299 * S)) == {"etf_move_fast": "set"}
    later = alerts.apply(guard.evaluate(T0 + 301 * S), T0 + 301 * S)  # window high now 30.97: 8 cents
    assert later == []  # 8 cents: within the band (10 - 3 = 7)
    done = alerts.apply(guard.evaluate(T0 + 481 * S), T0 + 481 * S)  # only 30.89 left
    assert [(a.alert_type, a.data["state"]) for a in done] == [("etf_move_fast", "resolved")]


def test_etf_guard_rising_move_and_bounded_window():
    rules = GUARD_RULES.model_copy(update={"max_window_prints": 10})
    guard = EtfGuard(rules, {"PFF": 31.00})
    for i in range(30):
        findings = guard.on_print("PFF", 31.00 + 0.01 * i, T0 + i * S, "2026-11-20")
    assert len(guard.states["PFF"].window) == 10
    fast = next(f for f in findings if f.alert_type == "etf_move_fast")
    assert (fast.level, fast.data["direction"], fast.data["move_cents"]) == ("hold", "up", 9)
    assert not guard.guards("CIM PRB")
