"""Daemons as real subprocesses: start, SIGKILL, SIGTERM, restart, read their logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def write_rules(directory: Path, **overrides: dict) -> Path:
    """A copy of etc/risk_rules.yaml with sections overridden (shallow merge per section)."""
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(document.get(section), dict):
            document[section] = {**document[section], **values}
        else:
            document[section] = values
    path = Path(directory) / "risk_rules.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def daemon_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    env.update(
        {
            "QE_HOME": str(REPO),
            "QE_REDIS_URL": redis_url,
            "QE_METRICS_PORT": "0",
            "QE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class DaemonProcess:
    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "DaemonProcess":
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        log_file.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            self.process.wait(timeout=10)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def restart(self) -> "DaemonProcess":
        self.kill()
        return self.start()

    def log_lines(self) -> list[dict]:
        lines = []
        if self.log_path.exists():
            for raw in self.log_path.read_text(errors="replace").splitlines():
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    lines.append({"raw": raw})
        return lines

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.05, message: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def console_script(name: str) -> list[str]:
    return [str(VENV_BIN / name)]
