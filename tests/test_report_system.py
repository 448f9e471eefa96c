"""The end-of-day report of a simulated afternoon (the whole system and qe-pnl, the IB
simulator as referee), written by qe-pnl after the close, opened in a real headless
Chromium with the network cut off: no console error, every chart present and drawn,
and the report's figures equal the P&L state at the close and the simulator's fills."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.support.browser import open_page
from tests.support.processes import REPO, wait_until
from tests.support.system import DAEMONS, System, new_york

pytestmark = [pytest.mark.slow, pytest.mark.long]  # make test-long
DAY = "2026-11-20"
# QE_REPORT_SCREENSHOT=docs/img/report.png refreshes the README's screenshot.
SCREENSHOT = os.environ.get("QE_REPORT_SCREENSHOT")

PAGE_SCRIPT = """(() => {
  const charts = [...document.querySelectorAll('figure.chart')].map(f => {
    const svg = f.querySelector('svg'); const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return {name: f.dataset.chart, width: box.width, height: box.height,
            lines: svg ? svg.querySelectorAll('path, use, rect').length : 0,
            text: svg ? svg.textContent.length : 0};
  });
  const totals = Object.fromEntries([...document.querySelectorAll('[data-total]')].map(c => [c.dataset.total, c.querySelector('b').textContent]));
  const rows = Object.fromEntries([...document.querySelectorAll('table[data-table]')].map(t => [t.dataset.table, t.tBodies[0].rows.length]));
  return {charts, totals, rows, scripts: document.scripts.length, title: document.title,
          final: document.body.innerText.includes('P&L final, at the close')};
})()"""


def _rules(rules: dict, reports: Path) -> None:
    rules["report"] = {"directory": str(reports), "keep_days": 30, "after_close": True}
    rules["pnl"] = {"publish_interval_s": 10}


def test_the_report_of_a_simulated_afternoon_opens_offline_and_agrees_with_the_pnl_and_the_simulator(tmp_path):
    reports = tmp_path / "reports"
    system = System(tmp_path, new_york(DAY, "15:44"), daemons=(*DAEMONS, "pnl"), rules_update=lambda rules: _rules(rules, reports))
    try:
        system.run_until(new_york(DAY, "16:01"), timeout=240)
        page = reports / DAY / "index.html"
        wait_until(page.exists, timeout=120, message=f"{page}")
        sim_fills = system.sim.control.fills()
        finals = [p for p in system.payloads("ev.pnl") if p["trading_day"] == DAY and p["final"]]
    finally:
        system.stop()
    assert finals, "no final P&L"
    final = finals[-1]
    assert len(sim_fills) >= 5, "the afternoon should have traded"

    # The P&L at the close counted every fill the simulator made, with its commission.
    assert final["account"]["fills"] == len(sim_fills)
    assert final["account"]["commissions"] == pytest.approx(sum(f["commission"] for f in sim_fills), abs=0.01)
    for symbol, line in final["symbols"].items():
        mine = [f for f in sim_fills if f["symbol"] == symbol]
        net = sum(f["shares"] if f["side"] in ("BOT", "BUY") else -f["shares"] for f in mine)
        assert line["qty"] - line["start_qty"] == net, symbol

    # The CSV files: every simulator fill once, the P&L by symbol of the close.
    with open(page.parent / "fills.csv") as handle:
        fills_csv = list(csv.DictReader(handle))
    assert sorted((f["symbol"], int(f["qty"]), float(f["price"])) for f in fills_csv) == sorted(
        (f["symbol"], f["shares"], f["price"]) for f in sim_fills)
    with open(page.parent / "pnl_by_symbol.csv") as handle:
        pnl_csv = {row["symbol"]: row for row in csv.DictReader(handle)}
    assert set(pnl_csv) == set(final["symbols"])
    assert sum(float(row["total"]) for row in pnl_csv.values()) == pytest.approx(final["account"]["total"], abs=0.05)
    assert (page.parent / "orders.csv").read_text().count("\n") >= 2

    # In a real browser, with no network: loads without errors, every chart drawn.
    result = open_page(page, PAGE_SCRIPT, screenshot=True)
    assert result.errors == [], result.errors
    found = result.value
    traded = sorted({f["symbol"] for f in sim_fills})
    names = [c["name"] for c in found["charts"]]
    assert names == ["exposure", "modes", "pnl", *(f"symbol:{s}" for s in traded)], names
    for chart in found["charts"]:
        assert chart["width"] > 300 and chart["height"] > 100 and chart["lines"] > 10, chart
    assert found["final"], "the report shows the close's final P&L"
    assert found["scripts"] == 0  # nothing to run, nothing to fetch
    # The figures shown are the P&L state at the close (state:pnl then; ev.pnl keeps it).
    for key in ("total", "realized", "unrealized", "commissions"):
        assert found["totals"][key] == f"{final['account'][key]:,.2f}", key
    assert found["rows"]["fills"] == len(sim_fills)
    assert found["rows"]["modes"] >= 1  # the afternoon de-risked
    assert result.screenshot and result.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "report.png").write_bytes(result.screenshot)
    if SCREENSHOT:
        (REPO / SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        (REPO / SCREENSHOT).write_bytes(result.screenshot)
    print(json.dumps({"report": str(page), "charts": names, "totals": found["totals"]}))
