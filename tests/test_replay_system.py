"""Replay (SPEC 11) on a recorded simulated afternoon: the real daemons with the IB
simulator from 15:42 to after the close, then `qe archive` of the day, then the day's
archived inputs through the Brain in-process (`qe replay`), compared with the recorded
intents; then a what-if with another rules file.

The live Brain journals its handling (ev.decision_journal: the order of the entries it
handled, the clock reading of each step, its ticks and loads; docs/archive.md), and the
replay follows that journal: the replayed intents are identical to the recorded ones
(keys, sides, quantities, prices, types), and so is the mode sequence. Also checked:
isolation, determinism, the what-if files."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from qe import archive, replay
from tests.support.processes import REPO
from tests.support.system import System, new_york

pytestmark = [pytest.mark.slow, pytest.mark.long]  # make test-long
DAY = "2026-11-20"
KEEP = Path("/tmp/qe-replay-last")  # the recorded day, for a look after the test (bench/replay.py --archive)


def modes_from_soft(changes: list[replay.ModeChange]) -> list[str]:
    """The mode sequence from the first SOFT_DERISK on (a Brain with no saved state may
    first leave THROTTLE on a 0 % snapshot published before any quote)."""
    names = [c.to_mode for c in changes]
    return names[names.index("SOFT_DERISK"):] if "SOFT_DERISK" in names else names


def test_replay_of_a_recorded_afternoon(tmp_path):
    system = System(tmp_path, new_york(DAY, "15:42"), speed=30.0)
    system.run_until(new_york(DAY, "16:01"), timeout=240)
    time.sleep(2.0)
    for name, process in system.daemons.items():
        assert process.terminate(timeout=30) == 0, name
    try:
        day = archive.day_of_ms(archive.server_ms(system.r))  # stream ids are wall-clock: today
        directory = tmp_path / "archive"
        result = system.qe("archive", day.isoformat(), "--directory", str(directory), "--json")
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)["days"][0]
        assert record["streams"]["ev.intents"]["rows"] == system.r.xlen("ev.intents") > 0
        shutil.rmtree(KEEP, ignore_errors=True)
        shutil.copytree(directory, KEEP)
        before = {key: system.r.type(key) for key in system.r.keys("*")}
        lengths = {s: system.r.xlen(s) for s in archive.ALL_STREAMS}

        # The day's own rules (archived with it).
        cli = system.qe("replay", day.isoformat(), "--directory", str(directory), "--universe",
                        str(REPO / "etc" / "universe.csv"), "--out", str(tmp_path / "same"), "--json")
        assert cli.returncode == 0, cli.stderr
        report = replay.replay_day(directory, day, universe_file=REPO / "etc" / "universe.csv")
        print(replay.render(report))
        again = replay.replay_day(directory, day, universe_file=REPO / "etc" / "universe.csv")
        # Deterministic: the same archive gives the same intents and modes, run after run.
        assert [i.compared() for i in again.run.intents] == [i.compared() for i in report.run.intents]
        assert json.loads(cli.stdout)["replayed_intents"] == len(report.run.intents)
        # Isolated: nothing written to the system's Redis.
        assert {key: system.r.type(key) for key in system.r.keys("*")} == before
        assert {s: system.r.xlen(s) for s in archive.ALL_STREAMS} == lengths
        summary = report.summary()
        (KEEP / "summary.json").write_text(json.dumps({"same_rules": summary, "divergence": report.divergence},
                                                      default=str, indent=2))
        assert summary["recorded_intents"] > 0 and summary["replayed_intents"] > 0
        assert summary["followed"] == "journal" and summary["missing"] == 0 and summary["loads"] >= 1
        assert "followed the Brain's decision journal" in replay.render(report)
        # Identical: every recorded intent, in order, equal on keys, sides, quantities,
        # prices and types; the same mode changes at the same clock times.
        assert report.identical, replay.render(report)
        assert summary["same_intents"] == summary["recorded_intents"] == summary["replayed_intents"]
        assert [(m.ts_ns, m.from_mode, m.to_mode) for m in report.run.modes] == \
            [(m.ts_ns, m.from_mode, m.to_mode) for m in report.recorded_modes]
        assert [i.ts_ns for i in report.run.intents] == [i.ts_ns for i in report.recorded_intents]

        # What-if: soft de-risk priced 3 cents from the truth tick instead of 1.
        rules = yaml.safe_load((directory / day.isoformat() / "risk_rules.yaml").read_text())
        rules["derisk"]["soft_price_offset"] = 0.03
        other = tmp_path / "whatif.yaml"
        other.write_text(yaml.safe_dump(rules))
        out = tmp_path / "whatif"
        whatif = system.qe("replay", day.isoformat(), "--directory", str(directory), "--rules", str(other),
                           "--universe", str(REPO / "etc" / "universe.csv"), "--out", str(out))
        assert whatif.returncode == 0, whatif.stderr
        print(whatif.stdout[:3000])
        document = json.loads((out / f"replay-{day}.json").read_text())
        assert document["summary"]["rules_file"] == str(other)
        assert document["added"] or document["removed"] or document["changed"]
        assert document["summary"]["replayed_intents"] != summary["replayed_intents"] or \
            json.loads((tmp_path / "same" / f"replay-{day}.json").read_text())["divergence"] != document["divergence"]
        with open(out / f"replay-{day}-modes.csv") as handle:
            modes = list(csv.DictReader(handle))
        assert {"base_mode", "other_mode"} <= set(modes[0])
        with open(out / f"replay-{day}-gross.csv") as handle:
            gross = list(csv.DictReader(handle))
        assert gross and {"published_gross_pct", "base_gross_pct", "other_gross_pct"} <= set(gross[0])
        assert all(abs(float(g["base_gross_pct"]) - float(g["published_gross_pct"])) < 1e-3 for g in gross)
        (KEEP / "summary.json").write_text(json.dumps({"same_rules": summary, "whatif": document["summary"],
                                                       "divergence": report.divergence}, default=str, indent=2))
    finally:
        system.sim.stop()
        system.redis_server.stop()
