"""Reconciliation with the broker's P&L end to end: the real execution daemon subscribes to
the simulator's reqPnL / reqPnLSingle through ib_async and publishes ev.broker_pnl; the real
qe-pnl compares each symbol. Real fills agree (no alert); a fill qe-pnl never saw (its
ev.orders entries deleted while qe-pnl was stopped) raises exactly one pnl_mismatch alert
naming the symbol, resolved once the fill is read after all."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from qe.clock import NEW_YORK
from tests.support.processes import DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.support.raw_streams import append, copy
from tests.test_execution_daemon import SYMBOL, Execution, sim  # noqa: F401 - the simulator fixture
from tests.test_pnl_daemon import pnl_state, publish_session

GRACE_S = 3


def mismatch_alerts(r) -> list[dict]:
    alerts = [json.loads(f[b"event"])["payload"] for _i, f in r.xrange("ev.alerts")]
    return [a for a in alerts if a["alert_type"] == "pnl_mismatch"]


def reconciliation(r, symbol=SYMBOL):
    figures = pnl_state(r)
    line = figures.symbols.get(symbol) if figures else None
    return line.reconciliation if line is not None else None


@pytest.mark.long  # make test-long: make test stays under 15 min (covered there: test_pnl_reconcile.py, test_pnl_daemon.py)
@pytest.mark.slow
def test_real_fills_agree_with_the_broker_and_a_missed_fill_raises_one_alert(redis_url, r, sim, tmp_path):
    execution = Execution(redis_url, r, sim, tmp_path).start()
    rules_file = write_rules(tmp_path, pnl={"publish_interval_s": 1, "reconcile_grace_s": GRACE_S})
    env = daemon_env(redis_url, QE_CONFIG=str(rules_file), QE_CONSUMER_NAME="pnl-1")
    pnl = DaemonProcess(console_script("qe-pnl"), env, tmp_path / "pnl.log")
    try:
        execution.wait_connected()
        execution.brain_mode("NORMAL")
        now = datetime.now(timezone.utc)
        publish_session(r, now=now, day=now.astimezone(NEW_YORK).date().isoformat(), market_open=True,
                        open_utc=now - timedelta(hours=1))
        pnl.start()
        execution.price_the_book()
        execution.market(24.80, 24.82)
        # Execution subscribed reqPnL and a reqPnLSingle per held symbol: the broker's figures arrive.
        held = {p["symbol"] for p in sim.control.state()["positions"] if p["qty"]}
        wait_until(lambda: held <= {json.loads(f[b"event"])["payload"]["symbol"] for _i, f in r.xrange("ev.broker_pnl")},
                   timeout=30, message="reqPnLSingle of every held symbol")
        execution.intent("intent:recon:sell", side="SELL", qty=200, limit_price=24.80, classification="LT_LONG_DEC")
        execution.wait_status("intent:recon:sell", "FILLED")
        execution.intent("intent:recon:buy", side="BUY", qty=100, limit_price=24.82, classification="LT_LONG_INC",
                         intent_type="LT_BAND", risk_delta_gross_pct=0.2)
        execution.wait_status("intent:recon:buy", "FILLED")

        def agreed():
            judged = reconciliation(r)
            return judged if judged is not None and judged.status == "ok" and judged.broker_position == 3100 \
                and pnl_state(r).symbols[SYMBOL].fills == 2 else None

        judged = wait_until(agreed, timeout=30, message=f"CIM PRB reconciled: {reconciliation(r)}")
        assert judged.position_diff == 0 and abs(judged.realized_diff) <= judged.realized_tolerance
        assert judged.broker_realized is not None and judged.broker_realized != 0.0  # the sale realized something
        time.sleep(GRACE_S + 2.5)  # beyond the grace: any lasting difference would have raised by now
        figures = pnl_state(r)
        statuses = {s: line.reconciliation.status for s, line in figures.symbols.items() if line.reconciliation}
        assert set(statuses) >= held and set(statuses.values()) == {"ok"}, statuses
        assert mismatch_alerts(r) == [] and figures.mismatched == []
        assert figures.broker_account is not None and figures.broker_account.daily is not None

        # A fill qe-pnl never sees: stopped while it happens, its entries deleted from qe-pnl's copy of ev.orders.
        assert pnl.terminate() == 0
        execution.intent("intent:recon:hidden", side="SELL", qty=200, limit_price=24.80, classification="LT_LONG_DEC")
        execution.wait_status("intent:recon:hidden", "FILLED")
        hidden_ref = execution.orders("intent:recon:hidden")[0]["order_ref"]
        pnl_orders = copy("ev.orders", "pnl")
        hidden = [(i, f) for i, f in r.xrange(pnl_orders)
                  if json.loads(f[b"event"])["payload"]["order_ref"] == hidden_ref
                  and json.loads(f[b"event"])["payload"]["last_fill"] is not None]
        assert hidden
        r.xdel(pnl_orders, *[i for i, _f in hidden])
        pnl.start()
        raised = wait_until(lambda: mismatch_alerts(r) or None, timeout=30, message="pnl_mismatch raised")
        time.sleep(GRACE_S + 2.5)  # it stays raised, and is not raised again
        alerts = mismatch_alerts(r)
        assert [(a["symbol"], a["state"]) for a in alerts] == [(SYMBOL, "raised")], alerts
        assert "position 3100 here, 2900 at the broker" in raised[0]["message"]
        figures = pnl_state(r)
        assert figures.mismatched == [SYMBOL]
        judged = figures.symbols[SYMBOL].reconciliation
        assert (judged.status, judged.alerted, judged.position_diff) == ("mismatch", True, 200)
        others = [s for s, line in figures.symbols.items() if line.reconciliation and line.reconciliation.status == "mismatch"]
        assert others == [SYMBOL]

        # The fill is read after all: the figures agree again and the alert is resolved, once.
        for _i, fields in hidden:
            append(r, "ev.orders", {k.decode(): v for k, v in fields.items()}, group="pnl")
        wait_until(lambda: [a["state"] for a in mismatch_alerts(r)] == ["raised", "resolved"], timeout=30,
                   message=f"pnl_mismatch resolved: {mismatch_alerts(r)}")
        wait_until(lambda: pnl_state(r).mismatched == [], timeout=10, message="state:pnl without mismatch")
    finally:
        if pnl.alive():
            assert pnl.terminate() == 0, pnl.output()[-3000:]
        if execution.process.alive():
            assert execution.process.terminate() == 0
