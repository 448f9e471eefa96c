"""`qe replay DAY`: a day's archived inputs through the same Brain code, isolated.

In-process: the Brain's handler (`daemons.decision.DecisionHandler`) is built from a
Context whose clock is the recorded clock and whose Redis is an in-memory `ReplayState`;
its effects go to an in-memory sink. Nothing is written to any Redis.

With the Brain's decision journal in the archive (ev.decision_journal), `run_journal`
follows it: the live Brain's steps (handle of an input entry, tick, load) in their order,
each at its recorded clock reading: identical to the live run (docs/archive.md).
Without one (older archives), `run_brain`: events are fed in recorded order (stream id time; ties in the Brain's stream order, then sequence), each decoded
against the reader's limits and the recorded clock, with "now" = the event's `ts_ns`
(never going back). The runtime's tick (`decision.tick_interval_s`) is emulated on the
recorded clock. `--from/--to` (New York HH:MM): events before `from` are fed to rebuild
the Brain's state (warm-up) but only intents from `from` on are compared; events after
`to` are not fed.

Imports from the Brain (kept in one place, `_brain()`, for the refactor of
daemons/decision): `daemons.decision.DecisionHandler` (constructor(context), `load(r)`,
`handle(event, effects)`, `tick(now_ns, effects)`, `tick_interval_s`) and
`daemons.decision.STREAMS`.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime
from pathlib import Path
from typing import Any, Iterable

from . import archive, config
from . import clock as clock_module
from . import daemon as qe_daemon
from .clock import NEW_YORK
from .contracts import Alert, DecodeError, Envelope, Limits, decode
from .streams import Effects, Entry, StreamPolicy

log = logging.getLogger("qe.replay")
NS = 1_000_000_000
# What an intent is compared on (SPEC 11: keys, sides, quantities, prices, types).
INTENT_FIELDS = ("key", "action", "symbol", "side", "qty", "limit_price", "order_type", "intent_type", "target")


def _brain() -> tuple[Any, tuple[str, ...]]:
    """The Brain's public pieces replay depends on (adapt here after a refactor)."""
    from daemons.decision.service import STREAMS, DecisionHandler

    return DecisionHandler, tuple(STREAMS)


class ReplayClock(clock_module.Clock):
    """The recorded clock: whatever time the replay sets."""

    def __init__(self, now_ns: int = 0) -> None:
        self.current = now_ns

    def now_ns(self) -> int:
        return self.current

    def sleep(self, sim_seconds: float) -> None:  # never waits
        return None

    def describe(self) -> str:
        return "replay"


class NoRedis:
    """What `load()` sees: an empty Redis (a Brain with no saved state). Anything else
    touching Redis during a replay is a bug: it raises."""

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {}

    def hkeys(self, key: str) -> list[bytes]:
        return []

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"replay is isolated: the Brain called redis.{name}")


