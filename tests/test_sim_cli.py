"""The `qe-ib-sim` command: real subprocess, JSON logs, simulated clock, SIGTERM exits 0."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from ib_async import IB, MarketOrder, Stock

from qe.clock import sim_env

try:
    from conftest_sim import sim_process, wait_until  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.conftest_sim import sim_process, wait_until  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_cli_serves_clients_on_the_shared_clock_and_stops_on_sigterm(sim_process):
    start = datetime(2026, 11, 20, 15, 35, tzinfo=timezone.utc)
    running = sim_process(["--seed", "7", "--quote-rate", "5"], env=sim_env(start, speed=1.0))
    ib = IB()
    try:
        ib.connect("127.0.0.1", running.port, clientId=21, timeout=5)
        assert abs((ib.reqCurrentTime() - start).total_seconds()) < 30  # simulated, not wall, time
        contract = Stock("PFF", "SMART", "USD")
        ib.qualifyContracts(contract)
        trade = ib.placeOrder(contract, MarketOrder("BUY", 100, orderRef="cli-1"))
        wait_until(ib, lambda: trade.orderStatus.status == "Filled")
        assert trade.fills[0].execution.time.date() == start.date()
        state = running.control.state()
        assert state["account"]["account_id"] == "DU7654321" and state["executions"] == 1
    finally:
        ib.disconnect()
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(10) == 0
    running.stop()  # joins the output reader
    lines = [line for line in running.output if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {e["daemon"] for e in entries} == {"ib-sim"}
    assert any(e["msg"] == "signal received, stopping" for e in entries)


def test_console_script_is_installed():
    script = shutil.which("qe-ib-sim") or str(Path(sys.executable).parent / "qe-ib-sim")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--control-port" in result.stdout


def test_bad_account_file_exits_78_with_the_reason(tmp_path):
    bad = tmp_path / "account.yaml"
    bad.write_text("account: DU1234567\nequity: 1000\npositions:\n  - {symbol: AGNCO, qty: 100, avg_cost: 24, bucket: LT}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sim", "--port", "0", "--control-port", "0", "--account-file", str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 78
    assert "bucket_hint" in result.stderr and "positions[1]" in result.stderr
