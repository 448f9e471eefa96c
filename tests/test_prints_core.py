"""Truth ticks and GRPAN: the pure rules, table-driven, plus property tests that
GRPAN's price always carries the maximal weight and that the incremental windows
equal the definition over any sequence of prints (out of order, duplicates,
buffer evictions)."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.prints.core import (
    EMPTY,
    PrintRecord,
    Rules,
    SymbolPrints,
    grpan,
    grpan_weight,
    is_truth_tick,
    make_record,
    venue_class,
)
from qe.config import PrintsRules

RULES = Rules.from_config(PrintsRules())
S = 1_000_000_000
MIN = 60 * S
T0 = 1_790_000_000 * S


# --- truth tick ------------------------------------------------------------------------------

TRUTH_TABLE = [
    # size, venue, truth?, why
    (15, "NYSE", True, "lit at the minimum size"),
    (14, "NYSE", False, "lit below 15 shares"),
    (1, "ARCA", False, "lit single share"),
    (50, "NSDQ", True, "lit odd lot of 50 (>= 15)"),
    (99, "NASDAQ", True, "lit odd lot of 99"),
    (2500, "BATS", True, "lit large"),
    (15, "edgx", True, "venue case is normalised"),
    (100, "FNRA", True, "dark exactly 100"),
    (200, "ADFN", True, "dark exactly 200"),
    (100, "FINRA", True, "dark exactly 100 (IB spelling)"),
    (150, "FINRA", False, "dark 150: not 100/200"),
    (300, "TRF", False, "dark round lot 300"),
    (1000, "OTC", False, "dark 1000"),
    (99, "D", False, "dark odd lot"),
    (15, "DARK", False, "dark 15"),
    (100, "DARK", True, "dark 100"),
    (100, "XQZ", True, "unknown venue counts as dark: 100 passes"),
    (50, "XQZ", False, "unknown venue counts as dark: 50 does not"),
]


@pytest.mark.parametrize("size, venue, expected, why", TRUTH_TABLE, ids=[row[3] for row in TRUTH_TABLE])
def test_truth_tick_rules(size, venue, expected, why):
    assert is_truth_tick(size, venue, RULES) is expected, why


def test_unknown_venue_class_is_configurable():
    lit_unknown = Rules.from_config(PrintsRules(unknown_venue_class="lit"))
    assert venue_class("XQZ", RULES) == "dark"
    assert venue_class("XQZ", lit_unknown) == "lit"
    assert is_truth_tick(50, "XQZ", lit_unknown) is True


# --- GRPAN weights ---------------------------------------------------------------------------

WEIGHT_TABLE = [
    (19, "NYSE", 0, "under 20 shares weighs nothing (lit)"),
    (15, "FNRA", 0, "under 20 shares weighs nothing (dark)"),
    (20, "NYSE", 100, "lit 1.0 from 20 shares"),
    (5000, "ARCA", 100, "lit 1.0 whatever the size"),
    (100, "FNRA", 100, "dark 100 -> 1.0"),
    (200, "ADFN", 100, "dark 200 -> 1.0"),
    (300, "FINRA", 40, "dark round lot 300 -> 0.4"),
    (1000, "D", 40, "dark round lot 1000 -> 0.4"),
    (250, "TRF", 20, "dark 250 (not a round lot) -> 0.2"),
    (350, "OTC", 20, "dark 350 -> 0.2"),
    (150, "DARK", 20, "dark 150 -> 0.2"),
    (20, "FNRA", 20, "dark odd lot of 20 -> 0.2"),
    (99, "FNRA", 20, "dark odd lot of 99 -> 0.2"),
]


@pytest.mark.parametrize("size, venue, expected, why", WEIGHT_TABLE, ids=[row[3] for row in WEIGHT_TABLE])
def test_grpan_weights_in_hundredths(size, venue, expected, why):
    assert grpan_weight(size, venue, RULES) == expected, why


# --- GRPAN over one window -------------------------------------------------------------------


def prints(*rows: tuple[float, int, str, int]) -> list[PrintRecord]:
    """rows: (price, size, venue, seconds after T0); seq = row order."""
    return [make_record(f"k{i}", price, size, venue, T0 + seconds * S, i, RULES) for i, (price, size, venue, seconds) in enumerate(rows)]


GRPAN_TABLE = [
    ("one lit print", [(24.50, 100, "NYSE", 0)], 24.50, 100.0, 1),
    (
        "three dark odd lots (0.6) lose to one lit print (1.0)",
        [(24.50, 50, "FNRA", 0), (24.50, 60, "FNRA", 1), (24.50, 70, "FNRA", 2), (24.60, 100, "ARCA", 3)],
        24.60, 25.0, 4,
    ),
    (
        "dark 100 and 200 weigh like lit prints",
        [(24.50, 100, "FNRA", 0), (24.50, 200, "ADFN", 1), (24.70, 100, "NYSE", 2)],
        24.50, 66.6667, 3,
    ),
    (
        "three dark round lots (1.2) beat one lit print (1.0)",
        [(24.40, 300, "FNRA", 0), (24.40, 500, "FNRA", 1), (24.40, 1000, "FNRA", 2), (24.60, 100, "NYSE", 3)],
        24.40, 75.0, 4,
    ),
    (
        "prints under 20 shares are not in the window",
        [(24.10, 19, "NYSE", 0), (24.10, 10, "NYSE", 1), (24.30, 20, "NYSE", 2)],
        24.30, 100.0, 1,
    ),
    (
        "tie: the price whose first print came first",
        [(24.50, 100, "NYSE", 0), (24.60, 100, "NYSE", 1), (24.60, 100, "NYSE", 2), (24.50, 100, "NYSE", 3)],
        24.50, 50.0, 4,
    ),
    (
        "tie decided by trade time, not by list order (late arrival)",
        [(24.60, 100, "NYSE", 5), (24.50, 100, "NYSE", 1)],
        24.50, 50.0, 2,
    ),
    (
        "tie at the same trade time: the earlier arrival",
        [(24.60, 100, "NYSE", 1), (24.50, 100, "NYSE", 1)],
        24.60, 50.0, 2,
    ),
    (
        "tie between weights made of different parts (0.2 * 5 == 1.0)",
        [(24.20, 25, "FNRA", 0), (24.20, 25, "FNRA", 1), (24.20, 25, "FNRA", 2), (24.20, 25, "FNRA", 3),
         (24.20, 25, "FNRA", 4), (24.25, 100, "NYSE", 6)],
        24.20, 83.3333, 6,
    ),
    (
        "exact price grouping: 24.5001 is not 24.50",
        [(24.5001, 100, "NYSE", 0), (24.50, 100, "NYSE", 1), (24.50, 100, "NYSE", 2)],
        24.50, 100.0, 3,
    ),
    (
        "concentration counts prints within +-0.04 inclusive, by count",
        [(24.50, 100, "NYSE", 0), (24.50, 100, "NYSE", 1), (24.46, 50, "FNRA", 2), (24.54, 20, "FNRA", 3),
         (24.55, 100, "NYSE", 4), (24.45, 100, "NYSE", 5)],
        24.50, 66.6667, 6,
    ),
]


@pytest.mark.parametrize("why, rows, price, concentration, count", GRPAN_TABLE, ids=[row[0] for row in GRPAN_TABLE])
def test_grpan_table(why, rows, price, concentration, count):
    window = prints(*rows)
    result = grpan(window, last_price=window[-1].price, rules=RULES)
    assert result.grpan_price == price, why
    assert result.concentration_pct == pytest.approx(concentration, abs=1e-4), why
    assert result.print_count == count, why


def test_grpan_deviation_is_last_minus_grpan():
    window = prints((24.50, 100, "NYSE", 0), (24.50, 100, "NYSE", 1), (24.55, 100, "NYSE", 2))
    assert grpan(window, 24.55, RULES).deviation == pytest.approx(0.05)
    assert grpan(window, 24.41, RULES).deviation == pytest.approx(-0.09)
    assert grpan(window, None, RULES).deviation is None


def test_grpan_of_an_empty_window_or_only_odd_lots():
    assert grpan([], 24.5, RULES) == EMPTY
    assert grpan(prints((24.5, 10, "NYSE", 0), (24.6, 19, "ARCA", 1)), 24.5, RULES) == EMPTY
    assert EMPTY.grpan_price is None and EMPTY.print_count == 0 and EMPTY.concentration_pct == 0.0


# --- one symbol: buffer, windows, staleness, truth tick ------------------------------------------


def feed(symbol: SymbolPrints, rows) -> None:
    for index, (price, size, venue, seconds) in enumerate(rows):
        symbol.add(symbol.record(f"p{index}:{price}:{size}:{venue}:{seconds}", price, size, venue, T0 + int(seconds * S)))


def test_last15_takes_the_last_15_prints_of_at_least_20_shares():
    symbol = SymbolPrints(RULES)
    rows = []
    for n in range(20):
        rows.append((24.00 + n / 100, 100, "NYSE", n))
        rows.append((30.00, 5, "NYSE", n + 0.5))  # odd lots in between never count
    feed(symbol, rows)
    values = symbol.evaluate(T0 + 20 * S)
    last15 = values.windows["last15"]
    assert last15.print_count == 15
    assert values.last_price == 24.19
    # all 15 prices distinct, equal weight: the earliest of the 15 (24.05) wins the tie
    assert last15.grpan_price == 24.05
    assert values.headline == last15


def test_time_windows_end_at_the_newest_print():
    symbol = SymbolPrints(RULES)
    feed(symbol, [
        (24.00, 100, "NYSE", -25 * 3600),  # outside 1d
        (24.10, 100, "NYSE", -5 * 3600),  # in 1d only
        (24.20, 100, "NYSE", -2 * 3600),  # 3h, 1d
        (24.30, 100, "NYSE", -50 * 60),  # 1h+
        (24.30, 100, "NYSE", -25 * 60),  # 30m+
        (24.40, 100, "NYSE", -5 * 60),  # 10m+
        (24.40, 100, "NYSE", 0),
    ])
    values = symbol.evaluate(T0)
    counts = {name: result.print_count for name, result in values.windows.items()}
    assert counts == {"last15": 7, "10m": 2, "30m": 3, "1h": 4, "3h": 5, "1d": 6}
    assert values.windows["10m"].grpan_price == 24.40
    assert values.windows["1h"].grpan_price == 24.30  # tie 2.0 vs 2.0: 24.30 came first
    assert values.windows["1d"].grpan_price == 24.30
    assert values.windows["1d"].deviation == pytest.approx(0.10)
    assert not any(result.stale for result in values.windows.values())


def test_stale_windows_are_judged_against_the_clock():
    symbol = SymbolPrints(RULES)
    feed(symbol, [(24.40, 100, "NYSE", 0), (24.40, 10, "NYSE", 20 * 60)])  # newest print is an odd lot
    values = symbol.evaluate(T0 + 11 * MIN)
    assert values.windows["10m"].stale and values.windows["10m"].grpan_price is None
    assert values.windows["10m"].print_count == 0
    assert not values.windows["30m"].stale and values.windows["30m"].grpan_price == 24.40
    later = symbol.evaluate(T0 + 25 * 3600 * S)
    assert all(later.windows[name].stale for name in ("10m", "30m", "1h", "3h", "1d"))
    # the last-15 window is a count window: it never goes stale by time
    assert later.windows["last15"].grpan_price == 24.40 and not later.windows["last15"].stale


def test_an_empty_symbol_has_empty_windows():
    values = SymbolPrints(RULES).evaluate(T0)
    assert values.last_price is None and values.truth_tick is None
    assert values.windows["last15"] == EMPTY
    assert all(values.windows[name].stale and values.windows[name].print_count == 0 for name in ("10m", "1d"))


def test_duplicate_key_is_ignored():
    symbol = SymbolPrints(RULES)
    record = symbol.record("print:A:1", 24.5, 100, "NYSE", T0)
    assert symbol.add(record) == (True, None)
    again = symbol.record("print:A:1", 24.5, 100, "NYSE", T0)
    assert symbol.add(again) == (False, None)
    assert symbol.evaluate(T0).windows["last15"].print_count == 1


def test_buffer_cap_drops_the_oldest_arrival_and_marks_long_windows_truncated():
    rules = Rules.from_config(PrintsRules(buffer_cap=20))
    symbol = SymbolPrints(rules)
    feed(symbol, [(24.00 + (n % 3) / 100, 100, "NYSE", n * 60) for n in range(30)])  # 30 prints, 1 a minute
    assert len(symbol) == 20
    values = symbol.evaluate(T0 + 29 * MIN)
    assert values.windows["1d"].print_count == 20 and values.windows["1d"].truncated
    assert values.windows["10m"].print_count == 10 and not values.windows["10m"].truncated
    # a print older than everything the full buffer holds cannot change any window
    old = symbol.record("old", 30.0, 100, "NYSE", T0)
    assert symbol.add(old) == (False, None)


def test_truth_tick_is_the_newest_truth_print():
    symbol = SymbolPrints(RULES)
    feed(symbol, [
        (24.50, 100, "NYSE", 0),
        (24.55, 150, "FNRA", 1),  # dark 150: not a truth tick
        (24.45, 14, "NYSE", 2),  # too small
    ])
    assert symbol.truth_tick.price == 24.50
    feed(symbol, [(24.60, 200, "ADFN", 3)])
    assert symbol.truth_tick.price == 24.60 and symbol.truth_tick.venue == "ADFN"
    symbol.add(symbol.record("late", 24.70, 100, "NYSE", T0 + 2 * S))  # arrives late, older trade time
    assert symbol.truth_tick.price == 24.60


# --- properties ---------------------------------------------------------------------------------

VENUES = ["NYSE", "ARCA", "FNRA", "ADFN", "FINRA", "D", "XQZ"]
SIZES = [5, 15, 19, 20, 50, 99, 100, 150, 200, 250, 300, 400, 1000]
print_rows = st.lists(
    st.tuples(
        st.integers(2400, 2412).map(lambda cents: cents / 100),
        st.sampled_from(SIZES),
        st.sampled_from(VENUES),
        st.integers(0, 600),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(print_rows)
def test_grpan_price_is_a_window_price_with_maximal_weight(rows):
    window = prints(*rows)
    result = grpan(window, None, RULES)
    totals: dict[float, int] = {}
    for record in window:
        if record.size >= 20:
            totals[record.price] = totals.get(record.price, 0) + grpan_weight(record.size, record.venue, RULES)
    if not totals:
        assert result.grpan_price is None
        return
    assert result.grpan_price in totals
    assert totals[result.grpan_price] == max(totals.values())
    assert 0 < result.concentration_pct <= 100
    assert result.print_count == sum(1 for record in window if record.size >= 20)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(2400, 2410).map(lambda cents: cents / 100),
            st.sampled_from(SIZES),
            st.sampled_from(VENUES),
            st.integers(0, 4 * 3600),  # seconds: spans every window but 1d
            st.integers(0, 30),  # key id: repeats are duplicates
        ),
        max_size=80,
    ),
    st.sampled_from([20, 25, 5000]),
)
def test_incremental_windows_equal_the_definition(rows, cap):
    """SymbolPrints (incremental, capped, out-of-order input) == grpan over the
    prints a straightforward model says are in each window."""
    rules = Rules.from_config(PrintsRules(buffer_cap=cap, windows_s={"10m": 600, "30m": 1800, "1h": 3600, "3h": 10800}))
    symbol = SymbolPrints(rules)
    model: deque[PrintRecord] = deque()  # arrival order, capped like the Redis list
    for price, size, venue, seconds, key_id in rows:
        key = f"k{key_id}:{price}:{size}:{venue}:{seconds}"
        record = symbol.record(key, price, size, venue, T0 + seconds * S)
        added, _evicted = symbol.add(record)
        expected_added = all(r.key != key for r in model) and not (
            len(model) >= cap and record.order < min(r.order for r in model)
        )
        assert added == expected_added
        if added:
            model.append(record)
            if len(model) > cap:
                model.popleft()
        check_against_model(symbol, list(model), rules)


def check_against_model(symbol: SymbolPrints, model: list[PrintRecord], rules: Rules) -> None:
    if not model:
        return
    as_of = max(r.ts_ns for r in model)
    by_time = sorted(model, key=lambda r: r.order)
    eligible = [r for r in by_time if r.weight > 0]
    last_price = eligible[-1].price if eligible else None
    values = symbol.evaluate(as_of)
    assert values.windows["last15"] == grpan(eligible[-15:], last_price, rules)
    for name, length in rules.windows_ns:
        in_window = [r for r in eligible if r.ts_ns > as_of - length]
        expected = grpan(in_window, last_price, rules)
        got = values.windows[name]
        assert got.stale == (not in_window)
        assert (got.grpan_price, got.concentration_pct, got.print_count, got.deviation) == (
            expected.grpan_price, expected.concentration_pct, expected.print_count, expected.deviation
        ), name


def test_incremental_windows_on_a_long_random_day():
    """A larger deterministic run than hypothesis explores: 3,000 prints over a day,
    10 % arriving out of order, 5 % re-sent, cap 1,000."""
    rng = random.Random(11)
    rules = Rules.from_config(PrintsRules(buffer_cap=1000))
    symbol = SymbolPrints(rules)
    model: deque[PrintRecord] = deque()
    seen: list[tuple] = []
    for n in range(3000):
        if seen and rng.random() < 0.05:
            row = rng.choice(seen)
        else:
            seconds = n * 25 - (rng.randint(0, 900) if rng.random() < 0.1 else 0)
            row = (rng.randint(2400, 2420) / 100, rng.choice(SIZES), rng.choice(VENUES), seconds, n)
            seen.append(row)
        price, size, venue, seconds, key_id = row
        record = symbol.record(f"k{key_id}", price, size, venue, T0 + seconds * S)
        added, _ = symbol.add(record)
        if added:
            model.append(record)
            if len(model) > 1000:
                model.popleft()
        if n % 97 == 0:
            check_against_model(symbol, list(model), rules)
    check_against_model(symbol, list(model), rules)


# --- the print gate: implausible prints never reach truth ticks or GRPAN ----------------------------

from daemons.prints.core import PrintScreen, gate_reference, plausible_stored, screen_print  # noqa: E402
from qe import config as qe_config  # noqa: E402
from tests.support.processes import REPO  # noqa: E402

PLAUSIBILITY = qe_config.load_rules(REPO / "etc" / "risk_rules.yaml").plausibility
NOW = T0 + 10 * MIN


class Feed:
    """One symbol's prints through the gate, as the worker does it."""

    def __init__(self) -> None:
        self.prints = SymbolPrints(RULES)
        self.screen = PrintScreen()
        self.n = 0

    def send(self, price: float, size: int = 100, venue: str = "NYSE", ts_ns: int | None = None):
        self.n += 1
        record = self.prints.record(f"k{self.n}", price, size, venue, T0 + self.n * S if ts_ns is None else ts_ns)
        screening = screen_print("CIM PRB", self.prints, self.screen, record, T0 + self.n, NOW, PLAUSIBILITY)
        if screening.problem is None:
            self.prints.add(record)
        return screening

    def headline(self):
        return self.prints.evaluate(NOW).headline


