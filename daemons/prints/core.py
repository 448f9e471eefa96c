"""Truth ticks and GRPAN: the pure rules of the prints/features worker (SPEC 6).

Everything here is plain data and arithmetic, no Redis and no clock:

* `venue_class`, `is_truth_tick`, `grpan_weight`: the per-print rules.
* `grpan(window, last_price, rules)`: the definition of GRPAN over one window.
* `SymbolPrints`: one symbol's bounded buffer of prints with incremental time
  windows (so a feature costs O(distinct prices), not O(prints in a day)); its
  results are checked against `grpan` by property tests.

Exactness: prices are grouped on an integer grid of $0.0001 (`price_key`), and
weights are integers in hundredths (lit 1.0 -> 100), so sums, ties and the
+-$0.04 band never depend on float rounding.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

from qe.clock import NS_PER_S
from qe.config import PlausibilityRules, PrintsRules
from qe.plausibility import EpisodeChange, episode_change, print_problem, trusted_reference

PRICE_SCALE = 10_000  # price keys are in $0.0001
WEIGHT_SCALE = 100  # weights are in hundredths

VenueClass = Literal["lit", "dark"]


def price_key(price: float) -> int:
    return round(price * PRICE_SCALE)


def key_price(key: int) -> float:
    return round(key / PRICE_SCALE, 4)


def normalize_venue(venue: str) -> str:
    return venue.strip().upper()


@dataclass(frozen=True, slots=True)
class Rules:
    """PrintsRules compiled for fast, exact evaluation."""

    lit: frozenset[str]
    dark: frozenset[str]
    unknown_is_dark: bool
    truth_min_size: int
    dark_truth_sizes: frozenset[int]
    grpan_min_size: int
    weight_lit: int
    weight_dark_truth_size: int
    weight_dark_round_lot: int
    dark_round_lot_min: int
    weight_dark_other: int
    band_key: int
    last_n: int
    windows_ns: tuple[tuple[str, int], ...]  # (name, length) in config order
    buffer_cap: int

    @classmethod
    def from_config(cls, config: PrintsRules) -> "Rules":
        def weight(value: float) -> int:
            return round(value * WEIGHT_SCALE)

        return cls(
            lit=frozenset(normalize_venue(v) for v in config.lit_venues),
            dark=frozenset(normalize_venue(v) for v in config.dark_venues),
            unknown_is_dark=config.unknown_venue_class == "dark",
            truth_min_size=config.truth_min_size,
            dark_truth_sizes=frozenset(config.dark_truth_sizes),
            grpan_min_size=config.grpan_min_size,
            weight_lit=weight(config.weight_lit),
            weight_dark_truth_size=weight(config.weight_dark_truth_size),
            weight_dark_round_lot=weight(config.weight_dark_round_lot),
            dark_round_lot_min=config.dark_round_lot_min,
            weight_dark_other=weight(config.weight_dark_other),
            band_key=round(config.concentration_band * PRICE_SCALE),
            last_n=config.last_n,
            windows_ns=tuple((name, seconds * NS_PER_S) for name, seconds in config.windows_s.items()),
            buffer_cap=config.buffer_cap,
        )

    @property
    def last_n_name(self) -> str:
        return f"last{self.last_n}"

    def is_known_venue(self, venue: str) -> bool:
        venue = normalize_venue(venue)
        return venue in self.lit or venue in self.dark


# --- per-print rules ---------------------------------------------------------------------


def venue_class(venue: str, rules: Rules) -> VenueClass:
    venue = normalize_venue(venue)
    if venue in rules.dark:
        return "dark"
    if venue in rules.lit:
        return "lit"
    return "dark" if rules.unknown_is_dark else "lit"


def is_truth_tick(size: int, venue: str, rules: Rules) -> bool:
    """A print that shows the real price: >= truth_min_size on a lit venue; on a
    dark venue only exactly one of dark_truth_sizes (100 or 200 shares)."""
    if size < rules.truth_min_size:
        return False
    if venue_class(venue, rules) == "dark":
        return size in rules.dark_truth_sizes
    return True


def grpan_weight(size: int, venue: str, rules: Rules) -> int:
    """GRPAN weight in hundredths: lit 1.0; dark 100/200 -> 1.0, other dark round
    lots >= 300 -> 0.4, any other dark print 0.2; under 20 shares 0."""
    if size < rules.grpan_min_size:
        return 0
    if venue_class(venue, rules) == "lit":
        return rules.weight_lit
    if size in rules.dark_truth_sizes:
        return rules.weight_dark_truth_size
    if size >= rules.dark_round_lot_min and size % 100 == 0:
        return rules.weight_dark_round_lot
    return rules.weight_dark_other


@dataclass(frozen=True, slots=True)
class PrintRecord:
    """One print as the worker keeps it. `seq` orders prints with the same trade
    time by arrival; only its relative order matters."""

    key: str
    price: float
    size: int
    venue: str
    ts_ns: int
    seq: int
    price_key: int
    weight: int
    truth: bool

    @property
    def order(self) -> tuple[int, int]:
        return (self.ts_ns, self.seq)


def make_record(key: str, price: float, size: int, venue: str, ts_ns: int, seq: int, rules: Rules) -> PrintRecord:
    venue = normalize_venue(venue)
    return PrintRecord(
        key=key,
        price=price,
        size=size,
        venue=venue,
        ts_ns=ts_ns,
        seq=seq,
        price_key=price_key(price),
        weight=grpan_weight(size, venue, rules),
        truth=is_truth_tick(size, venue, rules),
    )


# --- GRPAN over one window ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowResult:
    grpan_price: float | None
    concentration_pct: float
    print_count: int
    deviation: float | None
    stale: bool = False
    truncated: bool = False


EMPTY = WindowResult(grpan_price=None, concentration_pct=0.0, print_count=0, deviation=None)


def _finish(
    best_key: int | None, counts_by_key: Iterable[tuple[int, int]], total: int, last_price: float | None, band_key: int
) -> WindowResult:
    if best_key is None or total == 0:
        return EMPTY
    low, high = best_key - band_key, best_key + band_key
    near = 0
    for key, count in counts_by_key:
        if low <= key <= high:
            near += count
    grpan_price = key_price(best_key)
    deviation = None if last_price is None else round(last_price - grpan_price, 4)
    return WindowResult(
        grpan_price=grpan_price,
        concentration_pct=round(100.0 * near / total, 4),
        print_count=total,
        deviation=deviation,
    )


def grpan(window: Sequence[PrintRecord], last_price: float | None, rules: Rules) -> WindowResult:
    """GRPAN of a window (the definition; `SymbolPrints` computes the same incrementally).

    Only prints with weight > 0 (>= grpan_min_size shares) belong to the window.
    Each adds its weight to its exact price; the GRPAN price has the largest total
    weight; on a tie, the price whose first print in the window came first (by
    trade time, then arrival) wins. concentration_pct = share of the window's
    prints, by count, within +-band of the GRPAN price. deviation = last_price -
    GRPAN price.
    """
    weights: dict[int, int] = {}
    counts: dict[int, int] = {}
    # In time order, dict insertion order is the order of each price's first print.
    for record in sorted(window, key=_order):
        if record.weight <= 0:
            continue
        key = record.price_key
        weights[key] = weights.get(key, 0) + record.weight
        counts[key] = counts.get(key, 0) + 1
    best: int | None = None
    for key, weight in weights.items():
        if best is None or weight > weights[best]:  # strictly greater: a tie keeps the earlier price
            best = key
    return _finish(best, counts.items(), sum(counts.values()), last_price, rules.band_key)


def _order(record: "PrintRecord") -> tuple[int, int]:
    return (record.ts_ns, record.seq)


# --- one symbol: bounded buffer + incremental time windows ------------------------------------


@dataclass(slots=True)
class _PriceGroup:
    weight: int = 0
    members: list[tuple[int, int]] = field(default_factory=list)  # (ts, seq) ascending


class TimeWindow:
    """Eligible prints with ts in (as_of - length, +inf), aggregated by price."""

    def __init__(self, length_ns: int) -> None:
        self.length_ns = length_ns
        self.start_ns: int | None = None  # exclusive lower bound; None: nothing tracked yet
        self.groups: dict[int, _PriceGroup] = {}
        self.count = 0

    def contains(self, record: PrintRecord) -> bool:
        return self.start_ns is not None and record.ts_ns > self.start_ns

    def add(self, record: PrintRecord) -> None:
        group = self.groups.get(record.price_key)
        if group is None:
            group = self.groups[record.price_key] = _PriceGroup()
        group.weight += record.weight
        members = group.members
        if not members or members[-1] < record.order:
            members.append(record.order)
        else:
            bisect.insort(members, record.order)
        self.count += 1

    def remove(self, record: PrintRecord) -> None:
        group = self.groups[record.price_key]
        group.weight -= record.weight
        members = group.members
        if members[0] == record.order:
            del members[0]
        else:
            del members[bisect.bisect_left(members, record.order)]
        if not members:
            del self.groups[record.price_key]
        self.count -= 1

    def result(self, last_price: float | None, band_key: int) -> WindowResult:
        best: int | None = None
        best_weight, best_first = -1, (0, 0)
        counts = []
        for key, group in self.groups.items():
            members = group.members
            counts.append((key, len(members)))
            weight = group.weight
            if weight > best_weight or (weight == best_weight and members[0] < best_first):
                best, best_weight, best_first = key, weight, members[0]
        return _finish(best, counts, self.count, last_price, band_key)


@dataclass(frozen=True, slots=True)
class FeatureValues:
    last_price: float | None
    windows: dict[str, WindowResult]
    truth_tick: PrintRecord | None
    last_n_name: str

    @property
    def headline(self) -> WindowResult:
        return self.windows[self.last_n_name]


class SymbolPrints:
    """One symbol's prints: a buffer capped at `rules.buffer_cap` prints (the oldest
    *arrival* is dropped first, exactly like the persisted Redis list), dedupe by
    idempotency key over the buffer, incremental time windows ending at the newest
    print, and the last truth tick."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.sorted: list[PrintRecord] = []  # by (ts, seq)
        self.sorted_order: list[tuple[int, int]] = []  # parallel keys for bisect
        self.eligible: list[PrintRecord] = []  # weight > 0, by (ts, seq)
        self.eligible_order: list[tuple[int, int]] = []
        self.arrivals: deque[PrintRecord] = deque()
        self.keys: set[str] = set()
        self.windows = {name: TimeWindow(length) for name, length in rules.windows_ns}
        self.truth_tick: PrintRecord | None = None
        self.next_seq = 0
        self.last_key: str | None = None

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def as_of_ns(self) -> int | None:
        """Time windows end at the newest print (deterministic: no clock involved)."""
        return self.sorted_order[-1][0] if self.sorted_order else None

    def record(self, key: str, price: float, size: int, venue: str, ts_ns: int) -> PrintRecord:
        return make_record(key, price, size, venue, ts_ns, self.next_seq, self.rules)

    def add(self, record: PrintRecord) -> tuple[bool, PrintRecord | None]:
        """Add a print. Returns (added, evicted): added is False for a duplicate key
        or a print older than everything a full buffer holds (it cannot change
        any window)."""
        if record.key in self.keys:
            return False, None
        if len(self.arrivals) >= self.rules.buffer_cap and record.order < self.sorted_order[0]:
            return False, None
        self.next_seq = max(self.next_seq, record.seq) + 1
        self.keys.add(record.key)
        self.arrivals.append(record)
        self.last_key = record.key
        _insert(self.sorted, self.sorted_order, record)
        if record.weight > 0:
            _insert(self.eligible, self.eligible_order, record)
            for window in self.windows.values():
                if window.contains(record):
                    window.add(record)
        if record.truth and (self.truth_tick is None or record.ts_ns >= self.truth_tick.ts_ns):
            self.truth_tick = record
        evicted = None
        if len(self.arrivals) > self.rules.buffer_cap:
            evicted = self.arrivals.popleft()
            self._forget(evicted)
        self._advance()
        return True, evicted

    def _forget(self, record: PrintRecord) -> None:
        self.keys.discard(record.key)
        _delete(self.sorted, self.sorted_order, record)
        if record.weight > 0:
            _delete(self.eligible, self.eligible_order, record)
            for window in self.windows.values():
                if window.contains(record):
                    window.remove(record)
        # The truth tick is kept even when its print leaves the buffer.

    def _advance(self) -> None:
        """Move every time window to end at the newest print (either direction)."""
        as_of = self.as_of_ns
        if as_of is None:
            return
        for window in self.windows.values():
            new_start = as_of - window.length_ns
            old_start = window.start_ns
            if old_start == new_start:
                continue
            if old_start is None:
                for record in self._eligible_after(new_start):
                    window.add(record)
            elif new_start > old_start:
                for record in self._eligible_between(old_start, new_start):
                    window.remove(record)
            else:
                for record in self._eligible_between(new_start, old_start):
                    window.add(record)
            window.start_ns = new_start

    def _eligible_after(self, start_ns: int) -> list[PrintRecord]:
        index = bisect.bisect_right(self.eligible_order, (start_ns, _MAX_SEQ))
        return self.eligible[index:]

    def _eligible_between(self, low_ns: int, high_ns: int) -> list[PrintRecord]:
        """Eligible prints with low < ts <= high."""
        low = bisect.bisect_right(self.eligible_order, (low_ns, _MAX_SEQ))
        high = bisect.bisect_right(self.eligible_order, (high_ns, _MAX_SEQ))
        return self.eligible[low:high]

    def last_eligible(self, n: int) -> list[PrintRecord]:
        return self.eligible[-n:]

    def evaluate(self, now_ns: int) -> FeatureValues:
        """Every window's GRPAN as of the newest print; a time window with no
        eligible print in (now - length, now] is stale and reported empty."""
        rules = self.rules
        last_price = self.eligible[-1].price if self.eligible else None
        newest_eligible = self.eligible_order[-1][0] if self.eligible_order else None
        full = len(self.arrivals) >= rules.buffer_cap
        oldest = self.sorted_order[0][0] if self.sorted_order else None
        windows: dict[str, WindowResult] = {
            rules.last_n_name: grpan(self.last_eligible(rules.last_n), last_price, rules),
        }
        # Windows nest (same end, growing length): one holding as many prints as
        # the next shorter one holds the same prints, so it has the same result.
        previous: tuple[int, WindowResult] | None = None
        for name, window in sorted(self.windows.items(), key=lambda item: item[1].length_ns):
            if newest_eligible is None or newest_eligible <= now_ns - window.length_ns:
                windows[name] = WindowResult(None, 0.0, 0, None, stale=True)
                continue
            if previous is not None and previous[0] == window.count:
                result = previous[1]
            else:
                result = window.result(last_price, rules.band_key)
                previous = (window.count, result)
            truncated = full and oldest is not None and window.start_ns is not None and oldest > window.start_ns
            if truncated:
                result = WindowResult(
                    result.grpan_price, result.concentration_pct, result.print_count, result.deviation, truncated=True
                )
            windows[name] = result
        ordered = {rules.last_n_name: windows[rules.last_n_name]}
        ordered.update((name, windows[name]) for name in self.windows)  # config order
        return FeatureValues(last_price, ordered, self.truth_tick, rules.last_n_name)

    def window_prints(self, name: str) -> list[PrintRecord]:
        """The eligible prints of a time window as of the newest print (for tests)."""
        window = self.windows[name]
        return [] if window.start_ns is None else self._eligible_after(window.start_ns)


