"""The end-of-day report: one self-contained HTML file (charts as inline SVG drawn by
matplotlib, no script, nothing fetched) plus CSV files of orders, fills and P&L by
symbol, in `report.directory/<trading day>/`.

Read from the day's streams (each entry's stream id is its time): ev.exposure (gross
and potential against the 100 % target and the hard cap), ev.alerts (mode changes with
their reasons, skipped symbols, every alert), ev.orders (orders, fills, rejects),
ev.pnl (P&L over the day, and the day's last figures: the final ones after the close)
and ev.l1 (each traded symbol's mid, with its fills on it). Gathering (`gather`) is
separate from drawing (`render`), which is a function of plain data.
"""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, cast

import redis

from .clock import NEW_YORK
from .config import RiskRules
from .redis_types import StreamEntries

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PAGE = 5_000  # entries per XRANGE call
MAX_PRICE_POINTS = 2_000  # per symbol chart


class ReportError(Exception):
    pass


@dataclass
class DayData:
    day: str
    exposure: list[tuple[int, float | None, float | None]] = field(default_factory=list)  # ts_ns, gross, potential
    alerts: list[dict[str, Any]] = field(default_factory=list)
    orders: list[dict[str, Any]] = field(default_factory=list)  # latest event per order
    fills: list[dict[str, Any]] = field(default_factory=list)
    pnl_series: list[tuple[int, float, float, float]] = field(default_factory=list)  # ts_ns, total, realized, unrealized
    pnl: dict[str, Any] | None = None  # the day's last (final) P&L payload
    prices: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # symbol -> (ts_ns, mid)
    target_pct: float = 100.0
    cap_pct: float = 130.0

    @property
    def mode_changes(self) -> list[dict[str, Any]]:
        return [a for a in self.alerts if a["alert_type"] == "mode_change"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [a for a in self.alerts if a["alert_type"] == "decision_symbol_skipped"]

    @property
    def rejects(self) -> list[dict[str, Any]]:
        return [o for o in self.orders if o["status"] == "REJECTED"]


# --- gathering ----------------------------------------------------------------------------------


def day_window_ns(day: str) -> tuple[int, int]:
    """The New York calendar day as epoch nanoseconds [start, end)."""
    start = datetime.combine(date.fromisoformat(day), time(0), tzinfo=NEW_YORK)
    end = start + timedelta(days=1)
    return int(start.timestamp()) * 1_000_000_000, int(end.timestamp()) * 1_000_000_000


def _entries(r: redis.Redis, stream: str, start_ns: int, end_ns: int,
             keep: Any = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """The stream's events whose own time (envelope ts_ns, the producer's clock: simulated
    in the demo and tests) falls in [start_ns, end_ns). Stream ids are Redis's wall clock,
    so they cannot select a day; the whole retained stream is read, page by page.
    `keep(raw bytes)`: a cheap pre-filter before JSON parsing."""
    low = "-"
    while True:
        batch = cast(StreamEntries, r.xrange(stream, min=low, max="+", count=PAGE))
        for _entry_id, fields in batch:
            raw = fields.get(b"event")
            if raw is None or (keep is not None and not keep(raw)):
                continue
            try:
                event = json.loads(raw)
                ts = int(event["ts_ns"])
                payload = event["payload"]
            except (ValueError, KeyError, TypeError):
                continue
            if start_ns <= ts < end_ns:
                yield ts, payload
        if len(batch) < PAGE:
            return
        low = "(" + batch[-1][0].decode()


def gather(r: redis.Redis, day: str, rules: RiskRules) -> DayData:
    start_ns, end_ns = day_window_ns(day)
    data = DayData(day, target_pct=rules.derisk.target_gross_pct, cap_pct=rules.exposure.hard_cap_pct)
    for ts, payload in _entries(r, "ev.exposure", start_ns, end_ns):
        if payload.get("status") == "ok":
            data.exposure.append((ts, payload.get("gross_pct"), payload.get("potential_gross_pct")))
    for ts, payload in _entries(r, "ev.alerts", start_ns, end_ns):
        data.alerts.append({"ts_ns": ts, **payload})
    latest: dict[str, dict[str, Any]] = {}
    seen_fills: set[str] = set()
    for ts, order in _entries(r, "ev.orders", start_ns, end_ns):
        latest[order["order_ref"]] = {"ts_ns": ts, **order}
        fill = order.get("last_fill")
        if fill and fill["exec_id"] not in seen_fills:
            seen_fills.add(fill["exec_id"])
            data.fills.append({"exec_id": fill["exec_id"], "ts_ns": fill["ts_ns"], "symbol": order["symbol"],
                               "side": order["side"], "qty": fill["qty"], "price": fill["price"],
                               "commission": fill.get("commission"), "order_ref": order["order_ref"], "bucket": order["bucket"]})
        elif fill and fill.get("commission") is not None:  # a later copy with its commission report
            for row in data.fills:
                if row["exec_id"] == fill["exec_id"] and row["commission"] is None:
                    row["commission"] = fill["commission"]
    data.orders = sorted(latest.values(), key=lambda o: o["ts_ns"])
    data.fills.sort(key=lambda f: f["ts_ns"])
    for ts, payload in _entries(r, "ev.pnl", start_ns, end_ns + 12 * 3600 * 10**9):  # the final one is after the close
        if payload["trading_day"] != day:
            continue
        account = payload["account"]
        data.pnl_series.append((ts, account["total"], account["realized"], account["unrealized"]))
        if data.pnl is None or not data.pnl.get("final") or payload.get("final"):
            data.pnl = payload
    traded = {f["symbol"] for f in data.fills}
    if traded:
        tokens = [json.dumps(symbol).encode() for symbol in traded]
        for ts, quote in _entries(r, "ev.l1", start_ns, end_ns, keep=lambda raw: any(t in raw for t in tokens)):
            if quote["symbol"] in traded and quote.get("bid") and quote.get("ask") and not quote.get("implausible"):
                data.prices.setdefault(quote["symbol"], []).append((ts, (quote["bid"] + quote["ask"]) / 2))
    return data


# --- drawing ----------------------------------------------------------------------------------------


def _times(values: list[int]) -> list[datetime]:
    # matplotlib plots datetimes (its units registry); its stubs accept only ArrayLike: callers ignore arg-type.
    return [datetime.fromtimestamp(v / 1e9, tz=timezone.utc).astimezone(NEW_YORK).replace(tzinfo=None) for v in values]


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline SVG


def _axes(title: str, height: float = 3.2) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, height))
    axes.set_title(title, loc="left", fontsize=11)
    axes.grid(True, alpha=0.3)
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    return figure, axes


