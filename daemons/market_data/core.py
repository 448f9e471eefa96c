"""The pure rules of the market data worker: print identity, dedupe memory, the
stale-feed state, reconnect delays, tick-by-tick slot planning, getTicks polling
and the Hammer Pro message shapes. No sockets, no Redis, no clock reads: every
function takes `now` from its caller.
"""

from __future__ import annotations

import math
import reprlib
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence
from zoneinfo import ZoneInfo

from redis.backoff import EqualJitterBackoff

from qe.clock import NS_PER_S
from qe.config import PlausibilityRules
from qe.contracts import L1, Print, idempotency_key
from qe.plausibility import (
    EpisodeChange,
    PrintProblem,
    QuoteProblem,
    QuoteVerdict,
    episode_change,
    print_problem,
    quote_verdict,
    trusted_reference,
)
from qe.universe import from_hammer

NS_PER_MS = 1_000_000
MAX_TS_NS = 2**63  # epoch ns that fit a signed 64-bit integer (year 2262)


# Feed values in log lines and errors: bounded, whatever the feed sent (a 10 MB string,
# a list nested 900 deep).
_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxlevel = 2
_SHORT.maxlist = _SHORT.maxdict = 4


def short_repr(value: Any) -> str:
    try:
        return _SHORT.repr(value)[:120]
    except Exception:  # noqa: BLE001 - a hostile object's repr may fail any way
        return f"<unprintable {type(value).__name__}>"


class MalformedMessage(ValueError):
    """A feed message that cannot be used; `reason` is a short label for metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- print identity --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawTick:
    """A trade as a feed reports it, before it gets its identity."""

    symbol: str  # display form
    ts_ns: int
    price: float
    size: int
    venue: str
    conditions: tuple[str, ...] = ()

    @property
    def identity(self) -> tuple[str, int, str, int, str]:
        return (self.symbol, self.ts_ns, f"{self.price:.4f}", self.size, self.venue)


def print_key(tick: RawTick, occurrence: int) -> str:
    """`print:<symbol>:<trade ts ns>:<price>:<size>:<venue>:<occurrence>`.

    The occurrence index tells apart genuinely identical prints (same symbol,
    time, price, size and venue); see `keyed_batch` and `OccurrenceCounter`."""
    symbol, ts_ns, price, size, venue = tick.identity
    return idempotency_key("print", symbol, ts_ns, price, size, venue, occurrence)


def keyed_batch(ticks: Iterable[RawTick]) -> list[tuple[RawTick, str]]:
    """Keys for one snapshot of a symbol's recent trades (a getTicks reply).

    Ticks are ordered by trade time (stable), and identical ticks are numbered
    0, 1, ... in that order. A later, overlapping snapshot numbers the same
    prints the same way, so a re-sent print gets the same key. Limit: when a
    snapshot's oldest edge cuts through a run of identical prints (same time
    to the feed's resolution, price, size and venue), the survivors are
    renumbered from 0 and the newest of them looks like a re-send."""
    ordered = sorted(ticks, key=lambda tick: tick.ts_ns)
    seen: dict[tuple, int] = {}
    keyed = []
    for tick in ordered:
        occurrence = seen.get(tick.identity, 0)
        seen[tick.identity] = occurrence + 1
        keyed.append((tick, print_key(tick, occurrence)))
    return keyed


class OccurrenceCounter:
    """Keys for a stream of ticks that are never re-sent (IB tick-by-tick): the
    n-th identical tick gets occurrence n. Counts survive reconnects (so a tick
    after a reconnect never reuses an earlier key) and are forgotten once their
    trade time is `horizon_ns` older than the newest tick seen."""

    def __init__(self, horizon_ns: int = 600 * NS_PER_S) -> None:
        self.horizon_ns = horizon_ns
        self.counts: OrderedDict[tuple, int] = OrderedDict()
        self.newest_ns = 0

    def key(self, tick: RawTick) -> str:
        identity = tick.identity
        occurrence = self.counts.get(identity, 0)
        self.counts[identity] = occurrence + 1
        self.counts.move_to_end(identity)
        if tick.ts_ns > self.newest_ns:
            self.newest_ns = tick.ts_ns
            self._forget_old()
        return print_key(tick, occurrence)

    def _forget_old(self) -> None:
        limit = self.newest_ns - self.horizon_ns
        while self.counts:
            identity = next(iter(self.counts))
            if identity[1] >= limit:
                break
            del self.counts[identity]


class SeenKeys:
    """Bounded memory of published print keys (oldest forgotten first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str) -> bool:
        """Remember a key; False if it was already known."""
        if key in self.keys:
            return False
        self.keys[key] = None
        if len(self.keys) > self.capacity:
            self.keys.popitem(last=False)
        return True


