"""Benchmark: `qe replay` of a recorded afternoon (SPEC 11).

Records a simulated afternoon with the real daemons and the IB simulator (the
repository's universe: 25 symbols; 15:42 to 16:01 at 30x, about a minute of wall
time), archives it with `qe archive`, then replays it through the Brain in-process
with the day's own rules: events/s, the speed-up over the recorded (simulated) time,
and how many replayed intents equal the recorded ones in order. `--archive DIR`
replays an existing archive instead of recording (e.g. /tmp/qe-replay-last, kept by
tests/test_replay_system.py).

Not measured: a 1,000-symbol afternoon. The simulator's account and the universe file
are 25 symbols; a 1,000-symbol recorded day needs a 1,000-symbol universe and account
for the simulator and several minutes of two cores for the recording.

    .venv/bin/python bench/replay.py [--archive DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qe import archive, replay  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def record(tmp: Path) -> Path:
    from tests.support.processes import REPO as _REPO  # noqa: F401 - the test support's paths
    from tests.support.system import System, new_york

    system = System(tmp, new_york("2026-11-20", "15:42"), speed=30.0)
    try:
        system.run_until(new_york("2026-11-20", "16:01"), timeout=240)
        time.sleep(2.0)
        for process in system.daemons.values():
            process.terminate(timeout=30)
        day = archive.day_of_ms(archive.server_ms(system.r))
        directory = tmp / "archive"
        result = system.qe("archive", day.isoformat(), "--directory", str(directory), "--json")
        if result.returncode != 0:
            raise SystemExit(f"qe archive failed: {result.stderr}")
        return directory
    finally:
        system.sim.stop()
        system.redis_server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", help="an archive directory to replay (default: record one now)")
    parser.add_argument("--repeat", type=int, default=3, help="replays timed (the best is reported)")
    args = parser.parse_args()
    logging.getLogger("qe.decision").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="qe-bench-replay-") as tmp:
        directory = Path(args.archive) if args.archive else record(Path(tmp))
        day = archive.parse_day(sorted(p.name for p in directory.iterdir() if p.is_dir())[-1])
        universe = directory / day.isoformat() / "universe.csv"
        best = None
        for _ in range(max(1, args.repeat)):
            report = replay.replay_day(directory, day, universe_file=universe if universe.exists() else REPO / "etc" / "universe.csv")
            if best is None or report.run.seconds < best.run.seconds:
                best = report
        assert best is not None
        s = best.summary()
        symbols = len({json.loads(r["payload"])["symbol"] for r in archive.read_day(directory, day, ["ev.l1"])})
        real_s = (best.run.last_ns - best.run.first_ns) / 1e9
        print(replay.render(best).splitlines()[0])
        print(f"symbols={symbols} recorded span={real_s:.0f} s (simulated clock), events={s['events']}")
        print(
            f"RESULT symbols={symbols} events={s['events']} events_per_s={s['events_per_s']} speedup={s['speedup']} "
            f"recorded_intents={s['recorded_intents']} replayed_intents={s['replayed_intents']} "
            f"identical_in_order={s['same_intents']} different={s['recorded_intents'] - s['same_intents']} "
            f"added={s['added']} removed={s['removed']} changed={s['changed']} identical={str(s['identical']).lower()}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