class ReplayState:
    """The Brain's Redis hashes as its own committed effects leave them (HSET, HDEL, DEL),
    in memory: what a `load()` recorded in the journal reads back. It starts empty (a Brain
    with no saved state); anything else touching Redis during a replay raises."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    def apply(self, ops: list[list[str]]) -> None:
        for op in ops:
            name = op[0].upper()
            if name == "HSET":
                target = self.hashes.setdefault(op[1], {})
                for index in range(2, len(op) - 1, 2):
                    target[op[index].encode()] = op[index + 1].encode()
            elif name == "HDEL":
                target = self.hashes.get(op[1], {})
                for field_name in op[2:]:
                    target.pop(field_name.encode(), None)
            elif name == "DEL":
                for key in op[1:]:
                    self.hashes.pop(key, None)
            # EXPIRE and the like: no time passes in a replay's state.

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))

    def hkeys(self, key: str) -> list[bytes]:
        return list(self.hashes.get(key, {}))

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"replay is isolated: the Brain called redis.{name}")


class SinkEffects(Effects):
    """An in-memory effects sink: publishes are kept as events; state writes go to a
    ReplayState when one is given, else are dropped."""

    def __init__(self, policy: StreamPolicy, state: ReplayState | None = None) -> None:
        super().__init__(policy)
        self.events: list[tuple[str, Envelope]] = []
        self.state = state

    def publish(self, stream: str, event: Envelope) -> None:
        self.events.append((stream, event))

    def take(self) -> list[tuple[str, Envelope]]:
        events, self.events = self.events, []
        if self.state is not None:
            self.state.apply(self.ops)
        self.ops.clear()
        return events


@dataclass
class IntentRow:
    """One intent as compared, with its trace for the divergence report."""

    key: str
    action: str
    symbol: str
    side: str
    qty: int
    limit_price: float | None
    order_type: str
    intent_type: str
    target: str | None
    ts_ns: int
    trace: dict[str, Any] = field(default_factory=dict, repr=False)

    def compared(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in INTENT_FIELDS)

    def brief(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*INTENT_FIELDS, "ts_ns")}

    @classmethod
    def from_payload(cls, key: str, ts_ns: int, p: dict[str, Any]) -> "IntentRow":
        return cls(key=key, action=p["action"], symbol=p["symbol"], side=p["side"], qty=p["qty"],
                   limit_price=p.get("limit_price"), order_type=p["order_type"], intent_type=p["intent_type"],
                   target=p.get("target_intent_key"), ts_ns=ts_ns, trace=p.get("trace") or {})


@dataclass
class ModeChange:
    ts_ns: int
    from_mode: str
    to_mode: str
    rule: str
    reason: str


@dataclass
class RunResult:
    intents: list[IntentRow]
    modes: list[ModeChange]
    events: int
    rejected: int  # entries that did not decode (the runtime dead-letters them)
    seconds: float
    first_ns: int
    last_ns: int
    # "journal": the Brain's decision journal followed (recorded order, clock, ticks,
    # loads); "inputs": no journal, inputs in id order with "now" = each event's ts_ns.
    followed: str = "inputs"
    ticks: int = 0
    loads: int = 0
    missing: int = 0  # journaled entries not in the archive (trimmed, or of another day)
    notes: list[str] = field(default_factory=list)


# --- feeding --------------------------------------------------------------------------------


def hhmm_ns(day: date, text: str | None) -> int | None:
    if not text:
        return None
    hour, minute = (int(part) for part in text.split(":"))
    return clock_module.to_ns(datetime.combine(day, dtime(hour, minute), tzinfo=NEW_YORK))


JOURNAL = "ev.decision_journal"


def load_inputs(directory: Path, day: date) -> list[dict[str, Any]]:
    _handler, streams = _brain()
    return archive.read_day(directory, day, streams)


def load_journal(directory: Path, day: date) -> list[dict[str, Any]]:
    """The Brain's journal of the day (empty for a day archived before it existed)."""
    return [row for row in archive.read_day(directory, day, (JOURNAL,)) if row["source"] == "decision"]


def _collect_outputs(effects: "SinkEffects", start_ns: int | None, intents: list["IntentRow"], modes: list["ModeChange"]) -> None:
    """What the Brain published since the last call: intents and mode changes (from start_ns)."""
    for stream, event in effects.take():
        if event.ts_ns < (start_ns or 0):
            continue
        if stream == "ev.intents":
            intents.append(IntentRow.from_payload(event.idempotency_key, event.ts_ns, event.payload.model_dump(mode="json")))
        elif stream == "ev.alerts" and isinstance(event.payload, Alert) and event.payload.alert_type == "mode_change":
            data = event.payload.data
            modes.append(ModeChange(event.ts_ns, data["from"], data["to"], data.get("rule", ""), data.get("reason", "")))


