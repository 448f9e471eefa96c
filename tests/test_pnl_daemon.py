"""qe-pnl as a real subprocess over a real Redis, with the real execution daemon and
the IB simulator producing the fills (through the real ib_async client). The trading
day comes from session events the test publishes (as qe-session does)."""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from qe import state, streams
from qe.clock import NEW_YORK
from qe.contracts import Session, make_event
from tests.support.processes import DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.test_execution_daemon import RULES, SYMBOL, Execution, sim  # noqa: F401 - the simulator fixture

REF_PRICE = 24.85  # CIM PRB's reference price in etc/universe.csv: its previous close here
START_QTY = 3200  # the demo account's CIM PRB


def session_event(now: datetime, day: str, market_open: bool, open_utc: datetime) -> Session:
    return Session(now_ns=int(now.timestamp() * 1e9), now_utc=now.isoformat(), now_ny=now.astimezone(NEW_YORK).isoformat(),
                   trading_day=day, market_open=market_open, regime="MID" if market_open else "CLOSED",
                   minutes_to_close=60.0 if market_open else None, soft_derisk_active=False, hard_derisk_active=False,
                   early_close=False, open_utc=open_utc.isoformat(), close_utc=(open_utc + timedelta(hours=6, minutes=30)).isoformat())


def publish_session(r, **kwargs) -> None:
    event = make_event(session_event(**kwargs), idempotency_key=f"test:session:{time.time_ns()}", source="test", ts_ns=time.time_ns())
    streams.Publisher(r, RULES).publish("ev.session", event)


