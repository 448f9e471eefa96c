"""qe-session as a real subprocess on a simulated, sped-up clock: ev.session and
state:session every simulated second, regimes changing as simulated time passes,
SIGTERM -> exit 0, invalid configuration -> exit 78 naming the field."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime

import pytest
import redis

from qe import config
from qe.clock import NS_PER_S, sim_env, to_ns
from qe.contracts import decode
from tests.support.processes import DaemonProcess, console_script, daemon_env, wait_until, write_rules

SESSION = console_script("qe-session")


def session_events(r: redis.Redis) -> list:
    return [decode("ev.session", fields) for _id, fields in r.xrange("ev.session")]


def metrics_url(daemon: DaemonProcess) -> str | None:
    for line in daemon.log_lines():
        if line.get("msg") == "metrics endpoint up":
            return line["metrics_url"]
    return None


def test_publishes_every_simulated_second_through_an_early_close(redis_url, r, tmp_path):
    # The day after Thanksgiving 2026 closes at 13:00; start in MID, at 240x.
    start = datetime.fromisoformat("2026-11-27T12:35:00-05:00")
    env = daemon_env(redis_url, **sim_env(start, speed=240))
    daemon = DaemonProcess(SESSION, env, tmp_path / "session.log").start()
    try:
        wait_until(
            lambda: r.hget("state:session", "regime") == b'"CLOSED"' and r.xlen("ev.session") > 0,
            timeout=40,
            message="the simulated clock passes the 13:00 close",
        )
        url = metrics_url(daemon)
        scraped = urllib.request.urlopen(url, timeout=5).read().decode()
        assert daemon.terminate() == 0
    finally:
        daemon.kill()

    events = session_events(r)
    payloads = [event.payload for event in events]
    # One event per simulated second: the key is the second, never repeated.
    keys = [event.idempotency_key for event in events]
    assert len(keys) == len(set(keys))
    assert all(key == f"session:{p.now_ns // NS_PER_S}" for key, p in zip(keys, payloads))
    seconds = [p.now_ns // NS_PER_S for p in payloads]
    assert seconds == sorted(seconds)
    span = seconds[-1] - seconds[0] + 1
    assert len(seconds) >= 0.5 * span, f"{len(seconds)} events over {span} simulated seconds"
    assert all(e.ts_ns == p.now_ns for e, p in zip(events, payloads))

    # Regimes in order as simulated time passes, with the early-close boundaries.
    regimes = [p.regime for p in payloads]
    collapsed = [regime for i, regime in enumerate(regimes) if i == 0 or regimes[i - 1] != regime]
    assert collapsed == ["MID", "CLOSE", "CLOSED"]
    close_ns = to_ns(datetime.fromisoformat("2026-11-27T13:00:00-05:00"))
    for p in payloads:
        to_close_s = (close_ns - p.now_ns) / NS_PER_S
        assert p.early_close is (p.now_ns < close_ns)
        if p.market_open:
            assert p.trading_day == "2026-11-27"
            assert p.close_utc == "2026-11-27T18:00:00+00:00"
            assert p.minutes_to_close == pytest.approx(to_close_s / 60, abs=1e-3)
            assert p.regime == ("CLOSE" if to_close_s <= 15 * 60 else "MID")
            assert p.soft_derisk_active is (to_close_s <= 15 * 60)
            assert p.hard_derisk_active is (to_close_s <= 2 * 60)
        else:
            assert p.trading_day == "2026-11-30" and p.minutes_to_close is None
            assert not p.soft_derisk_active and not p.hard_derisk_active
        assert p.now_ny.endswith("-05:00") and p.now_utc.endswith("+00:00")
    assert any(p.hard_derisk_active for p in payloads)

    # state:session is the latest event.
    latest = {k.decode(): json.loads(v) for k, v in r.hgetall("state:session").items()}
    assert latest["_idempotency_key"] == keys[-1]
    assert latest["regime"] == "CLOSED" and latest["trading_day"] == "2026-11-30"
    assert latest["now_ns"] == payloads[-1].now_ns

    assert 'qe_session_regime{regime="CLOSED"} 1.0' in scraped
    assert "qe_session_market_open 0.0" in scraped
    logs = daemon.log_lines()
    assert [line["regime"] for line in logs if line.get("msg") == "regime"] == ["MID", "CLOSE", "CLOSED"]
    assert any(line.get("msg") == "stop requested" and line.get("signal") == "SIGTERM" for line in logs)


def test_wall_clock_publishes_about_once_a_second(redis_url, r, tmp_path):
    daemon = DaemonProcess(SESSION, daemon_env(redis_url), tmp_path / "session.log").start()
    try:
        wait_until(lambda: r.xlen("ev.session") >= 3, timeout=30, message="three session events")
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    events = session_events(r)
    gaps = [(b.payload.now_ns - a.payload.now_ns) / NS_PER_S for a, b in zip(events, events[1:])]
    assert all(0.9 <= gap <= 1.6 for gap in gaps), gaps
    assert r.hexists("state:daemon:session", "pid")  # heartbeat from the runtime


def test_a_simulated_clock_years_away_still_works(redis_url, r, tmp_path):
    start = datetime.fromisoformat("2041-11-28T10:00:00-05:00")  # Thanksgiving 2041
    daemon = DaemonProcess(SESSION, daemon_env(redis_url, **sim_env(start, speed=1)), tmp_path / "session.log").start()
    try:
        wait_until(lambda: r.xlen("ev.session") >= 1, timeout=30, message="a session event")
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    payload = session_events(r)[0].payload
    assert (payload.regime, payload.market_open, payload.trading_day, payload.early_close) == ("CLOSED", False, "2041-11-29", True)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"hard_derisk_minutes_before_close": 20},
         "session: hard_derisk_minutes_before_close (20) must be below soft_derisk_minutes_before_close (15)"),
        ({"calendar": "XNYZ"}, "session.calendar: unknown exchange calendar 'XNYZ'"),
        ({"early_regime_end": 720}, "session.early_regime_end: must be a quoted 'HH:MM' local time"),
    ],
    ids=["hard-above-soft", "unknown-calendar", "unquoted-time"],
)
def test_invalid_session_config_exits_78_naming_the_field(redis_url, tmp_path, override, message):
    rules = write_rules(tmp_path, session=override)
    daemon = DaemonProcess(SESSION, daemon_env(redis_url, QE_CONFIG=rules), tmp_path / "session.log").start()
    assert daemon.wait(timeout=30) == config.EX_CONFIG
    output = daemon.output()
    assert "qe-session: invalid configuration:" in output
    assert message in output