def run_journal(rows: list[dict[str, Any]], journal: list[dict[str, Any]], rules: config.RiskRules,
                universe_file: Path, *, start_ns: int | None = None, end_ns: int | None = None,
                state: ReplayState | None = None) -> RunResult:
    """Drive a fresh Brain exactly as the live one ran: the journal's steps in their order,
    each with its recorded clock reading: `handle` of the archived input entry it names,
    `tick`, and `load` (from the state the replayed Brain's own effects committed)."""
    handler_class, _streams = _brain()
    clock = ReplayClock()
    settings = config.Settings(universe_path=Path(universe_file))
    state = ReplayState() if state is None else state  # the caller may keep it, to compare
    context = qe_daemon.Context("decision", settings, rules, clock, state, log)  # type: ignore[arg-type]
    handler = handler_class(context)
    handler.record_journal = False
    limits = Limits.from_rules(rules.plausibility)
    effects = SinkEffects(StreamPolicy(rules.streams), state)
    by_id = {(row["stream"], row["id"]): row for row in rows}
    intents: list[IntentRow] = []
    modes: list[ModeChange] = []
    result = RunResult(intents, modes, 0, 0, 0.0, 0, 0, followed="journal")
    started = time.perf_counter()
    loaded = False

    def collect() -> None:
        _collect_outputs(effects, start_ns, intents, modes)

    for entry in journal:
        for step in json.loads(entry["payload"])["steps"]:
            now = step["now_ns"]
            if end_ns is not None and now > end_ns:
                break
            if not result.first_ns:
                result.first_ns = now
            result.last_ns = now
            clock.current = now
            kind = step["kind"]
            if kind == "load":
                handler.load(state)
                result.loads += 1
                loaded = True
                continue
            if not loaded:
                result.notes.append("the journal starts inside a run: the Brain's state at its start is not in the "
                                    "record (replayed from an empty state)")
                handler.load(state)
                loaded = True
            if kind == "tick":
                handler.tick(now, effects)
                result.ticks += 1
                collect()
                continue
            row = by_id.get((step["stream"], step["id"]))
            if row is None:
                result.missing += 1
                continue
            fields = {b"event": archive.event_text(row)}
            if row["type"] is not None:
                fields[b"type"] = row["type"].encode()
            try:
                event = decode(row["stream"], fields, limits, now)
            except DecodeError:
                result.rejected += 1
                continue
            effects.entry = Entry(row["stream"], row["id"], fields, 1)
            handler.handle(event, effects)
            effects.entry = None
            result.events += 1
            collect()
        else:
            continue
        break
    if result.missing:
        result.notes.append(f"{result.missing} journaled input entries are not in the archive (trimmed before it, "
                            f"or of another day): skipped")
    result.seconds = time.perf_counter() - started
    return result


def run_brain(rows: list[dict[str, Any]], rules: config.RiskRules, universe_file: Path,
              *, start_ns: int | None = None, end_ns: int | None = None) -> RunResult:
    """Feed the rows through a fresh Brain on the recorded clock; collect what it publishes."""
    handler_class, _streams = _brain()
    clock = ReplayClock()
    settings = config.Settings(universe_path=Path(universe_file))
    context = qe_daemon.Context("decision", settings, rules, clock, NoRedis(), log)  # type: ignore[arg-type]
    handler = handler_class(context)
    limits = Limits.from_rules(rules.plausibility)
    effects = SinkEffects(StreamPolicy(rules.streams))
    intents: list[IntentRow] = []
    modes: list[ModeChange] = []
    interval = int(handler.tick_interval_s * NS) if handler.tick_interval_s else None
    next_tick: int | None = None
    now = 0
    events = rejected = 0
    started = time.perf_counter()
    first_ns = None

    def collect() -> None:
        _collect_outputs(effects, start_ns, intents, modes)

    for row in rows:
        ts = row["ts_ns"] if row["ts_ns"] is not None else row["id_ms"] * 1_000_000
        if end_ns is not None and ts > end_ns:
            break
        if first_ns is None:
            clock.current = now = ts
            first_ns = ts
            handler.load(NoRedis())
            next_tick = ts if interval else None
        now = max(now, ts)
        # The runtime ticks on the clock between batches: emulated at every interval.
        while next_tick is not None and next_tick <= now:
            clock.current = next_tick
            handler.tick(next_tick, effects)
            collect()
            next_tick += interval  # type: ignore[operator]
        clock.current = now
        fields = {b"event": archive.event_text(row)}
        if row["type"] is not None:
            fields[b"type"] = row["type"].encode()
        try:
            event = decode(row["stream"], fields, limits, now)
        except DecodeError:
            rejected += 1
            continue
        effects.entry = Entry(row["stream"], row["id"], fields, 1)
        handler.handle(event, effects)
        effects.entry = None
        events += 1
        collect()
    return RunResult(intents, modes, events, rejected, time.perf_counter() - started, first_ns or 0, now,
                     notes=["no decision journal in the archive: inputs fed in id order with \"now\" = each event's "
                            "ts_ns and ticks emulated (not identical to the live run: docs/archive.md)"])


