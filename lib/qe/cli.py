"""`qe`: the operator's command-line tool.

Human tables by default, `--json` (anywhere on the line) for scripts: one JSON
object, `{"ok": true, "redis": {...}, ...}` or `{"ok": false, "error": ...}`.
Every command says which Redis it talks to (password redacted) and where that
came from. Exit codes: 0 ok; 1 failure (Redis unreachable, unknown id, a daemon
not healthy, a halt/resume not acknowledged); 2 usage; 78 configuration.

Which Redis (docs/operations.md): `--redis-url`, else `QE_REDIS_URL`, else the
demo's `run/demo.env` of the repository `qe` runs in (found from the current
directory upwards; its QE_* settings are used where the environment has none);
else `qe` refuses to guess.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, cast

import redis

from . import acl, cli_pnl, config, daemon, liveness, operator_ack, state, streams, topology
from . import clock as clock_module
from .clock import NEW_YORK
from .contracts import DLQ_STREAM, STREAM_TYPES, Control, DecodeError, decode, idempotency_key, is_our_order_ref, make_event
from .redis_types import StreamEntries
from .universe import UniverseError, load_universe

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
STREAMS = [*STREAM_TYPES, DLQ_STREAM]
DEMO_ENV = Path("run") / "demo.env"
MAX_LIMIT = 1000  # entries per page, whatever --limit says
MAX_OFFSET = 10_000
MAX_SCAN = 200_000  # stream entries one listing reads at most while filtering
PREVIEW_CHARS = 200  # a dead letter's payload in a list
SEVERITIES = ("info", "warning", "error", "critical")
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
STREAM_ID_OR_MS = re.compile(r"^\d{1,20}(-\d{1,20})?$")


class CliError(Exception):
    pass


class UsageError(Exception):
    pass


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [["" if row.get(column) is None else str(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(cell[i]) for cell in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def shorten(text: Any, limit: int) -> str:
    shown = "" if text is None else str(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# --- which Redis ----------------------------------------------------------------------------


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as `sim/demo.py` writes them (no quoting); comments and blanks skipped."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if key.startswith("export "):
            key = key[len("export "):]
        values[key.strip()] = value.strip()
    return values


def find_demo_env(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The demo's environment file of the repository qe runs in: `$QE_HOME/run/demo.env`
    when QE_HOME is set, else the first directory from `cwd` upwards that holds
    `etc/risk_rules.yaml` (a checkout)."""
    if environ.get("QE_HOME"):
        candidate = Path(environ["QE_HOME"]) / DEMO_ENV
        return candidate if candidate.is_file() else None
    for directory in (cwd, *cwd.parents):
        if (directory / "etc" / "risk_rules.yaml").is_file():
            candidate = directory / DEMO_ENV
            return candidate if candidate.is_file() else None
    return None


@dataclass(frozen=True)
class Target:
    environ: dict[str, str]
    source: str | None  # where QE_REDIS_URL came from; None: nowhere (qe refuses to guess)


def resolve_target(environ: Mapping[str, str], cwd: Path, redis_url: str | None = None) -> Target:
    """Pure apart from reading the demo's file: the environment qe runs with and
    where its Redis URL comes from."""
    env = dict(environ)
    if redis_url:
        env["QE_REDIS_URL"] = redis_url
        return Target(env, "--redis-url")
    if env.get("QE_REDIS_URL"):
        return Target(env, "QE_REDIS_URL")
    demo_env = find_demo_env(env, cwd)
    if demo_env is not None:
        for key, value in parse_env_file(demo_env.read_text()).items():
            if key.startswith("QE_") and not env.get(key):
                env[key] = value
        if env.get("QE_REDIS_URL"):
            return Target(env, str(demo_env))
    return Target(env, None)


def refusal(cwd: Path) -> str:
    return (f"which Redis? QE_REDIS_URL is not set and there is no demo environment ({DEMO_ENV}) "
            f"in a checkout at or above {cwd}; qe does not guess. Set QE_REDIS_URL "
            f"(e.g. `set -a; . /etc/quant-engine/qe.env; set +a`), pass --redis-url, or start the demo (`make run`)")


def redis_info(settings: config.Settings, source: str | None) -> dict[str, Any]:
    return {"url": settings.redis_url_redacted if source else None, "source": source}


def connect(settings: config.Settings, source: str | None = "QE_REDIS_URL") -> redis.Redis:
    if source is None:
        raise config.ConfigError(refusal(Path.cwd()))
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
        hint = "; is the demo running? (`make run`)" if source.endswith(str(DEMO_ENV)) else ""
        raise CliError(f"cannot reach Redis at {settings.redis_url_redacted} (from {source}{hint}): {exc}") from exc
    return client


