"""P&L of the trading day (SPEC 10): pure functions over plain data.

Shared by the pnl daemon (live figures), `qe pnl` and the end-of-day report, so the
three can never disagree. Nothing here reads Redis, a clock or the broker.

The method (IB's average cost):

* Each symbol's position is one average-cost book: a fill that adds to the position
  (or opens it) moves the average price; a fill that reduces it realizes
  (fill price - average) x closed shares (reversed for a short) and leaves the average
  unchanged; a fill that crosses zero closes the whole position, then opens the rest at
  the fill price.
* Day figures: a position carried from the previous day enters the day's book at the
  previous close (not at its original cost), so realized + unrealized is the day's
  P&L against the previous close, as IB's daily P&L counts it. The same fills run
  through a second book started at the broker's average cost give `realized_vs_cost`
  (IB's realizedPnL basis, before commissions).
* Unrealized = open quantity x (mark - average) at the mark chosen by qe.marks; a
  stale, fallback or missing mark is flagged (a missing one counts 0 unrealized).
* Commissions are the broker's commission reports, kept apart from prices (the
  averages exclude them). A fill whose report has not arrived yet is counted in the
  quantities and prices and flagged pending; its commission counts 0 until it arrives.
* total = realized + unrealized - commissions.

Reconciliation with the broker's own P&L (reqPnLSingle, `reconcile`): the same fills run
through a third book on IB's basis (started at the broker's average cost, which includes
commissions; an opening fill's commission goes into the average cost, a closing fill's
into realized, a flip through zero splits it pro rata) give the figures IB reports; they
are compared at the broker's own mark (its value / position), so a difference is one of
books (a fill, a commission, a position, a previous close), never of marks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .marks import Mark, MarkSource

BUCKETS = ("LT", "MM_PURE")


@dataclass(frozen=True, slots=True)
class Trade:
    """One execution (an IB execId), as execution published it on ev.orders."""

    exec_id: str
    symbol: str
    bucket: str
    side: str  # BUY | SELL
    qty: int  # > 0
    price: float
    ts_ns: int
    commission: float | None = None  # None: no commission report yet
    seq: int = 0  # arrival order, the tie-break for equal timestamps

    @property
    def signed_qty(self) -> int:
        return self.qty if self.side == "BUY" else -self.qty


@dataclass(frozen=True, slots=True)
class Carried:
    """A position carried into the day: its quantity at the day's start, the previous
    close it starts from, and (optionally) the broker's average cost."""

    symbol: str
    bucket: str
    qty: int
    prev_close: float
    prev_close_source: str = "close"  # where the previous close came from (close, reference, avg_cost)
    avg_cost: float | None = None


@dataclass(frozen=True, slots=True)
class Book:
    """An average-cost position: signed quantity and the average price of it (0 when flat)."""

    qty: int = 0
    avg: float = 0.0


def apply_trade(book: Book, signed_qty: int, price: float) -> tuple[Book, float]:
    """The book after one fill, and the P&L the fill realized (prices only)."""
    if signed_qty == 0:
        return book, 0.0
    if book.qty == 0 or (book.qty > 0) == (signed_qty > 0):
        qty = book.qty + signed_qty
        avg = (book.avg * abs(book.qty) + price * abs(signed_qty)) / abs(qty)
        return Book(qty, avg), 0.0
    closed = min(abs(signed_qty), abs(book.qty))
    direction = 1 if book.qty > 0 else -1
    realized = (price - book.avg) * closed * direction
    qty = book.qty + signed_qty
    if qty == 0:
        return Book(), realized
    if (qty > 0) == (book.qty > 0):
        return Book(qty, book.avg), realized
    return Book(qty, price), realized  # through zero: the rest opens at the fill price


