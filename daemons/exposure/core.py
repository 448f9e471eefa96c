"""The exposure book: positions, open orders, marks and equity -> exposure
(SPEC 6, Marks / Exposure), kept up to date incrementally.

Each symbol caches its contribution to the running totals (long, short and
potential notional; current and potential notional per bucket). An event for one
symbol subtracts that symbol's old contribution and adds the new one, so the
cost of an event does not depend on how many symbols the book holds. Staleness
changes with time only: `refresh_marks` re-resolves every symbol's mark and is
called on a periodic tick, never per event.

Marks are kept as integers in units of $0.0001 (`MARK_SCALE`): quotes and prints
are on the cent grid and a mid is on the half-cent grid, so nothing is lost, and
every notional and running sum is an exact integer. The totals therefore never
drift however many updates they absorb, and a book rebuilt from Redis after a
restart has bit-identical totals.

Per-symbol numbers (the cached contribution and the open quantity per side and
bucket) live in one flat int64 array, a row per symbol: an update then touches a
cache line or two wherever the symbol is, instead of a dozen boxed Python ints
scattered over the heap, which is what keeps the cost of an event at 5,000
symbols close to its cost at 100. Quantities are bounded (MAX_QTY) so that no
row value can overflow int64.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from qe.config import BUCKET_NAMES, ExposureRules, PlausibilityRules
from qe.contracts import OPEN_ORDER_STATUSES, TERMINAL_ORDER_STATUSES
from qe.exposure_math import potential_notional
from qe.marks import Mark, MarkInputs, MarkRules, MarkSource, resolve
from qe.plausibility import quote_verdict, trusted_reference

MARK_SCALE = 10_000  # mark units per dollar
# Largest position or order quantity accepted (shares), and largest total open quantity
# per symbol, side and bucket. With prices below $1,000,000 (the contract's limit, 1e10
# mark units) every row value stays below (MAX_QTY + 2 * MAX_OPEN_QTY) * 1e10 < 2**63.
MAX_QTY = 10_000_000
MAX_OPEN_QTY = 10 * MAX_QTY
MAX_MARK_UNITS = 1_000_000 * MARK_SCALE  # prices below $1,000,000 (the contract's limit)



def to_units(price: float) -> int:
    return round(price * MARK_SCALE)


def to_dollars(units: int) -> float:
    return units / MARK_SCALE


def _dollars(units: int | None) -> float | None:
    return None if units is None else units / MARK_SCALE


def finite(value: float | None) -> bool:
    return value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# --- marks ---------------------------------------------------------------------------------
# The rule is qe.marks (one rule for exposure, the Brain and execution); the book only
# gathers its inputs, in mark units.

NO_MARK: Mark[int] = Mark(None, MarkSource.NONE, "no price at all")


@dataclass(slots=True)
class SavedPrices:
    """A symbol's price inputs as saved in `state:exposure:marks`. `mid` is the mid of the
    last quote that passed the quote gate (the last trusted L1 mark) and `mid_ts_ns` the
    envelope ts_ns of the latest L1 event that carried it (when market data last vouched
    for it); `implausible` is set while the latest quote failed the gate."""

    mid: int | None = None  # L1 mid, mark units
    mid_ts_ns: int = 0
    tick: int | None = None  # last truth tick price, mark units
    tick_ts_ns: int = 0
    grpan: int | None = None  # GRPAN price, mark units (a reference for the quote gate)
    last_print: int | None = None  # latest trusted print, mark units (confirms a quote that moved)
    implausible: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mid": self.mid, "mid_ts_ns": self.mid_ts_ns, "tick": self.tick, "tick_ts_ns": self.tick_ts_ns,
            "grpan": self.grpan, "last_print": self.last_print, "implausible": self.implausible,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SavedPrices":
        """Our own saved inputs (fields added later read as unknown); a value that is not a
        usable price is refused (ValueError) rather than restored."""
        implausible = data.get("implausible")
        return cls(
            mid=_saved_units(data["mid"]),
            mid_ts_ns=int(data["mid_ts_ns"]),
            tick=_saved_units(data["tick"]),
            tick_ts_ns=int(data["tick_ts_ns"]),
            grpan=_saved_units(data.get("grpan")),
            last_print=_saved_units(data.get("last_print")),
            implausible=None if implausible is None else str(implausible)[:200],
        )


def _saved_units(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_MARK_UNITS:
        raise ValueError(f"saved price {value!r} is not a price in mark units")
    return value


# --- orders ----------------------------------------------------------------------------------


def open_quantity(qty: int, filled_qty: int, remaining_qty: int) -> int:
    """Shares of an open order that may still fill. Worst case: a producer that left
    remaining_qty at its default 0 on a new order must not hide the order's risk."""
    return max(remaining_qty, qty - filled_qty, 0)