def print_payload(tick: RawTick) -> Print:
    return Print(
        symbol=tick.symbol,
        price=tick.price,
        size=tick.size,
        venue=tick.venue,
        conditions=list(tick.conditions),
        trade_ts_ns=tick.ts_ns,
    )


def l1_key(quote: L1) -> str:
    return idempotency_key(
        "l1", quote.symbol, quote.quote_ts_ns, quote.bid, quote.ask, quote.bid_size, quote.ask_size, quote.last
    )


# --- reconnect delays -------------------------------------------------------------------------


class ReconnectBackoff:
    """Capped exponential backoff with jitter (redis-py's EqualJitterBackoff): the
    n-th consecutive failure waits between half and all of min(cap, base * 2**(n-1))."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.backoff = EqualJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return self.backoff.compute(self.failures - 1)

    def reset(self) -> None:
        self.failures = 0


# --- stale feed ---------------------------------------------------------------------------------

# IB codes (SPEC 6, Broker connectivity).
IB_RESTORED = {1101, 1102}
IB_FARM_BROKEN = {1100: "server", 2103: "md", 2105: "hmds", 2110: "server"}
IB_FARM_OK = {2104: "md", 2106: "hmds", 2158: "secdef"}


def farm_name(message: str) -> str:
    """'Market data farm connection is broken:usfarm' -> 'usfarm' ('' if none)."""
    _, sep, tail = message.rpartition(":")
    return tail.strip() if sep else ""


@dataclass
class FeedHealth:
    """Whether the feed can be trusted. Stale when a data farm reports broken
    (IB 2103/2105/2110) or no update came for `stale_after_ns` while the market
    is open. `evaluate` returns the reason when the state changes."""

    stale_after_ns: int
    last_update_ns: int | None = None
    broken: dict[str, str] = field(default_factory=dict)  # farm key -> message
    stale: bool = False
    reason: str = ""

    def on_update(self, now_ns: int) -> None:
        self.last_update_ns = now_ns

    def on_connected(self, now_ns: int) -> None:
        """A fresh connection: old farm reports no longer apply; silence counts from now."""
        self.broken.clear()
        self.last_update_ns = now_ns

    def on_ib_code(self, code: int, message: str) -> None:
        if code in IB_FARM_BROKEN:
            self.broken[f"{IB_FARM_BROKEN[code]}:{farm_name(message)}"] = f"{code} {message}"
        elif code in IB_FARM_OK:
            kind, farm = IB_FARM_OK[code], farm_name(message)
            for key in [k for k in self.broken if k == f"{kind}:{farm}" or (k.startswith(f"{kind}:") and not farm)]:
                del self.broken[key]
        elif code in IB_RESTORED:
            for key in [k for k in self.broken if k.startswith("server:")]:
                del self.broken[key]

    def silent_for_ns(self, now_ns: int) -> int:
        return 0 if self.last_update_ns is None else now_ns - self.last_update_ns

    def evaluate(self, now_ns: int, market_open: bool) -> str | None:
        """New state's reason if stale/ok flipped, else None."""
        if self.broken:
            reason = "data farm broken: " + "; ".join(sorted(self.broken.values()))
        elif market_open and self.silent_for_ns(now_ns) >= self.stale_after_ns:
            reason = f"no update for {self.silent_for_ns(now_ns) / NS_PER_S:.0f}s while the market is open"
        else:
            reason = ""
        stale = bool(reason)
        if stale == self.stale:
            if stale:
                self.reason = reason
            return None
        self.stale, self.reason = stale, reason
        return reason or "feed ok"


# --- IB tick-by-tick slots ------------------------------------------------------------------------


def plan_tick_by_tick(
    universe: Sequence[str], priority: Iterable[str], cap: int, rotation_index: int
) -> list[str]:
    """Which symbols hold the `cap` tick-by-tick slots.

    Priority symbols (open positions and orders) come first, in universe order.
    The remaining slots rotate through the other symbols: rotation step k starts
    at offset k * free_slots, so every symbol gets its turn."""
    if cap <= 0:
        return []
    wanted = set(priority)
    first = [symbol for symbol in universe if symbol in wanted][:cap]
    rest = [symbol for symbol in universe if symbol not in wanted]
    free = cap - len(first)
    if free <= 0 or not rest:
        return first
    if len(rest) <= free:
        return first + rest
    start = (rotation_index * free) % len(rest)
    return first + [rest[(start + i) % len(rest)] for i in range(free)]


