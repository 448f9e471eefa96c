"""No flapping (issue 13): a fault-free afternoon from 15:20 to the close.

The real daemons with the IB simulator (the seeded ~125 % gross portfolio) on one
sped-up clock. Market making must not push the Brain's potential gross over the
regime tolerance and back (NORMAL <-> SOFT_DERISK every few seconds): strategies size
their increases to the regime tolerance less `strategies.tolerance_margin_pct`.
The playbook still runs: SOFT_DERISK in the soft window, HARD_DERISK if gross is
still above 100 % at close - 2 min, and gross is at most 100 % after the close."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from qe import clock as qe_clock
from tests.support.system import System, new_york

pytestmark = [pytest.mark.slow, pytest.mark.long]  # make test-long
DAY = "2026-11-20"  # a normal Friday: close 16:00
MAX_MODE_CHANGES = 10
SPEED = 20.0  # 41 simulated minutes in about 125 wall seconds


def counted_changes(changes: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
    """Mode changes from the first SOFT_DERISK on: a Brain with no saved state starts
    in THROTTLE and may first leave it on a 0 % snapshot published before any quote
    (a start-up artefact another part of issue 13 removes)."""
    first_soft = next((i for i, (_f, to, _d) in enumerate(changes) if to == "SOFT_DERISK"), len(changes))
    return changes[first_soft:]


def test_a_fault_free_afternoon_changes_mode_at_most_ten_times(tmp_path):
    close = new_york(DAY, "16:00")
    system = System(tmp_path, new_york(DAY, "15:20"), speed=SPEED)
    try:
        system.run_until(close + timedelta(minutes=1), timeout=240)
        time.sleep(2.0)
        changes = system.mode_changes()
        print("mode changes:", [(f, to, d.get("rule"), (d.get("numbers") or {}).get("potential_gross_pct"))
                                for f, to, d in changes])
        modes = [to for _f, to, _d in changes]
        counted = counted_changes(changes)
        assert counted, f"the Brain never entered SOFT_DERISK: {modes}"
        assert len(counted) <= MAX_MODE_CHANGES, f"{len(counted)} mode changes: {[to for _f, to, _d in counted]}"
        # No increase ever took the Brain's potential above the regime tolerance less the margin.
        for intent in system.intents():
            if intent["action"] == "NEW" and intent["classification"].endswith("_INC"):
                numbers = intent["trace"]["numbers"]
                assert numbers["brain_potential_after_pct"] <= numbers["increase_ceiling_pct"] + 1e-6, intent
        # The playbook: SOFT_DERISK orders in the soft window (from close - 15 min) ...
        soft_window = [i for i in system.intents() if i["action"] == "NEW" and i["intent_type"] == "SOFT_DERISK"
                       and i["created_ns"] >= qe_clock.to_ns(close - timedelta(minutes=15))]
        assert soft_window, "no SOFT_DERISK intent in the soft window"
        # ... then HARD_DERISK at close - 2 min if gross was still above 100 % then.
        if "HARD_DERISK" in modes:
            hard_at = next(d["at_ns"] for _f, to, d in changes if to == "HARD_DERISK")
            assert 0 <= (qe_clock.to_ns(close) - hard_at) / 1e9 <= 2 * 60 + 5
            assert modes.index("SOFT_DERISK") < modes.index("HARD_DERISK")
        exposures = [e for e in system.payloads("ev.exposure") if e["status"] == "ok"]
        assert max(e["potential_gross_pct"] for e in exposures) <= 130
        assert exposures[-1]["gross_pct"] <= 100.0, exposures[-1]["gross_pct"]
        assert len(system.sim.control.fills()) >= 10  # the simulator really de-risked
    finally:
        system.stop()
