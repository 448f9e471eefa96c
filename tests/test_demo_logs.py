"""`make run` keeps the previous runs' logs: run/log -> run/log.1 -> ... (bounded)."""

from __future__ import annotations

from sim.demo import rotate_logs


def run_once(run, text: str) -> None:
    (run / "log").mkdir(parents=True, exist_ok=True)
    (run / "log" / "session.log").write_text(text)


def test_previous_runs_logs_are_rotated_and_bounded(tmp_path):
    assert rotate_logs(tmp_path, keep=3) is None  # nothing yet
    for n in range(1, 6):
        run_once(tmp_path, f"run {n}\n")
        rotated = rotate_logs(tmp_path, keep=3)
        assert rotated == tmp_path / "log.1" and not (tmp_path / "log").exists()
    kept = {p.name: (p / "session.log").read_text() for p in sorted(tmp_path.glob("log.*"))}
    assert kept == {"log.1": "run 5\n", "log.2": "run 4\n", "log.3": "run 3\n"}


def test_an_empty_log_directory_is_not_rotated(tmp_path):
    (tmp_path / "log").mkdir()
    assert rotate_logs(tmp_path, keep=3) is None and (tmp_path / "log").is_dir()
