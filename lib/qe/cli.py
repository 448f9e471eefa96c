"""`qe`: the operator's command-line tool.

Human tables by default, `--json` for scripts. Exit codes: 0 ok, 1 failure
(e.g. Redis unreachable, unknown DLQ id), 78 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Sequence

import redis

import getpass
import os

from . import acl, config, daemon, state, streams
from . import clock as clock_module
from .contracts import DLQ_STREAM, STREAM_TYPES, Control, idempotency_key, is_our_order_ref, make_event
from .streams import DAEMON_KEY
from .universe import UniverseError, load_universe

EXIT_OK, EXIT_FAIL = 0, 1
STREAMS = [*STREAM_TYPES, DLQ_STREAM]


class CliError(Exception):
    pass


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _age(ts_ns: int | None) -> str:
    if not ts_ns:
        return "-"
    seconds = max(0.0, (time.time_ns() - ts_ns) / 1e9)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(cell[i]) for cell in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def connect(settings: config.Settings) -> redis.Redis:
    username, password = settings.redis_credentials("cli")
    client = redis.Redis.from_url(
        settings.redis_url,
        username=username,
        password=password,
        socket_timeout=5,
        socket_connect_timeout=3,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CliError(f"cannot reach Redis at {settings.redis_url_redacted} ({exc})") from exc
    return client


# --- commands -------------------------------------------------------------------------------


class CheckFailed(config.ConfigError):
    """check-config: the first class of checks that failed, with its messages."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