# --- Hammer getTicks polling ------------------------------------------------------------------------


class TickPoller:
    """Which symbols to ask getTicks for, and when.

    A symbol is due as soon as its L1 shows new volume (a trade happened), and
    every symbol is swept at least every `sweep_ns`; requests are limited to
    `rate_per_s` (token bucket) and one outstanding request per symbol."""

    def __init__(self, symbols: Sequence[str], sweep_s: float, rate_per_s: float) -> None:
        self.symbols = list(symbols)
        self.sweep_ns = int(sweep_s * NS_PER_S)
        self.rate_per_s = rate_per_s
        self.tokens = max(1.0, rate_per_s)
        self.refilled_ns: int | None = None
        self.due: OrderedDict[str, None] = OrderedDict((symbol, None) for symbol in self.symbols)
        self.last_poll_ns: dict[str, int] = {}
        self.volume: dict[str, float] = {}
        self.outstanding: dict[str, int] = {}  # symbol -> sent at

    def reset(self) -> None:
        """After a reconnect: everything is due again; nothing is outstanding."""
        self.outstanding.clear()
        self.due = OrderedDict((symbol, None) for symbol in self.symbols)

    def on_l1(self, symbol: str, volume: float | None, last: float | None) -> None:
        marker = volume if volume is not None else last
        if marker is None:
            return
        previous = self.volume.get(symbol)
        self.volume[symbol] = marker
        if previous is not None and marker != previous:
            self.due[symbol] = None

    def on_reply(self, symbol: str) -> None:
        self.outstanding.pop(symbol, None)

    def next_requests(self, now_ns: int, timeout_ns: int) -> list[str]:
        if self.refilled_ns is not None:
            elapsed = (now_ns - self.refilled_ns) / NS_PER_S
            self.tokens = min(max(1.0, self.rate_per_s), self.tokens + elapsed * self.rate_per_s)
        self.refilled_ns = now_ns
        for symbol, sent in list(self.outstanding.items()):
            if now_ns - sent > timeout_ns:
                del self.outstanding[symbol]  # no reply: ask again later
                self.due[symbol] = None
        for symbol in self.symbols:
            if symbol not in self.due and now_ns - self.last_poll_ns.get(symbol, 0) >= self.sweep_ns:
                self.due[symbol] = None
        chosen = []
        for symbol in list(self.due):
            if self.tokens < 1.0:
                break
            if symbol in self.outstanding:
                continue
            del self.due[symbol]
            self.tokens -= 1.0
            self.outstanding[symbol] = now_ns
            self.last_poll_ns[symbol] = now_ns
            chosen.append(symbol)
        return chosen


# --- Hammer Pro message shapes -----------------------------------------------------------------------


def parse_hammer_time(value: Any, zone: ZoneInfo) -> int:
    """getTicks `t`: epoch milliseconds (number or digits) or ISO-8601 text; text
    without an offset is read in `zone`."""
    try:
        ts_ns = _hammer_time_ns(value, zone)
    except MalformedMessage:
        raise
    except (ValueError, OverflowError, TypeError):  # huge numbers, absurd dates
        raise MalformedMessage("bad_time", short_repr(value)) from None
    if not 0 < ts_ns < MAX_TS_NS:
        raise MalformedMessage("bad_time", short_repr(value))
    return ts_ns


def _hammer_time_ns(value: Any, zone: ZoneInfo) -> int:
    if isinstance(value, bool):
        raise MalformedMessage("bad_time", short_repr(value))
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise MalformedMessage("bad_time", short_repr(value))
        return int(round(value * NS_PER_MS))
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 64:
            raise MalformedMessage("bad_time", short_repr(value))
        if text.isdigit():
            return int(text) * NS_PER_MS
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1_000
    raise MalformedMessage("bad_time", short_repr(value))


def _number(value: Any, name: str, *, positive: bool = False) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MalformedMessage(f"bad_{name}", short_repr(value))
    if isinstance(value, str) and len(value) > 64:
        raise MalformedMessage(f"bad_{name}", short_repr(value))
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer of 400 digits
        raise MalformedMessage(f"bad_{name}", short_repr(value)) from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise MalformedMessage(f"bad_{name}", short_repr(value))
    return number


