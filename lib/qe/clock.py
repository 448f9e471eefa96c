"""The one notion of "now" shared by every process.

Wall clock by default. For the demo and for tests every process can run on the
same simulated clock: the environment names a simulated start time, the wall
epoch at which the simulation was at that start, and a speed. Because all three
come from the environment (set once by whoever launches the processes), every
daemon computes the same simulated "now" without talking to the others.

    QE_CLOCK_START   ISO-8601 time with offset, e.g. 2026-11-20T15:35:00-05:00
    QE_CLOCK_ANCHOR  wall epoch seconds (float) at which simulated time == START
                     (default: the moment the process reads it; set it explicitly
                     whenever more than one process must agree)
    QE_CLOCK_SPEED   simulated seconds per wall second (default 1.0)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

NS_PER_S = 1_000_000_000
NEW_YORK = ZoneInfo("America/New_York")  # the exchange's time zone: trading days, sessions, IB times


class Clock:
    """Wall clock. Subclasses change the mapping from wall time to "now"."""

    speed: float = 1.0

    def now_ns(self) -> int:
        return time.time_ns()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ns() / NS_PER_S, tz=timezone.utc)

    def wall_seconds(self, sim_seconds: float) -> float:
        """How long a wall-clock wait lasts for `sim_seconds` of this clock."""
        return sim_seconds / self.speed

    def sleep(self, sim_seconds: float) -> None:
        if sim_seconds > 0:
            time.sleep(self.wall_seconds(sim_seconds))

    def describe(self) -> str:
        return "wall"


@dataclass(frozen=True)
class SimClock(Clock):
    start_ns: int
    anchor_wall_ns: int
    speed: float = 1.0

    def now_ns(self) -> int:
        elapsed_wall_ns = time.time_ns() - self.anchor_wall_ns
        return self.start_ns + int(elapsed_wall_ns * self.speed)

    def describe(self) -> str:
        start = datetime.fromtimestamp(self.start_ns / NS_PER_S, tz=timezone.utc)
        return f"sim start={start.isoformat()} speed={self.speed}"


class ClockConfigError(ValueError):
    pass


def parse_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ClockConfigError(f"QE_CLOCK_START must carry a UTC offset, got {text!r}")
    return moment


def to_ns(moment: datetime) -> int:
    # Integer arithmetic avoids float rounding of nanoseconds.
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1_000


def from_env(environ: dict[str, str] | None = None) -> Clock:
    env = os.environ if environ is None else environ
    start_text = env.get("QE_CLOCK_START", "").strip()
    if not start_text:
        return Clock()
    try:
        start_ns = to_ns(parse_iso(start_text))
    except ValueError as exc:
        raise ClockConfigError(f"QE_CLOCK_START: {exc}") from exc
    try:
        anchor_text = env.get("QE_CLOCK_ANCHOR", "").strip()
        anchor_ns = int(float(anchor_text) * NS_PER_S) if anchor_text else time.time_ns()
        speed = float(env.get("QE_CLOCK_SPEED", "1") or "1")
    except (ValueError, OverflowError) as exc:  # OverflowError: an anchor of inf
        raise ClockConfigError(f"QE_CLOCK_ANCHOR/QE_CLOCK_SPEED: {exc}") from exc
    if not math.isfinite(speed) or speed <= 0:
        raise ClockConfigError(f"QE_CLOCK_SPEED must be a finite number > 0, got {speed}")
    return SimClock(start_ns=start_ns, anchor_wall_ns=anchor_ns, speed=speed)


def sim_env(start: datetime, speed: float = 1.0, anchor_wall_s: float | None = None) -> dict[str, str]:
    """Environment that puts child processes on one shared simulated clock."""
    return {
        "QE_CLOCK_START": start.isoformat(),
        "QE_CLOCK_ANCHOR": repr(time.time() if anchor_wall_s is None else anchor_wall_s),
        "QE_CLOCK_SPEED": repr(float(speed)),
    }