_MAX_SEQ = 1 << 62


def _insert(records: list[PrintRecord], orders: list[tuple[int, int]], record: PrintRecord) -> None:
    if not orders or orders[-1] < record.order:
        records.append(record)
        orders.append(record.order)
    else:
        index = bisect.bisect_left(orders, record.order)
        records.insert(index, record)
        orders.insert(index, record.order)


def _delete(records: list[PrintRecord], orders: list[tuple[int, int]], record: PrintRecord) -> None:
    index = bisect.bisect_left(orders, record.order)
    if index < len(orders) and orders[index] == record.order:
        del records[index]
        del orders[index]


# --- plausibility: prints kept out of truth ticks and GRPAN (SPEC 9) --------------------------------

FUTURE_TIME = "future_time"  # not in qe.plausibility's print gate: a trade time ahead of our clock


@dataclass
class PrintScreen:
    """One symbol's memory for the print gate: the excluded prints just before now (key,
    price; a run that agrees with itself is the market moving) and the open episode."""

    excluded: list[tuple[str, float]] = field(default_factory=list)
    since_ns: int | None = None  # ts_ns of the event that opened the episode
    problem: str | None = None
    excluded_in_episode: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {"excluded": self.excluded, "since_ns": self.since_ns, "problem": self.problem, "count": self.excluded_in_episode},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes, keep: int) -> "PrintScreen":
        value = json.loads(text)
        excluded = [(str(key), float(price)) for key, price in value.get("excluded", [])][-keep:]
        if not all(math.isfinite(price) and price > 0 for _key, price in excluded):
            raise ValueError("excluded price not finite and positive")
        since = value.get("since_ns")
        problem = value.get("problem")
        return cls(
            excluded=excluded,
            since_ns=int(since) if since is not None else None,
            problem=str(problem)[:32] if problem is not None else None,
            excluded_in_episode=int(value.get("count", 0)),
        )