def _price(value: Any, name: str) -> float | None:
    number = _number(value, name)
    return None if number is None or number == 0 else number  # Hammer sends 0 for "no quote"


def _size(value: Any, name: str) -> int:
    number = _number(value, name)
    return 0 if number is None else int(number)


def _venue(value: Any) -> str:
    if not isinstance(value, str):
        return "UNKNOWN"
    return value.strip().upper()[:16] or "UNKNOWN"


def hammer_symbol(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 32:
        raise MalformedMessage("bad_symbol", short_repr(value))
    return from_hammer(value.strip().upper())


def parse_l1_update(result: Any, now_ns: int) -> tuple[L1, float | None]:
    """`L1Update.result` -> (L1 payload, cumulative volume). Raises MalformedMessage."""
    if not isinstance(result, dict):
        raise MalformedMessage("bad_l1", "result is not an object")
    last_size = _number(result.get("size"), "size")
    fields = dict(
        symbol=hammer_symbol(result.get("sym")),
        bid=_price(result.get("bid"), "bid"),
        ask=_price(result.get("ask"), "ask"),
        bid_size=_size(result.get("bidSize", result.get("bidsize")), "bid_size"),
        ask_size=_size(result.get("askSize", result.get("asksize")), "ask_size"),
        last=_price(result.get("last"), "last"),
        last_size=None if last_size is None else int(last_size),
        venue=_venue(result.get("venue")) if result.get("venue") else None,
        quote_ts_ns=now_ns,
    )
    try:
        quote = L1(**fields)
    except ValueError as exc:  # pydantic ValidationError: e.g. a symbol of the wrong form
        raise MalformedMessage("bad_l1", str(exc).splitlines()[0]) from None
    return quote, _number(result.get("volume"), "volume")


def parse_ticks(symbol: str, result: Any, zone: ZoneInfo) -> tuple[list[RawTick], int]:
    """`getTicks.result` -> (trades, number of unusable rows skipped)."""
    rows = result.get("data") if isinstance(result, dict) else result
    if not isinstance(rows, list):
        raise MalformedMessage("bad_ticks", "result.data is not a list")
    ticks, skipped = [], 0
    for row in rows:
        try:
            if not isinstance(row, dict):
                raise MalformedMessage("bad_tick", "row is not an object")
            price = _number(row.get("p"), "price", positive=True)
            size = _number(row.get("s"), "size", positive=True)
            if price is None or size is None:
                raise MalformedMessage("bad_tick", "price and size are required")
            venue = _venue(row.get("e"))
            ticks.append(RawTick(symbol, parse_hammer_time(row.get("t"), zone), price, int(size), venue))
        except MalformedMessage:
            skipped += 1
    return ticks, skipped


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[start:start + size]) for start in range(0, len(items), size)]



@dataclass
class Backlog:
    """Events waiting for Redis, bounded: L1 collapses to the latest quote per
    symbol when over `max_l1`; prints over `max_prints` drop the oldest."""

    max_l1: int
    max_prints: int
    l1: list[Any] = field(default_factory=list)
    prints: deque[Any] = field(default_factory=deque)
    dropped_prints: int = 0
    collapsed_l1: int = 0

    def add_l1(self, symbol: str, event: Any) -> None:
        self.l1.append((symbol, event))
        if len(self.l1) > self.max_l1:
            latest: dict[str, Any] = {}
            for sym, item in self.l1:
                latest[sym] = item
            self.collapsed_l1 += len(self.l1) - len(latest)
            self.l1 = list(latest.items())

    def add_print(self, event: Any) -> None:
        self.prints.append(event)
        if len(self.prints) > self.max_prints:
            self.prints.popleft()
            self.dropped_prints += 1

    def __len__(self) -> int:
        return len(self.l1) + len(self.prints)


# --- plausibility (SPEC 9) ---------------------------------------------------------------------------
#
# Two kinds of bad data, two treatments:
# * numbers no feed can mean (sizes above `max_quantity`, a last or print price above
#   `max_price`, trade times in the future or older than `prints.max_age_s`) are
#   refused: logged, counted, never published;
# * a quote that is well-formed but implausible (crossed, wide, jumping, absurd size)
#   is published FLAGGED (`L1.implausible`), never dropped: consumers must know the
#   current quote of the symbol is not a price.


def _above(value: float | None, limit: float) -> bool:
    return value is not None and value > limit


