"""`qe status` tells the truth about real daemon processes: a cleanly stopped daemon
is `stopped` at once, a SIGKILLed one `down` within seconds, and the exit code is
non-zero unless every expected daemon is healthy."""

from __future__ import annotations

import json
import subprocess
import time

from qe import liveness
from tests.support.processes import VENV_BIN, DaemonProcess, console_script, daemon_env, wait_until

QE = str(VENV_BIN / "qe")


def qe(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QE, *args], env=daemon_env(redis_url), capture_output=True, text=True, timeout=60)


def status(redis_url: str, *args: str) -> tuple[int, dict]:
    result = qe(redis_url, "status", "--json", *args)
    return result.returncode, json.loads(result.stdout)


def health(document: dict) -> dict[str, str]:
    return {row["daemon"]: row["health"] for row in document["daemons"]}


def start_session(redis_url: str, tmp_path, name: str = "session.log") -> DaemonProcess:
    return DaemonProcess(console_script("qe-session"), daemon_env(redis_url), tmp_path / name).start()


def test_nothing_running_is_not_healthy(redis_url):
    code, document = status(redis_url)
    assert code == 1
    assert document["ok"] is False and document["healthy"] is False
    assert health(document) == {name: "absent" for name in liveness.EXPECTED_DAEMONS}
    human = qe(redis_url, "status")
    assert human.returncode == 1
    assert f"0/{len(liveness.EXPECTED_DAEMONS)} expected daemons ok" in human.stdout and "qe status: not healthy: session absent" in human.stderr


def test_a_cleanly_stopped_daemon_is_stopped_at_once(redis_url, tmp_path):
    session = start_session(redis_url, tmp_path)
    try:
        wait_until(lambda: status(redis_url, "--daemons", "session")[0] == 0, timeout=30, message="session ok")
        code, document = status(redis_url, "--daemons", "session")
        row = document["daemons"][0]
        assert row["health"] == "ok" and row["pid"] == session.pid
        assert isinstance(row["heartbeat_age_s"], float) and row["heartbeat_age_s"] < liveness.EXPIRY_S
        # The other six are expected too by default: not healthy.
        assert status(redis_url)[0] == 1
    finally:
        assert session.terminate() == 0
    code, document = status(redis_url, "--daemons", "session")  # right after exit: no waiting
    assert code == 1 and health(document) == {"session": "stopped"}
    assert document["unhealthy"] == ["session stopped"]


def test_a_killed_daemon_is_down_within_seconds(redis_url, tmp_path):
    session = start_session(redis_url, tmp_path)
    wait_until(lambda: status(redis_url, "--daemons", "session")[0] == 0, timeout=30, message="session ok")
    session.kill()  # SIGKILL: no stopped marker
    killed_at = time.monotonic()
    wait_until(lambda: health(status(redis_url, "--daemons", "session")[1]) == {"session": "down"}, timeout=10,
               interval=0.2, message="session down")
    assert time.monotonic() - killed_at < liveness.EXPIRY_S + 3
    code, document = status(redis_url, "--daemons", "session")
    assert code == 1 and "not running on this host" in document["daemons"][0]["reason"]


def test_a_restarted_daemon_is_ok_again(redis_url, tmp_path):
    first = start_session(redis_url, tmp_path, "first.log")
    wait_until(lambda: status(redis_url, "--daemons", "session")[0] == 0, timeout=30, message="session ok")
    assert first.terminate() == 0
    assert health(status(redis_url, "--daemons", "session")[1]) == {"session": "stopped"}
    second = start_session(redis_url, tmp_path, "second.log")
    try:
        wait_until(lambda: status(redis_url, "--daemons", "session")[0] == 0, timeout=30, message="session ok again")
        assert status(redis_url, "--daemons", "session")[1]["daemons"][0]["pid"] == second.pid
    finally:
        assert second.terminate() == 0


# --- the verdict itself (pure) ---------------------------------------------------------------------

NOW = 1_800_000_000 * liveness.NS


def beat(age_s: float, **fields) -> dict:
    record = liveness.beat_fields(NOW - int(age_s * liveness.NS), NOW - 60 * liveness.NS, 4242, "h")
    record["ts_ns"] = NOW - int(age_s * liveness.NS)
    return {**record, **fields}


def test_verdicts():
    alive = lambda _pid: True  # noqa: E731
    assert liveness.verdict(None, NOW, 30).health == "absent"
    assert liveness.verdict(beat(0.5), NOW, 30, alive).health == "ok"
    assert liveness.verdict(beat(0.5), NOW, 30, lambda _pid: None).health == "ok"  # another host: cannot tell
    assert liveness.verdict(beat(0.5), NOW, 30, lambda _pid: False).health == "down"
    assert liveness.verdict(beat(liveness.EXPIRY_S + 0.1), NOW, 30, alive).health == "down"
    assert liveness.verdict({**beat(0.5), **liveness.stopped_fields(NOW)}, NOW, 30, alive).health == "stopped"
    assert liveness.verdict(beat(0.5, ts_ns=NOW - 40 * liveness.NS), NOW, 30, alive).health == "stale"
    assert liveness.verdict({"ts_ns": NOW, "pid": 1}, NOW, 30, alive).health == "down"  # no liveness beat at all
