"""Helpers to run the simulator from tests, benchmarks and demos.

* ``start_in_thread(...)``: in-process simulator on free ports (fast; tests).
* ``start_process(...)``: the real CLI (``python -m sim``) as a subprocess.
* ``wait_until(ib, predicate)``: let an ib_async/ib_insync client run until a condition holds.

No pytest import here; fixtures live in tests/conftest_sim.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import SimConfig
from .control import SimControl
from .server import SimThread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_UNIVERSE = ROOT / "etc" / "universe.csv"
DEFAULT_ACCOUNT = ROOT / "etc" / "sim_account.yaml"


def sim_test_config(**overrides: Any) -> SimConfig:
    """A config for tests: free ports, the repo's universe and demo account, lively market."""
    settings: dict[str, Any] = dict(
        universe_path=str(DEFAULT_UNIVERSE),
        account_path=str(DEFAULT_ACCOUNT),
        port=0,
        control_port=0,
        quote_rate=4.0,
        print_rate=2.0,
        tick_interval_s=0.02,
        account_update_s=1.0,
    )
    settings.update(overrides)
    return SimConfig(**settings)


@dataclass
class RunningSim:
    """Handle on a simulator started by this module (thread or process)."""

    port: int
    control_port: int
    metrics_port: int | None = None  # the Prometheus endpoint (processes started here serve one)
    thread: SimThread | None = None
    process: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def control(self) -> SimControl:
        return SimControl(self.control_url)

    @property
    def server(self):
        """The SimServer object (in-process only; touch it via ``call`` from other threads)."""
        assert self.thread is not None, "only for in-process simulators"
        return self.thread.server

    def call(self, fn: Callable[[], Any]) -> Any:
        assert self.thread is not None, "only for in-process simulators"
        return self.thread.call(fn)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.thread is not None:
            self.thread.stop(timeout)
            return None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.reader is not None:
            self.reader.join(timeout)  # ends at EOF, once the child has exited
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def start_in_thread(config: SimConfig | None = None, clock=None, **overrides: Any) -> RunningSim:
    config = config or sim_test_config(**overrides)
    thread = SimThread(config, clock).start()
    return RunningSim(port=thread.port, control_port=thread.control_port, thread=thread)


def start_process(
    args: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 20.0, cwd: Path | None = None
) -> RunningSim:
    """Run ``python -m sim`` with ``args`` (ports default to 0); wait for its "listening" log line."""
    args = list(args or [])
    if "--port" not in args:
        args += ["--port", "0"]
    if "--control-port" not in args:
        args += ["--control-port", "0"]
    if "--metrics-port" not in args:
        args += ["--metrics-port", "0"]
    if "--universe" not in args:
        args += ["--universe", str(DEFAULT_UNIVERSE)]
    if "--account-file" not in args:
        args += ["--account-file", str(DEFAULT_ACCOUNT)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", *args],
        cwd=str(cwd or ROOT),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("msg") == "listening":
            reader = threading.Thread(target=_drain, args=(proc.stdout, output), daemon=True)
            reader.start()
            metrics_port = int(entry["metrics_port"]) if entry.get("metrics_port") is not None else None
            return RunningSim(int(entry["port"]), int(entry["control_port"]), metrics_port, process=proc, output=output,
                              reader=reader)
    proc.kill()
    proc.wait(5)
    proc.stdout.close()
    raise RuntimeError("simulator process did not start:\n" + "".join(output))


def _drain(stream, output: list[str]) -> None:
    """Keep a child's pipe empty (it would block on a full pipe); remember what it said."""
    for line in stream:
        output.append(line)


def wait_until(ib: Any, predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    """Run the client's event loop until ``predicate()`` is truthy; return its value or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        try:
            ib.sleep(step)
        except ConnectionError:
            # ib_async aborts a running sleep when the socket drops; the predicate decides.
            pass