def absurd_quote(quote: L1, rules: PlausibilityRules) -> tuple[L1, QuoteProblem | None]:
    """The quote with values no preferred can have (a price above `max_price`, a size above
    `max_quantity`) removed, and the problem they make. Such a quote is still published,
    flagged: if it were dropped, the last quote market data vouches for would be an older
    good one while the feed shows garbage."""
    price_fields = [name for name in ("bid", "ask", "last") if _above(getattr(quote, name), rules.max_price)]
    size_fields = [name for name in ("bid_size", "ask_size", "last_size") if (getattr(quote, name) or 0) > rules.max_quantity]
    if not price_fields and not size_fields:
        return quote, None
    cleared: dict[str, object] = {name: None for name in price_fields}
    cleared.update({name: (None if name == "last_size" else 0) for name in size_fields})
    problem = QuoteProblem.ABSURD_PRICE if price_fields else QuoteProblem.ABSURD_SIZE
    return quote.model_copy(update=cleared), problem


def print_refusal(tick: RawTick, now_ns: int, rules: PlausibilityRules) -> str | None:
    """Why a trade from the feed is not published as a print (None: publish it). Times
    are judged against the daemon's own clock."""
    if not math.isfinite(tick.price) or tick.price <= 0 or tick.price > rules.max_price:
        return "print_price"
    if tick.size <= 0 or tick.size > rules.max_quantity:
        return "print_size"
    if tick.ts_ns > now_ns + int(rules.max_future_skew_s * NS_PER_S):
        return "print_future_time"
    if tick.ts_ns < now_ns - int(rules.prints.max_age_s * NS_PER_S):
        return "print_too_old"
    return None


@dataclass(frozen=True, slots=True)
class GatedQuote:
    """The quote gate's outcome for one L1: the event to publish (flagged or not), or a
    refusal; and the start or end of the symbol's implausible episode, if any."""

    l1: L1 | None
    verdict: QuoteVerdict | None
    refused: str | None = None
    episode: EpisodeChange | None = None
    episode_since_ns: int | None = None


@dataclass
class SymbolTrust:
    """What market data itself has seen of one symbol that passed the gates."""

    confirm_prints: int
    trusted_print: float | None = None  # latest print that passed the print gate
    trusted_mid: float | None = None  # mid of the latest quote that passed the quote gate
    recent_excluded: deque[float] = field(default_factory=deque)
    implausible_since_ns: int | None = None  # start of the current implausible-quote episode

    @property
    def reference(self) -> float | None:
        return trusted_reference(self.trusted_print, None, self.trusted_mid)


class QuoteGate:
    """Market data's quote gate and the per-symbol memory it needs (SPEC 9). Pure: the
    caller passes `now_ns`."""

    def __init__(self, rules: PlausibilityRules) -> None:
        self.rules = rules
        self.symbols: dict[str, SymbolTrust] = {}

    def trust(self, symbol: str) -> SymbolTrust:
        trust = self.symbols.get(symbol)
        if trust is None:
            trust = self.symbols[symbol] = SymbolTrust(self.rules.prints.confirm_prints)
        return trust

    @property
    def implausible_symbols(self) -> int:
        return sum(1 for trust in self.symbols.values() if trust.implausible_since_ns is not None)

    def on_print(self, tick: RawTick, now_ns: int) -> PrintProblem | None:
        """Remember a published print as trusted if the print gate lets it count. The
        print is published either way: the prints worker applies the gate again."""
        trust = self.trust(tick.symbol)
        problem = print_problem(
            tick.price,
            tick.size,
            age_s=max(0, now_ns - tick.ts_ns) / NS_PER_S,
            reference=trust.reference,
            recent_excluded=list(trust.recent_excluded),
            rules=self.rules.prints,
        )
        if problem is None:
            trust.trusted_print = tick.price
            trust.recent_excluded.clear()
        else:
            trust.recent_excluded.append(tick.price)
            while len(trust.recent_excluded) > trust.confirm_prints:
                trust.recent_excluded.popleft()
        return problem

    def on_quote(self, quote: L1, now_ns: int) -> GatedQuote:
        quote, absurd = absurd_quote(quote, self.rules)
        trust = self.trust(quote.symbol)
        verdict = quote_verdict(
            quote.bid,
            quote.ask,
            reference=trust.reference,
            confirming_price=trust.trusted_print,
            rules=self.rules.quote,
            bid_size=quote.bid_size,
            ask_size=quote.ask_size,
        )
        if absurd is not None:
            verdict = QuoteVerdict(absurd, None, "a price above max_price or a size above max_quantity")
        problem = None if verdict.problem is None else verdict.problem.value
        change = episode_change(quote.symbol, trust.implausible_since_ns is not None, problem)
        since = trust.implausible_since_ns
        if change is not None:
            since = now_ns if change.started else trust.implausible_since_ns
            trust.implausible_since_ns = now_ns if change.started else None
        if verdict.plausible and verdict.mid is not None:
            trust.trusted_mid = verdict.mid
        flagged = quote if quote.implausible == problem else quote.model_copy(update={"implausible": problem})
        return GatedQuote(flagged, verdict, episode=change, episode_since_ns=since)