@dataclass(frozen=True, slots=True)
class Screening:
    """The print gate's verdict on one print and what it did to the symbol's episode."""

    problem: str | None  # None: the print counts
    reference: float | None
    episode: EpisodeChange | None
    since_ns: int | None  # the episode's start (for a start or an end)
    excluded_in_episode: int = 0


def gate_reference(prints: SymbolPrints) -> float | None:
    """The trusted reference of a symbol for the print gate: its last truth tick, else the
    GRPAN of its last prints (computed only when there is no truth tick)."""
    truth = prints.truth_tick.price if prints.truth_tick is not None else None
    if truth is not None:
        return trusted_reference(truth, None, None)
    rules = prints.rules
    return trusted_reference(None, grpan(prints.last_eligible(rules.last_n), None, rules).grpan_price, None)


def screen_print(
    symbol: str,
    prints: SymbolPrints,
    screen: PrintScreen,
    record: PrintRecord,
    event_ts_ns: int,
    now_ns: int,
    rules: PlausibilityRules,
) -> Screening:
    """Judge one (not yet added) print and update the symbol's screen. An excluded print
    never reaches the buffer, the truth tick or any GRPAN window."""
    reference = gate_reference(prints)
    if record.ts_ns > now_ns + int(rules.max_future_skew_s * NS_PER_S):
        problem: str | None = FUTURE_TIME
    else:
        verdict = print_problem(
            record.price,
            record.size,
            age_s=(now_ns - record.ts_ns) / NS_PER_S,
            reference=reference,
            recent_excluded=[price for _key, price in screen.excluded],
            rules=rules.prints,
        )
        problem = None if verdict is None else verdict.value
    change = episode_change(symbol, screen.since_ns is not None, problem)
    since = screen.since_ns
    if problem is None:
        count = screen.excluded_in_episode
        screen.excluded.clear()
        screen.since_ns, screen.problem, screen.excluded_in_episode = None, None, 0
        return Screening(None, reference, change, since, count)
    if all(key != record.key for key, _price in screen.excluded):
        screen.excluded.append((record.key, record.price))
        del screen.excluded[: -rules.prints.confirm_prints]
    if change is not None:  # started
        since = screen.since_ns = event_ts_ns
        screen.problem = problem
    screen.excluded_in_episode += 1
    return Screening(problem, reference, change, since, screen.excluded_in_episode)


def plausible_stored(price: float, size: int, ts_ns: int, now_ns: int, rules: PlausibilityRules) -> bool:
    """Whether a print read back from saved state is a number a print can be (state saved
    before the gates existed, or written by hand, must not come back into the windows)."""
    return (
        isinstance(price, (int, float)) and not isinstance(price, bool) and math.isfinite(price)
        and 0 < price <= rules.max_price
        and isinstance(size, int) and not isinstance(size, bool) and 0 < size <= rules.prints.max_size
        and isinstance(ts_ns, int) and not isinstance(ts_ns, bool)
        and 0 < ts_ns <= now_ns + int(rules.max_future_skew_s * NS_PER_S)
    )
