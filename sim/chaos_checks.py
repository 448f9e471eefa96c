"""The chaos run's invariant checks: pure functions over plain data (lists and dicts
read from the simulator's referee, from Redis and from supervisord's log), so each
one is unit-tested on small hand-made data (tests/test_chaos.py).

Every function returns what it found (counts and examples), never a bare bool:
the runner prints the figures and decides what is a violation in one place
(`violations`)."""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# -- orders at the broker --------------------------------------------------------------------------


def duplicate_order_refs(broker_orders: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """orderRef -> number of broker orders, for every orderRef the broker accepted more
    than once. An order the broker rejected at placement (perm_id 0: it never lived)
    does not count: "at most one live broker order per intent, ever" (SPEC 6)."""
    accepted = Counter(
        (order.get("order_ref") or "")
        for order in broker_orders
        if order.get("perm_id") and order.get("order_ref")
    )
    return {ref: count for ref, count in sorted(accepted.items()) if count > 1}


# -- fills: broker executions vs fill events in ev.orders -----------------------------------------


@dataclass(frozen=True)
class FillAudit:
    broker_fills: int
    fill_events: int  # ev.orders entries carrying a last_fill
    missing: list[str]  # execIds at the broker without a fill event
    duplicated: dict[str, int]  # execId -> number of fill events (> 1)
    unknown: list[str]  # fill events whose execId the broker never reported


def audit_fills(broker_fills: Iterable[Mapping[str, Any]], order_events: Iterable[Mapping[str, Any]]) -> FillAudit:
    """Each execution at the broker must appear in ev.orders exactly once (as the
    `last_fill` of an order event). `order_events` are ev.orders payloads."""
    broker_ids = [fill["exec_id"] for fill in broker_fills]
    published = Counter(
        event["last_fill"]["exec_id"] for event in order_events if event.get("last_fill")
    )
    known = set(broker_ids)
    return FillAudit(
        broker_fills=len(broker_ids),
        fill_events=sum(published.values()),
        missing=sorted(exec_id for exec_id in known if exec_id not in published),
        duplicated={exec_id: n for exec_id, n in sorted(published.items()) if n > 1},
        unknown=sorted(exec_id for exec_id in published if exec_id not in known),
    )


# -- positions ---------------------------------------------------------------------------------------


def position_mismatches(ours: Mapping[str, int], broker: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """symbol -> (our qty, broker qty) wherever they differ; a symbol absent on one
    side is flat there (0)."""
    symbols = set(ours) | set(broker)
    return {
        symbol: (int(ours.get(symbol, 0)), int(broker.get(symbol, 0)))
        for symbol in sorted(symbols)
        if int(ours.get(symbol, 0)) != int(broker.get(symbol, 0))
    }


def last_published_positions(position_events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """symbol -> qty of the last `position` event per symbol in ev.positions (in
    stream order); flat positions are dropped. Account events are skipped."""
    last: dict[str, int] = {}
    for event in position_events:
        if event.get("type") != "position":
            continue
        payload = event["payload"]
        last[payload["symbol"]] = int(payload["qty"])
    return {symbol: qty for symbol, qty in last.items() if qty != 0}


# -- collar: order prices against the simulator's own mark at that time ---------------------------


class MarkTape:
    """The simulator's mark per symbol over time, from samples (ts_ns, mark) the runner
    took while the symbol was NOT under the runner's own bad data: the trusted
    reference a sane system prices against. `at(symbol, ts)` is the last sample at
    or before ts (or the first one after it, when the order predates every sample)."""

    def __init__(self, samples: Mapping[str, Iterable[tuple[int, float]]]) -> None:
        self.times: dict[str, list[int]] = {}
        self.marks: dict[str, list[float]] = {}
        for symbol, rows in samples.items():
            ordered = sorted((ts, mark) for ts, mark in rows if mark and mark > 0)
            self.times[symbol] = [ts for ts, _ in ordered]
            self.marks[symbol] = [mark for _, mark in ordered]

    def at(self, symbol: str, ts_ns: int) -> float | None:
        times = self.times.get(symbol)
        if not times:
            return None
        index = bisect.bisect_right(times, ts_ns) - 1
        return self.marks[symbol][max(index, 0)]


def orders_outside_collar(requests: Iterable[Mapping[str, Any]], tape: MarkTape, collar_pct: float) -> list[dict[str, Any]]:
    """Every place/modify request whose limit price lies more than collar_pct from the
    mark at its time (a market order, or one on a symbol without any mark, counts as
    outside: nothing vouches for its price)."""
    outside = []
    for request in requests:
        if request.get("event") not in ("place", "modify"):
            continue
        price = request.get("lmt_price")
        mark = tape.at(request.get("symbol", ""), int(request.get("ts_ns", 0)))
        off_pct = None if (price is None or mark is None) else abs(price - mark) / mark * 100
        if off_pct is None or off_pct > collar_pct:
            outside.append({
                "order_ref": request.get("order_ref"), "event": request.get("event"), "symbol": request.get("symbol"),
                "lmt_price": price, "mark": mark, "off_pct": None if off_pct is None else round(off_pct, 3),
                "ts_ns": request.get("ts_ns"),
            })
    return outside


def simulator_mark(quote: Mapping[str, Any]) -> float | None:
    """The simulator's mark from a /quote snapshot, as sim.broker.Broker.mark computes
    it: the last trade bounded by bid and ask; the mid when there is no trade or the
    book is crossed or locked."""
    bid, ask, last = quote.get("bid") or 0.0, quote.get("ask") or 0.0, quote.get("last") or 0.0
    if last <= 0 or bid >= ask:
        mid = (bid + ask) / 2
        return mid if mid > 0 else None
    return min(max(last, bid), ask)


# -- consumer groups and the dead-letter stream --------------------------------------------------------


def pending_by_group(groups: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """"stream/group" -> pending, for every group with pending entries (XINFO GROUPS
    replies per stream, decoded to str keys)."""
    pending = {}
    for stream, rows in sorted(groups.items()):
        for row in rows:
            count = int(row.get("pending", 0))
            if count:
                pending[f"{stream}/{row.get('name')}"] = count
    return pending


def unexpected_dead_letters(
    dlq: Iterable[Mapping[str, Any]], expected: frozenset[tuple[str, str]] = frozenset()
) -> list[dict[str, Any]]:
    """ev.dlq entries not on the known list of (origin_stream, label) pairs the run
    itself causes on purpose. The runner's list is empty: its bad data goes through
    the simulator and market data, which must gate it, never dead-letter it."""
    return [
        {"origin_stream": e.get("origin_stream"), "label": e.get("label"), "group": e.get("group"),
         "reason": (e.get("reason") or "")[:200]}
        for e in dlq
        if (e.get("origin_stream"), e.get("label")) not in expected
    ]


# -- supervisord: exits that were not ours, crash loops ----------------------------------------------

_SPAWNED = re.compile(r"^(?P<ts>\S+ \S+) \w+ spawned: '(?P<name>[^']+)' with pid (?P<pid>\d+)")
_EXITED = re.compile(r"^(?P<ts>\S+ \S+) \w+ exited: (?P<name>\S+) \((?P<how>[^)]*)\)")
_FATAL = re.compile(r"^(?P<ts>\S+ \S+) \w+ gave up: (?P<name>\S+) entered FATAL")


@dataclass(frozen=True)
class Exit:
    ts_s: float  # seconds (supervisord's local time, only differences matter)
    name: str
    pid: int | None
    how: str


def parse_supervisord_log(lines: Iterable[str]) -> tuple[list[Exit], list[str]]:
    """Every exit (with the pid supervisord had spawned last for that program) and
    every program that gave up (FATAL), from supervisord's own log."""
    from datetime import datetime

    current_pid: dict[str, int] = {}
    exits: list[Exit] = []
    fatal: list[str] = []
    for line in lines:
        if match := _SPAWNED.match(line):
            current_pid[match["name"]] = int(match["pid"])
        elif match := _EXITED.match(line):
            when = datetime.strptime(match["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            exits.append(Exit(when, match["name"], current_pid.get(match["name"]), match["how"]))
        elif match := _FATAL.match(line):
            fatal.append(match["name"])
    return exits, fatal


def exits_not_ours(exits: Iterable[Exit], our_kill_pids: set[int]) -> list[Exit]:
    return [e for e in exits if e.pid not in our_kill_pids]


def crash_loops(unexpected: Iterable[Exit], max_per_minute: int) -> dict[str, int]:
    """program -> most exits not caused by the runner within any 60 s window, for every
    program above max_per_minute: a daemon that keeps dying by itself."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in unexpected:
        by_name[e.name].append(e.ts_s)
    loops = {}
    for name, times in sorted(by_name.items()):
        times.sort()
        worst = max(bisect.bisect_right(times, t + 60.0) - i for i, t in enumerate(times))
        if worst > max_per_minute:
            loops[name] = worst
    return loops


# -- the verdict --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_potential_gross_pct: float = 130.0
    max_final_gross_pct: float = 100.0
    max_unexpected_exits_per_minute: int = 3


def violations(figures: Mapping[str, Any], required: Mapping[str, int], limits: Limits = Limits()) -> list[str]:
    """Every broken promise, as one readable line each. `required` is what the run
    had to inject (kills, redis_restarts, broker_faults ...): a run that injected less
    proves less, so it fails too."""
    found = []

    def zero(key: str, what: str) -> None:
        if figures.get(key):
            found.append(f"{what}: {key}={figures[key]}")

    zero("dup_order_refs", "duplicate broker orders for one orderRef")
    zero("fills_missing", "broker fills without a fill event in ev.orders")
    zero("fills_duplicated", "execIds published more than once in ev.orders")
    zero("fills_unknown", "fill events for execIds the broker never reported")
    zero("position_mismatches", "state:positions differs from the broker")
    zero("published_position_mismatches", "the last ev.positions differ from the broker")
    zero("collar_violations", "orders outside the collar at the simulator")
    zero("pending", "entries still pending in consumer groups after the settle period")
    zero("dlq_unexpected", "unexpected ev.dlq entries")
    zero("crash_loops", "programs that died by themselves more than the limit in a minute")
    zero("programs_not_running", "programs not RUNNING at the end (FATAL/BACKOFF/EXITED)")
    zero("referee_log_evicted", "the referee log dropped entries: the checks above are incomplete")
    potential = figures.get("max_potential_gross_pct")
    if potential is None or potential > limits.max_potential_gross_pct:
        found.append(f"broker-side potential gross above {limits.max_potential_gross_pct:g} %: max_potential_gross_pct={potential}")
    gross = figures.get("final_gross_pct")
    if gross is None or gross > limits.max_final_gross_pct:
        found.append(f"gross after the close above {limits.max_final_gross_pct:g} %: final_gross_pct={gross}")
    for key, minimum in required.items():
        if int(figures.get(key, 0)) < minimum:
            found.append(f"the run injected too little: {key}={figures.get(key, 0)} < {minimum}")
    return found


def result_line(figures: Mapping[str, Any]) -> str:
    """`RESULT key=value ...`: numbers as they are (base units), text without spaces."""
    def text(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace(" ", "_")

    return "RESULT " + " ".join(f"{key}={text(value)}" for key, value in figures.items())
