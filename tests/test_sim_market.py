"""The simulated market model: seeded, on $0.01 ticks, realistic venues and sizes."""

from __future__ import annotations

from collections import Counter

import pytest

from sim.market import DARK_VENUE, LIT_VENUES, ODD_LOT, Market, MarketConfig, PrintEvent, QuoteEvent

REFS = {"CIM PRB": 24.85, "AGNCN": 25.30, "PFF": 31.45}


def make(seed=7, **config) -> Market:
    clock = iter(range(10**9, 10**12, 1000))
    return Market(REFS, seed=seed, config=MarketConfig(**config), now_ns=lambda: next(clock))


def run(market: Market, steps=400, dt=0.1) -> list:
    events = []
    for _ in range(steps):
        events += market.advance(dt)
    return events


def strip_ts(events):
    return [(type(e).__name__, *[v for k, v in vars(e).items() if k != "ts_ns"]) for e in events]


def test_same_seed_same_market_other_seed_differs():
    a = strip_ts(run(make(seed=7, quote_rate=5, print_rate=3)))
    b = strip_ts(run(make(seed=7, quote_rate=5, print_rate=3)))
    c = strip_ts(run(make(seed=8, quote_rate=5, print_rate=3)))
    assert a == b
    assert a != c


def test_symbol_sequence_does_not_depend_on_other_symbols():
    alone = Market({"CIM PRB": 24.85}, seed=7, config=MarketConfig(quote_rate=5, print_rate=3), now_ns=lambda: 0)
    together = make(seed=7, quote_rate=5, print_rate=3)
    only = lambda events: [e for e in strip_ts(events) if e[1] == "CIM PRB"]  # noqa: E731
    assert only(run(alone)) == only(run(together))


def test_rates_are_per_symbol_per_second():
    events = run(make(quote_rate=10, print_rate=4), steps=100, dt=0.1)  # 10 s
    counts = Counter(type(e).__name__ for e in events)
    assert counts["QuoteEvent"] == pytest.approx(3 * 10 * 10, abs=3)
    assert counts["PrintEvent"] == pytest.approx(3 * 4 * 10, abs=3)


def test_quotes_stay_on_ticks_with_sane_spreads_and_round_lot_sizes():
    market = make(quote_rate=20, print_rate=0)
    for event in run(market, steps=500):
        assert isinstance(event, QuoteEvent)
        assert isinstance(event.bid, int) and isinstance(event.ask, int)  # cents
        assert 1 <= event.ask - event.bid <= 5
        assert event.bid_size % 100 == 0 and event.ask_size % 100 == 0 and event.bid_size > 0
    for book in market.books.values():  # slow, mean-reverting walk stays near the reference
        assert abs(book.mid - book.ref) / book.ref < 0.05


def test_prints_have_venues_conditions_and_truth_tick_sizes():
    prints = [e for e in run(make(quote_rate=1, print_rate=20), steps=500) if isinstance(e, PrintEvent)]
    lit = {v for v, _ in LIT_VENUES}
    dark = [p for p in prints if p.venue == DARK_VENUE]
    on_lit = [p for p in prints if p.venue in lit]
    assert len(dark) + len(on_lit) == len(prints)
    assert 0.25 < len(dark) / len(prints) < 0.55
    dark_sizes = Counter(p.size for p in dark)
    assert dark_sizes[100] > 0 and dark_sizes[200] > 0
    assert any(p.size < 15 for p in dark) and any(15 <= p.size < 100 for p in dark)
    assert any(p.size >= 300 and p.size % 100 == 0 for p in dark)
    assert any(p.size < 100 for p in on_lit) and any(p.size >= 100 for p in on_lit)
    assert all((p.conditions == ODD_LOT) == (p.size < 100) for p in dark)
    assert {p.venue for p in on_lit} == lit


def test_consume_walks_the_book_by_displayed_size():
    market = make()
    market.set_quote("CIM PRB", 24.80, 24.82, bid_size=300, ask_size=200)
    slices, quote = market.consume("CIM PRB", buy=True, qty=500, limit=2482)
    assert slices == [(2482, 200)]  # only the displayed 200 at the limit
    assert quote.ask == 2483 and quote.bid == 2480
    slices, _ = market.consume("CIM PRB", buy=False, qty=100, limit=None)
    assert slices == [(2480, 100)]
    assert market.book("CIM PRB").bid_size == 200
    slices, _ = market.consume("CIM PRB", buy=False, qty=1000, limit=None)
    assert sum(q for _, q in slices) == 1000 and slices[0] == (2480, 200) and slices[1][0] == 2479


def test_frozen_symbol_is_quiet_and_shock_moves_quotes():
    market = make(quote_rate=20, print_rate=20)
    market.set_quote("CIM PRB", 24.80, 24.82, 300, 200, freeze=True)
    assert all(e.symbol != "CIM PRB" for e in run(market, steps=50))
    events = market.shock(["CIM PRB"], -10)
    quote = events[0]
    assert (quote.bid, quote.ask) == (2232, 2234)
    assert isinstance(events[1], PrintEvent) and events[1].price == 2232
    with pytest.raises(ValueError):
        market.set_quote("CIM PRB", 25.0, 24.0)
