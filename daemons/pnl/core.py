"""qe-pnl's pure parts: which broker position a carried position is measured from,
the trading day of a fill, and the P&L payload. The arithmetic is qe.pnl's.

Carried positions without relying on the order in which two streams are read: for
each symbol the worker keeps one *anchor*, a broker position (ev.positions) with the
time it was published: the latest one at or before the day's open, else the earliest
one after it. The day's start quantity is the anchor's quantity less the day's fills
at or before the anchor (a position published at 15:31 already includes the 15:30
fill). A symbol opened today therefore starts at 0, whichever of its fill and its
position the worker read first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from qe.clock import NEW_YORK
from qe.contracts import BrokerPnL, PnL, PnLReconciliation, PnLTotals, SymbolPnL
from qe.pnl import BrokerFigures, Carried, DayPnL, Reconciliation, Totals, Trade, start_of_day

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class BrokerPosition:
    qty: int
    bucket: str
    avg_cost: float
    ts_ns: int  # the ev.positions event's time (the publisher's clock)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "BrokerPosition":
        return cls(int(data["qty"]), str(data["bucket"]), float(data["avg_cost"]), int(data["ts_ns"]))


def next_anchor(anchor: BrokerPosition | None, position: BrokerPosition, open_ns: int) -> BrokerPosition:
    """The latest position at or before the open, else the earliest after it."""
    if anchor is None:
        return position
    if position.ts_ns <= open_ns:
        return position if anchor.ts_ns > open_ns or position.ts_ns >= anchor.ts_ns else anchor
    if anchor.ts_ns <= open_ns:
        return anchor
    return position if position.ts_ns < anchor.ts_ns else anchor


def carried(anchors: Mapping[str, BrokerPosition], trades: Iterable[Trade], closes: Mapping[str, float],
            references: Mapping[str, float]) -> list[Carried]:
    """The day's carried positions: each anchor less the day's fills it already includes."""
    included: dict[str, int] = {}
    for trade in trades:
        anchor = anchors.get(trade.symbol)
        if anchor is not None and trade.ts_ns <= anchor.ts_ns:
            included[trade.symbol] = included.get(trade.symbol, 0) + trade.signed_qty
    positions = {
        symbol: (anchor.qty - included.get(symbol, 0), anchor.bucket, anchor.avg_cost) for symbol, anchor in anchors.items()
    }
    return start_of_day(positions, closes, references)


@dataclass(frozen=True, slots=True)
class BrokerLine:
    """The broker's latest reqPnLSingle (symbol) or reqPnL (account) as received."""

    position: int | None
    daily: float | None
    unrealized: float | None
    realized: float | None
    value: float | None
    ts_ns: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "BrokerLine":
        return cls(**{k: data.get(k) for k in ("position", "daily", "unrealized", "realized", "value")}, ts_ns=int(data["ts_ns"]))

    @property
    def figures(self) -> BrokerFigures:
        return BrokerFigures(self.position, self.daily, self.unrealized, self.realized, self.value)


@dataclass(frozen=True, slots=True)
class Episode:
    """A symbol's difference with the broker: since when, and whether its alert is raised."""

    since_ns: int
    alerted: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "Episode":
        return cls(int(data["since_ns"]), bool(data["alerted"]))


def next_episode(episode: Episode | None, judged: Reconciliation | None, now_ns: int, grace_ns: int) -> tuple[Episode | None, str | None]:
    """One step of a symbol's mismatch episode: the episode after it and the alert action
    (raise, resolve or None). A mismatch must last grace_ns before it is raised (the
    broker's figures and ours arrive apart); agreement resolves it at once; a symbol not
    judged now (a commission pending, no broker figures) leaves the episode as it is."""
    if judged is None or judged.status not in ("ok", "mismatch"):
        return episode, None
    if judged.status == "ok":
        return None, ("resolve" if episode is not None and episode.alerted else None)
    current = episode or Episode(now_ns)
    if not current.alerted and now_ns - current.since_ns >= grace_ns:
        return Episode(current.since_ns, True), "raise"
    return current, None