def _connect(args: argparse.Namespace, settings: config.Settings) -> redis.Redis:
    return connect(settings, args.redis_source)


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
    r = _connect(args, settings)
    rows = []
    for stream in STREAMS:
        if not r.exists(stream):
            rows.append({"stream": stream, "length": 0, "last_id": None, "group": None, "lag": None, "pending": None})
            continue
        info = r.xinfo_stream(stream)
        # Each consuming group reads its own copy of the stream (qe.topology).
        groups = streams.group_lags(r, [stream]).get(stream, [])
        base = {"stream": stream, "length": info["length"], "last_id": _text(info["last-generated-id"])}
        if not groups:
            rows.append({**base, "group": None, "lag": None, "pending": None})
        for group in groups:
            rows.append(
                {
                    **base,
                    "group": _text(group["name"]),
                    "consumers": group["consumers"],
                    "lag": group.get("lag"),
                    "pending": group["pending"],
                    "last_delivered": _text(group["last-delivered-id"]),
                }
            )
    human_rows = [{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]
    return {"streams": rows}, table(human_rows, ["stream", "length", "last_id", "group", "lag", "pending"])


# --- dead letters -----------------------------------------------------------------------------


def stream_id(value: str, *, exact: bool = True) -> str:
    """A stream entry id as given by the operator, or a friendly refusal."""
    pattern = STREAM_ID if exact else STREAM_ID_OR_MS
    if not pattern.match(value):
        example = "1718000000000-0"
        raise CliError(f"not a stream id: {shorten(value, 60)} (expected e.g. {example})")
    return value


def _dlq_record(entry_id: Any, fields: dict[bytes, bytes]) -> dict[str, Any]:
    record = {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
    try:
        record["fields"] = json.loads(record.get("fields", "{}"))
    except json.JSONDecodeError:
        pass
    return record


def dlq_summary(record: dict[str, Any]) -> dict[str, Any]:
    """A dead letter as a list shows it: bounded (the payload only as a preview)."""
    fields = record.get("fields")
    preview = fields if isinstance(fields, str) else json.dumps(fields, separators=(",", ":"))
    summary = {k: v for k, v in record.items() if k != "fields"}
    summary["reason"] = shorten(summary.get("reason"), 300)
    summary["fields_preview"] = shorten(preview, PREVIEW_CHARS)
    summary["fields_chars"] = len(preview)
    return summary


def _page_args(args: argparse.Namespace) -> tuple[int, int]:
    if args.limit < 1 or args.limit > MAX_LIMIT:
        raise CliError(f"--limit must be 1..{MAX_LIMIT}")
    offset = getattr(args, "offset", 0) or 0
    if offset < 0 or offset > MAX_OFFSET:
        raise CliError(f"--offset must be 0..{MAX_OFFSET}")
    return args.limit, offset


def cmd_dlq_list(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    limit, offset = _page_args(args)
    upper = "(" + stream_id(args.after, exact=False) if args.after else "+"
    r = _connect(args, settings)
    entries = cast(StreamEntries, r.xrevrange(DLQ_STREAM, max=upper, count=offset + limit))[offset:]
    records = [dlq_summary(_dlq_record(entry_id, fields)) for entry_id, fields in entries]
    total = r.xlen(DLQ_STREAM)
    next_after = records[-1]["id"] if len(records) == limit else None
    result = {"entries": records, "count": len(records), "total": total, "limit": limit, "offset": offset,
              "after": args.after, "next_after": next_after}
    rows = [
        {
            "id": rec["id"],
            "origin": f"{rec.get('origin_stream')}/{rec.get('origin_id')}",
            "group": rec.get("group"),
            "label": rec.get("label"),
            "reason": shorten(rec.get("reason"), 90),
        }
        for rec in records
    ]
    lines = [table(rows, ["id", "origin", "group", "label", "reason"]),
             f"{len(records)} shown of {total} dead letters (newest first)"]
    if next_after:
        lines.append(f"next page: qe dlq list --limit {limit} --after {next_after}")
    return result, "\n".join(lines)


def _dead_letter(r: redis.Redis, entry_id: str) -> dict[str, Any]:
    entries = cast(StreamEntries, r.xrange(DLQ_STREAM, min=entry_id, max=entry_id))
    if not entries:
        raise CliError(f"no dead letter with id {entry_id}")
    return _dlq_record(*entries[0])


def cmd_dlq_show(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    entry_id = stream_id(args.id)
    record = _dead_letter(_connect(args, settings), entry_id)
    return {"entry": record}, json.dumps(record, indent=2)


def cmd_dlq_requeue(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """Append the original entry again to its origin stream, for the group that
    dead-lettered it only (its own copy, qe.topology; the other groups handled it
    already), then drop the dead letter. The append is checked inside Redis (a function
    refuses at run time, where a transaction would still apply the XDEL), so the dead
    letter goes only once its entry is back; a crash in between leaves both, and the
    group dedupes on the event's idempotency key."""
    entry_id = stream_id(args.id)
    r = _connect(args, settings)
    record = _dead_letter(r, entry_id)
    origin, fields, group = record.get("origin_stream"), record.get("fields"), record.get("group")
    if origin not in STREAM_TYPES or not isinstance(fields, dict) or not fields:
        raise CliError(f"dead letter {entry_id} has no original payload to requeue (label {record.get('label')})")
    if group not in topology.consumers_of(origin):
        raise CliError(f"dead letter {entry_id} names group {group!r}, which does not consume {origin}")
    try:
        new_id = r.fcall("qe_append", 0, origin, group, *(item for pair in fields.items() for item in pair))
    except redis.ResponseError as exc:
        raise CliError(f"could not requeue {entry_id} to {origin}: {exc}") from exc
    r.xdel(DLQ_STREAM, entry_id)
    result = {"requeued": entry_id, "stream": origin, "group": group, "new_id": _text(new_id)}
    return result, f"requeued {entry_id} to {origin} for group {group} as {result['new_id']}"


# --- status -----------------------------------------------------------------------------------


def _hash(r: redis.Redis, key: str) -> dict[str, Any]:
    out = {}
    for field_, value in r.hgetall(key).items():
        try:
            out[_text(field_)] = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            out[_text(field_)] = _text(value)
    return out


def _seconds_since(ts_ns: Any, now_ns: int) -> float | None:
    try:
        return round(max(0.0, (now_ns - int(ts_ns)) / 1e9), 3)
    except (TypeError, ValueError):
        return None


def daemon_row(name: str, record: dict[str, Any], now_ns: int, stale_after_s: float, expected: bool,
               pid_alive: Callable[[int], bool | None]) -> dict[str, Any]:
    """One daemon's line of `qe status` (pure given `pid_alive`)."""
    judged = liveness.verdict(record, now_ns, stale_after_s, pid_alive)
    return {
        "daemon": name,
        "health": judged.health,
        "reason": judged.reason,
        "expected": expected,
        "heartbeat_age_s": _seconds_since(record.get("alive_ns"), now_ns) if record else None,
        "loop_age_s": _seconds_since(record.get("ts_ns"), now_ns) if record else None,
        "stopped_age_s": _seconds_since(record.get("stopped_ns"), now_ns) if judged.health == "stopped" else None,
        "pid": record.get("pid") if record else None,
        "host": record.get("host") if record else None,
        "consumer": record.get("consumer") if record else None,
    }


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def session_line(session: dict[str, Any], today: tuple[datetime, datetime] | None) -> str:
    """The SESSION line, about today. `today` is (open, close) in New York of the
    session on the local date of `now_ny`, or None when there is none (weekend,
    holiday). state:session's `trading_day`, `open_utc`, `close_utc` and
    `early_close` name the current session, or the next one once today's closed."""
    now_text = str(session.get("now_ny") or "")
    head = f"SESSION {now_text[:19]} New York, {session.get('regime')}"
    try:
        now_ny = datetime.fromisoformat(now_text).astimezone(NEW_YORK)
    except ValueError:
        return head
    if session.get("market_open") or session.get("minutes_to_close") is not None:
        minutes = session.get("minutes_to_close")
        line = head + (f", {minutes:.1f} min to close" if minutes is not None else "")
        if today is not None and session.get("early_close"):
            line += f" (early close today at {today[1]:%H:%M})"
        return line
    next_open = _ny(session.get("open_utc"))
    next_close = _ny(session.get("close_utc"))
    upcoming = ""
    if next_open is not None:
        when = "today" if next_open.date() == now_ny.date() else f"{next_open:%a}"
        upcoming = f"next open {when} {next_open:%H:%M}"
        if session.get("early_close") and next_close is not None:
            upcoming += f", early close {next_close:%H:%M}"
    if today is None:
        detail = "no session today" + (f"; {upcoming}" if upcoming else "")
    elif now_ny >= today[1]:
        detail = f"closed at {today[1]:%H:%M}" + (f"; {upcoming}" if upcoming else "")
    else:
        detail = f"opens {today[0]:%H:%M}" + (f", closes {today[1]:%H:%M}" if (today[1].hour, today[1].minute) != (16, 0) else "")
    return f"{head} ({detail})"


def _ny(iso: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    return parsed.astimezone(NEW_YORK) if parsed.tzinfo else None


def today_session(calendar: str, now_ny_iso: Any) -> tuple[datetime, datetime] | None:
    """(open, close) in New York of the exchange session on now's local date, if any."""
    now_ny = _ny(now_ny_iso)
    if now_ny is None:
        return None
    import exchange_calendars  # slow to import: only when the market is closed

    day = now_ny.date()
    with warnings.catch_warnings():  # pandas deprecation notices are not for the operator
        warnings.simplefilter("ignore")
        cal = exchange_calendars.get_calendar(calendar, start=str(day - timedelta(days=7)), end=str(day + timedelta(days=7)))
        if not cal.is_session(str(day)):
            return None
        return (cal.session_open(str(day)).tz_convert(NEW_YORK).to_pydatetime(),
                cal.session_close(str(day)).tz_convert(NEW_YORK).to_pydatetime())


def _expected(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.daemons:
        return liveness.EXPECTED_DAEMONS
    names = tuple(name.strip() for name in args.daemons.split(",") if name.strip())
    if not names:
        raise CliError("--daemons: name at least one daemon")
    return names


def cmd_status(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    expected = _expected(args)
    rules = config.load_rules(settings.rules_file)
    r = _connect(args, settings)
    prefix = liveness.DAEMON_KEY.format(daemon="")
    found = sorted(_text(key)[len(prefix):] for key in r.scan_iter(match=prefix + "*", count=100))
    now_ns = time.time_ns()
    daemons = []
    for name in [*expected, *(n for n in found if n not in expected)]:
        record = _hash(r, prefix + name)
        host = record.get("host")
        daemons.append(daemon_row(name, record, now_ns, args.stale_after, name in expected,
                                  liveness.pid_alive_here(str(host) if host is not None else None)))
    unhealthy = [f"{row['daemon']} {row['health']}" for row in daemons if row["expected"] and row["health"] != liveness.HEALTHY]
    decision = cmd_status_decision(r)
    # Other daemons' state through their contracts (qe.state): a value that is missing or
    # invalid is shown as such, never as zero.
    session, session_problem = _snapshot(state.read_session(r))
    exposure, exposure_problem = _snapshot(state.read_exposure(r))
    broker, broker_problem = _snapshot(state.read_broker(r))
    caps = rules.exposure
    result: dict[str, Any] = {
        "healthy": not unhealthy,
        "unhealthy": unhealthy,
        "daemons": daemons,
        "decision": decision,
        "session": {k: session.get(k) for k in ("now_ny", "trading_day", "market_open", "regime", "minutes_to_close",
                                                "early_close", "open_utc", "close_utc")},
        "exposure": {
            k: exposure.get(k)
            for k in ("status", "error", "equity", "gross_pct", "net_pct", "potential_gross_pct", "buckets", "marks_stale")
        },
        "caps": {"hard_cap_pct": caps.hard_cap_pct, "cap_recovery_target_pct": caps.cap_recovery_target_pct},
        "broker": {k: broker.get(k) for k in ("connected", "orders_allowed", "account", "mode", "data_farm_ok", "reason")},
        "problems": [p for p in (decision.get("problem"), session_problem, exposure_problem, broker_problem) if p],
    }
    human_rows = [{**row, "heartbeat_age": _age_text(row["heartbeat_age_s"]), "pid": row["pid"] or "-",
                   "reason": shorten(row["reason"] + (f" {_age_text(row['stopped_age_s'])} ago" if row["stopped_age_s"] is not None else ""), 60)}
                  for row in daemons]
    lines = ["DAEMONS", table(human_rows, ["daemon", "health", "heartbeat_age", "pid", "reason"])]
    lines.append(f"{len(expected) - len(unhealthy)}/{len(expected)} expected daemons ok"
                 + (f"; NOT OK: {', '.join(unhealthy)}" if unhealthy else ""))
    if decision.get("mode"):
        halted = f" (halted by {decision['halt_operator']}: {decision['halt_reason']})" if decision.get("halted") else ""
        lines += ["", f"MODE {decision['mode']}: {decision.get('reason')}{halted}"]
    if session:
        closed = not session.get("market_open") and session.get("minutes_to_close") is None
        today = today_session(rules.session.calendar, session.get("now_ny")) if closed or session.get("early_close") else None
        lines += [session_line(session, today)]
    if exposure:
        lines += ["", _exposure_lines(exposure, caps.hard_cap_pct)]
    if broker:
        link = "connected" if broker.get("connected") else "DOWN"
        allowed = "" if broker.get("orders_allowed", True) else ", orders REFUSED"
        lines += ["", f"BROKER {link}{allowed}: account {broker.get('account')} ({broker.get('mode')}), {broker.get('reason')}"]
    # Unknown is not fine: a state nobody has published yet is said, not left out.
    lines += [f"UNKNOWN {problem}" for problem in result["problems"]]
    if unhealthy:
        raise Unhealthy(result, "\n".join(lines), f"not healthy: {', '.join(unhealthy)}")
    return result, "\n".join(lines)


class Unhealthy(Exception):
    """A command that produced its full output but whose verdict is a failure (exit 1)."""

    def __init__(self, result: dict[str, Any], human: str, message: str) -> None:
        super().__init__(message)
        self.result, self.human = result, human


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


# --- alerts, orders, fills: what an operator would otherwise read with redis-cli -------------


def parse_since(value: str, now: datetime) -> datetime:
    """`--since`: a duration back from now (`90s`, `15m`, `2h`, `1d`) or an ISO time
    (New York when it has no zone)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise CliError(f"--since: not a duration (15m, 2h) or an ISO time: {shorten(value, 60)}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=NEW_YORK)


def newest_events(r: redis.Redis, stream: str, min_id: str = "-", page: int = 500) -> Iterator[tuple[str, Any]]:
    """(entry id, typed event) newest first, at most MAX_SCAN entries; entries that do
    not decode are skipped."""
    upper, scanned = "+", 0
    while scanned < MAX_SCAN:
        entries = cast(StreamEntries, r.xrevrange(stream, max=upper, min=min_id, count=page))
        if not entries:
            return
        for entry_id, fields in entries:
            scanned += 1
            try:
                yield _text(entry_id), decode(stream, fields)
            except DecodeError:
                continue
        upper = "(" + _text(entries[-1][0])


def _ny_time(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=NEW_YORK).isoformat(timespec="seconds")


def alert_matches(alert: Any, *, types: set[str], symbol: str | None, min_severity: str | None) -> bool:
    if types and alert.alert_type not in types:
        return False
    if symbol and (alert.symbol or "").upper() != symbol.upper():
        return False
    if min_severity and SEVERITIES.index(alert.severity) < SEVERITIES.index(min_severity):
        return False
    return True


def cmd_alerts(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    limit, _ = _page_args(args)
    min_id = "-"
    if args.since:
        since = parse_since(args.since, datetime.now(timezone.utc))
        min_id = str(int(since.timestamp() * 1000))  # written at or after (wall clock)
    types = {t.strip() for t in (args.type or "").split(",") if t.strip()}
    r = _connect(args, settings)
    rows = []
    for entry_id, event in newest_events(r, "ev.alerts", min_id):
        alert = event.payload
        if not alert_matches(alert, types=types, symbol=args.symbol, min_severity=args.severity):
            continue
        rows.append({"id": entry_id, "time_ny": _ny_time(event.ts_ns), "ts_ns": event.ts_ns, "severity": alert.severity,
                     "alert_type": alert.alert_type, "symbol": alert.symbol, "source": event.source,
                     "message": alert.message, "data": alert.data})
        if len(rows) >= limit:
            break
    human = [{**row, "time": row["time_ny"][11:19], "message": shorten(row["message"], 100)} for row in rows]
    text = table(human, ["id", "time", "severity", "alert_type", "symbol", "message"])
    return {"alerts": rows, "count": len(rows), "limit": limit}, f"{text}\n{len(rows)} alerts (newest first)"


def system_today(r: redis.Redis) -> date:
    """The trading system's date in New York: the session daemon's clock (the demo's
    is simulated), else the wall clock."""
    session, _problem = _snapshot(state.read_session(r))
    now_ny = _ny(session.get("now_ny"))
    return (now_ny or datetime.now(NEW_YORK)).date()


def orders_of_day(r: redis.Redis, day: date) -> Iterator[tuple[str, Any]]:
    """ev.orders events of one New York day, newest first (stops at the day before)."""
    for entry_id, event in newest_events(r, "ev.orders"):
        event_day = datetime.fromtimestamp(event.ts_ns / 1e9, tz=NEW_YORK).date()
        if event_day > day:
            continue
        if event_day < day:
            return
        yield entry_id, event


def _day(args: argparse.Namespace, r: redis.Redis) -> date:
    if args.day:
        try:
            return date.fromisoformat(args.day)
        except ValueError:
            raise CliError(f"--day: not a date (YYYY-MM-DD): {shorten(args.day, 40)}") from None
    return system_today(r)


def latest_orders(events: Iterator[tuple[str, Any]], *, symbol: str | None, statuses: set[str]) -> Iterator[dict[str, Any]]:
    """Each order once, as its newest event says (pure)."""
    seen: set[str] = set()
    for entry_id, event in events:
        order = event.payload
        if order.order_ref in seen:
            continue
        seen.add(order.order_ref)
        if symbol and order.symbol.upper() != symbol.upper():
            continue
        if statuses and order.status not in statuses:
            continue
        yield {"order_ref": order.order_ref, "time_ny": _ny_time(event.ts_ns), "ts_ns": event.ts_ns, "symbol": order.symbol,
               "side": order.side, "qty": order.qty, "limit_price": order.limit_price, "status": order.status,
               "filled_qty": order.filled_qty, "remaining_qty": order.remaining_qty, "avg_fill_price": order.avg_fill_price,
               "bucket": order.bucket, "external": order.external, "reject_reason": order.reject_reason,
               "intent_key": order.intent_key, "broker_order_id": order.broker_order_id, "event_id": entry_id}


def fills_of(events: Iterator[tuple[str, Any]], *, symbol: str | None) -> Iterator[dict[str, Any]]:
    """Each execution once (by exec_id), newest first (pure)."""
    seen: set[str] = set()
    for entry_id, event in events:
        order = event.payload
        fill = order.last_fill
        if fill is None or fill.exec_id in seen:
            continue
        seen.add(fill.exec_id)
        if symbol and order.symbol.upper() != symbol.upper():
            continue
        yield {"exec_id": fill.exec_id, "time_ny": _ny_time(fill.ts_ns), "ts_ns": fill.ts_ns, "symbol": order.symbol,
               "side": order.side, "qty": fill.qty, "price": fill.price, "commission": fill.commission,
               "order_ref": order.order_ref, "bucket": order.bucket, "event_id": entry_id}


def _take(rows: Iterator[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    taken = []
    for row in rows:
        taken.append(row)
        if len(taken) >= limit:
            break
    return taken


def cmd_orders(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    limit, _ = _page_args(args)
    statuses = {s.strip().upper() for s in (args.status or "").split(",") if s.strip()}
    r = _connect(args, settings)
    day = _day(args, r)
    rows = _take(latest_orders(orders_of_day(r, day), symbol=args.symbol, statuses=statuses), limit)
    human = [{**row, "time": row["time_ny"][11:19], "filled": f"{row['filled_qty']}/{row['qty']}",
              "limit": row["limit_price"], "note": shorten(row["reject_reason"] or ("external" if row["external"] else ""), 50)}
             for row in rows]
    text = table(human, ["time", "order_ref", "symbol", "side", "filled", "limit", "status", "bucket", "note"])
    return ({"day": day.isoformat(), "orders": rows, "count": len(rows), "limit": limit},
            f"ORDERS {day.isoformat()} (newest first)\n{text}\n{len(rows)} orders")


def cmd_fills(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    limit, _ = _page_args(args)
    r = _connect(args, settings)
    day = _day(args, r)
    rows = _take(fills_of(orders_of_day(r, day), symbol=args.symbol), limit)
    human = [{**row, "time": row["time_ny"][11:19]} for row in rows]
    text = table(human, ["time", "symbol", "side", "qty", "price", "exec_id", "order_ref", "bucket"])
    return ({"day": day.isoformat(), "fills": rows, "count": len(rows), "limit": limit},
            f"FILLS {day.isoformat()} (newest first)\n{text}\n{len(rows)} fills")


# --- the kill switch --------------------------------------------------------------------------


def _operator(args: argparse.Namespace) -> str:
    return args.operator or os.environ.get("USER") or getpass.getuser()


def _required(args: argparse.Namespace) -> tuple[str, ...]:
    names = tuple(n.strip() for n in args.require.split(",") if n.strip())
    unknown = [n for n in names if n not in operator_ack.REQUIRED]
    if not names or unknown:
        raise CliError(f"--require: one or more of {','.join(operator_ack.REQUIRED)} (got {args.require!r})")
    return names


def cmd_control(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """halt / resume: one Control event on ev.control (only this tool writes it), then
    wait until the Brain and execution acknowledge it (qe.operator_ack)."""
    if args.timeout <= 0 or args.timeout > 600:
        raise CliError("--timeout must be in (0, 600] seconds")
    required = _required(args)
    rules = config.load_rules(settings.rules_file)
    r = _connect(args, settings)
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
    started = time.monotonic()
    streams.Publisher(r, rules).publish("ev.control", event)
    outcome = operator_ack.wait_for(r, str(event.event_id), args.command, required, timeout_s=args.timeout)
    elapsed = round(time.monotonic() - started, 3)
    done = "halted" if args.command == "halt" else "resumed"
    result: dict[str, Any] = {
        "command": args.command, "reason": args.reason, "operator": operator, "event_id": str(event.event_id),
        "timeout_s": args.timeout, "elapsed_s": elapsed, "required": list(required),
        "acknowledged": {name: ack.model_dump() for name, ack in outcome.acknowledged.items()},
        "missing": outcome.missing,
    }
    if outcome.complete:
        names = " and ".join(required)
        skipped = [name for name in operator_ack.REQUIRED if name not in required]
        unasked = f"; NOT waited for: {', '.join(skipped)}" if skipped else ""
        return result, (f"{done}: acknowledged by {names} in {elapsed:.1f} s "
                        f"(timeout {args.timeout:g} s; event {event.event_id}{unasked})")
    now_ns = time.time_ns()
    why = []
    for name, reason in outcome.missing.items():
        record = _hash(r, liveness.DAEMON_KEY.format(daemon=name))
        host = record.get("host")
        judged = liveness.verdict(record, now_ns, float("inf"), liveness.pid_alive_here(str(host) if host else None))
        state = "" if judged.health == liveness.HEALTHY else f"; daemon {judged.health}" + (f": {judged.reason}" if judged.reason else "")
        why.append(f"{name} did not acknowledge ({reason}{state})")
    nobody = not outcome.acknowledged
    message = (f"{args.command} NOT confirmed within {args.timeout:g} s: " + ("nobody acknowledged: " if nobody else "")
               + "; ".join(why)
               + f". The control event {event.event_id} is on ev.control and applies when they consume it.")
    raise Unhealthy(result, message, message)


# --- why --------------------------------------------------------------------------------------


def cmd_why(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """The decision trace behind an order (by orderRef) or an intent (by key)."""
    r = _connect(args, settings)
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


def archive_directory(settings: config.Settings, rules: config.RiskRules) -> Path:
    directory = Path(rules.archive.directory)
    return directory if directory.is_absolute() else settings.home / directory


def cmd_archive(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """`qe archive DAY` / `qe archive --pending` (the hook after each close): docs/archive.md."""
    from . import archive

    rules = config.load_rules(settings.rules_file)
    r = _connect(args, settings)
    directory = Path(args.directory) if args.directory else archive_directory(settings, rules)
    options: dict[str, Any] = dict(compression=rules.archive.compression, row_group_rows=rules.archive.row_group_rows,
                   rules_file=settings.rules_file, universe_file=settings.universe_file)
    try:
        if args.pending:
            records = archive.archive_pending(r, directory, include_today=not args.closed_only, **options)
        elif args.day:
            records = [archive.archive_day(r, archive.parse_day(args.day), directory, force=args.force, **options)]
        else:
            raise CliError("give a DAY (YYYY-MM-DD, New York) or --pending")
    except archive.ArchiveError as exc:
        raise CliError(str(exc)) from None
    floor = r.get(streams.ARCHIVE_FLOOR)
    lines = [f"{rec['day']}: {rec['status']}, {rec['rows']} entries in {len(rec['streams'])} files under "
             f"{rec['directory']}{'' if rec['closed'] else ' (day not over: written so far)'}"
             f"{'' if rec['complete'] else ' (INCOMPLETE: part of the day was trimmed before archiving)'}"
             for rec in records]
    lines.append(f"retention floor: {_text(floor) if floor else 'none (nothing archived)'}"
                 f"{'' if rules.archive.enabled else ' (archive.enabled is false: retention is not guarded)'}")
    return {"days": records, "floor": _text(floor) if floor else None}, "\n".join(lines)


def cmd_replay(args: argparse.Namespace, settings: config.Settings) -> tuple[Any, str]:
    """`qe replay DAY [--rules FILE] [--from HH:MM --to HH:MM]`: the archived day through the
    Brain in-process (never a Redis); with other rules, the what-if (docs/archive.md)."""
    from . import archive, replay

    rules = config.load_rules(settings.rules_file)
    directory = Path(args.directory) if args.directory else archive_directory(settings, rules)
    logging.getLogger("qe.decision").setLevel(logging.ERROR)  # the replayed Brain's own log lines
    try:
        report = replay.replay_day(directory, archive.parse_day(args.day), rules_file=args.rules,
                                   universe_file=args.universe, start=args.start, end=args.end)
    except (archive.ArchiveError, ValueError) as exc:
        raise CliError(str(exc)) from None
    written = replay.write_outputs(report, Path(args.out)) if args.out else []
    result = {**report.summary(), "divergence": report.divergence, "files": [str(p) for p in written]}
    human = replay.render(report) + "".join(f"\nwrote {p}" for p in written)
    if args.rules is None and not report.identical and args.strict:
        raise Unhealthy(result, human, "replayed intents differ from the recorded ones")
    return result, human


COMMANDS: dict[str, Callable[[argparse.Namespace, config.Settings], tuple[Any, str]]] = {
    "check-config": cmd_check_config,
    "status": cmd_status,
    "streams": cmd_streams,
    "dlq list": cmd_dlq_list,
    "dlq show": cmd_dlq_show,
    "dlq requeue": cmd_dlq_requeue,
    "alerts": cmd_alerts,
    "orders": cmd_orders,
    "fills": cmd_fills,
    "halt": cmd_control,
    "resume": cmd_control,
    "why": cmd_why,
    "archive": cmd_archive,
    "replay": cmd_replay,
    "pnl": cli_pnl.cmd_pnl,
    "report": cli_pnl.cmd_report,
}


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that `--json` gets a JSON error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (usage: {self.format_usage().strip().removeprefix('usage: ')})")


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the subcommand it sets the flag; absent it keeps the value
    # the main parser set (so `qe --json status` and `qe status --json` both work).
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object on stdout")
    parser.add_argument("--redis-url", default=argparse.SUPPRESS, help="the Redis to talk to (else QE_REDIS_URL, else run/demo.env)")


def _page(parser: argparse.ArgumentParser, default: int = 50) -> None:
    parser.add_argument("--limit", type=int, default=default, help=f"at most this many (default {default}, max {MAX_LIMIT})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qe", description="quant-engine operator tool")
    parser.add_argument("--json", action="store_true", default=False, help="one JSON object on stdout")
    parser.add_argument("--redis-url", default=None, help="the Redis to talk to (else QE_REDIS_URL, else run/demo.env)")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("check-config", help="validate risk_rules.yaml, the universe and the environment"))
    status = sub.add_parser("status", help="daemons' health, mode, session, exposure, broker (exit 1 unless all healthy)")
    _common(status)
    status.add_argument("--stale-after", type=float, default=30.0, help="loop without progress for this long (s): stale")
    status.add_argument("--daemons", help="comma-separated daemons expected (default: all eight)")
    _common(sub.add_parser("streams", help="length, last id, lag and pending per group"))
    dlq = sub.add_parser("dlq", help="dead-letter stream")
    _common(dlq)
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="newest dead letters first, payloads truncated (page with --after)")
    _common(dlq_list)
    _page(dlq_list)
    dlq_list.add_argument("--offset", type=int, default=0, help=f"skip this many first (max {MAX_OFFSET})")
    dlq_list.add_argument("--after", help="only entries older than this id (the previous page's next_after)")
    for name, text in (("show", "one dead letter in full"), ("requeue", "append the original entry to its stream again")):
        one = dlq_sub.add_parser(name, help=text)
        _common(one)
        one.add_argument("id", help="the dead letter's id (e.g. 1718000000000-0)")
    alerts = sub.add_parser("alerts", help="recent alerts, newest first")
    _common(alerts)
    _page(alerts)
    alerts.add_argument("--type", help="alert types, comma-separated (e.g. mode_change,broker_disconnected)")
    alerts.add_argument("--symbol", help="only this symbol (e.g. 'CIM PRB')")
    alerts.add_argument("--severity", choices=SEVERITIES, help="at least this severity")
    alerts.add_argument("--since", help="written within a duration (15m, 2h) or since an ISO time (New York)")
    orders = sub.add_parser("orders", help="today's orders as their latest event says, newest first")
    _common(orders)
    _page(orders)
    orders.add_argument("--symbol")
    orders.add_argument("--status", help="statuses, comma-separated (e.g. SUBMITTED,PARTIALLY_FILLED)")
    orders.add_argument("--day", help="New York date (default: the system's today)")
    fills = sub.add_parser("fills", help="today's executions, newest first")
    _common(fills)
    _page(fills)
    fills.add_argument("--symbol")
    fills.add_argument("--day", help="New York date (default: the system's today)")
    for name, text in (("halt", "operator kill switch: the Brain cancels its orders and issues nothing else"),
                       ("resume", "lift the operator halt")):
        control = sub.add_parser(name, help=f"{text}; waits for the Brain's and execution's acknowledgement")
        _common(control)
        control.add_argument("--reason", required=True, help="why (recorded with the mode change)")
        control.add_argument("--operator", help="who (default: $USER)")
        control.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for acknowledgements (default 10)")
        control.add_argument("--require", default=",".join(operator_ack.REQUIRED),
                             help="who must acknowledge (default: decision,execution)")
    why = sub.add_parser("why", help="the decision trace behind an order or intent")
    _common(why)
    why.add_argument("ref", help="an orderRef (qe-...) or an intent key")
    arch = sub.add_parser("archive", help="write a New York day's streams to Parquet, verified (docs/archive.md)")
    _common(arch)
    arch.add_argument("day", nargs="?", help="YYYY-MM-DD (New York date of the entry ids)")
    arch.add_argument("--pending", action="store_true", help="every closed day not yet archived, then today so far")
    arch.add_argument("--closed-only", action="store_true", help="with --pending: leave today out")
    arch.add_argument("--force", action="store_true", help="write an archived day again (same bytes: nothing changes)")
    arch.add_argument("--directory", help="archive directory (default: archive.directory of risk_rules.yaml)")
    rep = sub.add_parser("replay", help="an archived day through the Brain, isolated; --rules for a what-if")
    _common(rep)
    rep.add_argument("day", help="YYYY-MM-DD (an archived day)")
    rep.add_argument("--rules", help="another risk_rules.yaml (default: the day's own, archived with it)")
    rep.add_argument("--universe", help="universe file (default: the day's own, archived with it)")
    rep.add_argument("--from", dest="start", help="HH:MM New York: compare from here (earlier events warm the Brain up)")
    rep.add_argument("--to", dest="end", help="HH:MM New York: feed nothing after")
    rep.add_argument("--out", help="directory for the CSV/JSON of the difference")
    rep.add_argument("--strict", action="store_true", help="exit 1 when the day's own rules do not reproduce it")
    rep.add_argument("--directory", help="archive directory (default: archive.directory of risk_rules.yaml)")
    cli_pnl.add_parsers(sub, _common)
    return parser


def _wants_json(argv: Sequence[str]) -> bool:
    return "--json" in argv


def _emit_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        if _wants_json(argv):
            _emit_json({"ok": False, "error": f"usage: {exc}", "exit_code": EXIT_USAGE})
        print(f"qe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    name = args.command + (f" {args.dlq_command}" if args.command == "dlq" else "")
    target = resolve_target(os.environ, Path.cwd(), args.redis_url)
    args.redis_source = target.source
    os.environ.update(target.environ)  # what the clock and other readers of the environment see too
    redis_doc: dict[str, Any] = {"url": None, "source": target.source}
    try:
        settings = config.load_settings(target.environ)
        redis_doc = redis_info(settings, target.source)
        if target.source is None and name not in ("check-config", "replay"):  # replay never touches Redis
            raise config.ConfigError(refusal(Path.cwd()))
        result, human = COMMANDS[name](args, settings)
    except config.ConfigError as exc:
        # Redacted and bounded, like a daemon's; --json also gets it as an object.
        print(config.error_text(f"qe {name}", str(exc)), file=sys.stderr)
        if args.json:
            check = exc.check if isinstance(exc, CheckFailed) else "environment"
            lines = config.bounded(config.redact(str(exc))).splitlines()
            _emit_json({"ok": False, "error": "\n".join(lines), "exit_code": config.EX_CONFIG, "check": check,
                        "errors": lines, "redis": redis_doc})
        return config.EX_CONFIG
    except Unhealthy as exc:
        message = config.bounded(config.redact(str(exc)))
        if args.json:
            _emit_json({"ok": False, "error": message, "redis": redis_doc, **exc.result})
        else:
            if exc.human != str(exc):
                print(_with_redis(redis_doc, exc.human))
            else:
                print(_redis_line(redis_doc))
        print(f"qe {name}: {message}", file=sys.stderr)
        return EXIT_FAIL
    except (CliError, redis.RedisError) as exc:
        message = config.bounded(config.redact(str(exc)))
        if args.json:
            _emit_json({"ok": False, "error": message, "redis": redis_doc})
        print(f"qe {name}: {message}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        _emit_json({"ok": True, "redis": redis_doc, **result})
    else:
        print(_with_redis(redis_doc, human))
    return EXIT_OK


def _redis_line(redis_doc: dict[str, Any]) -> str:
    return f"Redis {redis_doc['url']} (from {redis_doc['source']})" if redis_doc.get("source") else "Redis: none chosen"


def _with_redis(redis_doc: dict[str, Any], human: str) -> str:
    return f"{_redis_line(redis_doc)}\n{human}"


if __name__ == "__main__":
    raise SystemExit(main())