def metric(url: str, name: str, labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    line = next(line for line in text.splitlines() if line.startswith(f"{name}{{{labels}}}"))
    return float(line.rsplit(" ", 1)[1])


def metrics_url(process: DaemonProcess) -> str:
    return wait_until(lambda: next((line["metrics_url"] for line in process.log_lines() if line.get("msg") == "metrics endpoint up"), None),
                      timeout=30, message="pnl metrics endpoint")


def pnl_state(r):
    reading = state.read_pnl(r)
    return reading.value.payload if reading.ok else None


@pytest.mark.slow
def test_pnl_of_real_fills_reconciles_with_the_simulator_and_survives_a_restart(redis_url, r, sim, tmp_path):
    execution = Execution(redis_url, r, sim, tmp_path).start()
    rules_file = write_rules(tmp_path, report={"directory": str(tmp_path / "reports"), "keep_days": 5, "after_close": True},
                             pnl={"publish_interval_s": 1})
    env = daemon_env(redis_url, QE_CONFIG=str(rules_file), QE_CONSUMER_NAME="pnl-1")
    pnl = DaemonProcess(console_script("qe-pnl"), env, tmp_path / "pnl.log")
    try:
        execution.wait_connected()
        execution.brain_mode("NORMAL")  # the buy adds to the long: allowed in NORMAL only
        now = datetime.now(timezone.utc)
        day = now.astimezone(NEW_YORK).date().isoformat()
        opened = now - timedelta(hours=1)
        publish_session(r, now=now, day=day, market_open=True, open_utc=opened)
        pnl.start()
        url = metrics_url(pnl)
        wait_until(lambda: pnl_state(r) is not None and SYMBOL in pnl_state(r).symbols, timeout=30, message="first P&L")
        execution.price_the_book()  # truth ticks for every held symbol (no increase while one is unpriced)
        execution.market(24.80, 24.82)
        execution.intent("intent:pnl:sell", side="SELL", qty=200, limit_price=24.80, classification="LT_LONG_DEC")
        execution.wait_status("intent:pnl:sell", "FILLED")
        execution.intent("intent:pnl:buy", side="BUY", qty=100, limit_price=24.82, classification="LT_LONG_INC",
                         intent_type="LT_BAND", risk_delta_gross_pct=0.2)
        execution.wait_status("intent:pnl:buy", "FILLED")
        fills = sim.control.fills()
        assert len(fills) == 2, fills

        def settled():
            pnl_now = pnl_state(r)
            line = pnl_now.symbols.get(SYMBOL) if pnl_now else None
            return pnl_now if line is not None and line.fills == 2 and line.commissions_pending == 0 else None

        figures = wait_until(settled, timeout=30, message="both fills in the P&L")
        line = figures.symbols[SYMBOL]
        sold = next(f for f in fills if f["side"] in ("SLD", "SELL"))
        bought = next(f for f in fills if f["side"] in ("BOT", "BUY"))
        commissions = sold["commission"] + bought["commission"]
        # By hand: 3,200 carried from the previous close (the reference price); sell 200 realizes
        # (sold - close) x 200; 3,000 left at the close; buy 100 averages in.
        avg = (3000 * REF_PRICE + 100 * bought["price"]) / 3100
        assert (line.start_qty, line.qty, line.prev_close) == (START_QTY, 3100, REF_PRICE)
        assert line.realized == pytest.approx((sold["price"] - REF_PRICE) * 200, abs=1e-3)
        assert line.avg_price == pytest.approx(avg, abs=1e-6)
        assert line.mark_source == "l1_mid" and line.mark == pytest.approx(24.81)
        assert line.unrealized == pytest.approx((24.81 - avg) * 3100, abs=1e-2)
        assert line.commissions == pytest.approx(commissions, abs=1e-4)
        assert line.total == pytest.approx(line.realized + line.unrealized - commissions, abs=1e-3)
        # Every held symbol is priced (a truth tick, or CIM PRB's quote); a flagged one says why.
        assert SYMBOL not in figures.marks_stale
        assert all(l.mark_reason for l in figures.symbols.values() if l.mark_stale)
        assert figures.account.total == pytest.approx(sum(l.total for l in figures.symbols.values()), abs=0.01)
        assert figures.account.total == pytest.approx(sum(b.total for b in figures.buckets.values()), abs=0.01)
        # Metrics and `qe pnl` say the same.
        wait_until(lambda: metric(url, "qe_pnl_dollars", 'component="total",scope="account"') == pytest.approx(
            pnl_state(r).account.total, abs=0.01), timeout=10, message="metric = state")
        result = json.loads(_qe(env, "pnl", "--json").stdout)
        assert result["ok"] and result["symbols"][SYMBOL]["fills"] == 2
        assert result["total"]["total"] == pytest.approx(pnl_state(r).account.total, abs=0.01)

        # SIGKILL and restart: the same figures from Redis.
        before = pnl_state(r)
        pnl.kill()
        pnl.start()
        wait_until(lambda: "pnl state loaded" in [line.get("msg") for line in pnl.log_lines()][-50:], timeout=30,
                   message="reloaded")
        time.sleep(2.5)
        after = pnl_state(r)
        assert after.symbols[SYMBOL].realized == before.symbols[SYMBOL].realized
        assert after.symbols[SYMBOL].start_qty == START_QTY and after.account.fills == before.account.fills

        # The close: the day's final figures, its marks kept as the next previous closes.
        later = datetime.now(timezone.utc)
        next_day = (later.astimezone(NEW_YORK).date() + timedelta(days=1)).isoformat()
        publish_session(r, now=later, day=next_day, market_open=False, open_utc=later + timedelta(hours=12))
        wait_until(lambda: any(json.loads(f[b"event"])["payload"]["final"] for _i, f in r.xrange("ev.pnl")), timeout=20,
                   message="final P&L")
        final = [json.loads(f[b"event"])["payload"] for _i, f in r.xrange("ev.pnl")]
        final = [p for p in final if p["final"]][-1]
        assert final["trading_day"] == day and final["symbols"][SYMBOL]["fills"] == 2
        assert json.loads(r.hget("state:pnl:closes", SYMBOL)) == pytest.approx(24.81)
        # qe-pnl wrote the day's report after the close; `qe report DAY` writes it on demand.
        wait_until(lambda: (tmp_path / "reports" / day / "index.html").exists(), timeout=60, message="automatic report")
        made = _qe(env, "report", day, "--out", str(tmp_path / "on-demand"), "--json")
        assert json.loads(made.stdout)["ok"], made.stderr
        assert {p.name for p in (tmp_path / "on-demand").iterdir()} == {"index.html", "orders.csv", "fills.csv", "pnl_by_symbol.csv"}
        assert (tmp_path / "on-demand" / "fills.csv").read_text().count("\n") == 3  # header + two fills
        # The next day starts from that close, no fills yet.
        wait_until(lambda: pnl_state(r).trading_day == next_day, timeout=20, message="next day")
        carried = pnl_state(r).symbols[SYMBOL]
        assert (carried.start_qty, carried.prev_close, carried.prev_close_source, carried.fills) == (3100, 24.81, "close", 0)
    finally:
        if pnl.alive():
            assert pnl.terminate() == 0, pnl.output()[-3000:]
        if execution.process.alive():
            assert execution.process.terminate() == 0


def _qe(env, *args):
    import subprocess

    from tests.support.processes import VENV_BIN

    return subprocess.run([str(VENV_BIN / "qe"), *args], env=env, capture_output=True, text=True, timeout=60)