def reconciliation_model(judged: Reconciliation, episode: Episode | None, broker_ts_ns: int | None) -> PnLReconciliation:
    broker = judged.broker

    def money(value: float | None) -> float | None:
        return None if value is None else _money(value)

    return PnLReconciliation(
        status=judged.status,  # type: ignore[arg-type]
        since_ns=episode.since_ns if episode is not None else None,
        alerted=episode.alerted if episode is not None else False,
        broker_position=broker.position if broker else None,
        broker_realized=money(broker.realized) if broker else None,
        broker_unrealized=money(broker.unrealized) if broker else None,
        broker_daily=money(broker.daily) if broker else None,
        broker_mark=round(judged.broker_mark, 6) if judged.broker_mark and judged.broker_mark > 0 else None,
        broker_ts_ns=broker_ts_ns,
        position_diff=judged.position_diff,
        realized_diff=money(judged.realized_diff),
        unrealized_diff=money(judged.unrealized_diff),
        daily_diff=money(judged.daily_diff),
        realized_tolerance=_money(judged.realized_tolerance),
        unrealized_tolerance=_money(judged.unrealized_tolerance),
        daily_tolerance=_money(judged.daily_tolerance),
        problems=[p[:256] for p in judged.problems[:8]],
    )


def trading_day_of(ts_ns: int) -> str:
    """The New York date of an execution (fills happen in the session: its trading day)."""
    return datetime.fromtimestamp(ts_ns / NS_PER_S, tz=timezone.utc).astimezone(NEW_YORK).date().isoformat()


def iso_to_ns(text: str | None) -> int | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp()) * NS_PER_S + moment.microsecond * 1000


def _money(value: float) -> float:
    return round(value, 4)


def _totals(totals: Totals) -> PnLTotals:
    return PnLTotals(
        realized=_money(totals.realized), unrealized=_money(totals.unrealized), commissions=_money(totals.commissions),
        total=_money(totals.total), commissions_pending=totals.commissions_pending, fills=totals.fills,
        marks_stale=totals.marks_stale, symbols=totals.symbols,
    )


def payload(day: str, figures: DayPnL, final: bool = False, reconciliations: Mapping[str, PnLReconciliation] | None = None,
            mismatched: Iterable[str] = (), broker_account: BrokerPnL | None = None) -> PnL:
    symbols = {
        symbol: SymbolPnL(
            bucket=line.bucket,  # type: ignore[arg-type]
            start_qty=line.start_qty,
            prev_close=line.prev_close if line.prev_close and line.prev_close > 0 else None,
            prev_close_source=line.prev_close_source,  # type: ignore[arg-type]
            qty=line.qty,
            avg_price=round(line.avg_price, 6),
            mark=line.mark,
            mark_source=line.mark_source,  # type: ignore[arg-type]
            mark_stale=line.mark_stale,
            mark_reason=line.mark_reason[:256] or None,
            realized=_money(line.realized),
            unrealized=_money(line.unrealized),
            commissions=_money(line.commissions),
            total=_money(line.total),
            commissions_pending=line.commissions_pending,
            fills=line.fills,
            bought_qty=line.bought_qty,
            sold_qty=line.sold_qty,
            realized_vs_cost=None if line.realized_vs_cost is None else _money(line.realized_vs_cost),
            reconciliation=(reconciliations or {}).get(symbol),
        )
        for symbol, line in figures.symbols.items()
    }
    return PnL(
        trading_day=day,
        account=_totals(figures.account),
        buckets={name: _totals(t) for name, t in figures.buckets.items()},  # type: ignore[misc]
        symbols=symbols,
        marks_stale=figures.marks_stale,
        pending_exec_ids=figures.pending_exec_ids[:1000],
        final=final,
        mismatched=sorted(mismatched),
        broker_account=broker_account,
    )
