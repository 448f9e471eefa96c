"""etc/supervisord.conf for real: every program RUNNING, a SIGKILLed daemon restarted
and its work resumed, exit code 78 final, everything stopped cleanly."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from qe import acl, config
from tests.support.processes import REPO, VENV_BIN, wait_until
from tests.support.redis_server import free_port, redis_server_binary

CONF = REPO / "etc" / "supervisord.conf"


def programs_in(conf: Path) -> dict[str, str]:
    """program name -> its group, from the config file."""
    parser = configparser.RawConfigParser()
    parser.read(conf)
    groups = {}
    for section in parser.sections():
        if section.startswith("group:"):
            for program in parser.get(section, "programs").split(","):
                groups[program.strip()] = section.split(":", 1)[1]
    return groups


class Supervisor:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.conf = root / "etc" / "supervisord.conf"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(self.conf), *args], env=self.env, capture_output=True, text=True, timeout=60)

    def status(self) -> dict[str, tuple[str, str]]:
        rows = {}
        for line in self.ctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                rows[parts[0]] = (parts[1], line)
        return rows

    def pid(self, name: str) -> int:
        return int(self.ctl("pid", name).stdout.strip())


@pytest.fixture
def supervisor(tmp_path: Path):
    """The shipped config in a scratch root: etc/ (config + symlinked data files), run/, .venv."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "run" / "log").mkdir(parents=True)
    (root / "run" / "redis").mkdir(parents=True)
    (root / ".venv").symlink_to(VENV_BIN.parent)
    for item in (REPO / "etc").iterdir():
        if item.name != "supervisord.conf":
            (root / "etc" / item.name).symlink_to(item)
    (root / "etc" / "supervisord.conf").write_text(CONF.read_text())
    redis_port = free_port()
    acl_file = acl.write_acl_file(root / "run" / "redis" / "users.acl", root / "run" / "secrets")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    env.update(
        QE_HOME=str(REPO),
        QE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        QE_DEMO_PRIVATE_REDIS="true",
        QE_DEMO_REDIS_PORT=str(redis_port),
        QE_DEMO_REDIS_SERVER=redis_server_binary(),
        QE_DEMO_ACL_FILE=str(acl_file),
        QE_REDIS_SECRETS_DIR=str(root / "run" / "secrets"),  # every daemon as its own ACL user
        QE_IB_PORT=str(free_port()),
        QE_SIM_CONTROL_PORT=str(free_port()),
        QE_METRICS_PORT="0",  # every daemon on a free port: tests run beside a demo
        QE_CLOCK_START="2026-11-20T15:40:00-05:00",
        QE_CLOCK_ANCHOR=repr(time.time()),
        QE_CLOCK_SPEED="5",
    )
    sup = Supervisor(root, env)
    subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(sup.conf)], env=env, check=True, timeout=30)
    try:
        # The administrative step of every install: the runtime's function library, as
        # qe-admin (daemons may only FCALL it; those up first back off until it is there).
        loaded = subprocess.run([str(VENV_BIN / "python"), "-m", "qe.admin", "load-functions", "--wait", "30"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        yield sup
    finally:
        sup.ctl("shutdown")
        pid_file = root / "run" / "supervisord.pid"
        deadline = time.monotonic() + 60
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def test_every_program_runs_a_killed_daemon_is_restarted_and_all_stop_cleanly(supervisor):
    expected = programs_in(supervisor.conf)
    assert {"redis", "ib-sim", "session", "exposure", "execution"} <= set(expected)
    names = [f"{group}:{program}" for program, group in expected.items()]

    def all_running() -> bool:
        status = supervisor.status()
        return all(status.get(name, ("",))[0] == "RUNNING" for name in names)

    wait_until(all_running, timeout=120, interval=0.5, message=f"all RUNNING: {supervisor.status()}")
    settings = config.load_settings({k: v for k, v in supervisor.env.items() if k.startswith("QE_")})
    username, password = settings.redis_credentials("cli")
    r = redis.Redis.from_url(supervisor.env["QE_REDIS_URL"], username=username, password=password)
    wait_until(lambda: r.hget("state:broker", "connected") == b"true", timeout=30, message="execution connected to the simulator")
    wait_until(lambda: r.xlen("ev.session") > 3, timeout=30, message="session publishing")

    # SIGKILL a daemon: supervisord restarts it and its work resumes.
    old_pid = supervisor.pid("qe:session")
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: supervisor.status()["qe:session"][0] == "RUNNING" and supervisor.pid("qe:session") != old_pid,
               timeout=30, interval=0.3, message="session restarted")
    published = r.xlen("ev.session")
    wait_until(lambda: r.xlen("ev.session") > published + 2, timeout=30, message="session publishing again")

    # `supervisorctl stop/start qe:*` work on the group.
    stopped = supervisor.ctl("stop", "qe:*")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = supervisor.status()
    assert all(status[f"qe:{p}"][0] == "STOPPED" for p, g in expected.items() if g == "qe")
    assert all(status[f"demo:{p}"][0] == "RUNNING" for p, g in expected.items() if g == "demo")
    started = supervisor.ctl("start", "qe:*")
    assert started.returncode == 0, started.stdout + started.stderr
    wait_until(all_running, timeout=120, interval=0.5, message="all RUNNING again")

    # Least privilege held: no daemon was refused anything it needs (a refusal reads
    # "NOPERM ..." inside a function, "NoPermissionError: ... no permissions" otherwise).
    for program, group in expected.items():
        if group == "qe":
            text = (supervisor.root / "run" / "log" / f"{program}.log").read_text()
            for mark in ("NOPERM", "NoPermissionError", "no permissions", "can't access"):
                assert mark not in text, (program, mark)

    # Clean stop: every daemon exits 0 on SIGTERM (supervisord logs "stopped: ... (exit status 0)").
    assert supervisor.ctl("stop", "all").returncode == 0
    log = (supervisor.root / "run" / "log" / "supervisord.log").read_text()
    for program, group in expected.items():
        if group == "qe":
            assert f"stopped: {program} (exit status 0)" in log, f"{program} did not exit 0 on SIGTERM"


def test_exit_78_is_final_not_a_restart_loop(supervisor, tmp_path):
    bad = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    bad["runtime"]["batch_size"] = 0
    bad_file = tmp_path / "bad_rules.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    supervisor.ctl("stop", "qe:*")
    # Restart supervisord's children with the broken config: each daemon exits 78 at start.
    supervisor.ctl("shutdown")
    pid_file = supervisor.root / "run" / "supervisord.pid"
    wait_until(lambda: not pid_file.exists(), timeout=60, message="supervisord down")
    supervisor.env["QE_CONFIG"] = str(bad_file)
    log_file = supervisor.root / "run" / "log" / "supervisord.log"
    before = len(log_file.read_text())
    subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(supervisor.conf)], env=supervisor.env, check=True, timeout=30)
    daemons = [program for program, group in programs_in(supervisor.conf).items() if group == "qe"]
    # Final either way: FATAL when it exits within startsecs, EXITED (78 is an expected
    # exit code) when a slow start takes longer. Never restarted.
    final = {"FATAL", "EXITED"}
    wait_until(lambda: all(supervisor.status().get(f"qe:{d}", ("",))[0] in final for d in daemons), timeout=90, interval=0.5,
               message=f"final states: {supervisor.status()}")
    time.sleep(3)
    log = log_file.read_text()[before:]
    for daemon in daemons:
        assert log.count(f"spawned: '{daemon}'") == 1, f"{daemon}: a daemon that exits 78 must not be restarted"
        assert supervisor.status()[f"qe:{daemon}"][0] in final
    session_log = (supervisor.root / "run" / "log" / "session.log").read_text()
    assert "runtime.batch_size: Input should be greater than or equal to 1 (got 0)" in session_log