def recorded(rows_all: list[dict[str, Any]], start_ns: int | None, end_ns: int | None) -> tuple[list[IntentRow], list[ModeChange]]:
    """The Brain's recorded output of the day (ev.intents; mode_change alerts)."""
    intents, modes = [], []
    for row in rows_all:
        ts = row["ts_ns"] or 0
        if row["source"] != "decision" or (start_ns is not None and ts < start_ns) or (end_ns is not None and ts > end_ns):
            continue
        payload = json.loads(row["payload"])
        if row["stream"] == "ev.intents":
            intents.append(IntentRow.from_payload(row["idempotency_key"], ts, payload))
        elif row["stream"] == "ev.alerts" and payload.get("alert_type") == "mode_change":
            data = payload["data"]
            modes.append(ModeChange(ts, data["from"], data["to"], data.get("rule", ""), data.get("reason", "")))
    return intents, modes


# --- comparing ------------------------------------------------------------------------------


def first_divergence(left: list[IntentRow], right: list[IntentRow]) -> dict[str, Any] | None:
    """The first position where the two intent sequences differ, with both traces."""
    for index in range(max(len(left), len(right))):
        a = left[index] if index < len(left) else None
        b = right[index] if index < len(right) else None
        if a is None or b is None or a.compared() != b.compared():
            return {
                "index": index,
                "recorded": None if a is None else {**a.brief(), "trace": a.trace},
                "replayed": None if b is None else {**b.brief(), "trace": b.trace},
                "fields": [] if a is None or b is None else
                          [n for n in INTENT_FIELDS if getattr(a, n) != getattr(b, n)],
            }
    return None


def diff_intents(base: list[IntentRow], other: list[IntentRow]) -> dict[str, list[dict[str, Any]]]:
    """Added / removed / changed intents, matched by idempotency key (slot, symbol, side,
    generation: the n-th intent of that kind that day)."""
    by_key = {i.key: i for i in base}
    other_keys = {i.key: i for i in other}
    added = [i.brief() for i in other if i.key not in by_key]
    removed = [i.brief() for i in base if i.key not in other_keys]
    changed = []
    for i in other:
        j = by_key.get(i.key)
        if j is not None and j.compared() != i.compared():
            changed.append({"key": i.key, "fields": [n for n in INTENT_FIELDS if getattr(i, n) != getattr(j, n)],
                            "base": j.brief(), "other": i.brief()})
    return {"added": added, "removed": removed, "changed": changed}


def mode_timeline(base: list[ModeChange], other: list[ModeChange]) -> list[dict[str, Any]]:
    """Both runs' mode changes on one time axis: each row says the mode each run is in."""
    rows = []
    marks = sorted([(m.ts_ns, 0, m) for m in base] + [(m.ts_ns, 1, m) for m in other], key=lambda x: (x[0], x[1]))
    current = ["THROTTLE", "THROTTLE"]
    for ts, side, change in marks:
        current[side] = change.to_mode
        rows.append({"time": _ny(ts), "ts_ns": ts, "run": "base" if side == 0 else "other",
                     "base_mode": current[0], "other_mode": current[1], "rule": change.rule, "reason": change.reason})
    return rows


def _ny(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / NS, tz=NEW_YORK).strftime("%H:%M:%S.%f")[:-3]


# --- gross exposure path from the recorded fills ----------------------------------------------


def fills_by_intent(rows_all: list[dict[str, Any]]) -> list[tuple[int, str, str, str, int]]:
    """(ts_ns, intent key, symbol, side, shares filled by this event) from ev.orders."""
    seen: dict[str, int] = {}
    out = []
    for row in rows_all:
        if row["stream"] != "ev.orders" or row["payload"] is None:
            continue
        p = json.loads(row["payload"])
        key = p.get("intent_key")
        if not key:
            continue
        filled = int(p.get("filled_qty") or 0)
        delta = filled - seen.get(key, 0)
        if delta > 0:
            seen[key] = filled
            out.append((row["ts_ns"] or 0, key, p["symbol"], p["side"], delta))
    return out