def _checked(check: str, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except (config.ConfigError, clock_module.ClockConfigError, UniverseError) as exc:
        raise CheckFailed(check, str(exc)) from None


def _redis_secrets(settings: config.Settings) -> list[str]:
    """Every daemon's password file in QE_REDIS_SECRETS_DIR (each daemon reads its own
    at start); all problems at once. Explicit QE_REDIS_USERNAME/PASSWORD_FILE win, as
    they do in the daemons."""
    if settings.redis_username or settings.redis_password or settings.redis_secrets_dir is None:
        return []
    problems = []
    for user in acl.ACCESS:
        try:
            settings.redis_credentials(user)
        except config.ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise config.ConfigError("\n  ".join(problems))
    return [acl.username(user) for user in acl.ACCESS]


def _rules_against_the_world(settings: config.Settings, rules: config.RiskRules, universe: dict[str, Any]) -> None:
    """What daemons check at start beyond the file itself: qe-session's exchange calendar
    and qe-alerts' ETF guard symbols (they need a ref_price from the universe)."""
    import exchange_calendars  # slow to import; only this command needs it here

    problems = []
    if rules.session.calendar not in exchange_calendars.get_calendar_names(include_aliases=True):
        problems.append(f"session.calendar: unknown exchange calendar {rules.session.calendar!r}")
    missing = [symbol for symbol in rules.alerts.etf_guard.symbols if symbol not in universe]
    if missing:
        problems.append(f"alerts.etf_guard.symbols: {missing} not in the universe ({settings.universe_file})")
    if problems:
        raise config.ConfigError(f"{settings.rules_file}:\n  " + "\n  ".join(problems))


def _market_data_secrets(settings: config.Settings, rules: config.RiskRules) -> str:
    if rules.market_data.source == "hammer" and settings.hammer_password is None:
        raise config.ConfigError("QE_HAMMER_PASSWORD_FILE: required when market_data.source is hammer")
    return rules.market_data.source


def cmd_check_config(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """What every daemon checks at start, in the order they do; stops at the first
    class that fails (the environment itself was checked on loading the settings)."""
    clock = _checked("clock", clock_module.from_env)
    rules = _checked("rules", lambda: config.load_rules(settings.rules_file))
    universe = _checked("universe", lambda: _universe(settings))
    _checked("rules_vs_universe", lambda: _rules_against_the_world(settings, rules, universe))
    redis_users = _checked("redis_secrets", lambda: _redis_secrets(settings))
    feed = _checked("market_data", lambda: _market_data_secrets(settings, rules))
    _checked("metrics", lambda: daemon.check_metrics_endpoint(settings.metrics_host, settings.metrics_port))
    result = {
        "ok": True,
        "rules_file": str(settings.rules_file),
        "universe_file": str(settings.universe_file),
        "symbols": len(universe),
        "sections": sorted(type(rules).model_fields),
        "redis_url": settings.redis_url_redacted,
        "redis_users": redis_users,
        "market_data_source": feed,
        "metrics": f"{settings.metrics_host}:{settings.metrics_port if settings.metrics_port is not None else 'default'}",
        "clock": clock.describe(),
    }
    return result, f"configuration OK: {result['rules_file']}, {len(universe)} symbols in {result['universe_file']}"


def _universe(settings: config.Settings) -> dict[str, Any]:
    return load_universe(settings.universe_file)


def cmd_streams(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    r = connect(settings)
    rows = []
    for stream in STREAMS:
        if not r.exists(stream):
            rows.append({"stream": stream, "length": 0, "last_id": "-", "group": "-", "lag": "-", "pending": "-"})
            continue
        info = r.xinfo_stream(stream)
        groups = r.xinfo_groups(stream)
        base = {"stream": stream, "length": info["length"], "last_id": _text(info["last-generated-id"])}
        if not groups:
            rows.append({**base, "group": "-", "lag": "-", "pending": "-"})
        for group in groups:
            rows.append(
                {
                    **base,
                    "group": _text(group["name"]),
                    "consumers": group["consumers"],
                    "lag": group.get("lag", "?"),
                    "pending": group["pending"],
                    "last_delivered": _text(group["last-delivered-id"]),
                }
            )
    return rows, table(rows, ["stream", "length", "last_id", "group", "lag", "pending"])


def _dlq_record(entry_id: Any, fields: dict[bytes, bytes]) -> dict[str, Any]:
    record = {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
    try:
        record["fields"] = json.loads(record.get("fields", "{}"))
    except json.JSONDecodeError:
        pass
    return record


def cmd_dlq_list(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    r = connect(settings)
    entries = r.xrevrange(DLQ_STREAM, count=args.limit)
    records = [_dlq_record(entry_id, fields) for entry_id, fields in entries]
    rows = [
        {
            "id": rec["id"],
            "origin": f"{rec.get('origin_stream')}/{rec.get('origin_id')}",
            "group": rec.get("group"),
            "label": rec.get("label"),
            "reason": (rec.get("reason") or "")[:90],
        }
        for rec in records
    ]
    return records, table(rows, ["id", "origin", "group", "label", "reason"])


def cmd_dlq_show(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    r = connect(settings)
    entries = r.xrange(DLQ_STREAM, min=args.id, max=args.id)
    if not entries:
        raise CliError(f"no dead letter with id {args.id}")
    record = _dlq_record(*entries[0])
    return record, json.dumps(record, indent=2)


def cmd_dlq_requeue(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """Append the original entry again to its origin stream and drop the dead letter,
    in one transaction. Every group of that stream sees it again; consumers dedupe on
    the event's idempotency key."""
    r = connect(settings)
    entries = r.xrange(DLQ_STREAM, min=args.id, max=args.id)
    if not entries:
        raise CliError(f"no dead letter with id {args.id}")
    record = _dlq_record(*entries[0])
    origin, fields = record.get("origin_stream"), record.get("fields")
    if origin not in STREAM_TYPES or not isinstance(fields, dict) or not fields:
        raise CliError(f"dead letter {args.id} has no original payload to requeue (label {record.get('label')})")
    pipe = r.pipeline(transaction=True)
    pipe.xadd(origin, fields)
    pipe.xdel(DLQ_STREAM, args.id)
    new_id, _ = pipe.execute()
    result = {"requeued": args.id, "stream": origin, "new_id": _text(new_id)}
    return result, f"requeued {args.id} to {origin} as {result['new_id']}"


def _hash(r: redis.Redis, key: str) -> dict[str, Any]:
    out = {}
    for field, value in r.hgetall(key).items():
        try:
            out[_text(field)] = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            out[_text(field)] = _text(value)
    return out


def cmd_status(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    r = connect(settings)
    daemons = []
    prefix = DAEMON_KEY.format(daemon="")
    for key in sorted(r.scan_iter(match=prefix + "*")):
        name = _text(key)[len(prefix):]
        beat = _hash(r, _text(key))
        ts_ns = int(beat.get("ts_ns", 0) or 0)
        stale = (time.time_ns() - ts_ns) / 1e9 > args.stale_after
        daemons.append(
            {
                "daemon": name,
                "health": "STALE" if stale else "ok",
                "heartbeat_age": _age(ts_ns),
                "pid": beat.get("pid"),
                "consumer": beat.get("consumer"),
            }
        )
    decision = cmd_status_decision(r)
    # Other daemons' state through their contracts (qe.state): a value that is missing or
    # invalid is shown as such, never as zero.
    session, session_problem = _snapshot(state.read_session(r))
    exposure, exposure_problem = _snapshot(state.read_exposure(r))
    broker, broker_problem = _snapshot(state.read_broker(r))
    caps = config.load_rules(settings.rules_file).exposure
    result: dict[str, Any] = {
        "daemons": daemons,
        "redis_url": settings.redis_url_redacted,
        "decision": decision,
        "session": {k: session.get(k) for k in ("now_ny", "trading_day", "regime", "minutes_to_close", "early_close")},
        "exposure": {
            k: exposure.get(k)
            for k in ("status", "error", "equity", "gross_pct", "net_pct", "potential_gross_pct", "buckets", "marks_stale")
        },
        "caps": {"hard_cap_pct": caps.hard_cap_pct, "cap_recovery_target_pct": caps.cap_recovery_target_pct},
        "broker": {k: broker.get(k) for k in ("connected", "orders_allowed", "account", "mode", "data_farm_ok", "reason")},
        "problems": [p for p in (decision.get("problem"), session_problem, exposure_problem, broker_problem) if p],
    }
    lines = ["DAEMONS", table(daemons, ["daemon", "health", "heartbeat_age", "pid", "consumer"])]
    if decision.get("mode"):
        halted = f" (halted by {decision['halt_operator']}: {decision['halt_reason']})" if decision.get("halted") else ""
        lines += ["", f"MODE {decision['mode']}: {decision.get('reason')}{halted}"]
    if session:
        minutes = session.get("minutes_to_close")
        to_close = f", {minutes:.1f} min to close" if minutes is not None else ""
        lines += [f"SESSION {session.get('now_ny', '')[:19]} New York, {session.get('regime')}{to_close}"
                  + (" (early close)" if session.get("early_close") else "")]
    if exposure:
        lines += ["", _exposure_lines(exposure, caps.hard_cap_pct)]
    if broker:
        link = "connected" if broker.get("connected") else "DOWN"
        allowed = "" if broker.get("orders_allowed", True) else ", orders REFUSED"
        lines += ["", f"BROKER {link}{allowed}: account {broker.get('account')} ({broker.get('mode')}), {broker.get('reason')}"]
    for problem in result["problems"]:
        if not problem.endswith(": missing"):
            lines += [f"UNKNOWN {problem}"]
    return result, "\n".join(lines)


def _snapshot(reading: state.Reading[state.Snapshot[Any]]) -> tuple[dict[str, Any], str | None]:
    """A typed state reading as plain JSON values for display, and its problem."""
    if reading.value is None:
        return {}, reading.describe()
    return reading.value.payload.model_dump(mode="json"), None


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _exposure_lines(exposure: dict[str, Any], hard_cap_pct: float) -> str:
    if exposure.get("status") == "error":
        return f"EXPOSURE unavailable: {exposure.get('error')}"
    rows = [
        {"measure": "gross", "current": _pct(exposure.get("gross_pct")), "potential": _pct(exposure.get("potential_gross_pct")),
         "target": "", "max": f"{hard_cap_pct:g}% (hard cap)"},
    ]
    for bucket, numbers in sorted((exposure.get("buckets") or {}).items()):
        rows.append({"measure": bucket, "current": _pct(numbers.get("current_pct")), "potential": _pct(numbers.get("potential_pct")),
                     "target": _pct(numbers.get("target_pct")), "max": _pct(numbers.get("max_pct"))})
    stale = exposure.get("marks_stale") or []
    equity = exposure.get("equity")
    head = f"EXPOSURE equity {equity:,.0f}, net {_pct(exposure.get('net_pct'))}, stale marks: {len(stale)}" if equity else "EXPOSURE"
    return head + "\n" + table(rows, ["measure", "current", "potential", "target", "max"])


def _operator(args: argparse.Namespace) -> str:
    return args.operator or os.environ.get("USER") or getpass.getuser()


def cmd_control(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """halt / resume: one Control event on ev.control (only this tool writes it)."""
    rules = config.load_rules(settings.rules_file)
    r = connect(settings)
    operator = _operator(args)
    try:
        # The daemons' shared clock (simulated in the demo and tests): readers refuse
        # events stamped ahead of their own clock.
        ts_ns = clock_module.from_env().now_ns()
    except clock_module.ClockConfigError as exc:
        raise CliError(str(exc)) from None
    control = Control(command=args.command, reason=args.reason, operator=operator)
    event = make_event(control, idempotency_key=idempotency_key("control", args.command, operator, ts_ns),
                       source="qe-cli", ts_ns=ts_ns)
    streams.Publisher(r, rules).publish("ev.control", event)
    result = {"command": args.command, "reason": args.reason, "operator": operator, "event_id": str(event.event_id)}
    return result, f"{args.command} sent by {operator}: {args.reason}"


def cmd_why(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """The decision trace behind an order (by orderRef) or an intent (by key)."""
    r = connect(settings)
    for key in sorted((_text(k) for k in r.scan_iter(match="state:decision:why:*")), reverse=True):
        intent_key = args.ref
        if is_our_order_ref(args.ref):
            found = r.hget(key, args.ref)
            if found is None:
                continue
            intent_key = _text(found)
        raw = r.hget(key, intent_key)
        if raw is None:
            continue
        intent = json.loads(raw)
        trace = intent.get("trace", {})
        lines = [
            f"intent   {intent_key} ({intent['action']} {intent['intent_type']})",
            f"order    {intent['side']} {intent['qty']} {intent['symbol']} {intent['order_type']} "
            f"@ {intent.get('limit_price')}  [{intent['classification']}, priority {intent['priority']}]",
            f"reason   {intent['reason']}",
            f"mode     {trace.get('mode')} ({trace.get('mode_rule')}: {trace.get('mode_reason')})",
            f"rule     {trace.get('rule')}",
            f"exposure snapshot {trace.get('exposure_snapshot')}: gross {trace.get('gross_pct')}%, "
            f"Brain potential {trace.get('brain_potential_pct')}%",
            f"session  snapshot {trace.get('session_snapshot')}: regime {trace.get('regime')}",
            "numbers  " + json.dumps(trace.get("numbers", {}), sort_keys=True),
        ]
        return {"intent_key": intent_key, "intent": intent}, "\n".join(lines)
    raise CliError(f"no intent known for {args.ref!r} (traces are kept 7 days)")


def cmd_status_decision(r: redis.Redis) -> dict[str, Any]:
    reading = state.read_decision(r)
    if reading.value is None:
        return {"mode": None, "problem": reading.describe()}
    return reading.value.model_dump(mode="json")


COMMANDS: dict[str, Callable[[argparse.Namespace, config.Settings], tuple[Any, str]]] = {
    "check-config": cmd_check_config,
    "status": cmd_status,
    "streams": cmd_streams,
    "dlq list": cmd_dlq_list,
    "dlq show": cmd_dlq_show,
    "dlq requeue": cmd_dlq_requeue,
    "halt": cmd_control,
    "resume": cmd_control,
    "why": cmd_why,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qe", description="quant-engine operator tool")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check-config", help="validate risk_rules.yaml, the universe and the environment")
    status = sub.add_parser("status", help="daemons' health, mode, exposure, broker")
    status.add_argument("--stale-after", type=float, default=30.0, help="heartbeat age (s) that counts as stale")
    sub.add_parser("streams", help="length, last id, lag and pending per group")
    dlq = sub.add_parser("dlq", help="dead-letter stream")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="newest dead letters first")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_sub.add_parser("show", help="one dead letter in full").add_argument("id")
    dlq_sub.add_parser("requeue", help="append the original entry to its stream again").add_argument("id")
    for name, text in (("halt", "operator kill switch: the Brain cancels its orders and issues nothing else"),
                       ("resume", "lift the operator halt")):
        control = sub.add_parser(name, help=text)
        control.add_argument("--reason", required=True, help="why (recorded with the mode change)")
        control.add_argument("--operator", help="who (default: $USER)")
    why = sub.add_parser("why", help="the decision trace behind an order or intent")
    why.add_argument("ref", help="an orderRef (qe-...) or an intent key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command + (f" {args.dlq_command}" if args.command == "dlq" else "")
    try:
        settings = config.load_settings()
        result, human = COMMANDS[name](args, settings)
    except config.ConfigError as exc:
        # Redacted and bounded, like a daemon's; --json also gets it as an object.
        print(config.error_text(f"qe {name}", str(exc)), file=sys.stderr)
        if args.json:
            check = exc.check if isinstance(exc, CheckFailed) else "environment"
            lines = config.bounded(config.redact(str(exc))).splitlines()
            print(json.dumps({"ok": False, "exit_code": config.EX_CONFIG, "check": check, "errors": lines}, indent=2))
        return config.EX_CONFIG
    except (CliError, redis.RedisError) as exc:
        print(config.bounded(config.redact(f"qe {name}: {exc}")), file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(result, indent=2, default=str) if args.json else human)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