def apply_trade_ib(book: Book, signed_qty: int, price: float, commission: float) -> tuple[Book, float]:
    """IB's average-cost book: the opening part's commission in the average cost (a short's
    "cost" is its proceeds net of it), the closing part's in realized (pro rata on a flip)."""
    qty = abs(signed_qty)
    if qty == 0:
        return book, 0.0
    buy = signed_qty > 0
    closing = min(qty, abs(book.qty)) if book.qty and (book.qty > 0) != buy else 0
    opening = qty - closing
    realized = 0.0
    held, avg = book.qty, book.avg
    if closing:
        fee = commission * closing / qty
        realized = ((price - avg) if held > 0 else (avg - price)) * closing - fee
        held += closing if buy else -closing
        if held == 0:
            avg = 0.0
    if opening:
        fee = commission * opening / qty
        unit = price + fee / opening if buy else price - fee / opening
        avg = (avg * abs(held) + unit * opening) / (abs(held) + opening)
        held += opening if buy else -opening
    return Book(held, avg), realized


def unrealized(book: Book, mark: float | None) -> float:
    if book.qty == 0 or mark is None:
        return 0.0
    return (mark - book.avg) * book.qty


@dataclass(frozen=True, slots=True)
class SymbolPnL:
    symbol: str
    bucket: str
    start_qty: int
    prev_close: float | None
    prev_close_source: str | None
    qty: int
    avg_price: float  # the day book's average price of the open quantity (0 when flat)
    mark: float | None
    mark_source: str
    mark_stale: bool  # only for an open position: a flat one needs no mark
    mark_reason: str
    realized: float
    unrealized: float
    commissions: float
    commissions_pending: int  # fills whose commission report has not arrived
    fills: int
    bought_qty: int
    sold_qty: int
    realized_vs_cost: float | None  # None: no broker average cost for a carried position
    # IB's basis (commissions in the average cost / in realized): what reqPnLSingle reports.
    ib_realized: float | None = None  # None: no broker average cost for a carried position
    ib_avg_cost: float = 0.0

    @property
    def total(self) -> float:
        return self.realized + self.unrealized - self.commissions


@dataclass(frozen=True, slots=True)
class Totals:
    realized: float = 0.0
    unrealized: float = 0.0
    commissions: float = 0.0
    commissions_pending: int = 0
    fills: int = 0
    marks_stale: int = 0
    symbols: int = 0

    @property
    def total(self) -> float:
        return self.realized + self.unrealized - self.commissions

    def plus(self, line: SymbolPnL) -> "Totals":
        return Totals(
            self.realized + line.realized,
            self.unrealized + line.unrealized,
            self.commissions + line.commissions,
            self.commissions_pending + line.commissions_pending,
            self.fills + line.fills,
            self.marks_stale + (1 if line.mark_stale else 0),
            self.symbols + 1,
        )


@dataclass(frozen=True, slots=True)
class DayPnL:
    symbols: dict[str, SymbolPnL]
    buckets: dict[str, Totals]
    account: Totals
    marks_stale: list[str] = field(default_factory=list)
    pending_exec_ids: list[str] = field(default_factory=list)


def unique_trades(trades: Iterable[Trade]) -> list[Trade]:
    """Each execId once, in fill order (timestamp, then arrival). A later copy of an
    execution carrying its commission report replaces one without."""
    by_id: dict[str, Trade] = {}
    for trade in trades:
        seen = by_id.get(trade.exec_id)
        if seen is None:
            by_id[trade.exec_id] = trade
        elif seen.commission is None and trade.commission is not None:
            by_id[trade.exec_id] = Trade(seen.exec_id, seen.symbol, seen.bucket, seen.side, seen.qty, seen.price,
                                         seen.ts_ns, trade.commission, seen.seq)
    return sorted(by_id.values(), key=lambda t: (t.ts_ns, t.seq, t.exec_id))