def gross_paths(rows_all: list[dict[str, Any]], base: list[IntentRow], other: list[IntentRow]) -> list[dict[str, Any]]:
    """At each recorded exposure snapshot: the published gross (the recorded fills as they
    happened) and the gross the other rules would have had from the same recorded fills:
    fills of intents the other run did not issue are taken out (shares above its quantity
    too); intents only the other run issued get no fill (their fills are not in the
    record). Quantities and marks are the snapshots' (merged: a change snapshot carries only
    the symbols that changed), equity the snapshot's; the base path is the published gross."""
    kept = {i.key: i.qty for i in other if i.action == "NEW"}
    fills = fills_by_intent(rows_all)
    out = []
    removed: dict[str, int] = {}  # symbol -> signed shares the other run would not hold
    used: dict[str, int] = {}
    book: dict[str, dict[str, Any]] = {}  # symbol -> latest snapshot entry (qty, mark)
    cursor = 0
    for row in rows_all:
        if row["stream"] != "ev.exposure" or row["payload"] is None:
            continue
        p = json.loads(row["payload"])
        ts = row["ts_ns"] or 0
        while cursor < len(fills) and fills[cursor][0] <= ts:
            _t, key, symbol, side, qty = fills[cursor]
            cursor += 1
            allowed = max(0, kept.get(key, 0) - used.get(key, 0))
            taken = min(qty, allowed)
            used[key] = used.get(key, 0) + taken
            dropped = qty - taken
            if dropped:
                removed[symbol] = removed.get(symbol, 0) + (dropped if side == "BUY" else -dropped)
        equity = p.get("equity")
        if p.get("status") != "ok" or not equity or p.get("gross_pct") is None:
            continue
        if p.get("detail") == "full":
            book.clear()
        book.update(p.get("symbols") or {})  # a change snapshot names only the symbols that changed
        delta = 0.0
        for symbol, shares in removed.items():
            s = book.get(symbol)
            if s is None or not shares:
                continue
            mark = s.get("mark") or 0.0
            delta += (abs(s["qty"] - shares) - abs(s["qty"])) * mark
        published = p["gross_pct"]
        out.append({"time": _ny(ts), "ts_ns": ts, "published_gross_pct": published,
                    "base_gross_pct": round(published, 4), "other_gross_pct": round(published + delta / equity * 100, 4)})
    return out


# --- the command ----------------------------------------------------------------------------


@dataclass
class Report:
    day: str
    rules_file: str
    run: RunResult
    recorded_intents: list[IntentRow]
    recorded_modes: list[ModeChange]
    identical: bool
    divergence: dict[str, Any] | None
    diff: dict[str, list[dict[str, Any]]]
    timeline: list[dict[str, Any]]
    gross: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        real_s = max(0, self.run.last_ns - self.run.first_ns) / NS
        return {
            "day": self.day, "rules_file": self.rules_file, "followed": self.run.followed, "ticks": self.run.ticks,
            "loads": self.run.loads, "missing": self.run.missing, "notes": self.run.notes,
            "events": self.run.events, "rejected": self.run.rejected,
            "seconds": round(self.run.seconds, 3),
            "events_per_s": round(self.run.events / self.run.seconds) if self.run.seconds else None,
            "speedup": round(real_s / self.run.seconds, 1) if self.run.seconds else None,
            "recorded_intents": len(self.recorded_intents), "replayed_intents": len(self.run.intents),
            "same_intents": sum(1 for a, b in zip(self.recorded_intents, self.run.intents) if a.compared() == b.compared()),
            "identical": self.identical, "added": len(self.diff["added"]), "removed": len(self.diff["removed"]),
            "changed": len(self.diff["changed"]),
            "recorded_mode_changes": len(self.recorded_modes), "replayed_mode_changes": len(self.run.modes),
        }


def replay_day(directory: Path, day: date, *, rules_file: Path | None = None, universe_file: Path | None = None,
               start: str | None = None, end: str | None = None) -> Report:
    folder = archive.day_directory(directory, day)
    if not folder.is_dir():
        raise archive.ArchiveError(f"{day} is not archived under {directory}")
    rules_path = Path(rules_file) if rules_file else folder / "risk_rules.yaml"
    universe_path = Path(universe_file) if universe_file else folder / "universe.csv"
    for path, what in ((rules_path, "rules"), (universe_path, "universe")):
        if not path.exists():
            raise archive.ArchiveError(f"no {what} file {path} (give it explicitly)")
    rules = config.load_rules(rules_path)
    rows = load_inputs(directory, day)
    # --from/--to are times of the recorded clock's day (the day itself in production; a
    # simulated day in the demo and tests, whose stream ids are wall-clock).
    clock_day = day
    if rows and rows[0]["ts_ns"] is not None:
        clock_day = datetime.fromtimestamp(rows[0]["ts_ns"] / NS, tz=NEW_YORK).date()
    start_ns, end_ns = hhmm_ns(clock_day, start), hhmm_ns(clock_day, end)
    journal = load_journal(directory, day)
    if journal:
        run = run_journal(rows, journal, rules, universe_path, start_ns=start_ns, end_ns=end_ns)
    else:
        run = run_brain(rows, rules, universe_path, start_ns=start_ns, end_ns=end_ns)
    everything = archive.read_day(directory, day, (*_brain()[1], "ev.intents"))
    rec_intents, rec_modes = recorded(everything, start_ns, end_ns)
    divergence = first_divergence(rec_intents, run.intents)
    return Report(
        day=day.isoformat(), rules_file=str(rules_path), run=run, recorded_intents=rec_intents, recorded_modes=rec_modes,
        identical=divergence is None, divergence=divergence, diff=diff_intents(rec_intents, run.intents),
        timeline=mode_timeline(rec_modes, run.modes), gross=gross_paths(everything, rec_intents, run.intents),
    )


