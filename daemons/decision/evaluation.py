"""The inputs of one evaluation as `decide`'s steps read them (pure).

`Evaluation` is a memoizing lens over the plain `BrainView`: every quote judged by
the quote gate (guards.judged) before a mark or a price is taken from it, marks by
the one rule (qe.marks), positions from ev.positions falling back to the exposure
snapshot, the live intent of each (symbol, slot), the Brain's potential book; and
the containment record of symbols that could not be evaluated. Nothing here reads
a clock, Redis or the environment.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

from qe.marks import Mark, MarkRules, MarkSource, resolve

from . import guards
from .arbitration import PotentialBook
from .model import ExposureSnap, Market, Outstanding, PositionView, Skip

if TYPE_CHECKING:
    from .engine import BrainView, EngineRules


class MergedPositions:
    """Positions from ev.positions, falling back to the exposure snapshot; lazy, so
    a per-symbol evaluation does not touch every position."""

    def __init__(self, ev: "Evaluation") -> None:
        self.ev = ev

    def get(self, symbol: str) -> PositionView | None:
        qty, bucket = self.ev.position_qty(symbol)
        return None if bucket is None else PositionView(qty, bucket)

    def items(self):
        return self.ev.all_positions().items()


class LiveIndex:
    """The live NEW intent of each (symbol, slot), looked up through the by-symbol index."""

    def __init__(self, view: BrainView, now_ns: int, grace_s: float) -> None:
        self.view = view
        self.now = now_ns
        self.grace = grace_s
        self._symbols: dict[str, dict[str, Outstanding]] = {}

    def of_symbol(self, symbol: str) -> dict[str, Outstanding]:
        found = self._symbols.get(symbol)
        if found is None:
            found = {}
            for key in self.view.by_symbol.get(symbol, ()):
                record = self.view.outstanding[key]
                if record.live(self.now, self.grace):
                    current = found.get(record.slot)
                    if current is None or record.issued_ns > current.issued_ns:
                        found[record.slot] = record
            self._symbols[symbol] = found
        return found

    def get(self, key: tuple[str, str]) -> Outstanding | None:
        return self.of_symbol(key[0]).get(key[1])

    def items(self, symbols: Iterable[str] | None = None) -> list[tuple[tuple[str, str], Outstanding]]:
        chosen = sorted(self.view.by_symbol) if symbols is None else sorted(set(symbols))
        return [((symbol, slot), record) for symbol in chosen for slot, record in sorted(self.of_symbol(symbol).items())]

    def in_slot(self, slot: str) -> list[Outstanding]:
        return [record for (_symbol, s), record in self.items() if s == slot]

    def other_than(self, symbol: str, slots: Iterable[str]) -> bool:
        allowed = set(slots)
        return any(slot not in allowed for slot in self.of_symbol(symbol))


class Evaluation:
    """The inputs of one `decide` call as its steps read them: a memoizing lens over
    the view (judged markets, marks, merged positions, live orders), which stays
    untouched. What it accumulates is the containment record, `errors`: any step may
    add a symbol it could not evaluate (the first error of a symbol wins), none
    removes one; the steps read it where the rules say (risk increases are blocked
    while it is not empty)."""

    def __init__(self, view: BrainView, er: EngineRules, now_ns: int) -> None:
        self.view = view
        self.er = er
        self.cfg = er.rules
        self.plaus = er.rules.plausibility
        self.now = now_ns
        self.grace = self.cfg.decision.unacked_grace_s
        self.live = LiveIndex(view, now_ns, self.grace)
        self._marks: dict[str, Mark[float]] = {}
        self.mark_rules = MarkRules.from_rules(er.rules)
        self._markets: dict[str, Market | None] = {}
        self._positions: dict[str, PositionView] | None = None
        self.errors: dict[str, str] = {}  # symbol -> why evaluating it failed (the symbol is skipped)
        # Unknown is not zero: the latest snapshot, if usable; else the last good one,
        # while it is young enough to size de-risk; else none.
        self.exposure_unknown = guards.exposure_problem(view.exposure, self.plaus)
        basis = view.exposure if self.exposure_unknown is None else view.good_exposure
        if basis is not None and (
            guards.exposure_problem(basis, self.plaus) is not None
            or not guards.age_within(basis.ts_ns, now_ns, self.cfg.decision.derisk_max_exposure_age_s)
        ):
            basis = None
        self.basis: ExposureSnap | None = basis

    # -- containment ----------------------------------------------------------------------------
    def contain(self, symbol: str, what: str, compute: Any, default: Any = None) -> Any:
        """compute() for one symbol; an error is recorded against the symbol and
        `default` returned, so one symbol's absurd numbers never stop the others."""
        try:
            return compute()
        except Exception as exc:  # noqa: BLE001 - contained to the symbol, reported
            self.errors.setdefault(symbol, f"{what}: {type(exc).__name__}: {exc}"[:300])
            return default

    def record_failures(self, skips: Iterable[Skip]) -> None:
        """Symbols a planner or strategy skipped because evaluating them failed join
        the containment record (the first error of a symbol wins)."""
        for skip in skips:
            if skip.reason == "evaluation_error":
                self.errors.setdefault(skip.symbol, str(skip.numbers.get("error", "evaluation error")))

    # -- market view --------------------------------------------------------------------------
    def market(self, symbol: str) -> Market | None:
        """The symbol's market as pricing may see it (an implausible quote removed)."""
        if symbol not in self._markets:
            raw = self.view.markets.get(symbol)
            self._markets[symbol] = None if raw is None else self.contain(
                symbol, "quote gate", lambda: guards.judged(raw, self.plaus))
        return self._markets[symbol]

    def reference(self, symbol: str) -> float | None:
        """The trusted reference of the collar (truth tick, GRPAN, last trusted mark)."""
        return guards.reference_of(self.view.markets.get(symbol))

    def mark(self, symbol: str) -> Mark[float]:
        """The symbol's mark by the one rule (qe.marks); the Brain only gathers its inputs:
        its own judged market, the position's average cost, the universe's reference
        price (else the exposure snapshot's mark, for a symbol outside the universe)."""
        found = self._marks.get(symbol)
        if found is not None:
            return found
        market = self.market(symbol) or Market()
        position = self.view.positions.get(symbol)
        avg_cost = position.avg_cost if position is not None and position.qty else None
        reference = self.view.reference_prices.get(symbol)
        if reference is None:
            snap = self.basis.symbols.get(symbol) if self.basis else None
            reference = snap.mark if snap is not None else None
        mark = resolve(market.mark_inputs(avg_cost, reference), self.now, self.mark_rules)
        if mark.price is not None and not guards.price_ok(mark.price, self.plaus):
            self.errors.setdefault(symbol, f"mark {mark.price!r} is not a plausible price")
            mark = Mark(None, MarkSource.NONE, f"mark {mark.price!r} is not a plausible price")
        self._marks[symbol] = mark
        return mark

    def mark_of(self, symbol: str) -> float | None:
        return self.mark(symbol).price

    def position_qty(self, symbol: str) -> tuple[int, str | None]:
        position = self.view.positions.get(symbol)
        if position is not None:
            return position.qty, position.bucket
        snap = self.basis.symbols.get(symbol) if self.basis else None
        if snap is not None:
            return snap.qty, snap.bucket
        return 0, None

    def all_positions(self) -> dict[str, PositionView]:
        """Every non-flat position; a symbol whose position is absurd or was rejected is
        left out (and recorded in `errors`, which blocks risk increases)."""
        if self._positions is not None:
            return self._positions
        merged: dict[str, PositionView] = {}
        if self.basis is not None:
            for symbol, snap in self.basis.symbols.items():
                if snap.qty:
                    merged[symbol] = PositionView(snap.qty, snap.bucket)
        merged.update(self.view.positions)
        for symbol, why in self.view.input_problems.items():
            self.errors.setdefault(symbol, f"position rejected: {why}")
        positions = {}
        for symbol, p in merged.items():
            if symbol in self.view.input_problems or p.qty == 0:
                continue
            if not guards.qty_ok(p.qty, self.plaus, signed=True):
                self.errors.setdefault(symbol, "position quantity beyond plausibility.max_quantity")
                continue
            positions[symbol] = p
        self._positions = positions
        return positions

    def open_reducing_qty(self, symbol: str, qty: int, exclude_key: str | None = None) -> int:
        """Shares of `symbol` already covered by open orders that reduce the position:
        every reducing order the exposure snapshot includes (anyone's), PLUS the Brain's
        own live ones the snapshot does not include (by ev.orders entry id). Never the
        larger of the two: they are different orders."""
        reducing_side = "SELL" if qty > 0 else "BUY"
        snap = self.basis.symbols.get(symbol) if self.basis else None
        in_snapshot = 0 if snap is None else (snap.open_sell if reducing_side == "SELL" else snap.open_buy)
        through = self.basis.orders_through if self.basis else None
        unseen = 0
        for key in self.view.by_symbol.get(symbol, ()):
            record = self.view.outstanding[key]
            if record.side != reducing_side or key == exclude_key or not record.live(self.now, self.grace):
                continue
            if snap is None or record.counts_in_potential(through, self.now, self.grace):
                unseen += record.remaining_qty
        return in_snapshot + unseen

    def settling(self, symbol: str) -> bool:
        since = self.view.settling.get(symbol)
        return since is not None and guards.age_within(since, self.now, self.cfg.decision.fill_settle_timeout_s)

    def cooling_down(self, symbol: str) -> bool:
        """Execution rejected an order on this symbol a moment ago: no new one yet."""
        since = self.view.rejected.get(symbol)
        return since is not None and guards.age_within(since, self.now, self.cfg.decision.reject_cooldown_s)

    # -- exposure -----------------------------------------------------------------------------
    def equity(self) -> float | None:
        if self.basis is not None:
            return self.basis.equity
        account = self.view.account_equity
        if guards.equity_ok(account) and account > 0:  # type: ignore[operator]
            return account
        return None

    def brain_gross(self, equity: float) -> tuple[float, dict[str, float], list[str]]:
        """Current gross % from the Brain's freshest positions and marks; per bucket too;
        and the held symbols the market has not priced (a fallback mark, or none)."""
        total = 0.0
        buckets: dict[str, float] = {}
        unpriced: list[str] = []
        for symbol, position in self.all_positions().items():
            # Every held position counts, at its fallback mark until the market prices it;
            # such a position blocks risk increases (unpriced).
            if symbol not in self.errors and not self.mark(symbol).market_priced:
                unpriced.append(symbol)
            notional = self.contain(symbol, "gross", lambda: _notional(position.qty, self.mark_of(symbol)))
            if notional is None:
                continue
            total += notional
            buckets[position.bucket] = buckets.get(position.bucket, 0.0) + notional
        return total / equity * 100, {name: value / equity * 100 for name, value in buckets.items()}, unpriced

    def potential_book(self) -> PotentialBook | None:
        exposure = self.basis
        equity = self.equity()
        if exposure is None or exposure.potential_pct is None or equity is None:
            return None
        book = PotentialBook(
            equity=exposure.equity,
            potential_pct=exposure.potential_pct,
            bucket_potential_pct={name: b.potential_pct for name, b in exposure.buckets.items()},
            base=exposure.symbols,
        )
        for key in sorted(self.view.unseen):
            record = self.view.outstanding.get(key)
            if record is not None and record.counts_in_potential(exposure.orders_through, self.now, self.grace):
                mark = self.mark_of(record.symbol) or record.limit_price or 0.0
                self.contain(record.symbol, "potential", lambda: book.add(record.symbol, record.side, record.qty, mark,
                                                                           record.bucket))
        return book


def _notional(qty: int, mark: float | None) -> float | None:
    """|qty| x mark; an overflow or a non-finite result is an error, not a number."""
    if mark is None:
        return None
    notional = abs(qty) * mark
    if not math.isfinite(notional):
        raise ArithmeticError(f"notional of {qty} x {mark} is not finite")
    return notional


class JudgedMarkets:
    """`markets` for strategies: each symbol's market as judged by the quote gate."""

    def __init__(self, ev: Evaluation) -> None:
        self.ev = ev

    def get(self, symbol: str, default: Market | None = None) -> Market | None:
        market = self.ev.market(symbol)
        return default if market is None else market
