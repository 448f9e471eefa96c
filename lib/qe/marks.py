"""The marks rule (SPEC 6, Marks), in one place for exposure, the Brain and execution.

A mark is, in order:

1. the L1 mid, while the quote is CURRENT and plausible. Current = the feed vouched for
   it within `l1_max_age_s`: measured from the L1 event's envelope `ts_ns` (market
   data re-publishes unchanged quotes, docs/market_data.md), never from
   `quote_ts_ns` (that is how long the market has been quiet, not how old the
   information is); and not current while the consumer knows the feed is down, the
   data farm broken or the symbol halted;
2. else the last truth tick, while it is at most `truth_tick_max_age_s` old;
3. else the last known price, flagged stale: the last trusted market price (the more
   recent of the last trusted mid and the last truth tick), else the broker's average
   cost, else the universe's reference price (`fallback`: no market price yet).

Every held position always has a mark; one priced only by a `fallback` counts at it in
gross and potential and blocks risk increases until the market prices it.

Pure and generic over the price type: exposure passes integer mark units, the Brain
and execution dollars. The rule only chooses; it never does arithmetic on prices.
Each consumer gathers its own inputs (its own quote gate verdict, its own clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from .config import RiskRules

NS_PER_S = 1_000_000_000

P = TypeVar("P", int, float)


class MarkSource(StrEnum):
    L1_MID = "l1_mid"
    TRUTH_TICK = "truth_tick"
    LAST_KNOWN = "last_known"  # the last trusted market price, stale
    FALLBACK = "fallback"  # no market price yet: average cost or the universe's reference price
    NONE = "none"  # nothing at all (no market price, no average cost, no reference)


STALE_SOURCES = frozenset({MarkSource.LAST_KNOWN, MarkSource.FALLBACK, MarkSource.NONE})
# A position marked by one of these is not priced by the market: no risk increase.
UNPRICED_SOURCES = frozenset({MarkSource.FALLBACK, MarkSource.NONE})


@dataclass(frozen=True, slots=True)
class MarkRules:
    l1_max_age_ns: int
    truth_tick_max_age_ns: int

    @classmethod
    def of(cls, l1_max_age_s: float, truth_tick_max_age_s: float) -> "MarkRules":
        return cls(int(l1_max_age_s * NS_PER_S), int(truth_tick_max_age_s * NS_PER_S))

    @classmethod
    def from_rules(cls, rules: "RiskRules") -> "MarkRules":
        """The numbers of the marks rule: `exposure.l1_max_age_s` and
        `exposure.truth_tick_max_age_s` (one setting for every daemon)."""
        return cls.of(rules.exposure.l1_max_age_s, rules.exposure.truth_tick_max_age_s)


@dataclass(frozen=True, slots=True)
class MarkInputs(Generic[P]):
    """What a consumer knows of one symbol, on its own clock.

    `mid` is the mid of the last two-sided quote that passed the consumer's quote gate,
    `mid_vouched_ns` the envelope ts_ns of the latest L1 event (change or confirmation)
    that carried it; `quote_problem` is set while the LATEST quote is implausible (the
    last trusted mid is then not current). `feed_problem`: why the consumer knows the
    feed cannot vouch for the symbol now (feed down, data farm broken, halted), else None.
    """

    mid: P | None = None
    mid_vouched_ns: int = 0
    quote_problem: str | None = None
    feed_problem: str | None = None
    tick: P | None = None
    tick_ts_ns: int = 0
    avg_cost: P | None = None  # the broker's average cost of the position (> 0 to count)
    reference: P | None = None  # the universe's reference price


@dataclass(frozen=True, slots=True)
class Mark(Generic[P]):
    price: P | None
    source: MarkSource
    reason: str = ""  # why the mark is stale (empty while it is current)

    @property
    def stale(self) -> bool:
        return self.source in STALE_SOURCES

    @property
    def market_priced(self) -> bool:
        """False for a fallback or no mark: such a position blocks risk increases."""
        return self.source not in UNPRICED_SOURCES


def age_ns(ts_ns: int, now_ns: int) -> int:
    """Age on the consumer's clock; a time ahead of it counts as its distance (a stamp
    in 2100 is never fresh)."""
    return abs(now_ns - ts_ns)


def quote_current(vouched_ns: int, now_ns: int, l1_max_age_ns: int, *, quote_problem: str | None = None,
                  feed_problem: str | None = None) -> bool:
    """Is a quote the feed vouched for at `vouched_ns` current now? However long it has
    not changed: what counts is the last confirmation, and a known feed problem."""
    return (
        vouched_ns > 0
        and quote_problem is None
        and feed_problem is None
        and age_ns(vouched_ns, now_ns) <= l1_max_age_ns
    )


def _positive(value: P | None) -> bool:
    return value is not None and value > 0


def resolve(inputs: MarkInputs[P], now_ns: int, rules: MarkRules) -> Mark[P]:
    """The symbol's mark at now_ns (SPEC 6, Marks)."""
    mid, tick = inputs.mid, inputs.tick
    if _positive(mid) and quote_current(inputs.mid_vouched_ns, now_ns, rules.l1_max_age_ns,
                                        quote_problem=inputs.quote_problem, feed_problem=inputs.feed_problem):
        return Mark(mid, MarkSource.L1_MID)
    if _positive(tick) and age_ns(inputs.tick_ts_ns, now_ns) <= rules.truth_tick_max_age_ns:
        return Mark(tick, MarkSource.TRUTH_TICK)
    why = _why_quote_not_current(inputs, rules)
    last = _last_trusted(inputs)
    if last is not None:
        return Mark(last, MarkSource.LAST_KNOWN, f"{why}; no fresh truth tick: last known market price")
    if _positive(inputs.avg_cost):
        return Mark(inputs.avg_cost, MarkSource.FALLBACK, "no market price yet: the broker's average cost")
    if _positive(inputs.reference):
        return Mark(inputs.reference, MarkSource.FALLBACK, "no market price yet: the universe's reference price")
    return Mark(None, MarkSource.NONE, "no price at all: no market price, average cost or reference price")


def _last_trusted(inputs: MarkInputs[P]) -> P | None:
    """The more recent of the last trusted mid and the last truth tick."""
    mid, tick = inputs.mid, inputs.tick
    if not _positive(mid):
        return tick if _positive(tick) else None
    if not _positive(tick):
        return mid
    return mid if inputs.mid_vouched_ns >= inputs.tick_ts_ns else tick


def _why_quote_not_current(inputs: MarkInputs[P], rules: MarkRules) -> str:
    """Stable text (no running age): a mark that did not change must compare equal."""
    if inputs.mid is None:
        return "no plausible quote yet"
    if inputs.quote_problem is not None:
        return f"latest quote implausible ({inputs.quote_problem})"
    if inputs.feed_problem is not None:
        return f"quote not current: {inputs.feed_problem}"
    return f"quote not confirmed within {rules.l1_max_age_ns / NS_PER_S:g}s"