@dataclass(frozen=True, slots=True)
class OpenOrder:
    order_ref: str
    symbol: str
    side: str  # BUY | SELL
    bucket: str
    open_qty: int
    filled_qty: int

    def to_json(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "side": self.side,
            "bucket": self.bucket,
            "open_qty": self.open_qty,
            "filled_qty": self.filled_qty,
        }

    @classmethod
    def from_json(cls, order_ref: str, data: dict[str, Any]) -> "OpenOrder":
        return cls(order_ref, str(data["symbol"]), str(data["side"]), str(data["bucket"]), int(data["open_qty"]), int(data["filled_qty"]))


# What apply_order did; the shell persists and publishes accordingly.
OPENED, UPDATED, CLOSED, UNCHANGED = "opened", "updated", "closed", "unchanged"
IGNORED_AFTER_TERMINAL, IGNORED_STALE = "ignored_after_terminal", "ignored_stale_update"


# --- the book ------------------------------------------------------------------------------------


@dataclass(slots=True)
class SymbolState:
    """Everything the book knows about one symbol, in one object (one lookup per event):
    its price inputs, and while it has a position or open orders its resolved mark
    (qe.marks), position and row `slot` in the book's array (-1 while not exposed)."""

    mid: int | None = None
    mid_ts_ns: int = 0  # envelope ts_ns of the latest L1 carrying `mid`: when the feed vouched for it
    tick: int | None = None
    tick_ts_ns: int = 0
    grpan: int | None = None
    last_print: int | None = None
    implausible: str | None = None  # the latest quote's problem (the quote gate), None when it passed
    mark: Mark[int] = NO_MARK
    slot: int = -1
    qty: int = 0
    bucket: str | None = None  # the position's bucket
    avg_cost: float = 0.0
    dirty: bool = False  # changed since the last take_changed()
    reference_price: int | None = None  # the universe's reference price, mark units (last-resort mark)

    def saved_prices(self) -> SavedPrices:
        return SavedPrices(self.mid, self.mid_ts_ns, self.tick, self.tick_ts_ns, self.grpan, self.last_print, self.implausible)

    def mark_inputs(self) -> MarkInputs[int]:
        """The marks rule's inputs, in mark units (exposure knows nothing of feed health:
        market data stops confirming when it cannot vouch, and the quote ages out)."""
        avg_cost = to_units(self.avg_cost) if self.qty and finite(self.avg_cost) and self.avg_cost > 0 else None
        return MarkInputs(
            mid=self.mid, mid_vouched_ns=self.mid_ts_ns, quote_problem=self.implausible,
            tick=self.tick, tick_ts_ns=self.tick_ts_ns, avg_cost=avg_cost, reference=self.reference_price,
        )

    def reference(self) -> float | None:
        """The quote gate's trusted reference: last truth tick, else GRPAN, else the last trusted mid."""
        return trusted_reference(_dollars(self.tick), _dollars(self.grpan), _dollars(self.mid))


@dataclass(frozen=True)
class SymbolDetail:
    symbol: str
    qty: int
    bucket: str
    mark: float | None
    mark_source: str
    notional: float  # signed: qty * mark
    open_buy_qty: int
    open_sell_qty: int
    potential_notional: float
    mark_reason: str | None = None  # why the mark is stale or a fallback (None while current)


