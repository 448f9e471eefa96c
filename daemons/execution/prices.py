"""Execution's own view of prices (SPEC 9): which quotes it trusts, the reference its
price collar is measured from, and the marks of its own hard-cap check.

Defense in depth: execution does not take the Brain's word (nor market data's) for a
price. It reads ev.l1 and ev.features itself and applies the one shared quote gate
(`qe.plausibility.quote_verdict`) against its own trusted reference. An implausible
quote (flagged by market data, or caught here) never becomes a mark nor a reference:
the last trusted mid, truth tick or GRPAN stands.

Pure: plain numbers in, verdicts out; no Redis, no broker.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from qe.config import QuoteGateRules
from qe.marks import Mark, MarkInputs, MarkRules, resolve
from qe.plausibility import episode_change, quote_verdict, trusted_reference


def _usable(value: float | None) -> float | None:
    """A price from outside, or None when it cannot be one (absent, NaN, <= 0, a bool)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@dataclass(slots=True)
class SymbolPrices:
    truth_tick: float | None = None  # last truth tick (the prints worker's gate already passed it)
    grpan: float | None = None
    last_print: float | None = None  # the latest trusted print: confirms a quote that moved
    trusted_mid: float | None = None  # mid of the last quote that passed the gate
    implausible: str | None = None  # the latest quote's problem; None when it passed
    mid_vouched_ns: int = 0  # envelope ts_ns of the latest L1 carrying trusted_mid (execution's clock at most)
    truth_tick_ts_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SymbolPrices":
        """Execution's own saved prices; anything that is not a usable price reads as unknown."""
        implausible = data.get("implausible")
        return cls(
            truth_tick=_usable(data.get("truth_tick")),
            grpan=_usable(data.get("grpan")),
            last_print=_usable(data.get("last_print")),
            trusted_mid=_usable(data.get("trusted_mid")),
            implausible=str(implausible)[:200] if implausible is not None else None,
            mid_vouched_ns=_time(data.get("mid_vouched_ns")),
            truth_tick_ts_ns=_time(data.get("truth_tick_ts_ns")),
        )


def _time(value: Any) -> int:
    """A saved time; anything else (missing in state saved before issue 13) is "never"."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True, slots=True)
class QuoteOutcome:
    problem: str | None  # why the quote is not trusted (None: trusted, or one-sided and valid)
    changed: bool = False  # the symbol's prices changed (they are persisted)
    episode_started: bool = False  # the symbol just turned implausible (log once per episode)
    episode_ended: bool = False


class PriceBook:
    def __init__(self, gate: QuoteGateRules) -> None:
        self.gate = gate
        self.symbols: dict[str, SymbolPrices] = {}

    def _prices(self, symbol: str) -> SymbolPrices:
        prices = self.symbols.get(symbol)
        if prices is None:
            prices = self.symbols[symbol] = SymbolPrices()
        return prices

    def restore(self, symbol: str, data: Mapping[str, Any]) -> None:
        self.symbols[symbol] = SymbolPrices.from_json(data)

    def on_feature(
        self, symbol: str, truth_tick: float | None, grpan: float | None, last_print: float | None, tick_ts_ns: int = 0
    ) -> bool:
        """A feature event: a missing value leaves the last known one in place. True if
        anything changed. `tick_ts_ns`: the truth tick's time, bounded by the caller's clock."""
        prices = self._prices(symbol)
        before = (prices.truth_tick, prices.truth_tick_ts_ns, prices.grpan, prices.last_print)
        if _usable(truth_tick) is not None:
            prices.truth_tick, prices.truth_tick_ts_ns = _usable(truth_tick), tick_ts_ns
        prices.grpan = _usable(grpan) or prices.grpan
        prices.last_print = _usable(last_print) or prices.last_print
        return (prices.truth_tick, prices.truth_tick_ts_ns, prices.grpan, prices.last_print) != before

    def on_quote(
        self,
        symbol: str,
        bid: float | None,
        ask: float | None,
        *,
        bid_size: int = 0,
        ask_size: int = 0,
        flagged: str | None = None,
        vouched_ns: int = 0,
    ) -> QuoteOutcome:
        """Gate one L1 quote. Market data's flag is honoured as is; otherwise the shared
        quote gate decides against this book's own reference. Only a plausible two-sided
        quote moves the trusted mid; a one-sided valid quote changes nothing. `vouched_ns`:
        the L1 envelope's ts_ns (when market data vouched for it; bounded by the caller's
        clock): a confirmation of an unchanged quote keeps it current (qe.marks)."""
        prices = self._prices(symbol)
        before = (prices.trusted_mid, prices.implausible, prices.mid_vouched_ns)
        if flagged:
            problem: str | None = f"flagged by market data: {flagged}"
        else:
            verdict = quote_verdict(
                bid,
                ask,
                reference=self.reference(symbol),
                confirming_price=prices.last_print or prices.truth_tick,
                rules=self.gate,
                bid_size=bid_size,
                ask_size=ask_size,
            )
            problem = None if verdict.plausible else f"{verdict.problem}: {verdict.detail}"
            if verdict.plausible and verdict.mid is not None:
                prices.trusted_mid, prices.mid_vouched_ns = round(verdict.mid, 4), vouched_ns
        change = episode_change(symbol, prices.implausible is not None, problem)
        prices.implausible = problem
        return QuoteOutcome(
            problem,
            changed=(prices.trusted_mid, prices.implausible, prices.mid_vouched_ns) != before,
            episode_started=change is not None and change.started,
            episode_ended=change is not None and not change.started,
        )

    def reference(self, symbol: str) -> float | None:
        """The price the collar is measured from: last truth tick, else GRPAN, else the
        last trusted mid; None when execution has no market-confirmed price at all."""
        prices = self.symbols.get(symbol)
        if prices is None:
            return None
        return trusted_reference(prices.truth_tick, prices.grpan, prices.trusted_mid)

    def mark(
        self,
        symbol: str,
        now_ns: int,
        rules: MarkRules,
        *,
        avg_cost: float | None = None,
        reference: float | None = None,
        feed_problem: str | None = None,
    ) -> Mark[float]:
        """The symbol's mark for the hard-cap check, by the one rule (qe.marks): execution's
        own trusted mid while current, else a fresh truth tick, else the last known price,
        else the position's average cost / `reference` (fallback)."""
        prices = self.symbols.get(symbol) or SymbolPrices()
        inputs = MarkInputs(
            mid=prices.trusted_mid, mid_vouched_ns=prices.mid_vouched_ns, quote_problem=prices.implausible,
            feed_problem=feed_problem, tick=prices.truth_tick, tick_ts_ns=prices.truth_tick_ts_ns,
            avg_cost=_usable(avg_cost), reference=_usable(reference),
        )
        return resolve(inputs, now_ns, rules)
