"""Strategies: GRPAN market making in MM_PURE, LT band keeping; both subject to modes and caps."""

from __future__ import annotations

from daemons.decision.engine import decide
from daemons.decision.strategies import build_strategies
from tests.support.brain import NS, T0, engine_rules, exposure, load_rules, market, outstanding, session, view

EQUITY = 1_000_000.0
MM_UNIVERSE = {"CIM PRC": "MM_PURE", "CIM PRB": "LT", "AGNCN": "LT", "NLY PRF": "LT", "TWO PRA": "LT"}


def mm_view(position=0, grpan=25.00, bid=24.90, ask=25.10, **kw):
    positions = {"CIM PRB": (10000, "LT", 25.0)}
    if position:
        positions["CIM PRC"] = (position, "MM_PURE", 25.0)
    markets = {"CIM PRC": market(bid, ask, truth=25.0, grpan=grpan), "CIM PRB": market(24.99, 25.01, truth=25.0)}
    return view(positions, EQUITY, markets, universe=MM_UNIVERSE, sess=session(T0, regime="MID"), **kw)


def quotes(decision):
    return sorted((i.intent.side, i.intent.qty, i.intent.limit_price, i.intent.classification)
                  for i in decision.intents if i.intent.intent_type == "MM_QUOTE")


def test_mm_quotes_both_sides_around_grpan_with_edge_and_size():
    d = decide(mm_view(), engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert quotes(d) == [("BUY", 200, 24.95, "MM_LONG_INC"), ("SELL", 200, 25.05, "MM_SHORT_INC")]
    assert all(i.intent.priority == 10 and i.intent.bucket == "MM_PURE" for i in d.intents)


def test_mm_quotes_never_cross_the_market():
    d = decide(mm_view(grpan=25.00, bid=24.97, ask=24.99), engine_rules(), T0)
    prices = {side: price for side, _q, price, _c in quotes(d)}
    assert prices["BUY"] == 24.95 and prices["SELL"] == 25.05
    d = decide(mm_view(grpan=25.00, bid=24.90, ask=24.93), engine_rules(), T0)
    assert {side: price for side, _q, price, _c in quotes(d)}["BUY"] == 24.92  # below the offer


def test_mm_inventory_side_is_a_decrease_and_limits_hold():
    d = decide(mm_view(position=300), engine_rules(), T0)
    assert quotes(d) == [("BUY", 200, 24.95, "MM_LONG_INC"), ("SELL", 200, 25.05, "MM_LONG_DEC")]
    at_limit = decide(mm_view(position=1000), engine_rules(), T0)
    assert quotes(at_limit) == [("SELL", 200, 25.05, "MM_LONG_DEC")]  # no more buying
    short = decide(mm_view(position=-150), engine_rules(), T0)
    assert quotes(short) == [("BUY", 150, 24.95, "MM_SHORT_DEC"), ("SELL", 200, 25.05, "MM_SHORT_INC")]


def test_mm_skips_stale_or_weak_grpan():
    v = mm_view()
    v.markets["CIM PRC"].feature_ts_ns = T0 - 400 * NS
    assert quotes(decide(v, engine_rules(), T0)) == []
    weak = engine_rules(strategies={"mm": {"min_concentration_pct": 80}})
    assert quotes(decide(mm_view(), weak, T0)) == []


def test_mm_switched_off():
    rules = engine_rules(strategies={"mm": {"enabled": False}})
    assert [s.name for s in rules.strategies] == ["LT_BAND"]
    assert quotes(decide(mm_view(), rules, T0)) == []
    assert build_strategies(load_rules(strategies={"mm": {"enabled": False}, "lt_band": {"enabled": False}})) == []


def test_mm_subject_to_modes():
    v = mm_view()
    v.session = session(T0, regime="CLOSE", soft=True)  # soft window but gross 25 % <= 100 %: NORMAL, quotes go on
    assert len(quotes(decide(v, engine_rules(), T0))) == 2
    throttled = mm_view(position=300)
    throttled.state.halted = True
    d = decide(throttled, engine_rules(), T0)
    assert d.state.mode == "HALTED" and d.intents == []


def test_mm_requote_threshold_and_modify_pacing():
    rules = engine_rules(strategies={"lt_band": {"enabled": False}})
    v = mm_view()
    first = decide(v, rules, T0)
    for record in first.records.values():
        v.put_record(record)
    # GRPAN moves one cent: re-quote (MODIFY), but only 2.5 s after the last change.
    v.markets["CIM PRC"].grpan = 25.01
    v.markets["CIM PRC"].feature_ts_ns = T0 + NS
    v.session = session(T0 + 2 * NS, regime="MID")
    assert decide(v, rules, T0 + 2 * NS).intents == []
    v.session = session(T0 + 3 * NS, regime="MID")
    later = decide(v, rules, T0 + 3 * NS)
    assert sorted((i.intent.action, i.intent.side, i.intent.limit_price) for i in later.intents) == [
        ("MODIFY", "BUY", 24.96), ("MODIFY", "SELL", 25.06)]
    assert all(i.intent.target_intent_key in first.records for i in later.intents)


# --- LT band keeping ---------------------------------------------------------------------------


def band_view(long_qty, short_qty, equity=EQUITY):
    positions = {"CIM PRB": (long_qty // 2, "LT", 25.0), "AGNCN": (long_qty - long_qty // 2, "LT", 25.0),
                 "NLY PRF": (-short_qty, "LT", 25.0)}
    markets = {s: market(24.99, 25.01, truth=25.00) for s in positions}
    return view(positions, equity, markets, universe=MM_UNIVERSE, sess=session(T0, regime="MID"))


def band(decision):
    return [(i.intent.symbol, i.intent.side, i.intent.qty, i.intent.limit_price, i.intent.classification)
            for i in decision.intents if i.intent.intent_type == "LT_BAND"]


def test_band_inside_does_nothing():
    assert band(decide(band_view(13000, 7000), engine_rules(), T0)) == []  # 65 % long


def test_band_too_long_below_target_adds_short():
    # LT 20000 shares * $25 = 50 % of equity (< 80 % target); long share 80 % > 70 %.
    d = decide(band_view(16000, 4000), engine_rules(), T0)
    assert band(d) == [("NLY PRF", "SELL", 200, 25.01, "LT_SHORT_INC")]  # 0.5 % of 1M = $5000 near the truth tick
    assert d.intents[0].intent.trace["numbers"]["lt_long_share_pct"] == 80.0


def test_band_too_long_above_target_sells_the_largest_long():
    d = decide(band_view(30000, 4000, equity=1_000_000), engine_rules(), T0)  # LT 85 % > 80 % target
    (order,) = band(d)
    assert order[1:] == ("SELL", 200, 25.01, "LT_LONG_DEC") and order[0] in ("CIM PRB", "AGNCN")


def test_band_too_short_below_target_adds_long():
    d = decide(band_view(10000, 10000), engine_rules(), T0)  # 50 % long < 60 %
    assert band(d) == [("AGNCN", "BUY", 200, 24.99, "LT_LONG_INC")]  # smallest long (tie: by symbol)


def test_band_too_short_above_target_covers_shorts():
    d = decide(band_view(17000, 17000), engine_rules(), T0)  # LT 85 %, 50 % long
    assert band(d) == [("NLY PRF", "BUY", 200, 24.99, "LT_SHORT_DEC")]


def test_band_one_live_corrective_at_a_time():
    v = band_view(16000, 4000)
    v.put_record(outstanding("band-1", "LT_BAND", "NLY PRF", "SELL", 200, 25.01, classification="LT_SHORT_INC",
                             status="SUBMITTED"))
    assert band(decide(v, engine_rules(), T0)) == []


def test_band_correctives_are_subject_to_the_bucket_max():
    # LT below its target (so the band wants an increase) but its potential at the max.
    v = band_view(10000, 10000)
    v.exposure.buckets["LT"] = v.exposure.buckets["LT"].__class__(70.0, 89.9, 80.0, 90.0)
    d = decide(v, engine_rules(), T0)
    assert band(d) == []
    assert ("LT_BAND", "bucket_max") in {(s.candidate.purpose, s.reason) for s in d.suppressed}
    # Over the max: the band corrects by decreasing instead, and no increase passes.
    v.exposure.buckets["LT"] = v.exposure.buckets["LT"].__class__(91.0, 91.0, 80.0, 90.0)
    assert band(decide(v, engine_rules(), T0)) == [("NLY PRF", "BUY", 200, 24.99, "LT_SHORT_DEC")]


# --- no increase above the regime tolerance less the margin (issue 13: no flapping) ----------

LATE_CEILING = 115.0 - 3.0  # LATE tolerance less strategies.tolerance_margin_pct
MM_ONLY = {"lt_band": {"enabled": False}}


def late_view(held_shares, **kw):
    """CIM PRB held at $25 (held_shares / 400 % of the $1M equity), CIM PRC flat and quoted in LATE."""
    positions = {"CIM PRB": (held_shares, "LT", 25.0)}
    markets = {"CIM PRC": market(24.90, 25.10, truth=25.0, grpan=25.00), "CIM PRB": market(24.99, 25.01, truth=25.0)}
    return view(positions, EQUITY, markets, universe=MM_UNIVERSE, sess=session(T0, regime="LATE"), **kw)


def test_mm_quote_landing_exactly_at_tolerance_less_margin_is_kept():
    v = late_view(44_600)  # 111.5 %: a 200-share bid adds 0.5 % -> exactly 112 %
    d = decide(v, engine_rules(strategies=MM_ONLY), T0)
    assert d.state.mode == "NORMAL"
    assert quotes(d) == [("BUY", 200, 24.95, "MM_LONG_INC"), ("SELL", 200, 25.05, "MM_SHORT_INC")]


def test_mm_quote_landing_just_above_is_shrunk_by_the_strategy_itself():
    v = late_view(44_604)  # 111.51 %: room for $4,900 = 196 shares at the $25 mid
    d = decide(v, engine_rules(strategies=MM_ONLY), T0)
    assert quotes(d) == [("BUY", 196, 24.95, "MM_LONG_INC"), ("SELL", 196, 25.05, "MM_SHORT_INC")]
    bid = next(i.intent for i in d.intents if i.intent.side == "BUY")
    assert bid.trace["numbers"]["shrunk_from_qty"] == 200
    assert bid.trace["numbers"]["increase_ceiling_pct"] == LATE_CEILING
    assert not any(s.reason == "regime_tolerance" for s in d.suppressed)  # never proposed, so nothing to drop


def test_no_room_for_min_qty_means_no_increase_but_the_decrease_side_still_quotes():
    v = late_view(44_704)  # 111.76 %: 100 more shares would take it to 112.01 %
    v.positions["CIM PRC"] = v.positions["CIM PRB"].__class__(300, "MM_PURE")
    d = decide(v, engine_rules(strategies=MM_ONLY), T0)
    assert quotes(d) == [("SELL", 200, 25.05, "MM_LONG_DEC")]
    assert d.trace["skips"]["tolerance_headroom"]["symbols"] == ["CIM PRC"]


def test_the_brains_own_unacknowledged_intents_use_up_the_room():
    v = late_view(44_400)  # 111.0 %: room for 400 shares
    assert quotes(decide(v, engine_rules(strategies=MM_ONLY), T0))[0][1] == 200
    v.put_record(outstanding("pending", "LT_BAND", "CIM PRB", "BUY", 400, 25.00, classification="LT_LONG_INC"))
    d = decide(v, engine_rules(strategies=MM_ONLY), T0)
    assert d.trace["brain_potential_pct"] == 112.0  # the snapshot cannot include it yet
    assert quotes(d) == []
    assert d.trace["skips"]["tolerance_headroom"]["symbols"] == ["CIM PRC"]


def test_lt_band_increase_is_sized_to_the_room():
    # LT 50 % long (below the 60 % band), LT below its target: the band adds to the smallest long.
    v = band_view(10000, 10000)
    v.exposure = exposure({"CIM PRB": (5000, "LT", 25.0), "AGNCN": (5000, "LT", 25.0), "NLY PRF": (-10000, "LT", 25.0)},
                          EQUITY, open_orders={"NLY PRF": (0, 24_640)},  # potential 111.6 % in LATE
                          buckets_max={"LT": (80.0, 200.0), "MM_PURE": (20.0, 30.0)})  # the bucket max out of the way
    v.session = session(T0, regime="LATE")
    d = decide(v, engine_rules(), T0)
    assert band(d) == [("AGNCN", "BUY", 160, 24.99, "LT_LONG_INC")]  # 0.5 % wanted (200 sh), 0.4 % of room
    assert d.intents[0].intent.trace["numbers"]["shrunk_from_qty"] == 200


def test_market_making_fills_never_push_potential_over_the_tolerance():
    """Every increase the Brain proposes fills at once, round after round (the worst
    case for a market maker): potential gross creeps up to the CLOSE tolerance less
    the margin (97 %) and stops there; the mode never leaves NORMAL. Without the
    margin the quotes would take it over 100 % and into SOFT_DERISK."""
    mm = ("CIM PRC", "CIM PRD", "CIM PRE", "CIM PRF")
    held = {"CIM PRB": (37_000, "LT", 25.0)}  # 92.5 %; four MM symbols can add up to 4 x 1000 sh = 10 %
    universe = {**MM_UNIVERSE, **{s: "MM_PURE" for s in mm}}
    markets = {s: market(24.90, 25.10, truth=25.0, grpan=25.00) for s in (*mm, "CIM PRB")}
    rules = engine_rules(strategies=MM_ONLY)
    v = view(held, EQUITY, markets, universe=universe, sess=session(T0, regime="CLOSE", soft=True))
    potentials, filled = [], 0
    for _round in range(12):
        d = decide(v, rules, T0)
        assert d.state.mode == "NORMAL", d.state.reason
        for item in d.intents:
            intent = item.intent
            if intent.action == "NEW" and intent.classification.endswith("_INC") and intent.side == "BUY":
                qty, bucket, mark = held.get(intent.symbol, (0, "MM_PURE", 25.0))
                held[intent.symbol] = (qty + intent.qty, bucket, mark)
                filled += intent.qty
        v.exposure = exposure(held, EQUITY)
        v.positions = {s: v.positions.get("CIM PRB").__class__(q, b) for s, (q, b, _m) in held.items()}
        potentials.append(v.exposure.potential_pct)
    assert filled >= 100  # the market maker did add risk ...
    assert max(potentials) <= 97.0 + 1e-9  # ... but never beyond CLOSE tolerance 100 - margin 3
    assert potentials[-1] > 96.0  # and used the room it had
