"""`qe pnl` and `qe report DAY` (registered in qe.cli; kept here so cli.py stays small)."""

from __future__ import annotations

import argparse
from typing import Any

from . import config, state
from .contracts import PnL


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:,.2f}"


def pnl_document(pnl: PnL, ts_ns: int | None) -> dict[str, Any]:
    """The JSON answer of `qe pnl` (pure)."""
    return {
        "trading_day": pnl.trading_day,
        "final": pnl.final,
        "ts_ns": ts_ns,
        "total": pnl.account.model_dump(),
        "buckets": {name: totals.model_dump() for name, totals in pnl.buckets.items()},
        "symbols": {symbol: line.model_dump() for symbol, line in pnl.symbols.items()},
        "marks_stale": list(pnl.marks_stale),
        "pending_exec_ids": list(pnl.pending_exec_ids),
        "mismatched": list(pnl.mismatched),
        "broker_account": pnl.broker_account.model_dump() if pnl.broker_account else None,
    }


def _reconciled(line: Any) -> str:
    """The `broker` column: how the symbol's figures compare with the broker's P&L."""
    judged = line.reconciliation
    if judged is None or judged.status == "no_broker":
        return "-"
    if judged.status == "pending":
        return "pending"
    if judged.status == "ok":
        return "ok"
    diffs = [f"{name} {value:+,.2f}" for name, value in (("real", judged.realized_diff), ("unreal", judged.unrealized_diff),
                                                       ("daily", judged.daily_diff)) if value is not None]
    if judged.position_diff:
        diffs.insert(0, f"qty {judged.position_diff:+d}")
    return ("ALERT " if judged.alerted else "DIFF ") + ", ".join(diffs)


def pnl_text(pnl: PnL, symbol: str | None = None) -> str:
    """The human tables of `qe pnl` (pure)."""
    from .cli import table  # the one table formatter

    rows = []
    for name, line in sorted(pnl.symbols.items(), key=lambda item: item[1].total):
        if symbol and name.upper() != symbol.upper():
            continue
        flags = []
        if line.mark_stale:
            flags.append(f"stale mark ({line.mark_source})")
        if line.commissions_pending:
            flags.append(f"{line.commissions_pending} commission(s) pending")
        if line.prev_close_source not in (None, "close"):
            flags.append(f"prev close from {line.prev_close_source}")
        rows.append({"symbol": name, "bucket": line.bucket, "start": line.start_qty, "qty": line.qty,
                     "prev_close": line.prev_close, "mark": line.mark, "realized": _fmt(line.realized),
                     "unrealized": _fmt(line.unrealized), "commissions": _fmt(line.commissions), "total": _fmt(line.total),
                     "fills": line.fills, "broker": _reconciled(line), "note": "; ".join(flags)})
    scopes = [{"scope": name, "realized": _fmt(t.realized), "unrealized": _fmt(t.unrealized),
               "commissions": _fmt(t.commissions), "total": _fmt(t.total), "fills": t.fills,
               "pending": t.commissions_pending, "stale": t.marks_stale}
              for name, t in [*sorted(pnl.buckets.items()), ("TOTAL", pnl.account)]]
    head = f"P&L {pnl.trading_day}{' (final, at the close)' if pnl.final else ' (so far)'}"
    symbol_columns = ["symbol", "bucket", "start", "qty", "prev_close", "mark", "realized", "unrealized", "commissions",
                      "total", "fills", "broker", "note"]
    scope_columns = ["scope", "realized", "unrealized", "commissions", "total", "fills", "pending", "stale"]
    text = f"{head}\n{table(rows, symbol_columns)}\n\n{table(scopes, scope_columns)}"
    if pnl.mismatched:
        text += "\n\nDIFFERS FROM THE BROKER'S P&L (pnl_mismatch): " + ", ".join(pnl.mismatched)
    if pnl.broker_account is not None:
        b = pnl.broker_account
        text += f"\nbroker (reqPnL): daily {_fmt(b.daily)}  unrealized {_fmt(b.unrealized)}  realized {_fmt(b.realized)}"
    return text


def cmd_pnl(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    from .cli import CliError, _connect

    r = _connect(args, settings)
    reading = state.read_pnl(r)
    if not reading.ok or reading.value is None:
        raise CliError(f"no P&L: {reading.describe()} (is qe-pnl running?)")
    pnl, ts_ns = reading.value.payload, reading.value.ts_ns
    document = pnl_document(pnl, ts_ns)
    if args.symbol:
        document["symbols"] = {s: v for s, v in document["symbols"].items() if s.upper() == args.symbol.upper()}
    return document, pnl_text(pnl, args.symbol)


def cmd_report(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    from . import report
    from .cli import CliError, _connect

    r = _connect(args, settings)
    rules = config.load_rules(settings.rules_file)
    try:
        where = report.write(r, args.day, rules, settings.home, out_dir=args.out)
    except report.ReportError as exc:
        raise CliError(str(exc)) from None
    files = sorted(str(path) for path in where.parent.iterdir())
    return ({"day": args.day, "report": str(where), "files": files},
            f"REPORT {args.day}\n{where}\n" + "\n".join(f"  {name}" for name in files))


def add_parsers(sub: Any, common: Any) -> None:
    pnl = sub.add_parser("pnl", help="the trading day's P&L per symbol, bucket and total (state:pnl)")
    common(pnl)
    pnl.add_argument("--symbol", help="only this symbol (e.g. 'CIM PRB')")
    report = sub.add_parser("report", help="write the end-of-day report of a trading day (HTML + CSV)")
    common(report)
    report.add_argument("day", help="the trading day (YYYY-MM-DD, New York)")
    report.add_argument("--out", help="folder to write into (default: report.directory/<day>)")
