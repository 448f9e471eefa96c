"""The whole system on a simulated afternoon: the IB simulator with the seeded 125 %
gross portfolio, and session, market data, prints, exposure, decision and execution
as real subprocesses on one sped-up clock, over a private Redis. What the Brain
decided is read back from the streams (intents with their traces, mode-change
alerts), what happened from the simulator (the referee) and from ev.exposure."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from qe import clock as qe_clock
from tests.support.processes import wait_until
from tests.support.system import SPEED, System, new_york

pytestmark = [pytest.mark.slow, pytest.mark.long]  # make test-long
def assert_soft_and_hard_pricing(intents: list[dict]) -> int:
    """Soft: truth tick -/+ $0.01, never through the touch; hard: at the bid/ask."""
    checked = 0
    for intent in intents:
        if intent["action"] != "NEW" or intent["intent_type"] not in ("SOFT_DERISK", "HARD_DERISK"):
            continue
        numbers = intent["trace"]["numbers"]
        bid, ask, truth = numbers["bid"], numbers["ask"], numbers["truth_tick"]
        if intent["intent_type"] == "SOFT_DERISK":
            expected = max(round(truth - 0.01, 2), bid) if intent["side"] == "SELL" else min(round(truth + 0.01, 2), ask)
        else:
            expected = bid if intent["side"] == "SELL" else ask
        assert intent["limit_price"] == pytest.approx(expected), intent
        checked += 1
    return checked


def assert_afternoon(system: System, close: datetime) -> None:
    changes = system.mode_changes()
    modes = [to for _from, to, _data in changes]
    assert modes, "the Brain never changed mode"
    assert modes[0] == "SOFT_DERISK", modes  # 125 % potential over the regime tolerance
    assert set(modes) <= {"SOFT_DERISK", "HARD_DERISK", "NORMAL"}, modes
    if "HARD_DERISK" in modes:
        assert modes.index("SOFT_DERISK") < modes.index("HARD_DERISK")
        hard_at = next(d["at_ns"] for _f, to, d in changes if to == "HARD_DERISK")
        assert (qe_clock.to_ns(close) - hard_at) / 1e9 <= 2 * 60 + 5  # the hard window: close - 2 min
    assert modes[-1] == "NORMAL"  # after the close
    intents = system.intents()
    derisk = [i for i in intents if i["action"] == "NEW" and i["intent_type"] in ("SOFT_DERISK", "HARD_DERISK")]
    assert derisk, "no de-risk intents"
    assert all(i["classification"].endswith("_DEC") for i in derisk)
    assert assert_soft_and_hard_pricing(intents) == len(derisk)
    # No intent ever took the Brain's potential above the cap; the exposure worker agrees.
    over = [(i["intent_type"], i["action"], i["classification"], i["trace"].get("brain_potential_pct"), i["trace"].get("mode"), i["trace"].get("gross_pct"))
            for i in intents if (i["trace"].get("brain_potential_pct") or 0) > 130]
    assert not over, over
    assert max(e["potential_gross_pct"] for e in system.payloads("ev.exposure") if e["status"] == "ok") <= 130
    # Gross is at most 100 % once the market has closed, and the simulator really filled.
    closing = [e for e in system.payloads("ev.exposure") if e["status"] == "ok"][-1]
    assert closing["gross_pct"] <= 100.0, closing["gross_pct"]
    assert len(system.sim.control.fills()) >= 10


@pytest.mark.parametrize(
    "day, start, close",
    [("2026-11-20", "15:30", "16:00"), ("2026-11-27", "12:30", "13:00")],  # a normal day; the day after Thanksgiving
    ids=["normal-day", "early-close"],
)
def test_an_afternoon_from_125_percent_gross_to_at_most_100_by_the_close(tmp_path, day, start, close):
    system = System(tmp_path, new_york(day, start))
    try:
        system.run_until(new_york(day, close).replace(minute=new_york(day, close).minute + 1))
        time.sleep(2.0)
        sessions = [s for s in system.payloads("ev.session") if s["trading_day"] == day and s["market_open"]]
        assert sessions and all(s["early_close"] is (close == "13:00") for s in sessions)
        assert sessions[-1]["close_utc"] == new_york(day, close).astimezone(ZoneInfo("UTC")).isoformat()
        assert_afternoon(system, new_york(day, close))
    finally:
        system.stop()


def test_a_price_shock_over_130_percent_brings_cap_recovery_down_to_123(tmp_path):
    system = System(tmp_path, new_york("2026-11-20", "11:00"))
    try:
        system.run_until(new_york("2026-11-20", "11:03"))
        # A short squeeze: the shorts' prices jump 9 %, so gross grows and equity falls
        # (a uniform move would raise equity too: on a net-long book gross barely moves).
        shorts = [p["symbol"] for p in system.sim.control.state()["positions"] if p["qty"] < 0]
        assert shorts
        for symbol in shorts:
            system.sim.control.shock(symbol, 9.0)
        wait_until(lambda: any(to == "CAP_RECOVERY" for _f, to, _d in system.mode_changes()), timeout=60,
                   message="CAP_RECOVERY")
        entered = next(d for _f, to, d in system.mode_changes() if to == "CAP_RECOVERY")
        assert entered["numbers"]["gross_pct"] >= 130
        wait_until(lambda: any(f == "CAP_RECOVERY" for f, _to, _d in system.mode_changes()), timeout=120,
                   message="CAP_RECOVERY left")
        left = next(d for f, _to, d in system.mode_changes() if f == "CAP_RECOVERY")
        assert left["numbers"]["gross_pct"] <= 123.0 + 1e-6
        recovery = [i for i in system.intents() if i["action"] == "NEW" and i["intent_type"] == "CAP_RECOVERY"]
        assert recovery and all(i["classification"].endswith("_DEC") for i in recovery)
        assert all(i["priority"] == 100 for i in recovery)
    finally:
        system.stop()


def test_halted_stops_everything_but_cancels(tmp_path):
    system = System(tmp_path, new_york("2026-11-20", "15:30"))
    try:
        wait_until(lambda: any(o["status"] == "SUBMITTED" for o in system.payloads("ev.orders")), timeout=90,
                   message="orders working at the broker")
        halted = system.qe("halt", "--reason", "scenario test", "--operator", "tester")
        assert halted.returncode == 0, halted.stderr
        wait_until(lambda: system.r.hget("state:decision", "mode") == b'"HALTED"', timeout=30, message="HALTED")
        halted_at = time.time_ns()

        def nothing_live() -> bool:
            live = [o for o in system.sim.control.orders() if o["order_ref"].startswith("qe-") and o["status"] in ("PreSubmitted", "Submitted")]
            return not live

        wait_until(nothing_live, timeout=30, message="every order cancelled at the broker")
        time.sleep(6.0)  # three simulated minutes of HALTED
        placed_late = [q for q in system.sim.control.requests() if q["event"] in ("place", "modify") and q["ts_ns"] > halted_at + 2 * 10**9]
        assert placed_late == [], placed_late  # only cancels while halted
        assert nothing_live()
        late_intents = [i for i in system.intents() if i["action"] != "CANCEL" and i["created_ns"] > system.clock.now_ns() - int(5.5 * SPEED * 1e9)]
        assert late_intents == []
        resumed = system.qe("resume", "--reason", "scenario test done", "--operator", "tester")
        assert resumed.returncode == 0, resumed.stderr
        wait_until(lambda: system.r.hget("state:decision", "mode") != b'"HALTED"', timeout=30, message="resumed")
        modes = [to for _f, to, _d in system.mode_changes()]
        assert "HALTED" in modes and modes[-1] != "HALTED"
    finally:
        system.stop()