@dataclass(frozen=True)
class BucketView:
    current_notional: float
    potential_notional: float
    current_pct: float | None
    potential_pct: float | None
    target_pct: float
    max_pct: float


@dataclass(frozen=True)
class Totals:
    status: str  # ok | error
    error: str | None
    equity: float | None
    long_notional: float
    short_notional: float
    potential_notional: float
    gross_pct: float | None
    net_pct: float | None
    potential_gross_pct: float | None
    buckets: dict[str, BucketView]


class QuantityOutOfRange(ValueError):
    """A quantity beyond what the book accepts; raised before anything is changed."""


class NotFinite(ValueError):
    """A NaN or infinite number where a price belongs; raised before anything is changed."""


def _pct(units: int, equity: float) -> float:
    return round(units / MARK_SCALE / equity * 100, 6)


def equity_error(equity: float | None) -> str | None:
    """Why no percentage can be computed, or None when equity is usable."""
    if equity is None:
        return "no account equity (NetLiquidation) received yet: percentages are undefined"
    if not math.isfinite(equity):
        return f"equity {equity!r} is not a finite number: percentages are undefined"
    if equity <= 0:
        return f"equity is {equity:.2f} (NetLiquidation <= 0): percentages are undefined"
    return None


class ExposureBook:
    # A row: the contribution (long, short, potential, then current and potential per
    # bucket: `width` values), then open buy qty per bucket, then open sell qty per bucket.
    LONG, SHORT, POTENTIAL = 0, 1, 2

    def __init__(self, rules: ExposureRules, plausibility: PlausibilityRules,
                 reference_prices: Mapping[str, float] | None = None) -> None:
        self.rules = rules
        # The universe's reference prices: the last-resort mark of a held symbol (qe.marks).
        self.reference_prices = {s: to_units(p) for s, p in (reference_prices or {}).items() if finite(p) and p > 0}
        self.quote_gate = plausibility.quote
        # The stricter of the plausibility bound and what the int64 rows can hold.
        self.max_qty = min(MAX_QTY, plausibility.max_quantity)
        self.bucket_names: tuple[str, ...] = BUCKET_NAMES
        self.bucket_index = {name: index for index, name in enumerate(self.bucket_names)}
        buckets = len(self.bucket_names)
        self.width = 3 + 2 * buckets
        self.zero = (0,) * self.width
        self.buy_at = self.width  # row offsets
        self.sell_at = self.width + buckets
        self.row_width = self.width + 2 * buckets
        self.rows = array("q")
        self.free_slots: list[int] = []
        self.mark_rules = MarkRules.of(rules.l1_max_age_s, rules.truth_tick_max_age_s)
        self.totals_units = [0] * self.width
        self.known: dict[str, SymbolState] = {}  # every symbol seen (prices, positions, orders)
        self.symbols: dict[str, SymbolState] = {}  # the exposed ones: a position or open orders
        self.orders: dict[str, OpenOrder] = {}
        self.terminal: dict[str, int] = {}  # order_ref -> clock ns it was seen terminal
        self.equity: float | None = None
        self.stale: set[str] = set()  # exposed symbols whose mark is stale, a fallback or missing
        self.changed: list[str] = []  # symbols whose line changed since take_changed()
        self.stale_changed = False

    # -- inputs -----------------------------------------------------------------------------
    def set_equity(self, equity: float | None) -> bool:
        """The account's NetLiquidation. Unusable values (NaN, <= 0) are kept: they make
        the exposure "unknown" (status error), never a number computed from them."""
        same_nan = equity is not None and self.equity is not None and math.isnan(equity) and math.isnan(self.equity)
        if equity == self.equity or same_nan:
            return False
        self.equity = equity
        return True

    def _check_qty(self, qty: int) -> None:
        if not -self.max_qty <= qty <= self.max_qty:
            raise QuantityOutOfRange(f"quantity {qty} is beyond the {self.max_qty:,} shares this book accepts")

    def set_position(self, symbol: str, qty: int, bucket: str, avg_cost: float, now_ns: int) -> bool:
        """Absolute position of a symbol (0 removes it). True if anything changed."""
        self._check_bucket(bucket)
        self._check_qty(qty)
        if not finite(avg_cost):
            raise NotFinite(f"avg_cost {avg_cost!r} of {symbol} is not a finite number")
        state = self.known.get(symbol)
        if state is None:
            if qty == 0:
                return False
            state = self._state(symbol)
        new_bucket = bucket if qty != 0 else None
        if state.qty == qty and state.bucket == new_bucket and state.avg_cost == avg_cost:
            return False
        if qty == 0 and state.slot < 0:
            state.avg_cost = avg_cost  # flat and not exposed: nothing to count
            return False
        state.qty, state.bucket, state.avg_cost = qty, new_bucket, avg_cost
        if state.slot < 0:
            self._expose(symbol, state, now_ns)
        state.mark = self._resolve(state, now_ns)  # the average cost is a fallback mark
        self._apply(symbol, state)
        return True

    def apply_order(
        self,
        order_ref: str,
        symbol: str,
        side: str,
        bucket: str,
        status: str,
        open_qty: int,
        filled_qty: int,
        now_ns: int,
    ) -> str:
        """One order update. Terminal statuses remove the order for good; a later
        non-terminal update of it (late or replayed) is ignored, and so is an update
        that reports fewer fills than one already seen (fills only grow)."""
        self._check_bucket(bucket)
        self._check_qty(open_qty)
        self._check_qty(filled_qty)
        if side not in ("BUY", "SELL"):
            raise ValueError(f"order side must be BUY or SELL, got {side!r}")
        if order_ref in self.terminal:
            return UNCHANGED if status in TERMINAL_ORDER_STATUSES else IGNORED_AFTER_TERMINAL
        old = self.orders.get(order_ref)
        if status in TERMINAL_ORDER_STATUSES:
            self.terminal[order_ref] = now_ns
            if old is not None:
                del self.orders[order_ref]
                self._add_open(old, -1, now_ns)
            return CLOSED
        if status not in OPEN_ORDER_STATUSES:
            raise ValueError(f"unknown order status {status!r}")
        if old is not None and filled_qty < old.filled_qty:
            return IGNORED_STALE
        new = OpenOrder(order_ref, symbol, side, bucket, open_qty, filled_qty)
        if new == old:
            return UNCHANGED
        open_after = self._open_qty(symbol, side, bucket) + open_qty
        if old is not None and (old.symbol, old.side, old.bucket) == (symbol, side, bucket):
            open_after -= old.open_qty
        if open_after > MAX_OPEN_QTY:
            raise QuantityOutOfRange(f"{symbol} would have {open_after:,} shares open to {side} in {bucket}; at most {MAX_OPEN_QTY:,}")
        self.orders[order_ref] = new
        if old is not None:
            self._add_open(old, -1, now_ns)
        self._add_open(new, +1, now_ns)
        return OPENED if old is None else UPDATED

    def forget_terminal(self, before_ns: int) -> list[str]:
        """Drop terminal-order markers older than `before_ns` (periodic housekeeping)."""
        old = [ref for ref, seen_ns in self.terminal.items() if seen_ns < before_ns]
        for ref in old:
            del self.terminal[ref]
        return old

    def set_quote(
        self,
        symbol: str,
        bid: float | None,
        ask: float | None,
        ts_ns: int,
        now_ns: int,
        *,
        bid_size: int = 0,
        ask_size: int = 0,
        flagged: str | None = None,
    ) -> bool:
        """An L1 quote observed at ts_ns (a time ahead of now counts as now: a stamp in
        2100 never keeps a quote fresh). It goes through the quote gate against this
        book's own reference (truth tick / GRPAN / last trusted mid); market data's
        `flagged` verdict is honoured as is. A plausible two-sided quote's mid becomes the
        L1 mark input; an implausible one moves no price, it only marks the symbol's mid
        as not current (`quote_problem`). A valid one-sided quote has no mid: ignored.
        True if the inputs changed (they then need persisting)."""
        state = self.known.get(symbol)
        if state is None:
            state = self._state(symbol)
        problem = flagged or self._gate(state, bid, ask, bid_size, ask_size)
        if problem is not None:
            if state.implausible == problem:
                return False
            state.implausible = problem
            self._inputs_changed(symbol, state, now_ns)
            return True
        if bid is None or ask is None:
            return False
        mid = round((to_units(bid) + to_units(ask)) / 2)
        ts_ns = min(ts_ns, now_ns)
        if state.mid == mid and state.mid_ts_ns == ts_ns and state.implausible is None:
            return False
        state.mid, state.mid_ts_ns, state.implausible = mid, ts_ns, None
        self._inputs_changed(symbol, state, now_ns)
        return True

    def _gate(self, state: SymbolState, bid: float | None, ask: float | None, bid_size: int, ask_size: int) -> str | None:
        verdict = quote_verdict(
            bid,
            ask,
            reference=state.reference(),
            confirming_price=_dollars(state.last_print if state.last_print is not None else state.tick),
            rules=self.quote_gate,
            bid_size=bid_size,
            ask_size=ask_size,
        )
        return None if verdict.plausible else str(verdict.problem)

    def quote_problem(self, symbol: str) -> str | None:
        """Why the symbol's latest quote is not trusted, or None."""
        state = self.known.get(symbol)
        return None if state is None else state.implausible

    def set_truth_tick(self, symbol: str, price: float, ts_ns: int, now_ns: int) -> bool:
        return self.set_feature(symbol, price, ts_ns, None, None, now_ns)

    def set_feature(
        self, symbol: str, tick: float | None, tick_ts_ns: int, grpan: float | None, last_print: float | None, now_ns: int
    ) -> bool:
        """A feature event: the truth tick (a mark input; a time ahead of now counts as
        now), GRPAN and the latest trusted print (the quote gate's reference and its
        confirmation). A missing or unusable value leaves the last one in place."""
        state = self.known.get(symbol)
        if state is None:
            state = self._state(symbol)
        before = (state.tick, state.tick_ts_ns, state.grpan, state.last_print)
        if finite(tick) and tick > 0:  # type: ignore[operator]
            state.tick, state.tick_ts_ns = to_units(tick), min(tick_ts_ns, now_ns)  # type: ignore[arg-type]
        if finite(grpan) and grpan > 0:  # type: ignore[operator]
            state.grpan = to_units(grpan)  # type: ignore[arg-type]
        if finite(last_print) and last_print > 0:  # type: ignore[operator]
            state.last_print = to_units(last_print)  # type: ignore[arg-type]
        if (state.tick, state.tick_ts_ns, state.grpan, state.last_print) == before:
            return False
        if (state.tick, state.tick_ts_ns) != before[:2]:
            self._inputs_changed(symbol, state, now_ns)
        return True

    def saved_prices(self, symbol: str) -> SavedPrices | None:
        state = self.known.get(symbol)
        return None if state is None else state.saved_prices()

    def restore_mark(self, symbol: str, inputs: SavedPrices, now_ns: int) -> None:
        state = self._state(symbol)
        state.mid, state.mid_ts_ns, state.tick, state.tick_ts_ns = inputs.mid, inputs.mid_ts_ns, inputs.tick, inputs.tick_ts_ns
        state.grpan, state.last_print, state.implausible = inputs.grpan, inputs.last_print, inputs.implausible
        self._inputs_changed(symbol, state, now_ns)

    def refresh_marks(self, now_ns: int) -> None:
        """Re-resolve every exposed symbol's mark at now_ns (marks age with time)."""
        for symbol, state in self.symbols.items():
            mark = self._resolve(state, now_ns)
            if mark != state.mark:
                state.mark = mark
                self._apply(symbol, state, may_remove=False)

    # -- outputs --------------------------------------------------------------------------------
    def ratios(self) -> tuple[float, float] | None:
        """(gross %, potential gross %) in O(1), or None without usable equity."""
        equity = self.equity
        if equity is None or not equity > 0 or not math.isfinite(equity):
            return None
        units = self.totals_units
        return (units[0] + units[1]) / MARK_SCALE / equity * 100, units[2] / MARK_SCALE / equity * 100

    def totals(self) -> Totals:
        units = self.totals_units
        error = equity_error(self.equity)
        equity = self.equity if error is None else None
        buckets: dict[str, BucketView] = {}
        for index, name in enumerate(self.bucket_names):
            limits = self.rules.buckets[name]  # type: ignore[index]
            current, potential = units[3 + 2 * index], units[4 + 2 * index]
            buckets[name] = BucketView(
                current_notional=to_dollars(current),
                potential_notional=to_dollars(potential),
                current_pct=None if equity is None else _pct(current, equity),
                potential_pct=None if equity is None else _pct(potential, equity),
                target_pct=limits.target_pct,
                max_pct=limits.max_pct,
            )
        return Totals(
            status="ok" if error is None else "error",
            error=error,
            equity=self.equity,
            long_notional=to_dollars(units[0]),
            short_notional=to_dollars(units[1]),
            potential_notional=to_dollars(units[2]),
            gross_pct=None if equity is None else _pct(units[0] + units[1], equity),
            net_pct=None if equity is None else _pct(units[0] - units[1], equity),
            potential_gross_pct=None if equity is None else _pct(units[2], equity),
            buckets=buckets,
        )

    def stale_symbols(self) -> list[str]:
        return sorted(self.stale)

    def unpriced_symbols(self) -> dict[str, str]:
        """Exposed symbols the market has not priced (a fallback mark or none): symbol ->
        why. They count at their fallback mark, and block risk increases downstream."""
        return {symbol: state.mark.reason for symbol, state in self.symbols.items() if not state.mark.market_priced}

    def detail(self, symbol: str) -> SymbolDetail:
        """A symbol's line; a symbol that went flat (no position, no orders) reads as zeros."""
        state = self.symbols.get(symbol)
        if state is None:
            return SymbolDetail(symbol, 0, self.rules.default_bucket, None, str(MarkSource.NONE), 0.0, 0, 0, 0.0)
        units = state.mark.price
        base = state.slot * self.row_width
        buckets = len(self.bucket_names)
        return SymbolDetail(
            symbol=symbol,
            qty=state.qty,
            bucket=state.bucket or self._order_bucket(state),
            mark=None if units is None else to_dollars(units),
            mark_source=str(state.mark.source),
            mark_reason=state.mark.reason or None,
            notional=0.0 if units is None else to_dollars(state.qty * units),
            open_buy_qty=sum(self.rows[base + self.buy_at : base + self.buy_at + buckets]),
            open_sell_qty=sum(self.rows[base + self.sell_at : base + self.sell_at + buckets]),
            potential_notional=to_dollars(self.rows[base + self.POTENTIAL]),
        )

    def details(self, symbols: Iterable[str] | None = None) -> list[SymbolDetail]:
        return [self.detail(symbol) for symbol in (self.symbols if symbols is None else symbols)]

    def take_changed(self) -> set[str]:
        changed, self.changed = self.changed, []
        known = self.known
        for symbol in changed:
            known[symbol].dirty = False
        return set(changed)

    def take_stale_changed(self) -> bool:
        changed, self.stale_changed = self.stale_changed, False
        return changed

    def recount(self) -> list[int]:
        """Totals recomputed from scratch (to check the running totals)."""
        totals = [0] * self.width
        for state in self.symbols.values():
            for index, value in enumerate(self._contribution(state)):
                totals[index] += value
        return totals

    # -- internals --------------------------------------------------------------------------------
    def _state(self, symbol: str) -> SymbolState:
        state = self.known.get(symbol)
        if state is None:
            state = self.known[symbol] = SymbolState(reference_price=self.reference_prices.get(symbol))
        return state

    def _resolve(self, state: SymbolState, now_ns: int) -> Mark[int]:
        return resolve(state.mark_inputs(), now_ns, self.mark_rules)

    def _check_bucket(self, bucket: str) -> None:
        if bucket not in self.bucket_index:
            raise ValueError(f"unknown bucket {bucket!r}")

    def _order_bucket(self, state: SymbolState) -> str:
        base = state.slot * self.row_width
        for index, name in enumerate(self.bucket_names):
            if self.rows[base + self.buy_at + index] or self.rows[base + self.sell_at + index]:
                return name
        return self.rules.default_bucket

    def _expose(self, symbol: str, state: SymbolState, now_ns: int) -> None:
        """The symbol gets a position or an open order: give it a row and a mark."""
        if self.free_slots:
            state.slot = self.free_slots.pop()
        else:
            state.slot = len(self.rows) // self.row_width
            self.rows.extend((0,) * self.row_width)
        state.mark = self._resolve(state, now_ns)
        self.symbols[symbol] = state

    def exposed(self, state: SymbolState) -> bool:
        if state.qty:
            return True
        base = state.slot * self.row_width + self.buy_at
        return any(self.rows[base : base + 2 * len(self.bucket_names)])

    def _open_qty(self, symbol: str, side: str, bucket: str) -> int:
        state = self.known.get(symbol)
        if state is None or state.slot < 0:
            return 0
        offset = self.buy_at if side == "BUY" else self.sell_at
        return self.rows[state.slot * self.row_width + offset + self.bucket_index[bucket]]

    def _add_open(self, order: OpenOrder, sign: int, now_ns: int) -> None:
        state = self.known.get(order.symbol)
        if state is None:
            state = self._state(order.symbol)
        if state.slot < 0:
            self._expose(order.symbol, state, now_ns)
        offset = self.buy_at if order.side == "BUY" else self.sell_at
        self.rows[state.slot * self.row_width + offset + self.bucket_index[order.bucket]] += sign * order.open_qty
        self._apply(order.symbol, state)

    def _inputs_changed(self, symbol: str, state: SymbolState, now_ns: int) -> None:
        if state.slot < 0:
            return  # not exposed: nothing depends on this mark yet
        mark = self._resolve(state, now_ns)
        if mark != state.mark:
            state.mark = mark
            self._apply(symbol, state, may_remove=False)

    def _contribution(self, state: SymbolState) -> tuple[int, ...]:
        mark = state.mark.price
        if mark is None:
            return self.zero
        buckets = len(self.bucket_names)
        base = state.slot * self.row_width
        buy = self.rows[base + self.buy_at : base + self.buy_at + buckets]
        sell = self.rows[base + self.sell_at : base + self.sell_at + buckets]
        qty = state.qty
        notional = qty * mark
        parts = [
            notional if qty > 0 else 0,
            -notional if qty < 0 else 0,
            potential_notional(qty, sum(buy), sum(sell), mark),
        ]
        position_bucket = state.bucket
        for index, name in enumerate(self.bucket_names):
            bucket_qty = qty if position_bucket == name else 0
            parts.append(abs(bucket_qty) * mark)
            parts.append(potential_notional(bucket_qty, buy[index], sell[index], mark))
        return tuple(parts)

    def _apply(self, symbol: str, state: SymbolState, may_remove: bool = True) -> None:
        """Replace the symbol's cached contribution in the running totals: O(1)."""
        new = self._contribution(state)
        rows, totals = self.rows, self.totals_units
        base = state.slot * self.row_width
        for index in range(self.width):
            old = rows[base + index]
            if old != new[index]:
                totals[index] += new[index] - old
                rows[base + index] = new[index]
        if not state.dirty:
            state.dirty = True
            self.changed.append(symbol)
        exposed = self.exposed(state) if may_remove else True
        if exposed and state.mark.stale:
            if symbol not in self.stale:
                self.stale.add(symbol)
                self.stale_changed = True
        elif symbol in self.stale:
            self.stale.discard(symbol)
            self.stale_changed = True
        if not exposed:
            # Its contribution and open quantities are all zero now: the row is clean.
            del self.symbols[symbol]
            self.free_slots.append(state.slot)
            state.slot, state.mark = -1, NO_MARK