# --- confirming unchanged quotes (SPEC 6 Marks, issue 13) --------------------------------------------
#
# L1 is published on change; a quiet preferred can keep one quote for many minutes. So
# that silence means the feed and not the market, market data re-publishes ("confirms")
# every symbol's current quote at least every `confirm_interval_s` while the feed is
# healthy for it. A confirmation is the same payload (same `quote_ts_ns`: the time the
# quote last changed; same `implausible` flag) in a new envelope whose `ts_ns` is the
# time market data vouched for it. Consumers: a quote is current while
# now - envelope ts_ns <= l1_max_age_s.


def confirmation_key(quote: L1, vouched_ns: int) -> str:
    """A confirmation is not a duplicate of the quote it confirms: its own key, from the
    quote's identity (symbol, time it last changed) and the time it was vouched for."""
    return idempotency_key("l1confirm", quote.symbol, quote.quote_ts_ns, vouched_ns)


def confirm_blocked(
    *, connected: bool, farm_broken: bool, last_data_ns: int | None, now_ns: int, quiet_after_ns: int
) -> str | None:
    """Why no quote may be confirmed now (None: confirmations may go out). The feed as a
    whole must be connected, no data farm broken, and have delivered a quote or trade
    within `quiet_after_ns`: a feed that went quiet is not vouched for."""
    if not connected:
        return "disconnected"
    if farm_broken:
        return "data farm broken"
    if last_data_ns is None or now_ns - last_data_ns > quiet_after_ns:
        return "feed quiet"
    return None


class QuoteConfirmer:
    """The latest published quote of every symbol and when it is next due for a
    confirmation. Pure: the caller passes `now_ns`.

    Not a flood: a symbol's first confirmation comes at a fixed phase in (0, interval]
    derived from its name, so quotes that all arrive at a (re)connect are confirmed
    spread over one interval; afterwards each symbol is due one interval after its last
    publication (a change or a confirmation), which keeps them spread. After a pause
    (feed unhealthy) the same phases spread the resumption."""

    def __init__(self, interval_s: float) -> None:
        self.interval_ns = max(1, int(interval_s * NS_PER_S))
        self.quotes: dict[str, L1] = {}
        self.due_ns: dict[str, int] = {}
        self.paused = False

    def __len__(self) -> int:
        return len(self.quotes)

    def phase_ns(self, symbol: str) -> int:
        return 1 + zlib.crc32(symbol.encode()) % self.interval_ns

    def on_published(self, quote: L1, now_ns: int) -> None:
        """A quote (as published: flagged or not) went out at now_ns."""
        first = quote.symbol not in self.quotes
        self.quotes[quote.symbol] = quote
        self.due_ns[quote.symbol] = now_ns + (self.phase_ns(quote.symbol) if first else self.interval_ns)

    def clear(self) -> None:
        """The connection is gone: quotes seen on it are not vouched for on the next one."""
        self.quotes.clear()
        self.due_ns.clear()

    def due(self, now_ns: int, blocked: str | None, halted: frozenset[str] | set[str] = frozenset()) -> list[L1]:
        """The quotes to confirm now (each then due again one interval later); none while
        `blocked`; never a halted symbol's."""
        if blocked is not None:
            self.paused = True
            return []
        if self.paused:
            self.paused = False
            for symbol in self.due_ns:
                self.due_ns[symbol] = now_ns + self.phase_ns(symbol)
            return []
        out = []
        for symbol, at in self.due_ns.items():
            if at <= now_ns and symbol not in halted:
                out.append(self.quotes[symbol])
                following = at + self.interval_ns  # keep the symbol's phase
                self.due_ns[symbol] = following if following > now_ns else now_ns + self.interval_ns
        return out
