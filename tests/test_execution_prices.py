"""Execution's own prices: the shared quote gate decides which quotes become marks and
collar references; market data's `implausible` flag is honoured; nothing hostile sticks."""

from __future__ import annotations

import json

import pytest

from daemons.execution.prices import PriceBook, SymbolPrices
from qe import config
from qe.marks import MarkRules, MarkSource
from tests.support.processes import REPO

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
GATE = RULES.plausibility.quote
SYMBOL = "CIM PRB"


MARK_RULES = MarkRules.from_rules(RULES)
NOW = 1_795_000_000 * 10**9


def mark_of(book: PriceBook) -> float | None:
    """The price the hard-cap check would use (no quote here is current: the last known)."""
    return book.mark(SYMBOL, NOW, MARK_RULES).price


def book_with_truth_tick(price: float = 24.85) -> PriceBook:
    book = PriceBook(GATE)
    book.on_feature(SYMBOL, truth_tick=price, grpan=price, last_print=price)
    return book


def test_nothing_known_means_no_reference_and_no_mark():
    book = PriceBook(GATE)
    assert book.reference(SYMBOL) is None and mark_of(book) is None


def test_reference_is_truth_tick_then_grpan_then_trusted_mid():
    book = PriceBook(GATE)
    assert book.on_quote(SYMBOL, 24.80, 24.82).problem is None
    assert book.reference(SYMBOL) == pytest.approx(24.81)  # only a trusted mid so far
    book.on_feature(SYMBOL, truth_tick=None, grpan=24.90, last_print=None)
    assert book.reference(SYMBOL) == 24.90
    book.on_feature(SYMBOL, truth_tick=24.95, grpan=None, last_print=None)
    assert book.reference(SYMBOL) == 24.95
    assert mark_of(book) == pytest.approx(24.81)  # the mark prefers the trusted mid


@pytest.mark.parametrize(
    "bid, ask, problem",
    [
        (0.01, 999_999.0, "wide_spread"),  # the stub quote
        (0.01, 0.02, "jump"),  # narrow, but 99.9 % from the truth tick
        (2400.0, 2400.02, "jump"),
        (24.90, 24.80, "crossed"),
        (1.00, None, "jump"),  # one-sided: the present side is still checked
    ],
)
def test_an_implausible_quote_never_becomes_a_mark_or_a_reference(bid, ask, problem):
    book = book_with_truth_tick()
    assert book.on_quote(SYMBOL, 24.84, 24.86).problem is None
    outcome = book.on_quote(SYMBOL, bid, ask)
    assert outcome.problem is not None and outcome.problem.startswith(problem)
    assert outcome.episode_started
    assert mark_of(book) == pytest.approx(24.85)  # the previous trusted mid stands
    assert book.reference(SYMBOL) == 24.85


def test_the_stub_quote_is_caught_even_without_any_reference():
    book = PriceBook(GATE)
    assert book.on_quote(SYMBOL, 0.01, 999_999.0).problem.startswith("wide_spread")
    assert mark_of(book) is None and book.reference(SYMBOL) is None


def test_market_datas_flag_is_honoured_even_when_the_quote_looks_fine_here():
    book = book_with_truth_tick()
    outcome = book.on_quote(SYMBOL, 24.84, 24.86, flagged="jump")
    assert outcome.problem == "flagged by market data: jump"
    assert mark_of(book) == 24.85  # the truth tick: no mid was trusted


def test_absurd_sizes_are_implausible():
    book = book_with_truth_tick()
    assert book.on_quote(SYMBOL, 24.84, 24.86, bid_size=10**15).problem.startswith("absurd_size")


def test_one_episode_per_run_of_implausible_quotes():
    book = book_with_truth_tick()
    first = book.on_quote(SYMBOL, 0.01, 999_999.0)
    second = book.on_quote(SYMBOL, 0.01, 999_999.0)
    back = book.on_quote(SYMBOL, 24.84, 24.86)
    assert (first.episode_started, second.episode_started, second.episode_ended) == (True, False, False)
    assert back.episode_ended and back.problem is None


def test_a_move_confirmed_by_prints_is_trusted():
    book = book_with_truth_tick(24.85)
    book.on_feature(SYMBOL, truth_tick=None, grpan=None, last_print=27.90)  # the market really moved
    assert book.on_quote(SYMBOL, 27.88, 27.92).problem is None
    assert mark_of(book) == pytest.approx(27.90)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -24.85, 0.0, True])
def test_hostile_feature_values_are_ignored(bad):
    book = book_with_truth_tick()
    assert book.on_feature(SYMBOL, truth_tick=bad, grpan=bad, last_print=bad) is False
    assert book.reference(SYMBOL) == 24.85


def test_saved_prices_round_trip_and_hostile_saved_values_read_as_unknown():
    book = book_with_truth_tick()
    book.on_quote(SYMBOL, 24.84, 24.86)
    saved = json.loads(json.dumps(book.symbols[SYMBOL].to_json()))
    restored = PriceBook(GATE)
    restored.restore(SYMBOL, saved)
    assert restored.symbols[SYMBOL] == book.symbols[SYMBOL]
    assert SymbolPrices.from_json({"truth_tick": "NaN", "grpan": -1, "trusted_mid": True}) == SymbolPrices()


def test_marks_by_the_shared_rule_a_confirmed_quote_is_current_and_ages_out():
    book = book_with_truth_tick(24.85)
    assert book.on_quote(SYMBOL, 24.84, 24.88, vouched_ns=NOW - 30 * 10**9).changed
    assert book.mark(SYMBOL, NOW, MARK_RULES).source == MarkSource.L1_MID
    # A confirmation (same quote, later envelope time) keeps it current; silence does not.
    assert book.on_quote(SYMBOL, 24.84, 24.88, vouched_ns=NOW).changed
    assert book.mark(SYMBOL, NOW + 60 * 10**9, MARK_RULES).price == pytest.approx(24.86)
    late = book.mark(SYMBOL, NOW + 61 * 10**9, MARK_RULES)
    assert (late.price, late.source) == (pytest.approx(24.86), MarkSource.LAST_KNOWN)
    assert book.mark(SYMBOL, NOW, MARK_RULES, feed_problem="farm broken").source == MarkSource.LAST_KNOWN


def test_a_symbol_without_market_prices_gets_its_fallback_mark():
    book = PriceBook(GATE)
    by_cost = book.mark("ZZZ PRA", NOW, MARK_RULES, avg_cost=24.5, reference=23.0)
    assert (by_cost.price, by_cost.source, by_cost.market_priced) == (24.5, MarkSource.FALLBACK, False)
    assert book.mark("ZZZ PRA", NOW, MARK_RULES, reference=23.0).price == 23.0
    assert book.mark("ZZZ PRA", NOW, MARK_RULES).source == MarkSource.NONE
