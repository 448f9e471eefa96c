"""Arbitration (SPEC 6): priorities, suppression, merging, conflicts; the hard-cap filter."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.decision.arbitration import (
    ArbitrationContext,
    PotentialBook,
    SymbolBook,
    arbitrate,
    cap_filter,
    increase_ceiling_pct,
)
from daemons.decision.model import Candidate
from qe.exposure_math import potential_notional

PRIORITY = {"CAP_RECOVERY": 100, "HARD_DERISK": 80, "SOFT_DERISK": 60, "MM_OVERNIGHT": 40, "LT_BAND": 20, "MM_QUOTE": 10}
SLOT = {"MM_QUOTE": "MM_BID"}


def c(purpose, symbol, side, classification, qty=100, price=25.0, slot=None):
    bucket = "LT" if classification.startswith("LT_") else "MM_PURE"
    return Candidate(
        slot=slot or SLOT.get(purpose, purpose), purpose=purpose, symbol=symbol, side=side, qty=qty, order_type="LMT",
        limit_price=price, bucket=bucket, classification=classification, priority=PRIORITY[purpose], reason=purpose,
    )


MM_BUY_INC = c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC")
MM_SELL_INC = c("MM_QUOTE", "CIM PRC", "SELL", "MM_SHORT_INC", slot="MM_ASK")
MM_SELL_DEC = c("MM_QUOTE", "CIM PRC", "SELL", "MM_LONG_DEC", slot="MM_ASK")
BAND_BUY_INC = c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC")
BAND_SELL_DEC = c("LT_BAND", "AGNCN", "SELL", "LT_LONG_DEC")
SOFT_SELL = c("SOFT_DERISK", "AGNCN", "SELL", "LT_LONG_DEC", qty=300, price=24.99)
HARD_SELL = c("HARD_DERISK", "AGNCN", "SELL", "LT_LONG_DEC", qty=200, price=24.95)
CAP_SELL = c("CAP_RECOVERY", "AGNCN", "SELL", "LT_LONG_DEC", qty=500, price=24.95)
OVERNIGHT_SELL = c("MM_OVERNIGHT", "CIM PRC", "SELL", "MM_LONG_DEC", qty=300, price=25.01)


def ctx(mode="NORMAL", gross=100.0, **kw):
    return ArbitrationContext(mode=mode, gross_pct=gross, **kw)


def names(result):
    return sorted((k.purpose, k.symbol, k.side, k.qty) for k in result.kept)


def reasons(result):
    return sorted((s.candidate.purpose, s.reason) for s in result.suppressed)


# (scenario, candidates, context, kept [(purpose, symbol, side, qty)], suppressed [(purpose, reason)])
SCENARIOS = [
    ("NORMAL keeps increases and decreases", [MM_BUY_INC, BAND_BUY_INC], ctx(), [("LT_BAND", "AGNCN", "BUY", 100), ("MM_QUOTE", "CIM PRC", "BUY", 100)], []),
    ("CAP_RECOVERY drops every increase", [CAP_SELL, MM_BUY_INC, BAND_BUY_INC], ctx("CAP_RECOVERY", 131),
     [("CAP_RECOVERY", "AGNCN", "SELL", 500)], [("LT_BAND", "cap_recovery_no_increases"), ("MM_QUOTE", "cap_recovery_no_increases")]),
    ("gross >= 130 drops every increase even before the mode says so", [MM_BUY_INC, BAND_SELL_DEC], ctx("NORMAL", 130.0),
     [("LT_BAND", "AGNCN", "SELL", 100)], [("MM_QUOTE", "cap_recovery_no_increases")]),
    ("HARD_DERISK drops MM increases, keeps MM decreases", [MM_BUY_INC, MM_SELL_DEC, HARD_SELL], ctx("HARD_DERISK", 105),
     [("HARD_DERISK", "AGNCN", "SELL", 200), ("MM_QUOTE", "CIM PRC", "SELL", 100)], [("MM_QUOTE", "mm_increases_dropped")]),
    ("gross > 120 drops MM increases in NORMAL", [MM_BUY_INC, BAND_BUY_INC], ctx("NORMAL", 120.5),
     [("LT_BAND", "AGNCN", "BUY", 100)], [("MM_QUOTE", "mm_increases_dropped")]),
    ("gross exactly 120 keeps MM increases", [MM_BUY_INC], ctx("NORMAL", 120.0), [("MM_QUOTE", "CIM PRC", "BUY", 100)], []),
    ("HARD_DERISK drops LT band correctives, even decreases", [BAND_SELL_DEC, c("HARD_DERISK", "NLY PRF", "SELL", "LT_LONG_DEC")],
     ctx("HARD_DERISK", 104), [("HARD_DERISK", "NLY PRF", "SELL", 100)], [("LT_BAND", "lt_band_dropped_in_hard_derisk")]),
    ("SOFT_DERISK keeps LT band decreases but no increases", [BAND_BUY_INC, c("LT_BAND", "NLY PRF", "SELL", "LT_LONG_DEC")],
     ctx("SOFT_DERISK", 104), [("LT_BAND", "NLY PRF", "SELL", 100)], [("LT_BAND", "no_increases_in_soft_derisk")]),
    ("THROTTLE: no increases, decreases fine", [MM_BUY_INC, MM_SELL_DEC], ctx("THROTTLE", 110),
     [("MM_QUOTE", "CIM PRC", "SELL", 100)], [("MM_QUOTE", "no_increases_in_throttle")]),
    ("HALTED: nothing at all", [CAP_SELL, MM_SELL_DEC], ctx("HALTED", 131), [], [("CAP_RECOVERY", "halted"), ("MM_QUOTE", "halted")]),
    ("stale data blocks increases only", [MM_BUY_INC, MM_SELL_DEC], ctx(increases_allowed=False, increases_blocked_reason="broker_down"),
     [("MM_QUOTE", "CIM PRC", "SELL", 100)], [("MM_QUOTE", "broker_down")]),
    ("bucket over max blocks increases in that bucket only", [MM_BUY_INC, BAND_BUY_INC], ctx(blocked_buckets=frozenset({"LT"})),
     [("MM_QUOTE", "CIM PRC", "BUY", 100)], [("LT_BAND", "bucket_over_max")]),
    ("merge same symbol/direction/effect: qty summed, top priority's type", [SOFT_SELL, BAND_SELL_DEC], ctx("SOFT_DERISK", 104),
     [("SOFT_DERISK", "AGNCN", "SELL", 400)], [("LT_BAND", "merged_into_SOFT_DERISK")]),
    ("merge three: HARD + band is not possible (band dropped), overnight + MM dec merge", [OVERNIGHT_SELL, MM_SELL_DEC], ctx("NORMAL", 101),
     [("MM_OVERNIGHT", "CIM PRC", "SELL", 400)], [("MM_QUOTE", "merged_into_MM_OVERNIGHT")]),
    ("conflict on one symbol: higher priority wins", [c("SOFT_DERISK", "CIM PRC", "SELL", "MM_LONG_DEC"), MM_BUY_INC],
     ctx("NORMAL", 100), [("SOFT_DERISK", "CIM PRC", "SELL", 100)], [("MM_QUOTE", "conflict_lost_to_SOFT_DERISK")]),
    ("conflict: LT band buy vs overnight... different symbols do not conflict", [BAND_BUY_INC, OVERNIGHT_SELL], ctx(),
     [("LT_BAND", "AGNCN", "BUY", 100), ("MM_OVERNIGHT", "CIM PRC", "SELL", 300)], []),
    ("two-sided MM quote is not a conflict", [MM_BUY_INC, MM_SELL_INC], ctx(), [("MM_QUOTE", "CIM PRC", "BUY", 100), ("MM_QUOTE", "CIM PRC", "SELL", 100)], []),
    ("conflict: band increase vs band-less decrease of higher priority",
     [c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC"), c("MM_OVERNIGHT", "AGNCN", "SELL", "MM_LONG_DEC")],
     ctx(), [("MM_OVERNIGHT", "AGNCN", "SELL", 100)], [("LT_BAND", "conflict_lost_to_MM_OVERNIGHT")]),
]


@pytest.mark.parametrize("name, candidates, context, kept, suppressed", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_arbitration_scenarios(name, candidates, context, kept, suppressed):
    result = arbitrate(list(candidates), context)
    assert names(result) == sorted(kept)
    assert reasons(result) == sorted(suppressed)


def test_merge_keeps_the_top_priority_price_and_records_members():
    result = arbitrate([BAND_SELL_DEC, SOFT_SELL], ctx("SOFT_DERISK", 104))
    (merged,) = result.kept
    assert merged.limit_price == 24.99 and merged.slot == "SOFT_DERISK" and merged.priority == 60
    assert merged.numbers["merged_from"] == ["SOFT_DERISK:300", "LT_BAND:100"]


def test_kept_are_ordered_by_priority():
    result = arbitrate([MM_SELL_DEC, c("SOFT_DERISK", "NLY PRF", "SELL", "LT_LONG_DEC")], ctx("SOFT_DERISK", 104))
    assert [k.priority for k in result.kept] == [60, 10]


# --- the hard cap -------------------------------------------------------------------------


def book(potential_pct=125.0, equity=100_000.0, symbols=None):
    return PotentialBook(equity=equity, potential_pct=potential_pct, bucket_potential_pct={"LT": 100.0, "MM_PURE": 20.0},
                         base=symbols or {})


def test_cap_filter_admits_within_the_cap_and_shrinks_the_rest():
    # 125 % + 200 * 25 / 100k = +5 % -> exactly 130: fits; the next one does not.
    first = c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=200)
    second = c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC", qty=200)
    result = cap_filter([first, second], book(), hard_cap_pct=130, increase_ceiling_pct=130, bucket_max_pct={"LT": 200, "MM_PURE": 200},
                        min_qty=100, mark_of={"CIM PRC": 25.0, "AGNCN": 25.0})
    assert [k.symbol for k in result.kept] == ["AGNCN"]  # LT band (priority 20) is judged first and takes the room
    assert result.kept[0].qty == 200
    assert [(s.candidate.symbol, s.reason) for s in result.suppressed] == [("CIM PRC", "hard_cap")]


def test_cap_filter_shrinks_to_whole_shares_above_min():
    big = c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC", qty=1000)
    result = cap_filter([big], book(124.0), hard_cap_pct=130, increase_ceiling_pct=130, bucket_max_pct={"LT": 500}, min_qty=100, mark_of={"AGNCN": 25.0})
    assert result.kept[0].qty == 240  # 6 % of 100k / $25
    assert result.kept[0].numbers["shrunk_from_qty"] == 1000


def test_cap_filter_bucket_max():
    inc = c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=1000)
    result = cap_filter([inc], book(100.0), hard_cap_pct=130, increase_ceiling_pct=130, bucket_max_pct={"MM_PURE": 30.0}, min_qty=100,
                        mark_of={"CIM PRC": 25.0})
    assert result.kept[0].qty == 400  # MM potential 20 % -> 30 %: 10 % of 100k / $25


def test_cap_filter_counts_offsetting_positions():
    # Short 1000: a BUY of 800 reduces |pos| and adds no potential at all.
    snap = {"CIM PRC": SymbolBook(-1000, 0, 0, 25.0, "MM_PURE")}
    inc = c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=800)
    result = cap_filter([inc], book(129.9, symbols=snap), hard_cap_pct=130, increase_ceiling_pct=130, bucket_max_pct={}, min_qty=100,
                        mark_of={"CIM PRC": 25.0})
    assert result.kept[0].qty == 800


# --- the regime tolerance less the margin (issue 13: no flapping) --------------------------


def test_increase_ceiling_is_the_tolerance_less_the_margin_never_above_the_cap():
    assert increase_ceiling_pct(115.0, 3.0, 130.0) == 112.0  # LATE
    assert increase_ceiling_pct(100.0, 3.0, 130.0) == 97.0  # CLOSE
    assert increase_ceiling_pct(135.0, 3.0, 130.0) == 130.0  # a tolerance above the cap: the cap
    assert increase_ceiling_pct(None, 3.0, 130.0) is None  # no regime: no tolerance known


def ceiling_filter(candidates, potential_pct, ceiling=112.0, symbols=None):
    """Equity $100k, marks $25: 100 shares = 2.5 % of potential."""
    return cap_filter(candidates, book(potential_pct, symbols=symbols), hard_cap_pct=130, increase_ceiling_pct=ceiling,
                      bucket_max_pct={"LT": 200, "MM_PURE": 200}, min_qty=100, mark_of={"CIM PRC": 25.0, "AGNCN": 25.0})


def test_an_increase_landing_exactly_at_the_ceiling_is_kept():
    result = ceiling_filter([c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=100)], 109.5)
    assert [(k.symbol, k.qty) for k in result.kept] == [("CIM PRC", 100)]
    assert result.kept[0].numbers["brain_potential_after_pct"] == 112.0
    assert result.kept[0].numbers["increase_ceiling_pct"] == 112.0


def test_an_increase_landing_just_above_the_ceiling_is_dropped_when_min_qty_does_not_fit():
    # 109.51 + 2.5 = 112.01 > 112: the largest fitting size is 99 shares, below the 100 minimum.
    result = ceiling_filter([c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=100)], 109.51)
    assert result.kept == []
    assert [(s.candidate.symbol, s.reason) for s in result.suppressed] == [("CIM PRC", "regime_tolerance")]


def test_an_increase_over_the_ceiling_is_shrunk_to_what_fits():
    # 108 % + 400 shares (10 %) would be 118 %: shrunk to 160 shares (+4 % = 112 %).
    result = ceiling_filter([c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC", qty=400)], 108.0)
    assert [(k.symbol, k.qty) for k in result.kept] == [("AGNCN", 160)]
    assert result.kept[0].numbers["shrunk_from_qty"] == 400
    assert result.kept[0].numbers["brain_potential_after_pct"] == pytest.approx(112.0)


def test_the_ceiling_is_shared_by_priority_and_decreases_pass_above_it():
    band_inc = c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC", qty=100)
    mm_inc = c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=100)
    held = {"AGNCN": SymbolBook(1000, 0, 0, 25.0, "LT")}  # the soft sell reduces it: no potential added
    result = ceiling_filter([mm_inc, band_inc, SOFT_SELL], 108.0, symbols=held)
    # The LT band (priority 20) takes 108 -> 110.5; the quote would reach 113 > 112.
    assert sorted((k.purpose, k.qty) for k in result.kept) == [("LT_BAND", 100), ("SOFT_DERISK", 300)]
    assert [(s.candidate.purpose, s.reason) for s in result.suppressed] == [("MM_QUOTE", "regime_tolerance")]


def test_above_the_ceiling_a_live_increase_is_left_to_its_ttl_but_nothing_is_added():
    live = replace(c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=200), keep_key="intent:live")
    new = c("MM_QUOTE", "CIM PRC", "SELL", "MM_SHORT_INC", qty=400, slot="MM_ASK")
    result = ceiling_filter([live, new], 113.0)
    assert [k.keep_key for k in result.kept] == ["intent:live"]  # re-pricing: already counted in the book
    assert [(s.candidate.slot, s.reason) for s in result.suppressed] == [("MM_ASK", "regime_tolerance")]


def test_the_hard_cap_still_names_itself_when_it_binds():
    result = ceiling_filter([c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC", qty=100)], 128.0, ceiling=130.0)
    assert [(s.candidate.symbol, s.reason) for s in result.suppressed] == [("CIM PRC", "hard_cap")]


def test_no_regime_tolerance_means_no_new_increase():
    live = replace(c("MM_QUOTE", "CIM PRC", "BUY", "MM_LONG_INC"), keep_key="intent:live")
    result = ceiling_filter([c("LT_BAND", "AGNCN", "BUY", "LT_LONG_INC"), SOFT_SELL, live], 50.0, ceiling=None)
    assert sorted(k.purpose for k in result.kept) == ["MM_QUOTE", "SOFT_DERISK"]
    assert [(s.candidate.purpose, s.reason) for s in result.suppressed] == [("LT_BAND", "no_regime_tolerance")]


symbols_st = st.sampled_from(["A", "B", "C", "D"])
candidate_st = st.builds(
    lambda purpose, symbol, side, qty, price: c(purpose, symbol, side,
                                                 ("MM" if purpose == "MM_QUOTE" else "LT") + ("_LONG_INC" if side == "BUY" else "_SHORT_INC"),
                                                 qty=qty, price=price),
    st.sampled_from(["MM_QUOTE", "LT_BAND"]), symbols_st, st.sampled_from(["BUY", "SELL"]),
    st.integers(100, 5000), st.floats(5, 50).map(lambda p: round(p, 2)),
)
position_st = st.tuples(st.integers(-3000, 3000), st.integers(0, 2000), st.integers(0, 2000), st.floats(5, 50))


@settings(max_examples=300, deadline=None)
@given(
    candidates=st.lists(candidate_st, max_size=12),
    positions=st.dictionaries(symbols_st, position_st, max_size=4),
    equity=st.floats(50_000, 2_000_000),
    ceiling=st.floats(90, 130),
)
def test_no_emitted_set_takes_potential_above_the_cap(candidates, positions, equity, ceiling):
    """Property: whatever the candidates, what the filter lets through never takes the
    Brain's potential gross above the increase ceiling (<= 130 %; recomputed from
    scratch), and an increase is only ever shrunk, never grown."""
    base = {s: SymbolBook(q, b, sl, m, "LT") for s, (q, b, sl, m) in positions.items()}
    start_pct = sum(potential_notional(q, b, sl, m) for q, b, sl, m in positions.values()) / equity * 100
    marks = {s: base[s].mark if s in base else 20.0 for s in "ABCD"}
    result = cap_filter(list(candidates), PotentialBook(equity, start_pct, {"LT": 0.0, "MM_PURE": 0.0}, base),
                        hard_cap_pct=130, increase_ceiling_pct=ceiling, bucket_max_pct={}, min_qty=100, mark_of=marks)
    totals = {s: [q, b, sl, m] for s, (q, b, sl, m) in positions.items()}
    for kept in result.kept:
        row = totals.setdefault(kept.symbol, [0, 0, 0, marks[kept.symbol]])
        row[1 if kept.side == "BUY" else 2] += kept.qty
    after_pct = sum(potential_notional(q, b, sl, m) for q, b, sl, m in totals.values()) / equity * 100
    # Above the ceiling already: nothing may add potential (offsetting buys add none).
    assert after_pct <= max(ceiling, start_pct) + 1e-6
    originals = {id(x): x for x in candidates}
    assert len(result.kept) + len(result.suppressed) == len(candidates)
    for kept in result.kept:
        assert kept.qty >= 100 and any(kept.qty <= o.qty for o in originals.values() if o.symbol == kept.symbol)