def symbol_pnl(symbol: str, carried: Carried | None, trades: list[Trade], mark: Mark[float] | None) -> SymbolPnL:
    """One symbol's day: its carried position (if any), its fills in order, its mark."""
    day = Book(carried.qty, carried.prev_close) if carried and carried.qty else Book()
    cost_known = carried is None or carried.qty == 0 or carried.avg_cost is not None
    cost = Book(carried.qty, carried.avg_cost or 0.0) if carried and carried.qty else Book()
    ib_book = cost
    realized = realized_cost = realized_ib = commissions = 0.0
    pending = bought = sold = 0
    bucket = carried.bucket if carried else (trades[0].bucket if trades else "LT")
    for trade in trades:
        day, gained = apply_trade(day, trade.signed_qty, trade.price)
        cost, gained_cost = apply_trade(cost, trade.signed_qty, trade.price)
        ib_book, gained_ib = apply_trade_ib(ib_book, trade.signed_qty, trade.price, trade.commission or 0.0)
        realized += gained
        realized_cost += gained_cost
        realized_ib += gained_ib
        if trade.commission is None:
            pending += 1
        else:
            commissions += trade.commission
        if trade.side == "BUY":
            bought += trade.qty
        else:
            sold += trade.qty
        bucket = trade.bucket
    price = mark.price if mark is not None else None
    source = mark.source.value if mark is not None else MarkSource.NONE.value
    stale = day.qty != 0 and (mark is None or mark.stale)
    reason = (mark.reason if mark is not None else "no mark") if stale else ""
    return SymbolPnL(
        symbol=symbol,
        bucket=bucket,
        start_qty=carried.qty if carried else 0,
        prev_close=carried.prev_close if carried else None,
        prev_close_source=carried.prev_close_source if carried else None,
        qty=day.qty,
        avg_price=day.avg,
        mark=price,
        mark_source=source,
        mark_stale=stale,
        mark_reason=reason,
        realized=realized,
        unrealized=unrealized(day, price),
        commissions=commissions,
        commissions_pending=pending,
        fills=len(trades),
        bought_qty=bought,
        sold_qty=sold,
        realized_vs_cost=realized_cost if cost_known else None,
        ib_realized=realized_ib if cost_known else None,
        ib_avg_cost=ib_book.avg,
    )


def day_pnl(carried: Iterable[Carried], trades: Iterable[Trade], marks: Mapping[str, Mark[float]]) -> DayPnL:
    """Per symbol, per bucket and for the account: the day so far."""
    starts = {c.symbol: c for c in carried}
    by_symbol: dict[str, list[Trade]] = {}
    ordered = unique_trades(trades)
    for trade in ordered:
        by_symbol.setdefault(trade.symbol, []).append(trade)
    symbols = {
        symbol: symbol_pnl(symbol, starts.get(symbol), by_symbol.get(symbol, []), marks.get(symbol))
        for symbol in sorted(set(starts) | set(by_symbol))
    }
    buckets = {name: Totals() for name in BUCKETS}
    account = Totals()
    for line in symbols.values():
        buckets[line.bucket] = buckets.get(line.bucket, Totals()).plus(line)
        account = account.plus(line)
    return DayPnL(
        symbols=symbols,
        buckets=buckets,
        account=account,
        marks_stale=[s for s, line in symbols.items() if line.mark_stale],
        pending_exec_ids=[t.exec_id for t in ordered if t.commission is None],
    )


def start_of_day(positions: Mapping[str, tuple[int, str, float]], closes: Mapping[str, float],
                 references: Mapping[str, float]) -> list[Carried]:
    """The day's carried positions from the broker's positions at the day boundary
    (symbol -> (qty, bucket, avg_cost)): each starts from the previous close we saw,
    else the universe's reference price, else the broker's average cost (the source is
    recorded: anything but `close` is a stand-in)."""
    carried = []
    for symbol, (qty, bucket, avg_cost) in sorted(positions.items()):
        if qty == 0:
            continue
        if closes.get(symbol, 0) > 0:
            price, source = closes[symbol], "close"
        elif references.get(symbol, 0) > 0:
            price, source = references[symbol], "reference"
        else:
            price, source = avg_cost, "avg_cost"
        carried.append(Carried(symbol, bucket, qty, price, source, avg_cost if avg_cost > 0 else None))
    return carried


# --- reconciliation with the broker's P&L (reqPnLSingle) ------------------------------------

