"""The pure rules of qe-market-data: print identity across overlapping snapshots,
dedupe memory, feed health, reconnect delays, tick-by-tick slots, getTicks
polling, Hammer message shapes, the bounded backlog."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.market_data.core import (
    NS_PER_S,
    Backlog,
    FeedHealth,
    MalformedMessage,
    OccurrenceCounter,
    RawTick,
    ReconnectBackoff,
    SeenKeys,
    TickPoller,
    keyed_batch,
    parse_hammer_time,
    parse_l1_update,
    parse_ticks,
    plan_tick_by_tick,
)

NY = ZoneInfo("America/New_York")
T0 = 1_790_000_000 * NS_PER_S


def tick(ms: int, price: float = 24.5, size: int = 100, venue: str = "NYSE", symbol: str = "CIM PRB") -> RawTick:
    return RawTick(symbol, T0 + ms * 1_000_000, price, size, venue)


# --- print identity ----------------------------------------------------------------------------


def test_overlapping_snapshots_give_the_same_keys_and_twins_stay_distinct():
    tape = [tick(0), tick(1), tick(1), tick(2, 24.6), tick(3, size=200)]  # tick(1) twice: two real prints
    first = dict((k, t) for t, k in keyed_batch(tape[:3]))
    second = dict((k, t) for t, k in keyed_batch(tape))  # a later poll: overlaps the first
    assert len(first) == 3 and len(second) == 5
    assert set(first) <= set(second)
    twins = [k for k, t in second.items() if t == tick(1)]
    assert len(twins) == 2 and twins[0] != twins[1]


def test_snapshot_order_does_not_matter():
    tape = [tick(0), tick(5), tick(5), tick(9, 24.7)]
    assert sorted(k for _, k in keyed_batch(tape)) == sorted(k for _, k in keyed_batch(list(reversed(tape))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([24.5, 24.51]), st.sampled_from([100, 200])), max_size=30),
       st.integers(0, 30))
def test_a_newer_snapshot_keeps_every_key_of_an_older_one_it_fully_contains(rows, cut):
    """Snapshots are `lastFew` of a growing tape: an older snapshot's keys reappear
    in a newer one that still contains all of its prints."""
    tape = [tick(ms, price, size) for ms, price, size in sorted(rows)]
    older = {k for _, k in keyed_batch(tape[:cut])}
    newer = {k for _, k in keyed_batch(tape)}
    assert older <= newer
    assert len(newer) == len(tape)  # every print of the tape has its own key


def test_occurrence_counter_numbers_identical_ticks_and_survives_reconnects():
    counter = OccurrenceCounter(horizon_ns=60 * NS_PER_S)
    a = counter.key(tick(0))
    b = counter.key(tick(0))  # a genuinely identical second print
    assert a != b and a.endswith(":0") and b.endswith(":1")
    # later (e.g. after a reconnect) the same tuple again: a new key, never a reused one
    assert counter.key(tick(0)).endswith(":2")
    counter.key(tick(120_000))  # two minutes later: the old counts are forgotten
    assert len(counter.counts) == 1


def test_seen_keys_is_bounded_and_forgets_the_oldest():
    seen = SeenKeys(capacity=3)
    assert [seen.add(k) for k in "abca"] == [True, True, True, False]
    seen.add("d")
    assert "a" not in seen and {"b", "c", "d"} <= set(seen.keys) and len(seen) == 3


# --- feed health ---------------------------------------------------------------------------------


def test_silence_in_market_hours_is_stale_but_not_when_closed():
    health = FeedHealth(stale_after_ns=90 * NS_PER_S)
    health.on_connected(T0)
    assert health.evaluate(T0 + 89 * NS_PER_S, market_open=True) is None
    assert health.evaluate(T0 + 91 * NS_PER_S, market_open=False) is None
    reason = health.evaluate(T0 + 91 * NS_PER_S, market_open=True)
    assert health.stale and "no update for 91s" in reason
    assert health.evaluate(T0 + 95 * NS_PER_S, market_open=True) is None  # no repeat while still stale
    health.on_update(T0 + 96 * NS_PER_S)
    assert health.evaluate(T0 + 96 * NS_PER_S, market_open=True) == "feed ok" and not health.stale


@pytest.mark.parametrize("broken, ok, still_stale", [
    ((2103, "Market data farm connection is broken:usfarm"), (2104, "Market data farm connection is OK:usfarm"), False),
    ((2103, "Market data farm connection is broken:usfarm"), (2104, "Market data farm connection is OK:cashfarm"), True),
    ((2105, "HMDS data farm connection is broken:ushmds"), (2106, "HMDS data farm connection is OK:ushmds"), False),
    ((2110, "Connectivity between TWS and server is broken."), (1102, "restored - data maintained"), False),
    ((1100, "Connectivity between IB and Trader Workstation has been lost."), (1101, "restored - data lost"), False),
    ((2103, "Market data farm connection is broken:usfarm"), (2158, "Sec-def data farm connection is OK:secdefnj"), True),
])
def test_ib_farm_codes(broken, ok, still_stale):
    health = FeedHealth(stale_after_ns=90 * NS_PER_S)
    health.on_connected(T0)
    health.on_ib_code(*broken)
    reason = health.evaluate(T0, market_open=False)  # a broken farm is stale at any hour
    assert health.stale and str(broken[0]) in reason
    health.on_ib_code(*ok)
    health.evaluate(T0, market_open=False)
    assert health.stale is still_stale


def test_a_new_connection_clears_old_farm_reports():
    health = FeedHealth(stale_after_ns=90 * NS_PER_S)
    health.on_ib_code(2103, "Market data farm connection is broken:usfarm")
    health.on_connected(T0)
    assert health.evaluate(T0, market_open=True) is None and not health.stale


# --- reconnect delays -------------------------------------------------------------------------------


def test_reconnect_backoff_doubles_with_jitter_up_to_the_cap():
    backoff = ReconnectBackoff(base_s=3, cap_s=60)
    delays = [backoff.next_delay() for _ in range(10)]
    for attempt, delay in enumerate(delays):
        full = min(60, 3 * 2**attempt)
        assert full / 2 <= delay <= full
    assert max(delays) <= 60
    backoff.reset()
    assert backoff.next_delay() <= 3


# --- tick-by-tick slots ---------------------------------------------------------------------------


def test_tick_by_tick_plan_priority_first_then_rotation():
    universe = [f"S{i}" for i in range(10)]
    assert plan_tick_by_tick(universe, set(), 3, 0) == ["S0", "S1", "S2"]
    assert plan_tick_by_tick(universe, set(), 3, 1) == ["S3", "S4", "S5"]
    assert plan_tick_by_tick(universe, {"S7"}, 3, 0) == ["S7", "S0", "S1"]
    assert plan_tick_by_tick(universe, {"S7"}, 3, 1) == ["S7", "S2", "S3"]
    assert plan_tick_by_tick(universe, {"S1", "S2", "S3", "S4"}, 3, 5) == ["S1", "S2", "S3"]
    assert plan_tick_by_tick(universe, set(), 0, 0) == []
    assert plan_tick_by_tick(universe[:2], set(), 5, 3) == ["S0", "S1"]
    # over a full cycle (9 others / 2 free slots = 5 steps) every symbol gets a slot
    seen = set()
    for step in range(5):
        seen |= set(plan_tick_by_tick(universe, {"S9"}, 3, step))
    assert seen == set(universe)


# --- getTicks polling ---------------------------------------------------------------------------------


def test_tick_poller_polls_on_new_volume_sweeps_and_rate_limits():
    poller = TickPoller(["A", "B", "C"], sweep_s=10, rate_per_s=2)
    first = poller.next_requests(T0, timeout_ns=5 * NS_PER_S)
    assert first == ["A", "B"]  # everything is due at start; 2 tokens
    assert poller.next_requests(T0, 5 * NS_PER_S) == []
    assert poller.next_requests(T0 + NS_PER_S // 2, 5 * NS_PER_S) == ["C"]
    for symbol in "ABC":
        poller.on_reply(symbol)
    poller.on_l1("B", volume=100, last=None)
    assert poller.next_requests(T0 + 2 * NS_PER_S, 5 * NS_PER_S) == []  # first volume seen: nothing new yet
    poller.on_l1("B", volume=300, last=None)
    assert poller.next_requests(T0 + 3 * NS_PER_S, 5 * NS_PER_S) == ["B"]
    # an unanswered request is given up after the timeout and asked again
    assert poller.next_requests(T0 + 9 * NS_PER_S, 5 * NS_PER_S) == ["B"]
    poller.on_reply("B")
    assert sorted(poller.next_requests(T0 + 11 * NS_PER_S, 5 * NS_PER_S)) == ["A", "C"]  # the sweep


# --- Hammer shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (1_790_000_000_123, 1_790_000_000_123_000_000),
    ("1790000000123", 1_790_000_000_123_000_000),
    ("2026-09-21T14:15:02.250Z", 1_790_000_102_250_000_000),
    ("2026-09-21T10:15:02.250-04:00", 1_790_000_102_250_000_000),
    ("2026-09-21T10:15:02.250", 1_790_000_102_250_000_000),  # New York time
])
def test_hammer_times(value, expected):
    assert parse_hammer_time(value, NY) == expected


@pytest.mark.parametrize("value", [None, "yesterday", -5, True, float("nan"), {"t": 1}])
def test_bad_hammer_times(value):
    with pytest.raises(MalformedMessage):
        parse_hammer_time(value, NY)


def test_l1_update_shape():
    quote, volume = parse_l1_update(
        {"sym": "CIM-B", "bid": 24.84, "ask": "24.88", "last": 24.86, "size": 100, "venue": "NYSE", "volume": 5400}, T0
    )
    assert (quote.symbol, quote.bid, quote.ask, quote.last, quote.last_size, quote.venue) == (
        "CIM PRB", 24.84, 24.88, 24.86, 100, "NYSE"
    )
    assert volume == 5400 and quote.quote_ts_ns == T0
    assert parse_l1_update({"sym": "AGNCN", "bid": 0, "ask": 25.3}, T0)[0].bid is None  # 0 = no bid
    with pytest.raises(MalformedMessage, match="bad_bid"):
        parse_l1_update({"sym": "AGNCN", "bid": "x"}, T0)
    with pytest.raises(MalformedMessage, match="bad_symbol"):
        parse_l1_update({"bid": 1}, T0)
    with pytest.raises(MalformedMessage, match="bad_l1"):
        parse_l1_update(["not", "an", "object"], T0)


def test_get_ticks_shape_skips_bad_rows():
    result = {"data": [
        {"t": 1_790_000_000_000, "p": 24.5, "s": 100, "e": "nsdq", "b": 24.49, "a": 24.51},
        {"t": 1_790_000_000_500, "p": 24.5, "s": 0, "e": "NYSE"},  # zero size: skipped
        {"t": "garbage", "p": 24.5, "s": 100, "e": "NYSE"},  # bad time: skipped
        {"t": 1_790_000_001_000, "p": 24.52, "s": 50},  # no venue
        "not a row",
    ]}
    ticks, skipped = parse_ticks("CIM PRB", result, NY)
    assert skipped == 3
    assert [(t.price, t.size, t.venue) for t in ticks] == [(24.5, 100, "NSDQ"), (24.52, 50, "UNKNOWN")]
    with pytest.raises(MalformedMessage):
        parse_ticks("CIM PRB", {"data": "nope"}, NY)


# --- backlog ------------------------------------------------------------------------------------------------


def test_backlog_collapses_quotes_and_drops_the_oldest_prints_when_full():
    backlog = Backlog(max_l1=100, max_prints=100)
    for n in range(150):
        backlog.add_l1(f"S{n % 10}", n)
    assert len(backlog.l1) <= 100 and backlog.collapsed_l1 > 0
    assert dict(backlog.l1)["S9"] == 149  # the latest quote per symbol survives
    for n in range(130):
        backlog.add_print(n)
    assert list(backlog.prints)[0] == 30 and backlog.dropped_prints == 30


# --- plausibility: refusals, the quote gate, hostile feed values --------------------------------------

from daemons.market_data.core import QuoteGate, absurd_quote, print_refusal, short_repr  # noqa: E402
from daemons.market_data.ibkr import _price as ib_price, _size as ib_size  # noqa: E402
from qe import config as qe_config  # noqa: E402
from qe.contracts import L1  # noqa: E402
from tests.support.processes import REPO  # noqa: E402

PLAUSIBILITY = qe_config.load_rules(REPO / "etc" / "risk_rules.yaml").plausibility


def l1(bid, ask, symbol="CIM PRB", bid_size=100, ask_size=100, **extra) -> L1:
    return L1(symbol=symbol, bid=bid, ask=ask, bid_size=bid_size, ask_size=ask_size, quote_ts_ns=T0, **extra)


def test_stub_quote_is_flagged_wide_spread_and_one_episode_is_opened_and_closed():
    gate = QuoteGate(PLAUSIBILITY)
    first = gate.on_quote(l1(24.80, 24.90), T0)
    assert first.l1.implausible is None and first.episode is None
    stub = gate.on_quote(l1(0.01, 999_999.0), T0 + 1)
    # The $999,999 ask is above max_price: removed (consumers' contracts refuse it), flagged.
    assert stub.l1.implausible == "absurd_price" and (stub.l1.bid, stub.l1.ask) == (0.01, None)
    assert stub.episode.started and stub.episode.problem == "absurd_price" and stub.episode_since_ns == T0 + 1
    again = gate.on_quote(l1(0.01, 999_999.0), T0 + 2)
    assert again.l1.implausible == "absurd_price" and again.episode is None  # same episode: no second alert
    assert gate.implausible_symbols == 1
    back = gate.on_quote(l1(24.81, 24.90), T0 + 3)
    assert back.l1.implausible is None and back.episode is not None and not back.episode.started
    assert back.episode_since_ns == T0 + 1 and gate.implausible_symbols == 0


def test_crossed_one_sided_and_absurd_size_quotes():
    gate = QuoteGate(PLAUSIBILITY)
    assert gate.on_quote(l1(25.00, 24.90), T0).l1.implausible == "crossed"
    one_sided = gate.on_quote(l1(24.85, None, ask_size=0), T0)
    assert one_sided.l1.implausible is None and one_sided.verdict.mid is None
    assert gate.trust("CIM PRB").trusted_mid is None  # a one-sided quote has no mid
    big = PLAUSIBILITY.quote.max_size + 1
    assert gate.on_quote(l1(24.85, 24.90, bid_size=big), T0).l1.implausible == "absurd_size"


def test_a_jump_is_flagged_until_prints_confirm_the_new_price():
    gate = QuoteGate(PLAUSIBILITY)
    assert gate.on_quote(l1(24.80, 24.90), T0).l1.implausible is None  # trusted mid 24.85
    assert gate.on_quote(l1(29.80, 29.90), T0).l1.implausible == "jump"
    # One print at the new level is far from the reference: not trusted, confirms nothing.
    assert gate.on_print(RawTick("CIM PRB", T0, 29.85, 100, "NYSE"), T0) == "far_from_reference"
    assert gate.on_quote(l1(29.80, 29.90), T0).l1.implausible == "jump"
    # Prints that agree with each other: after confirm_prints of them the market really moved.
    confirm = PLAUSIBILITY.prints.confirm_prints
    verdicts = [gate.on_print(RawTick("CIM PRB", T0 + n, 29.85, 100, "NYSE"), T0) for n in range(1, confirm + 1)]
    assert verdicts[-1] is None and gate.trust("CIM PRB").trusted_print == 29.85
    assert gate.on_quote(l1(29.80, 29.90), T0).l1.implausible is None
    # ... and a quote back at the old level is now the jump.
    assert gate.on_quote(l1(24.80, 24.90), T0).l1.implausible == "jump"


def test_quote_and_print_refusals_are_numbers_no_feed_can_mean():
    sized, problem = absurd_quote(l1(24.8, 24.9, bid_size=PLAUSIBILITY.max_quantity + 1), PLAUSIBILITY)
    assert problem == "absurd_size" and sized.bid_size == 0 and (sized.bid, sized.ask) == (24.8, 24.9)
    priced, problem = absurd_quote(l1(24.8, 24.9, last=PLAUSIBILITY.max_price * 2), PLAUSIBILITY)
    assert problem == "absurd_price" and priced.last is None
    assert absurd_quote(l1(24.8, 24.9, last=24.85), PLAUSIBILITY) == (l1(24.8, 24.9, last=24.85), None)
    # Above max_price and not caught by the gate (no reference yet): published flagged, the
    # absurd sides removed -- never dropped, so the feed's last word is the flagged quote.
    gate = QuoteGate(PLAUSIBILITY)
    high = gate.on_quote(l1(50_000.0, 50_000.5), T0)
    assert high.l1 is not None and high.l1.implausible == "absurd_price" and (high.l1.bid, high.l1.ask) == (None, None)
    stub = gate.on_quote(l1(0.01, 999_999.0), T0)
    assert stub.l1 is not None and stub.l1.implausible == "absurd_price" and (stub.l1.bid, stub.l1.ask) == (0.01, None)
    now = T0
    skew = int(PLAUSIBILITY.max_future_skew_s * NS_PER_S)
    max_age = int(PLAUSIBILITY.prints.max_age_s * NS_PER_S)
    good = RawTick("CIM PRB", now - NS_PER_S, 24.85, 100, "NYSE")
    assert print_refusal(good, now, PLAUSIBILITY) is None
    cases = {
        "print_future_time": RawTick("CIM PRB", now + skew + 1, 24.85, 100, "NYSE"),
        "print_too_old": RawTick("CIM PRB", now - max_age - 1, 24.85, 100, "NYSE"),
        "print_size": RawTick("CIM PRB", now, 24.85, 10**300, "NYSE"),
        "print_price": RawTick("CIM PRB", now, float("nan"), 100, "NYSE"),
    }
    for reason, bad in cases.items():
        assert print_refusal(bad, now, PLAUSIBILITY) == reason
    year_2100 = RawTick("CIM PRB", 4_102_444_800 * NS_PER_S, 24.85, 100, "NYSE")
    year_1970 = RawTick("CIM PRB", 1_000 * NS_PER_S, 24.85, 100, "NYSE")
    assert print_refusal(year_2100, now, PLAUSIBILITY) == "print_future_time"
    assert print_refusal(year_1970, now, PLAUSIBILITY) == "print_too_old"


@pytest.mark.parametrize("row, reason", [
    ({"sym": "AGNCN", "bid": 10**400}, "bad_bid"),  # a JSON integer of 400 digits: float() overflows
    ({"sym": "AGNCN", "bid": float("nan")}, "bad_bid"),
    ({"sym": "AGNCN", "bid": float("inf")}, "bad_bid"),
    ({"sym": "AGNCN", "bid": True}, "bad_bid"),
    ({"sym": "AGNCN", "bid": [[[[1]]]]}, "bad_bid"),
    ({"sym": "AGNCN", "bid": 25.0, "volume": 10**400}, "bad_volume"),
    ({"sym": "A" * 10_000, "bid": 25.0}, "bad_symbol"),
])
def test_hostile_l1_numbers_are_malformed_with_bounded_detail(row, reason):
    with pytest.raises(MalformedMessage) as caught:
        parse_l1_update(row, T0)
    assert caught.value.reason == reason
    assert len(str(caught.value)) < 200


def test_hostile_tick_times_and_sizes():
    for value in (1e303, 10**400, "9" * 5000, "2100-01-01T00:00:00" + "0" * 10_000):
        with pytest.raises(MalformedMessage):
            parse_hammer_time(value, NY)
    ticks, skipped = parse_ticks("CIM PRB", {"data": [{"t": 1_790_000_000_000, "p": 24.5, "s": 1e300, "e": "NYSE"}]}, NY)
    assert skipped == 0 and ticks[0].size > PLAUSIBILITY.max_quantity  # parsed; refused by print_refusal
    assert print_refusal(ticks[0], ticks[0].ts_ns, PLAUSIBILITY) == "print_size"


def test_short_repr_is_bounded_for_any_value():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    for value in ("x" * 10_000_000, nested, {str(i): i for i in range(10_000)}, 10**4000):
        assert len(short_repr(value)) <= 120


def test_ib_absent_values_are_none_and_infinite_sizes_are_refused():
    for absent in (float("nan"), -1, 0, None, True):
        assert ib_price(absent) is None
    assert ib_price(24.85) == 24.85
    assert ib_size(float("nan")) == 0 and ib_size(-1) == 0 and ib_size(300.0) == 300
    with pytest.raises(ValueError):
        ib_size(float("inf"))