def chart_exposure(data: DayData) -> str:
    figure, axes = _axes("Gross and potential gross exposure (% of equity)")
    points = [p for p in data.exposure if p[1] is not None]
    if points:
        times = _times([p[0] for p in points])
        axes.plot(times, [p[1] for p in points], label="gross", color="#1f77b4")  # type: ignore[arg-type]  # datetimes: see _times
        axes.plot(times, [p[2] if p[2] is not None else float("nan") for p in points], label="potential gross",  # type: ignore[arg-type]  # datetimes: see _times
                  color="#ff7f0e", alpha=0.8)
    axes.axhline(data.target_pct, color="#2ca02c", linestyle="--", label=f"target {data.target_pct:g} %")
    axes.axhline(data.cap_pct, color="#d62728", linestyle="--", label=f"hard cap {data.cap_pct:g} %")
    if not points:
        axes.text(0.5, 0.5, "no exposure published this day", transform=axes.transAxes, ha="center")
    axes.legend(loc="upper left", fontsize=8)
    return _svg(figure)


MODE_COLOURS = {"NORMAL": "#2ca02c", "THROTTLE": "#bcbd22", "SOFT_DERISK": "#ff7f0e", "HARD_DERISK": "#d62728",
                "CAP_RECOVERY": "#9467bd", "HALTED": "#7f7f7f"}


