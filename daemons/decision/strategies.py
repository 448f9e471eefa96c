"""Strategies: the producers of risk-increasing intents (SPEC 6, Strategies). Pure.

A strategy is any object with a `name`, a `slots` tuple (its bookkeeping slots)
and `propose(context, symbols)` returning candidates; `build_strategies` makes
the enabled ones from the `strategies:` section of risk_rules.yaml (one registry
entry per strategy). Modes, bucket maxima and the hard cap are applied afterwards
by arbitration and the cap filter, to every strategy alike.

One limit is the strategies' own: a strategy never proposes a risk increase that
would take the Brain's potential gross (exposure snapshot + its own unacknowledged
intents) above the regime's tolerance less `strategies.tolerance_margin_pct`
(`IncreaseRoom`). Proposing more would only push the mode machine into de-risking
it again (NORMAL <-> SOFT_DERISK flapping, issue 13); the cap filter applies the
same ceiling to all strategies together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from qe.config import LtBandStrategy, MarketMakingStrategy, RiskRules

from .arbitration import PotentialBook
from .model import NS, Candidate, Market, Outstanding, PositionView, Skip, ceil_cent, classification, floor_cent


@dataclass(slots=True)
class IncreaseRoom:
    """How much risk a strategy may still add: potential gross up to `ceiling_pct`
    (the regime's tolerance less the margin, never above the hard cap), counted on
    an overlay of the Brain's potential book, so its own unacknowledged intents and
    what this strategy already proposed are included. Each strategy takes a
    `fresh()` one: strategies do not starve each other here (the cap filter shares
    the room among them by priority)."""

    book: PotentialBook
    ceiling_pct: float

    def fresh(self) -> "IncreaseRoom":
        return IncreaseRoom(self.book.overlay(), self.ceiling_pct)

    def take(self, symbol: str, side: str, qty: int, mark: float, bucket: str, min_qty: int) -> int:
        """The largest whole-share quantity <= qty (and >= min_qty) that keeps potential
        gross at or below the ceiling, now counted in the room; 0 when none fits."""
        if not (math.isfinite(mark) and mark > 0):
            return 0  # no mark, no way to know what it adds: no increase

        def fits(shares: int) -> bool:
            return self.book.potential_pct + self.book.delta_pct(symbol, side, shares, mark, bucket) <= self.ceiling_pct + 1e-9

        low, high = 0, qty  # fits is monotone: more shares, more potential
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        if low < min_qty:
            return 0
        self.book.add(symbol, side, low, mark, bucket)
        return low

    def numbers(self) -> dict[str, float]:
        return {"brain_potential_pct": round(self.book.potential_pct, 4), "increase_ceiling_pct": round(self.ceiling_pct, 4)}


@dataclass(frozen=True, slots=True)
class StrategyContext:
    now_ns: int
    equity: float
    positions: Mapping[str, PositionView]
    markets: Mapping[str, Market]  # as judged by the quote gate (an implausible quote is removed)
    live: Any  # engine.LiveIndex: get((symbol, slot)), in_slot(slot), other_than(symbol, slots)
    universe: Mapping[str, str]  # symbol -> bucket hint
    bucket_target_pct: Mapping[str, float]
    bucket_current_pct: Mapping[str, float]
    min_qty: int
    priority: int
    l1_max_age_s: float
    truth_max_age_s: float
    mark_of: Callable[[str], float | None]
    # What increases may still add (None: the Brain's potential or the regime's
    # tolerance is unknown, so no increase is proposed at all).
    room: IncreaseRoom | None


@dataclass(slots=True)
class StrategyOutput:
    candidates: list[Candidate] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    name: str
    slots: tuple[str, ...]
    per_symbol: bool  # True: may be run for just the symbols whose market moved

    def propose(self, context: StrategyContext, symbols: Iterable[str] | None) -> StrategyOutput: ...


STRATEGY_SLOTS = ("MM_BID", "MM_ASK", "LT_BAND")


# --- (a) reference market making in MM_PURE around GRPAN ------------------------------------


class GrpanMarketMaker:
    """Quote both sides around the GRPAN price: bid at GRPAN - edge (never at or
    above the offer), offer at GRPAN + edge (never at or below the bid), `quote_size`
    shares, inventory kept within +-max_position_shares. A quote on the side that
    reduces the inventory is a decrease (sized to at most the inventory); any
    other quote is an increase. A live quote within `requote_threshold` of the
    wanted price is left alone."""

    name = "MM_QUOTE"
    slots = ("MM_BID", "MM_ASK")
    per_symbol = True

    def __init__(self, config: MarketMakingStrategy) -> None:
        self.config = config
        self._symbols: tuple[str, ...] | None = tuple(config.symbols) or None

    def symbols(self, universe: Mapping[str, str]) -> tuple[str, ...]:
        if self._symbols is not None:
            return self._symbols
        return tuple(sorted(symbol for symbol, bucket in universe.items() if bucket == "MM_PURE"))

    def quotes_symbol(self, symbol: str, universe: Mapping[str, str]) -> bool:
        if self._symbols is not None:
            return symbol in self._symbols
        return universe.get(symbol) == "MM_PURE"

    def propose(self, context: StrategyContext, symbols: Iterable[str] | None) -> StrategyOutput:
        out = StrategyOutput()
        chosen = self.symbols(context.universe) if symbols is None else [s for s in symbols if self.quotes_symbol(s, context.universe)]
        room = None if context.room is None else context.room.fresh()
        for symbol in chosen:
            try:
                self._quote(symbol, context, room, out)
            except Exception as exc:  # noqa: BLE001 - one symbol's bad numbers must not stop the others
                out.skips.append(Skip(symbol, "MM_BID", "evaluation_error", {"error": f"{type(exc).__name__}: {exc}"[:200]}))
        return out

    def _quote(self, symbol: str, context: StrategyContext, room: IncreaseRoom | None, out: StrategyOutput) -> None:
        cfg = self.config
        market = context.markets.get(symbol)
        position = context.positions.get(symbol)
        if position is not None and position.qty != 0 and position.bucket != "MM_PURE":
            out.skips.append(Skip(symbol, "MM_BID", "position_not_mm", {"bucket": position.bucket}))
            return
        if context.live.other_than(symbol, STRATEGY_SLOTS):
            out.skips.append(Skip(symbol, "MM_BID", "higher_priority_order_live"))
            return
        if market is None or market.grpan is None or abs(context.now_ns - market.feature_ts_ns) > cfg.max_feature_age_s * NS:
            out.skips.append(Skip(symbol, "MM_BID", "stale_features"))
            return
        if market.concentration_pct < cfg.min_concentration_pct or market.print_count < cfg.min_print_count:
            out.skips.append(
                Skip(symbol, "MM_BID", "weak_grpan", {"concentration_pct": market.concentration_pct, "print_count": market.print_count})
            )
            return
        if market.quote_problem is not None:
            out.skips.append(Skip(symbol, "MM_BID", "implausible_quote", {"problem": market.quote_problem}))
            return
        if not market.quote_fresh(context.now_ns, context.l1_max_age_s):
            out.skips.append(Skip(symbol, "MM_BID", "stale_l1"))
            return
        qty = position.qty if position is not None else 0
        bid, ask = market.bid, market.ask
        bid_price = min(floor_cent(market.grpan - cfg.edge), floor_cent(ask - 0.01))  # type: ignore[operator]
        ask_price = max(ceil_cent(market.grpan + cfg.edge), ceil_cent(bid + 0.01))  # type: ignore[operator]
        numbers = {"grpan": market.grpan, "edge": cfg.edge, "bid": bid, "ask": ask, "position_qty": qty,
                   "concentration_pct": market.concentration_pct}
        for slot, side, price in (("MM_BID", "BUY", bid_price), ("MM_ASK", "SELL", ask_price)):
            if price <= 0:
                continue
            sized = self._size(side, qty, context.min_qty)
            if sized is None:
                out.skips.append(Skip(symbol, slot, "inventory_limit", {"position_qty": qty}))
                continue
            order_qty, effect = sized
            direction = ("LONG" if side == "BUY" else "SHORT") if effect == "INC" else ("SHORT" if side == "BUY" else "LONG")
            live = context.live.get((symbol, slot))
            shrunk: dict[str, Any] = {}
            if effect == "INC":
                wanted_qty = order_qty
                order_qty = _increase_qty(symbol, slot, side, order_qty, classification("MM_PURE", direction, effect),
                                          price, live, room, context, out)
                if order_qty == 0:
                    continue
                if order_qty < wanted_qty and room is not None and live is None:
                    shrunk = {"shrunk_from_qty": wanted_qty, **room.numbers()}
            if live is not None and live.limit_price is not None and abs(live.limit_price - price) < cfg.requote_threshold - 1e-9:
                price = live.limit_price  # not worth a re-quote
            out.candidates.append(
                Candidate(
                    slot=slot,
                    purpose=self.name,
                    symbol=symbol,
                    side=side,
                    qty=order_qty,
                    order_type="LMT",
                    limit_price=price,
                    bucket="MM_PURE",
                    classification=classification("MM_PURE", direction, effect),
                    priority=context.priority,
                    reason=f"MM quote {side} {order_qty} @ {price:.2f} around GRPAN {market.grpan:.2f}",
                    numbers={**numbers, "quote_price": price, **shrunk},
                )
            )

    def _size(self, side: str, qty: int, min_qty: int) -> tuple[int, str] | None:
        cfg = self.config
        reduces = (side == "BUY" and qty < 0) or (side == "SELL" and qty > 0)
        if reduces:
            decrease = min(cfg.quote_size, abs(qty))
            if decrease >= min_qty:
                return decrease, "DEC"
        # An increase (or a quote that would cross through zero, counted as one).
        room = cfg.max_position_shares - (qty if side == "BUY" else -qty)
        size = min(cfg.quote_size, room)
        if size < min_qty:
            return None
        return size, "INC"


def _increase_qty(symbol: str, slot: str, side: str, qty: int, classification_: str, price: float,
                  live: Outstanding | None, room: IncreaseRoom | None, context: StrategyContext, out: StrategyOutput) -> int:
    """The quantity of a market maker's increase that fits the room (0: none, skipped).

    The live quote of the slot is already in the Brain's potential: continuing it
    takes no room, and it is never grown in place (a bigger quote waits for the live
    one to end), so a quote admitted below the ceiling stays one."""
    if live is not None and not live.cancel_sent and live.side == side and live.classification == classification_:
        return min(qty, live.qty)
    if room is None:
        out.skips.append(Skip(symbol, slot, "no_increase_room"))
        return 0
    fitted = room.take(symbol, side, qty, context.mark_of(symbol) or price, "MM_PURE", context.min_qty)
    if fitted == 0:
        out.skips.append(Skip(symbol, slot, "tolerance_headroom", room.numbers()))
    return fitted


# --- (b) LT band keeping ----------------------------------------------------------------------


class LtBandKeeper:
    """Keep the LT long share of the LT bucket within [long_min_pct, long_max_pct]
    (short share within the complement) with one small corrective limit order
    near the truth tick at a time. Below the LT target the under-weight side is
    increased; at or above it the over-weight side is decreased. The increase goes
    to the smallest existing position on that side (spreading risk), the decrease
    to the largest."""

    name = "LT_BAND"
    slots = ("LT_BAND",)
    per_symbol = False

    def __init__(self, config: LtBandStrategy) -> None:
        self.config = config

    def propose(self, context: StrategyContext, symbols: Iterable[str] | None) -> StrategyOutput:
        cfg = self.config
        out = StrategyOutput()
        if context.equity <= 0:
            return out
        long_notional = short_notional = 0.0
        holdings: list[tuple[str, int, float]] = []
        for symbol, position in context.positions.items():
            if position.bucket != "LT" or position.qty == 0:
                continue
            mark = context.mark_of(symbol)
            if mark is None:
                continue
            if not math.isfinite(abs(position.qty) * mark):
                raise ArithmeticError(f"{symbol}: notional of {position.qty} x {mark} is not finite")
            holdings.append((symbol, position.qty, mark))
            if position.qty > 0:
                long_notional += position.qty * mark
            else:
                short_notional += -position.qty * mark
        total = long_notional + short_notional
        if total <= 0:
            return out
        long_share = long_notional / total * 100
        lt_current = context.bucket_current_pct.get("LT", total / context.equity * 100)
        lt_target = context.bucket_target_pct.get("LT", 80.0)
        out.numbers = {
            "lt_long_share_pct": round(long_share, 4),
            "band_pct": [cfg.long_min_pct, cfg.long_max_pct],
            "lt_current_pct": round(lt_current, 4),
            "lt_target_pct": lt_target,
        }
        if cfg.long_min_pct <= long_share <= cfg.long_max_pct:
            return out
        too_long = long_share > cfg.long_max_pct
        grow = lt_current < lt_target
        # Which side moves, and how: (direction of the position to trade, effect).
        direction, effect = ("SHORT", "INC") if (too_long and grow) else ("LONG", "DEC") if too_long else (
            ("LONG", "INC") if grow else ("SHORT", "DEC"))
        edge = cfg.long_max_pct if too_long else cfg.long_min_pct
        # Notional that brings the long share back to the band edge.
        if effect == "INC":
            share = edge / 100 if direction == "LONG" else 1 - edge / 100
            side_notional = long_notional if direction == "LONG" else short_notional
            gap = (share * total - side_notional) / (1 - share) if share < 1 else math.inf
        else:
            share = edge / 100 if direction == "SHORT" else 1 - edge / 100
            other = short_notional if direction == "LONG" else long_notional
            side_notional = long_notional if direction == "LONG" else short_notional
            gap = side_notional - (other / share - other) if share > 0 else side_notional
        order_notional = min(cfg.order_notional_pct / 100 * context.equity, max(gap, 0.0))
        out.numbers.update(direction=direction, effect=effect, gap_notional=round(gap, 2), order_notional=round(order_notional, 2))

        live_band = context.live.in_slot("LT_BAND")
        for live in live_band:
            if live.classification.split("_")[1:] == [direction, effect]:
                out.candidates.append(self._keep(live, context, out.numbers))
        if len(live_band) >= cfg.max_live_orders or order_notional <= 0:
            return out

        room = None if context.room is None else context.room.fresh()
        side_holdings = [h for h in holdings if (h[1] > 0) == (direction == "LONG")]
        shrunk: dict[str, Any] = {}
        side_holdings.sort(key=lambda h: (abs(h[1]) * h[2], h[0]), reverse=(effect == "DEC"))
        for symbol, qty, mark in side_holdings:
            if context.live.other_than(symbol, STRATEGY_SLOTS) or any(live.symbol == symbol for live in live_band):
                continue
            market = context.markets.get(symbol)
            if market is not None and market.quote_problem is not None:
                out.skips.append(Skip(symbol, "LT_BAND", "implausible_quote", {"problem": market.quote_problem}))
                continue
            if market is None or not market.quote_fresh(context.now_ns, context.l1_max_age_s):
                out.skips.append(Skip(symbol, "LT_BAND", "stale_l1"))
                continue
            if not market.truth_fresh(context.now_ns, context.truth_max_age_s):
                out.skips.append(Skip(symbol, "LT_BAND", "stale_prints"))
                continue
            order_qty = max(context.min_qty, math.ceil(order_notional / mark - 1e-9))
            side = "BUY" if (direction == "LONG") == (effect == "INC") else "SELL"
            if effect == "DEC":
                order_qty = min(order_qty, abs(qty))
                if order_qty < context.min_qty:
                    out.skips.append(Skip(symbol, "LT_BAND", "below_min_qty", {"position_qty": qty}))
                    continue
            elif room is None:
                out.skips.append(Skip(symbol, "LT_BAND", "no_increase_room"))
                continue
            else:
                wanted_qty = order_qty
                order_qty = room.take(symbol, side, order_qty, mark, "LT", context.min_qty)
                if order_qty == 0:
                    out.skips.append(Skip(symbol, "LT_BAND", "tolerance_headroom", room.numbers()))
                    continue
                if order_qty < wanted_qty:
                    shrunk = {"shrunk_from_qty": wanted_qty, **room.numbers()}
            price = self._price(side, market)
            out.candidates.append(
                Candidate(
                    slot="LT_BAND",
                    purpose=self.name,
                    symbol=symbol,
                    side=side,
                    qty=order_qty,
                    order_type="LMT",
                    limit_price=price,
                    bucket="LT",
                    classification=classification("LT", direction, effect),
                    priority=context.priority,
                    reason=f"LT long share {long_share:.1f}% outside {cfg.long_min_pct:g}-{cfg.long_max_pct:g}%",
                    numbers={**out.numbers, "truth_tick": market.truth_price, "bid": market.bid, "ask": market.ask,
                             "position_qty": qty, "mark": round(mark, 4), **shrunk},
                )
            )
            break
        return out

    def _price(self, side: str, market: Market) -> float:
        offset = self.config.price_offset
        if side == "BUY":
            return floor_cent(min(market.truth_price - offset, market.ask))  # type: ignore[operator]
        return ceil_cent(max(market.truth_price + offset, market.bid))  # type: ignore[operator]

    def _keep(self, live: Outstanding, context: StrategyContext, numbers: dict[str, Any]) -> Candidate:
        market = context.markets.get(live.symbol)
        price = live.limit_price
        if market is not None and market.quote_fresh(context.now_ns, context.l1_max_age_s) and market.truth_fresh(
            context.now_ns, context.truth_max_age_s
        ):
            price = self._price(live.side, market)
        return Candidate(
            slot="LT_BAND",
            purpose=self.name,
            symbol=live.symbol,
            side=live.side,
            qty=live.remaining_qty or live.qty,
            order_type="LMT",
            limit_price=price,
            bucket=live.bucket,
            classification=live.classification,
            priority=context.priority,
            reason="LT band corrective still needed",
            numbers=dict(numbers),
            keep_key=live.key,
        )


STRATEGY_REGISTRY: dict[str, Callable[[RiskRules], Strategy | None]] = {
    "mm": lambda rules: GrpanMarketMaker(rules.strategies.mm) if rules.strategies.mm.enabled else None,
    "lt_band": lambda rules: LtBandKeeper(rules.strategies.lt_band) if rules.strategies.lt_band.enabled else None,
}


def build_strategies(rules: RiskRules) -> list[Strategy]:
    """The enabled strategies, in registry order."""
    built = (factory(rules) for factory in STRATEGY_REGISTRY.values())
    return [strategy for strategy in built if strategy is not None]