def test_one_implausible_print_never_moves_the_truth_tick_or_grpan():
    feed = Feed()
    for _ in range(5):
        assert feed.send(25.00).problem is None
    truth, grpan_before = feed.prints.truth_tick.price, feed.headline().grpan_price
    assert (truth, grpan_before) == (25.00, 25.00)
    big = PLAUSIBILITY.prints.max_size + 1
    assert feed.send(0.01).problem == "far_from_reference"
    assert feed.send(250.0).problem == "far_from_reference"
    assert feed.send(25.00, size=big).problem == "absurd_size"
    assert feed.send(25.00, ts_ns=NOW + 3600 * S).problem == "future_time"
    assert feed.send(25.00, ts_ns=NOW - int(PLAUSIBILITY.prints.max_age_s * S) - S).problem == "too_old"
    assert feed.prints.truth_tick.price == 25.00 and feed.headline().grpan_price == 25.00
    assert feed.headline().print_count == 5 and len(feed.prints) == 5  # none of them is in any window


def test_one_alert_per_episode_and_a_resolution_when_a_print_counts_again():
    feed = Feed()
    feed.send(25.00)
    first = feed.send(0.01)
    assert first.episode.started and first.since_ns == T0 + 2
    second = feed.send(999.0)
    assert second.episode is None and second.since_ns == T0 + 2  # same episode
    back = feed.send(25.01)
    assert back.problem is None and not back.episode.started and back.since_ns == T0 + 2
    assert back.excluded_in_episode == 2
    assert feed.screen.excluded == [] and feed.screen.since_ns is None
    assert feed.send(25.02).episode is None  # no episode: nothing to announce