def mode_spans(data: DayData, end_ns: int) -> list[tuple[str, int, int, str]]:
    """(mode, start, end, why it started) from the day's mode_change alerts (pure)."""
    changes = data.mode_changes
    spans = []
    first_seen = min([p[0] for p in data.pnl_series] + [e[0] for e in data.exposure] + [end_ns])
    if changes and first_seen < changes[0]["ts_ns"]:  # the mode the day was in before its first change
        spans.append((changes[0].get("data", {}).get("from", "?"), first_seen, changes[0]["ts_ns"], "(before the first change)"))
    for i, change in enumerate(changes):
        info = change.get("data", {})
        start = change["ts_ns"]
        end = changes[i + 1]["ts_ns"] if i + 1 < len(changes) else max(end_ns, start + 1)
        spans.append((info.get("to", "?"), start, end, info.get("reason") or change.get("message", "")))
    return spans


def chart_modes(data: DayData, end_ns: int) -> str:
    import matplotlib.dates as mdates

    figure, axes = _axes("Mode timeline (each transition: the Brain's mode_change alert)", height=2.0)
    spans = mode_spans(data, end_ns)
    for mode, start, end, _why in spans:
        t0, t1 = _times([start, end])
        axes.barh(0, mdates.date2num(t1) - mdates.date2num(t0), left=mdates.date2num(t0), height=0.6,
                  color=MODE_COLOURS.get(mode, "#17becf"), edgecolor="black", linewidth=0.3)
        axes.text(mdates.date2num(t0), 0.42, mode, fontsize=7, rotation=20)
    if not spans:
        axes.text(0.5, 0.5, "no mode change this day", transform=axes.transAxes, ha="center")
    else:
        axes.xaxis_date()
    axes.set_yticks([])
    axes.set_ylim(-0.5, 1.0)
    return _svg(figure)