CENT = 0.01  # $ per share: how far the books may differ (price rounding)
COMMISSION_ROUNDING = 0.01  # $ per fill: a commission report rounded to the cent


@dataclass(frozen=True, slots=True)
class BrokerFigures:
    """One symbol's reqPnLSingle, as execution published it (None: unset at the broker)."""

    position: int | None
    daily: float | None
    unrealized: float | None
    realized: float | None
    value: float | None


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """Ours against the broker's, at the broker's mark. diff = ours - broker's; a figure
    neither side can give is None. status: ok, mismatch (a difference beyond its
    tolerance, or another position), pending (a commission report outstanding: not
    judged), no_broker (no figures from the broker)."""

    status: str
    broker: BrokerFigures | None = None
    broker_mark: float | None = None
    position_diff: int | None = None
    realized_diff: float | None = None
    unrealized_diff: float | None = None
    daily_diff: float | None = None
    realized_tolerance: float = 0.0
    unrealized_tolerance: float = 0.0
    daily_tolerance: float = 0.0
    problems: tuple[str, ...] = ()

    @property
    def mismatch(self) -> bool:
        return self.status == "mismatch"


def reconcile(line: SymbolPnL, broker: BrokerFigures | None, cent: float = CENT,
              commission_rounding: float = COMMISSION_ROUNDING) -> Reconciliation:
    """One symbol's figures against the broker's.

    * position: ours (the day's book) must equal the broker's exactly;
    * realized (IB's basis) within a cent per share traded today, plus commission rounding;
    * unrealized (IB's basis, at the broker's mark) within a cent per share held, plus rounding;
    * daily (realized + unrealized - commissions against the previous close, at the
      broker's mark) within a cent per share carried or traded, plus rounding.
    The broker's mark is its value / position (ours when it reports no value)."""
    if broker is None:
        return Reconciliation("no_broker")
    traded = line.bought_qty + line.sold_qty
    rounding = commission_rounding * line.fills
    tolerances: dict[str, float] = {
        "realized_tolerance": cent * traded + rounding,
        "unrealized_tolerance": cent * abs(line.qty) + rounding,
        "daily_tolerance": cent * (abs(line.start_qty) + traded) + rounding,
    }
    mark = line.mark
    if broker.position and broker.value is not None:
        mark = broker.value / broker.position
    position_diff = None if broker.position is None else line.qty - broker.position
    if line.commissions_pending:
        return Reconciliation(
            "pending", broker, mark, position_diff,
            realized_tolerance=tolerances["realized_tolerance"], unrealized_tolerance=tolerances["unrealized_tolerance"],
            daily_tolerance=tolerances["daily_tolerance"],
        )
    problems = []
    if position_diff:
        problems.append(f"position {line.qty} here, {broker.position} at the broker")
    realized_diff = unrealized_diff = daily_diff = None
    if line.ib_realized is not None and broker.realized is not None:
        realized_diff = line.ib_realized - broker.realized
    if line.ib_realized is not None and broker.unrealized is not None and (mark is not None or line.qty == 0):
        ours = line.qty * ((mark or 0.0) - line.ib_avg_cost) if line.qty else 0.0
        unrealized_diff = ours - broker.unrealized
    if broker.daily is not None and (mark is not None or line.qty == 0):
        day_unrealized = line.qty * ((mark or 0.0) - line.avg_price) if line.qty else 0.0
        daily_diff = line.realized + day_unrealized - line.commissions - broker.daily
    for name, diff in (("realized", realized_diff), ("unrealized", unrealized_diff), ("daily", daily_diff)):
        tolerance = tolerances[f"{name}_tolerance"]
        if diff is not None and abs(diff) > tolerance + 1e-9:
            problems.append(f"{name} differs by {diff:+.2f} (tolerance {tolerance:.2f})")
    return Reconciliation("mismatch" if problems else "ok", broker, mark, position_diff, realized_diff, unrealized_diff,
                          daily_diff, problems=tuple(problems), **tolerances)
