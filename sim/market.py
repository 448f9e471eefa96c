"""Simulated market: per-symbol quotes and prints, seeded and deterministic.

Prices are integer cents ($0.01 ticks) throughout; the protocol layer renders them.
Each symbol has its own ``random.Random(f"{seed}:{symbol}")`` so its sequence of
quotes and prints depends only on the seed and on how many events it produced,
not on the other symbols or the universe order.

Event rates are per symbol per *wall* second (simple, and what benchmarks need);
timestamps come from the injected clock (qe.clock), so a sped-up simulated clock
moves event times, not event counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable

# IB-style exchange codes as they appear in tick-by-tick and execution reports.
# (IB reports Nasdaq prints as "NASDAQ" in market data and "ISLAND" as a routing
# destination; EDGX is "DRCTEDGE".) Weights are rough shares of lit volume.
LIT_VENUES: tuple[tuple[str, float], ...] = (
    ("NYSE", 0.30),
    ("ARCA", 0.20),
    ("NASDAQ", 0.18),
    ("BATS", 0.12),
    ("DRCTEDGE", 0.12),
    ("IEX", 0.08),
)
# Off-exchange prints reported to a FINRA TRF; IB shows them as "FINRA".
DARK_VENUE = "FINRA"
DARK_VENUES = frozenset({"FINRA", "FNRA", "ADFN", "TRF", "OTC", "DARK", "D"})

ODD_LOT = "I"  # sale condition: odd lot trade
ISO = "F"  # sale condition: intermarket sweep

_QUOTE_SIZES = (100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 3000)
_QUOTE_SIZE_WEIGHTS = (14, 14, 12, 10, 10, 8, 8, 8, 5, 5, 4, 2)
_SPREADS = (1, 2, 3, 4, 5)
_SPREAD_WEIGHTS = (35, 30, 20, 10, 5)


@dataclass(frozen=True)
class QuoteEvent:
    symbol: str
    bid: int
    ask: int
    bid_size: int
    ask_size: int
    ts_ns: int


@dataclass(frozen=True)
class PrintEvent:
    symbol: str
    price: int
    size: int
    venue: str
    conditions: str
    ts_ns: int
    own_fill: bool = False  # the print of one of our fills (not from the random tape)


@dataclass
class MarketConfig:
    quote_rate: float = 1.0  # quote changes per symbol per wall second
    print_rate: float = 0.3  # prints per symbol per wall second
    dark_share: float = 0.4  # share of prints reported off-exchange (FINRA)
    lit_odd_lot_share: float = 0.2
    max_sweep_levels: int = 20  # how many price levels one marketable order may walk


@dataclass
class SymbolBook:
    """Top of book and day statistics for one symbol."""

    symbol: str
    rng: random.Random
    ref: int  # reference price (previous close), cents
    bid: int
    ask: int
    bid_size: int
    ask_size: int
    last: int
    last_size: int = 0
    last_venue: str = ""
    last_ts_ns: int = 0
    volume: int = 0
    notional: int = 0  # cents x shares traded today (VWAP for RTVolume)
    high: int = 0
    low: int = 0
    open: int = 0
    frozen: bool = False
    halted: bool = False  # trading halt (control): no quotes, prints or fills
    quiet_until_ns: int = 0  # quiet symbol (control): the quote does not change until then
    no_prints_until_ns: int = 0  # no random prints until then
    quote_due: float = 0.0
    print_due: float = 0.0

    @property
    def mid(self) -> float:
        return (self.bid + self.ask) / 2.0

    def quote(self, ts_ns: int) -> QuoteEvent:
        return QuoteEvent(self.symbol, self.bid, self.ask, self.bid_size, self.ask_size, ts_ns)

    def snapshot(self) -> dict:
        return {
            "symbol": self.symbol,
            "bid": self.bid / 100,
            "ask": self.ask / 100,
            "bid_size": self.bid_size,
            "ask_size": self.ask_size,
            "last": self.last / 100,
            "last_size": self.last_size,
            "last_venue": self.last_venue,
            "volume": self.volume,
            "high": self.high / 100 if self.high else None,
            "low": self.low / 100 if self.low else None,
            "close": self.ref / 100,
            "frozen": self.frozen,
            "halted": self.halted,
            "quiet_until_ns": self.quiet_until_ns or None,
            "no_prints_until_ns": self.no_prints_until_ns or None,
        }


def to_cents(price: float) -> int:
    return int(round(price * 100))


class Market:
    def __init__(
        self,
        ref_prices: dict[str, float],
        seed: int,
        config: MarketConfig | None = None,
        now_ns: Callable[[], int] | None = None,
    ) -> None:
        import time

        self.config = config or MarketConfig()
        self.seed = seed
        self.now_ns = now_ns or time.time_ns
        self.books: dict[str, SymbolBook] = {}
        for symbol, ref_price in ref_prices.items():
            self.books[symbol] = self._new_book(symbol, to_cents(ref_price))

    def _new_book(self, symbol: str, ref: int) -> SymbolBook:
        rng = random.Random(f"{self.seed}:{symbol}")
        spread = rng.choices(_SPREADS, _SPREAD_WEIGHTS)[0]
        bid = max(1, ref - spread // 2 + rng.randint(-3, 3))
        book = SymbolBook(
            symbol=symbol,
            rng=rng,
            ref=ref,
            bid=bid,
            ask=bid + spread,
            bid_size=rng.choices(_QUOTE_SIZES, _QUOTE_SIZE_WEIGHTS)[0],
            ask_size=rng.choices(_QUOTE_SIZES, _QUOTE_SIZE_WEIGHTS)[0],
            last=bid + rng.randint(0, spread),
        )
        # Stagger symbols so they do not all tick on the same timer beat.
        book.quote_due = rng.random()
        book.print_due = rng.random()
        return book

    # ---------------------------------------------------------------- time steps

    def advance(self, dt_wall: float) -> list[QuoteEvent | PrintEvent]:
        """Everything that happens in the next ``dt_wall`` seconds, symbol by symbol."""
        events: list[QuoteEvent | PrintEvent] = []
        quote_step = self.config.quote_rate * dt_wall
        print_step = self.config.print_rate * dt_wall
        ts = self.now_ns()
        for book in self.books.values():
            if book.frozen or book.halted:
                continue
            book.quote_due += quote_step
            book.print_due += print_step
            while book.quote_due >= 1.0 or book.print_due >= 1.0:
                # Interleave by which is further overdue; deterministic per symbol.
                if book.quote_due >= book.print_due:
                    book.quote_due -= 1.0
                    if ts >= book.quiet_until_ns:
                        events.append(self._random_quote(book, ts))
                else:
                    book.print_due -= 1.0
                    if ts >= book.no_prints_until_ns:
                        events.append(self._random_print(book, ts))
        return events

    def _fresh_size(self, book: SymbolBook) -> int:
        return book.rng.choices(_QUOTE_SIZES, _QUOTE_SIZE_WEIGHTS)[0]

    def _random_quote(self, book: SymbolBook, ts: int) -> QuoteEvent:
        rng = book.rng
        kind = rng.random()
        if kind < 0.45:
            # Size change on one side (most quote updates in thin preferreds).
            if rng.random() < 0.5:
                book.bid_size = self._fresh_size(book)
            else:
                book.ask_size = self._fresh_size(book)
        elif kind < 0.80:
            # Slow, mean-reverting random walk of the whole quote by one tick.
            deviation = (book.mid - book.ref) / max(book.ref, 1)
            p_up = min(0.8, max(0.2, 0.5 - deviation * 15))
            move = 1 if rng.random() < p_up else -1
            if book.bid + move >= 1:
                book.bid += move
                book.ask += move
            book.bid_size = self._fresh_size(book)
            book.ask_size = self._fresh_size(book)
        else:
            # Spread change: move one side by a tick, keeping 1-5 cents.
            spread = book.ask - book.bid
            target = rng.choices(_SPREADS, _SPREAD_WEIGHTS)[0]
            if target > spread:
                if rng.random() < 0.5 and book.bid > 1:
                    book.bid -= 1
                else:
                    book.ask += 1
                book.ask_size = self._fresh_size(book)
            elif target < spread:
                if rng.random() < 0.5:
                    book.bid += 1
                    book.bid_size = self._fresh_size(book)
                else:
                    book.ask -= 1
                    book.ask_size = self._fresh_size(book)
        return book.quote(ts)

    def _random_print(self, book: SymbolBook, ts: int) -> PrintEvent:
        rng = book.rng
        cfg = self.config
        if rng.random() < cfg.dark_share:
            venue = DARK_VENUE
            price = rng.randint(book.bid, book.ask)
            r = rng.random()
            if r < 0.25:
                size = rng.randint(1, 14)
            elif r < 0.45:
                size = rng.randint(15, 99)
            elif r < 0.70:
                size = 100
            elif r < 0.82:
                size = 200
            else:
                size = 100 * rng.randint(3, 20)
            conditions = ODD_LOT if size < 100 else ""
        else:
            venue = rng.choices([v for v, _ in LIT_VENUES], [w for _, w in LIT_VENUES])[0]
            price = book.bid if rng.random() < 0.5 else book.ask
            if rng.random() < cfg.lit_odd_lot_share:
                size = rng.randint(1, 99)
                conditions = ODD_LOT
            else:
                r = rng.random()
                size = 100 if r < 0.4 else 200 if r < 0.65 else 100 * rng.randint(3, 10)
                conditions = ISO if rng.random() < 0.1 else ""
        return self._record_print(book, price, size, venue, conditions, ts)

    def _record_print(
        self, book: SymbolBook, price: int, size: int, venue: str, conditions: str, ts: int, own: bool = False
    ) -> PrintEvent:
        book.last = price
        book.last_size = size
        book.last_venue = venue
        book.last_ts_ns = ts
        book.volume += size
        book.notional += price * size
        book.high = max(book.high, price) if book.high else price
        book.low = min(book.low, price) if book.low else price
        if not book.open:
            book.open = price
        return PrintEvent(book.symbol, price, size, venue, conditions, ts, own)

    def roll_day(self, closes: dict[str, int]) -> None:
        """A new trading day: ``closes`` (cents) become the reference (previous close) and the
        day statistics (volume, open, high, low) start again."""
        for symbol, close in closes.items():
            book = self.books.get(symbol)
            if book is None or close <= 0:
                continue
            book.ref = close
            book.volume = book.notional = 0
            book.open = book.high = book.low = 0

    # ------------------------------------------------------------- interactions

    def book(self, symbol: str) -> SymbolBook:
        return self.books[symbol]

    def consume(
        self, symbol: str, buy: bool, qty: int, limit: int | None, max_levels: int | None = None
    ) -> tuple[list[tuple[int, int]], QuoteEvent | None]:
        """Take displayed liquidity on the far side up to ``limit`` (None: any price).

        Returns the (price, qty) slices taken, level by level, and the new quote if
        it changed. A level taken out is replaced one tick further away with fresh
        size: the book "walks" like a thin preferred does.
        """
        book = self.books[symbol]
        slices: list[tuple[int, int]] = []
        levels = 0
        max_levels = self.config.max_sweep_levels if max_levels is None else max_levels
        while qty > 0 and levels < max_levels:
            if buy:
                if limit is not None and book.ask > limit:
                    break
                take = min(qty, book.ask_size)
                slices.append((book.ask, take))
                book.ask_size -= take
                if book.ask_size <= 0:
                    book.ask += 1
                    book.ask_size = self._fresh_size(book)
                    levels += 1
            else:
                if limit is not None and book.bid < limit:
                    break
                take = min(qty, book.bid_size)
                slices.append((book.bid, take))
                book.bid_size -= take
                if book.bid_size <= 0:
                    book.bid = max(1, book.bid - 1)
                    book.bid_size = self._fresh_size(book)
                    levels += 1
            qty -= take
        if not slices:
            return [], None
        return slices, book.quote(self.now_ns())

    def fill_print(self, symbol: str, price: int, size: int) -> PrintEvent:
        """Our own execution shows on the tape, on a lit venue."""
        book = self.books[symbol]
        venue = book.rng.choices([v for v, _ in LIT_VENUES], [w for _, w in LIT_VENUES])[0]
        return self._record_print(book, price, size, venue, ODD_LOT if size < 100 else "", self.now_ns(), own=True)

    def set_quote(
        self,
        symbol: str,
        bid: float,
        ask: float,
        bid_size: int | None = None,
        ask_size: int | None = None,
        freeze: bool = True,
    ) -> QuoteEvent:
        book = self.books[symbol]
        bid_c, ask_c = to_cents(bid), to_cents(ask)
        if bid_c <= 0 or ask_c <= bid_c:
            raise ValueError(f"need 0 < bid < ask, got bid={bid} ask={ask}")
        book.bid, book.ask = bid_c, ask_c
        if bid_size is not None:
            book.bid_size = int(bid_size)
        if ask_size is not None:
            book.ask_size = int(ask_size)
        if book.bid_size <= 0 or book.ask_size <= 0:
            raise ValueError("sizes must be positive")
        book.frozen = freeze
        return book.quote(self.now_ns())

    def unfreeze(self, symbols: Iterable[str] | None = None) -> None:
        for symbol in symbols if symbols is not None else list(self.books):
            self.books[symbol].frozen = False

    def shock(self, symbols: Iterable[str], pct: float) -> list[QuoteEvent | PrintEvent]:
        """Move whole quotes by ``pct`` percent (exposure and mark tests), with a lit print."""
        events: list[QuoteEvent | PrintEvent] = []
        ts = self.now_ns()
        for symbol in symbols:
            book = self.books[symbol]
            spread = book.ask - book.bid
            new_bid = max(1, int(round(book.bid * (1 + pct / 100.0))))
            book.bid, book.ask = new_bid, new_bid + spread
            events.append(book.quote(ts))
            events.append(self._record_print(book, new_bid, 100, "NYSE", "", ts))
        return events

    def inject_print(self, symbol: str, price: float, size: int, venue: str, conditions: str = "") -> PrintEvent:
        if size <= 0:
            raise ValueError("size must be positive")
        return self._record_print(self.books[symbol], to_cents(price), int(size), venue, conditions, self.now_ns())