def chart_pnl(data: DayData) -> str:
    figure, axes = _axes("P&L over the day (USD, account)")
    if data.pnl_series:
        times = _times([p[0] for p in data.pnl_series])
        axes.plot(times, [p[1] for p in data.pnl_series], label="total (net of commissions)", color="black")  # type: ignore[arg-type]  # datetimes: see _times
        axes.plot(times, [p[2] for p in data.pnl_series], label="realized", color="#2ca02c")  # type: ignore[arg-type]  # datetimes: see _times
        axes.plot(times, [p[3] for p in data.pnl_series], label="unrealized", color="#1f77b4")  # type: ignore[arg-type]  # datetimes: see _times
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.legend(loc="upper left", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no P&L published this day", transform=axes.transAxes, ha="center")
    return _svg(figure)


def chart_symbol(data: DayData, symbol: str) -> str:
    figure, axes = _axes(f"{symbol}: mid and fills", height=2.6)
    prices = data.prices.get(symbol, [])
    step = max(1, len(prices) // MAX_PRICE_POINTS)
    prices = prices[::step]
    if prices:
        axes.plot(_times([p[0] for p in prices]), [p[1] for p in prices], color="#7f7f7f", linewidth=1, label="mid")  # type: ignore[arg-type]  # datetimes: see _times
    for side, marker, colour in (("BUY", "^", "#2ca02c"), ("SELL", "v", "#d62728")):
        fills = [f for f in data.fills if f["symbol"] == symbol and f["side"] == side]
        if fills:
            axes.scatter(_times([f["ts_ns"] for f in fills]), [f["price"] for f in fills], marker=marker, color=colour,  # type: ignore[arg-type]  # datetimes: see _times
                         s=[20 + min(f["qty"], 2000) / 20 for f in fills], label=f"{side.lower()} fills", zorder=3)
    axes.legend(loc="upper left", fontsize=8)
    return _svg(figure)


# --- tables and files ------------------------------------------------------------------------


def _ny(ts_ns: int | None) -> str:
    if not ts_ns:
        return ""
    return datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc).astimezone(NEW_YORK).strftime("%H:%M:%S")


def _money(value: Any) -> str:
    return "" if value is None else f"{value:,.2f}"


def _table(rows: list[dict[str, Any]], columns: list[str], name: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if row.get(c) is None else str(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    empty = "" if rows else f'<tr><td colspan="{len(columns)}">none</td></tr>'
    return f'<table class="data" data-table="{name}"><thead><tr>{head}</tr></thead><tbody>{body}{empty}</tbody></table>'


ORDER_COLUMNS = ["time", "order_ref", "symbol", "side", "qty", "limit_price", "status", "filled_qty", "avg_fill_price",
                 "bucket", "reject_reason"]
FILL_COLUMNS = ["time", "exec_id", "symbol", "side", "qty", "price", "commission", "order_ref", "bucket"]
PNL_COLUMNS = ["symbol", "bucket", "start_qty", "prev_close", "qty", "avg_price", "mark", "mark_source", "realized",
               "unrealized", "commissions", "total", "fills", "commissions_pending", "mark_stale"]


def order_rows(data: DayData) -> list[dict[str, Any]]:
    return [{**o, "time": _ny(o["ts_ns"])} for o in data.orders]


def fill_rows(data: DayData) -> list[dict[str, Any]]:
    return [{**f, "time": _ny(f["ts_ns"])} for f in data.fills]


def pnl_rows(data: DayData) -> list[dict[str, Any]]:
    if data.pnl is None:
        return []
    return [{"symbol": symbol, **line} for symbol, line in sorted(data.pnl["symbols"].items())]


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd}
.totals{display:flex;gap:16px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:10px 16px}
.card b{display:block;font-size:1.4em}.neg{color:#c0392b}.pos{color:#1e8449}
table.data{border-collapse:collapse;font-size:12px;margin:8px 0}table.data td,table.data th{border:1px solid #ddd;padding:3px 6px}
table.data th{background:#f4f4f4} figure.chart{margin:8px 0} figure.chart svg{max-width:100%;height:auto}
"""


def render(data: DayData, generated_ns: int) -> str:
    """The whole HTML page (pure: plain data in, text out)."""
    end_ns = max([p[0] for p in data.pnl_series] + [e[0] for e in data.exposure] + [0]) or generated_ns
    account = (data.pnl or {}).get("account") or {}
    cards = "".join(
        f'<div class="card" data-total="{key}">{label}<b class="{"neg" if (account.get(key) or 0) < 0 else "pos"}">'
        f"{_money(account.get(key))}</b></div>"
        for key, label in (("total", "Day P&L (net)"), ("realized", "Realized"), ("unrealized", "Unrealized"),
                           ("commissions", "Commissions"))
    )
    final = "final, at the close" if (data.pnl or {}).get("final") else "last published (the day had not closed)"
    figures = [("exposure", chart_exposure(data)), ("modes", chart_modes(data, end_ns)), ("pnl", chart_pnl(data))]
    symbols = sorted({f["symbol"] for f in data.fills})
    figures += [(f"symbol:{s}", chart_symbol(data, s)) for s in symbols]
    charts = "".join(f'<figure class="chart" data-chart="{html.escape(name)}">{svg}</figure>' for name, svg in figures[:3])
    symbol_charts = "".join(f'<figure class="chart" data-chart="{html.escape(name)}">{svg}</figure>' for name, svg in figures[3:])
    transitions = [{"time": _ny(a["ts_ns"]), "from": a["data"].get("from"), "to": a["data"].get("to"),
                    "rule": a["data"].get("rule"), "reason": a["data"].get("reason") or a["message"]} for a in data.mode_changes]
    skipped = [{"time": _ny(a["ts_ns"]), "symbol": a.get("symbol"), "slot": a["data"].get("slot"),
                "reason": a["data"].get("reason")} for a in data.skipped]
    alerts = [{"time": _ny(a["ts_ns"]), "type": a["alert_type"], "state": a["state"], "severity": a["severity"],
               "symbol": a.get("symbol"), "message": a["message"]} for a in data.alerts]
    buckets = [{"scope": name, **{k: _money(v) if isinstance(v, float) else v for k, v in totals.items()}}
               for name, totals in sorted(((data.pnl or {}).get("buckets") or {}).items())]
    generated = datetime.fromtimestamp(generated_ns / 1e9, tz=timezone.utc).astimezone(NEW_YORK).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>quant-engine day report {data.day}</title>
<style>{STYLE}</style></head><body>
<h1>Trading day {data.day}</h1>
<p>P&amp;L {final}; generated {html.escape(generated)} (New York). Files beside this one: orders.csv, fills.csv, pnl_by_symbol.csv.</p>
<div class="totals">{cards}</div>
{_table(buckets, ["scope", "realized", "unrealized", "commissions", "total", "fills", "commissions_pending", "marks_stale"], "buckets")}
<h2>Exposure, modes and P&amp;L over the day</h2>
{charts}
<h3>Mode transitions</h3>
{_table(transitions, ["time", "from", "to", "rule", "reason"], "modes")}
<h2>Fills on each traded symbol's price</h2>
{symbol_charts or "<p>No fills this day.</p>"}
<h2>P&amp;L by symbol</h2>
{_table(pnl_rows(data), PNL_COLUMNS, "pnl")}
<h2>Orders ({len(data.orders)})</h2>
{_table(order_rows(data), ORDER_COLUMNS, "orders")}
<h2>Fills ({len(data.fills)})</h2>
{_table(fill_rows(data), FILL_COLUMNS, "fills")}
<h2>Rejects ({len(data.rejects)})</h2>
{_table([{**o, "time": _ny(o["ts_ns"])} for o in data.rejects],
        ["time", "order_ref", "symbol", "side", "qty", "limit_price", "reject_code", "reject_reason"], "rejects")}
<h2>Skipped symbols ({len(skipped)})</h2>
{_table(skipped, ["time", "symbol", "slot", "reason"], "skipped")}
<h2>Alerts ({len(alerts)})</h2>
{_table(alerts, ["time", "type", "state", "severity", "symbol", "message"], "alerts")}
</body></html>
"""


def report_dir(rules: RiskRules, home: Path) -> Path:
    directory = Path(rules.report.directory)
    return directory if directory.is_absolute() else Path(home) / directory


def prune(directory: Path, keep_days: int, today: str) -> list[Path]:
    """Delete day folders older than keep_days (only folders named as a date)."""
    cutoff = date.fromisoformat(today) - timedelta(days=keep_days)
    removed = []
    for child in directory.iterdir() if directory.exists() else ():
        try:
            day = date.fromisoformat(child.name)
        except ValueError:
            continue
        if child.is_dir() and day < cutoff:
            shutil.rmtree(child)
            removed.append(child)
    return removed


def write(r: redis.Redis, day: str, rules: RiskRules, home: Path, out_dir: str | Path | None = None,
          generated_ns: int | None = None) -> Path:
    """Gather, render and write the day's report; returns the HTML file's path."""
    try:
        date.fromisoformat(day)
    except ValueError:
        raise ReportError(f"not a date (YYYY-MM-DD): {day[:40]!r}") from None
    import time as _time

    data = gather(r, day, rules)
    base = report_dir(rules, home)
    target = Path(out_dir) if out_dir else base / day
    target.mkdir(parents=True, exist_ok=True)
    page = render(data, generated_ns or _time.time_ns())
    (target / "orders.csv").write_text(_csv(order_rows(data), ORDER_COLUMNS))
    (target / "fills.csv").write_text(_csv(fill_rows(data), FILL_COLUMNS))
    (target / "pnl_by_symbol.csv").write_text(_csv(pnl_rows(data), PNL_COLUMNS))
    path = target / "index.html"
    temporary = target / ".index.html.tmp"
    temporary.write_text(page)
    temporary.replace(path)
    if not out_dir:
        prune(base, rules.report.keep_days, day)
    return path