def test_a_real_move_is_accepted_once_enough_excluded_prints_agree():
    feed = Feed()
    for _ in range(5):
        feed.send(25.00)
    confirm = PLAUSIBILITY.prints.confirm_prints
    verdicts = [feed.send(27.80).problem for _ in range(confirm + 1)]
    assert verdicts == ["far_from_reference"] * confirm + [None]
    assert feed.prints.truth_tick.price == 27.80
    assert feed.send(27.81).problem is None  # the reference moved with the market
    # Disagreeing far prints do not confirm each other.
    other = Feed()
    other.send(25.00)
    assert [other.send(price).problem for price in (40.0, 10.0, 40.0, 10.0)] == ["far_from_reference"] * 4


def test_the_reference_is_the_truth_tick_else_grpan():
    feed = Feed()
    assert gate_reference(feed.prints) is None  # a new symbol: nothing known, the first print counts
    feed.send(24.90, size=150, venue="FINRA")  # dark 150: not a truth tick, but GRPAN weight
    assert feed.prints.truth_tick is None and gate_reference(feed.prints) == 24.90
    feed.send(25.00, size=100, venue="NYSE")
    assert gate_reference(feed.prints) == 25.00


def test_screen_memory_round_trips_and_saved_state_is_checked():
    screen = PrintScreen(excluded=[("k1", 0.01), ("k2", 0.02)], since_ns=5, problem="far_from_reference", excluded_in_episode=2)
    assert PrintScreen.from_json(screen.to_json(), keep=3) == screen
    with pytest.raises(ValueError):
        PrintScreen.from_json('{"excluded": [["k", NaN]]}', keep=3)
    assert plausible_stored(25.0, 100, NOW, NOW, PLAUSIBILITY)
    for price, size, ts in [(float("nan"), 100, NOW), (1e9, 100, NOW), (25.0, 10**400, NOW), (25.0, True, NOW),
                            (25.0, 100, NOW + 3600 * S), (0.0, 100, NOW), (25.0, 100.5, NOW)]:
        assert not plausible_stored(price, size, ts, NOW, PLAUSIBILITY)
