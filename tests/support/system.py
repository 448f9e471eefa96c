"""The whole system as real subprocesses for system tests: the IB simulator (the
referee), session, market data, prints, exposure, decision and execution (and
alerts, on request) on one sped-up simulated clock, over a private Redis.

Every process serves its metrics on a free port (QE_METRICS_PORT=0, the
simulator's --metrics-port 0); `metrics_url` reads the bound one from its log."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from qe import clock as qe_clock
from sim.testing import start_process
from tests.support.processes import REPO, VENV_BIN, DaemonProcess, console_script, daemon_env, wait_until
from tests.support.redis_server import RedisServer

NEW_YORK = ZoneInfo("America/New_York")
DAEMONS = ("session", "market-data", "prints", "exposure", "decision", "execution")
SPEED = 30.0  # simulated seconds per wall second: half an hour in a minute


class System:
    def __init__(
        self,
        tmp_path: Path,
        start: datetime,
        sim_args: list[str] | None = None,
        speed: float = SPEED,
        daemons: tuple[str, ...] = DAEMONS,
        rules_update=None,
    ) -> None:
        self.tmp_path = tmp_path
        self.redis_server = RedisServer(tmp_path / "redis", fsync="everysec").start()
        self.r = self.redis_server.client()
        # Simulated time starts a few wall seconds from now, once every process is up.
        anchor = time.time() + 6.0
        self.clock_env = qe_clock.sim_env(start, speed, anchor_wall_s=anchor)
        self.clock = qe_clock.from_env(self.clock_env)
        rules = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
        rules["market_data"]["ibkr"]["max_tick_by_tick"] = 25  # the simulator allows it (see sim/demo.py)
        if rules_update is not None:
            rules_update(rules)  # a scenario's own settings (the parsed risk_rules.yaml, changed in place)
        self.rules_file = tmp_path / "risk_rules.yaml"
        self.rules_file.write_text(yaml.safe_dump(rules))
        # sim_args: e.g. ["--universe", ..., "--account-file", ...] (the daemons keep QE_UNIVERSE).
        self.sim = start_process(
            ["--quote-rate", "1.0", "--print-rate", "0.5", "--no-fill-on-prints", *(sim_args or [])], env=self.clock_env
        )
        env = daemon_env(self.redis_server.url, QE_IB_PORT=str(self.sim.port), QE_CONFIG=str(self.rules_file), **self.clock_env)
        self.daemons = {
            name: DaemonProcess(console_script(f"qe-{name}"), env, tmp_path / f"{name}.log").start() for name in daemons
        }
        self.env = env
        self.killed: set[str] = set()

    def sim_now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=NEW_YORK)

    def run_until(self, moment: datetime, timeout: float = 180.0) -> None:
        wait_until(lambda: self.clock.now_ns() >= qe_clock.to_ns(moment), timeout=timeout, interval=0.5,
                   message=f"simulated time {moment.isoformat()}")
        for name, process in self.daemons.items():
            assert process.alive(), f"{name} died:\n{process.output()[-3000:]}"

    def events(self, stream: str) -> list[dict]:
        return [json.loads(fields[b"event"]) for _id, fields in self.r.xrange(stream)]

    def payloads(self, stream: str) -> list[dict]:
        return [event["payload"] for event in self.events(stream)]

    def mode_changes(self) -> list[tuple[str, str, dict]]:
        return [(a["data"]["from"], a["data"]["to"], a["data"]) for a in self.payloads("ev.alerts") if a["alert_type"] == "mode_change"]

    def intents(self) -> list[dict]:
        return self.payloads("ev.intents")

    def last_exposure(self) -> dict:
        return self.payloads("ev.exposure")[-1]

    def qe(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "qe"), *args], env=self.env, capture_output=True, text=True, timeout=60)

    def metrics_url(self, name: str, timeout: float = 30.0) -> str:
        """The daemon's metrics endpoint, as it logged it once listening."""
        process = self.daemons[name]

        def logged() -> str | None:
            assert process.alive(), f"{name} died:\n{process.output()[-3000:]}"
            return next((line["metrics_url"] for line in process.log_lines() if line.get("msg") == "metrics endpoint up"), None)

        return str(wait_until(logged, timeout=timeout, message=f"{name}'s metrics endpoint"))

    def kill(self, name: str) -> None:
        """SIGKILL one daemon (it is left out of stop()'s clean-exit check)."""
        self.daemons[name].kill()
        self.killed.add(name)

    def stop(self) -> None:
        codes = {name: process.terminate(timeout=30) for name, process in self.daemons.items() if name not in self.killed}
        self.sim.stop()
        self.redis_server.stop()
        assert codes == {name: 0 for name in codes}, codes


def new_york(day: str, hhmm: str) -> datetime:
    hour, minute = (int(part) for part in hhmm.split(":"))
    year, month, date_ = (int(part) for part in day.split("-"))
    return datetime(year, month, date_, hour, minute, tzinfo=NEW_YORK)