def write_outputs(report: Report, out: Path) -> list[Path]:
    """CSV and JSON of the difference (intents added/removed/changed, the mode timeline side
    by side, the gross paths) and the summary."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    document = {"summary": report.summary(), "divergence": report.divergence, **report.diff,
                "mode_timeline": report.timeline, "gross_path": report.gross}
    path = out / f"replay-{report.day}.json"
    path.write_text(json.dumps(document, indent=2, default=str))
    written.append(path)
    tables = {
        "intents": [{"change": kind, **(row if kind != "changed" else {**row["other"], "fields": ",".join(row["fields"]),
                                        "base_qty": row["base"]["qty"], "base_limit_price": row["base"]["limit_price"],
                                        "base_side": row["base"]["side"]})}
                    for kind in ("added", "removed", "changed") for row in report.diff[kind]],
        "modes": report.timeline,
        "gross": report.gross,
    }
    for name, rows in tables.items():
        path = out / f"replay-{report.day}-{name}.csv"
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns or ["empty"])
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
    return written


def render(report: Report, limit: int = 20) -> str:
    s = report.summary()
    lines = [
        f"replay {s['day']} with {s['rules_file']}: {s['events']} events in {s['seconds']} s "
        f"({s['events_per_s']} events/s, {s['speedup']}x real time), {s['rejected']} undecodable",
        (f"followed the Brain's decision journal: its order and clock, {s['ticks']} ticks, {s['loads']} loads"
         if s["followed"] == "journal" else "no decision journal: inputs in id order, \"now\" = event time"),
        *(f"note: {note}" for note in s["notes"]),
        f"intents: recorded {s['recorded_intents']}, replayed {s['replayed_intents']}, "
        f"same in order {s['same_intents']}; added {s['added']}, removed {s['removed']}, changed {s['changed']}",
    ]
    if report.identical:
        lines.append("IDENTICAL: the replayed intents equal the recorded ones (keys, sides, quantities, prices, types)")
    else:
        d = report.divergence or {}
        lines.append(f"FIRST DIVERGENCE at intent #{d.get('index')} (fields: {', '.join(d.get('fields') or []) or 'missing'})")
        lines.append("  recorded: " + json.dumps(d.get("recorded"), default=str)[:4000])
        lines.append("  replayed: " + json.dumps(d.get("replayed"), default=str)[:4000])
    for kind in ("added", "removed", "changed"):
        for row in report.diff[kind][:limit]:
            lines.append(f"  {kind:8} {json.dumps(row, default=str)[:300]}")
    lines.append("mode timeline (recorded | replayed):")
    for row in report.timeline[:limit * 2]:
        lines.append(f"  {row['time']}  {row['base_mode']:13} | {row['other_mode']:13}  ({row['run']}: {row['rule']})")
    if report.gross:
        last = report.gross[-1]
        peak_b = max(g["base_gross_pct"] for g in report.gross)
        peak_o = max(g["other_gross_pct"] for g in report.gross)
        lines.append(f"gross exposure (from the recorded fills): end {last['base_gross_pct']:.2f} % recorded vs "
                     f"{last['other_gross_pct']:.2f} % replayed; peak {peak_b:.2f} % vs {peak_o:.2f} %")
    return "\n".join(lines)


def iter_days(directory: Path) -> Iterable[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.is_dir())
