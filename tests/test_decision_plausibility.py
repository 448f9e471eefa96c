"""Bad data never becomes an order (issue 12), against the Brain's pure core: the quote
gate on every mark and price, the price collar on every NEW and MODIFY, unknown
exposure is never NORMAL, one symbol's absurd numbers are contained to it, and every
time is bounded by the Brain's own clock."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from pydantic import ValidationError
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.marks import Mark, MarkRules, MarkSource, resolve
from daemons.decision.codecs import exposure_snap
from daemons.decision import guards
from daemons.decision.engine import decide
from daemons.decision.model import Market, Outstanding
from qe.contracts import L1, BucketExposure, Exposure, Feature, SymbolExposure, TruthTick, make_event
from qe.plausibility import within_collar
from tests.support.brain import NS, T0, engine_rules, exposure, load_rules, market, outstanding, session, view

EQUITY = 1_000_000.0
NO_STRATEGIES = {"strategies": {"mm": {"enabled": False}, "lt_band": {"enabled": False}}}
PLAUS = load_rules().plausibility
COLLAR = PLAUS.collar_pct
YEAR_2100_NS = 4_102_444_800 * NS


def hard_window(now_ns: int = T0):
    return session(now_ns, regime="CLOSE", soft=True, hard=True, minutes_to_close=1.5)


def held(qty: int = 50000):
    """125 % gross at $25 in one LT long (HARD_DERISK in the hard window)."""
    return {"CIM PRB": (qty, "LT", 25.0)}


def stub(bid, ask, truth=25.0, grpan=25.0) -> Market:
    return market(bid, ask, truth=truth, grpan=grpan)


def news(decision):
    return [i.intent for i in decision.intents if i.intent.action == "NEW"]


def priced(decision):
    return [i.intent for i in decision.intents if i.intent.action in ("NEW", "MODIFY")]


# --- the quote gate ------------------------------------------------------------------------------


@pytest.mark.parametrize("bid, ask", [(0.01, 25.01), (1.00, 25.01), (0.01, 0.02), (0.01, 999_999.0), (0.01, None),
                                      (24.99, 24.98)])
def test_hard_window_stub_quote_gives_no_order_and_is_reported(bid, ask):
    """The issue's cases: a bid of $0.01 or $1.00 (a `true` coerced) while the truth tick
    is $25.00, in the hard de-risk window: no SELL at the stub; skipped and reported."""
    v = view(held(), EQUITY, {"CIM PRB": stub(bid, ask)}, sess=hard_window())
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert d.state.mode == "HARD_DERISK"
    assert news(d) == []
    assert d.trace["skips"]["implausible_quote"]["symbols"] == ["CIM PRB"]
    assert [(s.symbol, s.reason) for s in d.skips] == [("CIM PRB", "implausible_quote")]  # reported (alert) once
    # The mark is the truth tick, not the stub: gross stays 125 %.
    assert d.trace["brain_gross_pct"] == pytest.approx(125.0)


def test_the_same_position_with_a_good_quote_is_sold_at_the_bid():
    """Control for the test above: the only difference is the quote."""
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    (intent,) = news(decide(v, engine_rules(**NO_STRATEGIES), T0))
    assert (intent.side, intent.limit_price) == ("SELL", 24.99)


def test_market_data_flag_is_honoured_even_for_a_normal_looking_quote():
    flagged = replace(stub(24.99, 25.01), flagged="jump")
    v = view(held(), EQUITY, {"CIM PRB": flagged}, sess=hard_window())
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert news(d) == [] and d.trace["skips"]["implausible_quote"]["count"] == 1


@pytest.mark.parametrize("pricing", ["aggressive", "passive"])
def test_cap_recovery_never_prices_off_a_stub(pricing):
    v = view(held(56000), EQUITY, {"CIM PRB": stub(0.01, 25.01)}, sess=session(T0, regime="MID"))  # 140 %
    d = decide(v, engine_rules(derisk={"cap_recovery_pricing": pricing}, **NO_STRATEGIES), T0)
    assert d.state.mode == "CAP_RECOVERY"
    assert news(d) == [] and "implausible_quote" in d.trace["skips"]


def test_live_hard_order_is_not_repriced_to_a_stub():
    v = view(held(), EQUITY, {"CIM PRB": stub(0.01, 25.01)}, sess=hard_window())
    v.put_record(outstanding("h1", "HARD_DERISK", "CIM PRB", "SELL", 1000, 24.99, status="SUBMITTED",
                             issued_ns=T0 - 10 * NS))
    v.state.mode = "HARD_DERISK"
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert [i for i in d.intents if i.intent.action == "MODIFY"] == []
    assert all(i.intent.action != "CANCEL" for i in d.intents)  # the live order stands at its old price


def test_strategies_skip_a_symbol_with_an_implausible_quote():
    universe = {"CIM PRC": "MM_PURE", "CIM PRD": "MM_PURE"}
    markets = {"CIM PRC": stub(0.01, 25.10), "CIM PRD": stub(24.90, 25.10), "CIM PRB": stub(24.90, 25.10)}
    v = view({"CIM PRB": (20000, "LT", 25.0)}, EQUITY, markets, universe=universe, sess=session(T0, regime="MID"))
    d = decide(v, engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert {i.intent.symbol for i in d.intents} == {"CIM PRD"}  # its quotes at GRPAN +- edge
    assert ("CIM PRC", "implausible_quote") in {(s.symbol, s.reason) for s in d.skips}


def test_lt_band_skips_an_implausible_quote():
    # LT long share 25 % (band 60-70), LT under target: an LT long increase is wanted on CIM PRB.
    positions = {"CIM PRB": (5000, "LT", 25.0), "AGNCN": (-15000, "LT", 25.0)}
    markets = {"CIM PRB": stub(0.01, 25.10), "AGNCN": stub(24.90, 25.10)}
    v = view(positions, EQUITY, markets, sess=session(T0, regime="MID"))
    d = decide(v, engine_rules(strategies={"mm": {"enabled": False}}), T0)
    assert d.intents == []
    assert ("CIM PRB", "LT_BAND", "implausible_quote") in {(s.symbol, s.slot, s.reason) for s in d.skips}


def test_implausible_quote_never_moves_the_mark():
    rules = PLAUS
    m = stub(24.99, 25.01)
    marks = MarkRules.of(60, 300)
    assert resolve(guards.judged(m, rules).mark_inputs(None, None), T0, marks) == Mark(25.0, MarkSource.L1_MID)
    bad = stub(0.01, 25.01, truth=None, grpan=None)
    bad.trusted_mark, bad.trusted_ts_ns = 25.0, T0 - 10 * NS
    assert guards.judged(bad, rules).quote_problem == "wide_spread"
    stale = resolve(guards.judged(bad, rules).mark_inputs(None, None), T0, marks)
    assert (stale.price, stale.source) == (25.0, MarkSource.LAST_KNOWN)  # the last trusted mark, flagged stale


def test_handler_ingest_judges_real_l1_payloads():
    """Through the real contract model: `true` coerced to $1.00, a stub, market data's
    flag, an absurd price; only a plausible quote with a reference moves the trusted mark."""
    m = Market()
    feature = Feature(symbol="CIM PRB", grpan_price=25.0, concentration_pct=70, print_count=12,
                      truth_tick=TruthTick(price=25.0, size=100, venue="NYSE", ts_ns=T0))
    assert guards.apply_feature(m, feature, T0, T0, PLAUS) is None
    assert guards.apply_l1(m, L1(symbol="CIM PRB", bid=24.99, ask=25.01), T0, T0, PLAUS) is None
    assert m.trusted_mark == 25.0
    with pytest.raises(ValidationError):  # the strict contract refuses `true` for a price ...
        L1.model_validate_json('{"symbol": "CIM PRB", "bid": true, "ask": 25.01}')
    coerced = L1.model_construct(symbol="CIM PRB", bid=1.0, ask=25.01, bid_size=0, ask_size=0, last=None,
                                 last_size=None, venue=None, quote_ts_ns=None, implausible=None)
    assert guards.apply_l1(m, coerced, T0 + NS, T0 + NS, PLAUS) == "wide_spread"  # ... and the gate would catch $1.00 anyway
    assert guards.apply_l1(m, L1(symbol="CIM PRB", bid=0.01, ask=0.02), T0 + NS, T0 + NS, PLAUS) == "jump"
    assert guards.apply_l1(m, L1(symbol="CIM PRB", bid=24.99, ask=25.01, implausible="crossed"), T0, T0, PLAUS) == "crossed"
    over_max = L1.model_construct(symbol="CIM PRB", bid=24.99, ask=999_999.0, bid_size=0, ask_size=0, last=None,
                                  last_size=None, venue=None, quote_ts_ns=None, implausible=None)
    assert guards.apply_l1(m, over_max, T0, T0, PLAUS) == "absurd_price"
    assert (m.bid, m.ask, m.flagged) == (None, None, "absurd_price")  # present but unusable; nothing absurd kept
    assert m.trusted_mark == 25.0 and guards.market_problem(m, PLAUS) is None


def test_a_first_quote_without_reference_is_not_trusted():
    m = Market()
    assert guards.apply_l1(m, L1(symbol="CIM PRB", bid=0.01, ask=0.02), T0, T0, PLAUS) is None  # nothing to judge a jump by
    assert m.trusted_mark is None and guards.reference_of(m) is None


# --- price collars -------------------------------------------------------------------------------


def test_hard_window_price_is_clamped_into_the_collar():
    """A plausible quote (mid 7.8 % off the truth tick, inside the 10 % jump limit) whose
    bid is outside the 5 % collar: the SELL goes at the collar's edge, not at the bid."""
    v = view(held(), EQUITY, {"CIM PRB": stub(23.00, 23.10)}, sess=hard_window())
    (intent,) = news(decide(v, engine_rules(**NO_STRATEGIES), T0))
    assert intent.side == "SELL" and intent.limit_price == 23.75
    assert within_collar(intent.limit_price, 25.0, COLLAR)
    assert intent.trace["numbers"]["collar_clamped_from"] == 23.0


def test_modify_is_collared_too():
    v = view(held(), EQUITY, {"CIM PRB": stub(23.00, 23.10)}, sess=hard_window())
    v.put_record(outstanding("h1", "HARD_DERISK", "CIM PRB", "SELL", 50000, 24.99, status="SUBMITTED",
                             issued_ns=T0 - 10 * NS))
    v.state.mode = "HARD_DERISK"
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    (modify,) = [i.intent for i in d.intents if i.intent.action == "MODIFY"]
    assert modify.limit_price == 23.75 and modify.target_intent_key == "h1"


def test_a_live_order_outside_the_collar_is_brought_inside():
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    v.put_record(outstanding("h1", "HARD_DERISK", "CIM PRB", "SELL", 50000, 0.01, status="SUBMITTED",
                             issued_ns=T0 - 10 * NS))
    v.state.mode = "HARD_DERISK"
    (modify,) = [i.intent for i in decide(v, engine_rules(**NO_STRATEGIES), T0).intents]
    assert (modify.action, modify.limit_price) == ("MODIFY", 24.99)


def test_no_trusted_reference_no_order():
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01, truth=None, grpan=None)}, sess=hard_window())
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert d.state.mode == "HARD_DERISK" and d.intents == []
    assert ("CIM PRB", "no_reference") in {(s.symbol, s.reason) for s in d.skips}
    assert "no_reference" in {s.reason for s in d.suppressed}


@settings(max_examples=200, deadline=None)
@given(
    # Quotes around the collar's edges (5 %) and the gate's jump limit (10 %), some stubs.
    offset=st.floats(-0.14, 0.14) | st.sampled_from([-0.9996, -0.96, 3.0]),
    spread=st.floats(0.01, 1.5).map(lambda x: round(x, 2)) | st.floats(1.5, 40).map(lambda x: round(x, 2)),
    truth=st.floats(5, 50).map(lambda x: round(x, 2)),
    mode=st.sampled_from(["hard", "soft", "cap", "mm"]),
    live_price=st.none() | st.floats(0.01, 100).map(lambda x: round(x, 2)),
)
def test_every_price_sent_lies_in_the_collar(offset, spread, truth, mode, live_price):
    bid = max(round(truth * (1 + offset), 2), 0.01)
    ask = round(bid + spread, 2)
    quotes = {s: market(bid, ask, truth=truth, grpan=truth) for s in ("CIM PRB", "CIM PRC")}
    gross_pct = {"hard": 125, "soft": 125, "cap": 140, "mm": 50}[mode]
    qty = int(gross_pct / 100 * EQUITY / truth)
    sess = {"hard": hard_window(), "soft": session(T0, regime="CLOSE", soft=True), "cap": session(T0, regime="MID"),
            "mm": session(T0, regime="MID")}[mode]
    v = view({"CIM PRB": (qty, "LT", truth)}, EQUITY, quotes, sess=sess, universe={"CIM PRC": "MM_PURE"})
    if live_price is not None:
        slot = {"hard": "HARD_DERISK", "soft": "SOFT_DERISK", "cap": "CAP_RECOVERY", "mm": "MM_BID"}[mode]
        v.put_record(outstanding("live", slot, "CIM PRC" if mode == "mm" else "CIM PRB", "BUY" if mode == "mm" else "SELL",
                                 200 if mode == "mm" else 1000, live_price, status="SUBMITTED", issued_ns=T0 - 10 * NS,
                                 bucket="MM_PURE" if mode == "mm" else "LT",
                                 classification="MM_LONG_INC" if mode == "mm" else "LT_LONG_DEC"))
    d = decide(v, engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert d.state.mode == {"hard": "HARD_DERISK", "soft": "SOFT_DERISK", "cap": "CAP_RECOVERY", "mm": "NORMAL"}[mode]
    for intent in priced(d):
        assert within_collar(intent.limit_price, truth, COLLAR), (intent.action, intent.limit_price, truth)


# --- unknown is not zero ------------------------------------------------------------------------


def bad(snap, **numbers):
    return replace(snap, **numbers)


@pytest.mark.parametrize("numbers", [{"gross_pct": math.nan}, {"gross_pct": -5.0}, {"gross_pct": None},
                                     {"potential_pct": math.inf}, {"potential_pct": None}, {"equity": -1.0},
                                     {"ok": False, "problem": "equity <= 0"}])
def test_unknown_exposure_in_the_hard_window_is_never_normal(numbers):
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    v.exposure = bad(v.exposure, **numbers)
    d = decide(v, engine_rules(), T0)
    assert d.state.mode != "NORMAL"
    assert d.state.mode == "THROTTLE" and d.state.rule == "exposure_unknown"
    assert "exposure unknown" in d.state.reason and d.state.exposure_unknown
    assert "exposure_unknown" in d.trace["increases_blocked"] and d.trace["exposure_unknown"]
    assert not any(i.intent.is_risk_increasing for i in d.intents)


def test_no_exposure_at_all_is_never_normal():
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    v.exposure = None
    d = decide(v, engine_rules(), T0)
    assert (d.state.mode, d.state.rule) == ("THROTTLE", "exposure_unknown") and d.intents == []


def test_de_risk_continues_from_the_last_good_snapshot():
    """The current snapshot is NaN; the last good one (125 %, 60 s old) still drives
    HARD_DERISK: reductions go out, increases do not."""
    universe = {"CIM PRC": "MM_PURE"}
    markets = {"CIM PRB": stub(24.99, 25.01), "CIM PRC": stub(24.90, 25.10)}
    v = view(held(), EQUITY, markets, sess=hard_window(), universe=universe)
    v.good_exposure = exposure(held(), EQUITY, ts_ns=T0 - 60 * NS)
    v.exposure = bad(v.exposure, gross_pct=math.nan)
    d = decide(v, engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert d.state.mode == "HARD_DERISK" and "exposure unknown" in d.state.reason
    assert [(i.symbol, i.side) for i in news(d)] == [("CIM PRB", "SELL")]
    assert not any(i.intent.is_risk_increasing for i in d.intents)
    assert "exposure_unknown" in d.trace["increases_blocked"] and d.trace["exposure_snapshot"] == f"exposure:{T0 - 60 * NS}"


def test_last_good_snapshot_too_old_for_de_risk():
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    age = load_rules().decision.derisk_max_exposure_age_s + 1
    v.good_exposure = exposure(held(), EQUITY, ts_ns=T0 - int(age * NS))
    v.exposure = bad(v.exposure, gross_pct=-1.0)
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert d.state.mode == "THROTTLE" and d.intents == []


@pytest.mark.parametrize("gross, status", [(float("nan"), "ok"), (-5.0, "ok"), (None, "ok"), (125.0, "error")])
def test_exposure_events_from_the_real_contract_are_judged(gross, status):
    """The seam: an Exposure built by the real contract, decoded into the Brain's snapshot.
    NaN and negative gross are refused by the contract on decode; the Brain's own guard is
    tested with a payload built past validation (defense in depth)."""
    build = Exposure if gross is None or gross >= 0 else Exposure.model_construct
    payload = build(status=status, error="equity <= 0" if status == "error" else None, equity=EQUITY,
                       long_notional=1_250_000, short_notional=0, gross_pct=gross, net_pct=gross,
                       potential_gross_pct=125.0, buckets={"LT": BucketExposure(current_pct=125, potential_pct=125,
                                                                                   target_pct=80, max_pct=90)})
    event = make_event(payload, idempotency_key="exposure:1", source="exposure", ts_ns=T0)
    snap = exposure_snap(event, T0)
    problem = guards.exposure_problem(snap, PLAUS)
    assert problem is not None
    kept = guards.unknown_exposure(snap, problem)
    assert kept.gross_pct is None and kept.problem == problem and kept.ts_ns == T0


def test_absurd_symbol_in_a_snapshot_makes_the_snapshot_unknown():
    payload = Exposure.model_construct(status="ok", error=None, detail="full", equity=EQUITY, long_notional=0, short_notional=0,
                       gross_pct=10.0, net_pct=10.0, potential_gross_pct=10.0, buckets={}, marks_stale=[],
                       symbols={"CIM PRB": SymbolExposure.model_construct(qty=10**400, bucket="LT", mark=25.0, mark_source="l1_mid",
                                                          notional=1e300, open_buy_qty=0, open_sell_qty=0,
                                                          potential_notional=0)})
    snap = exposure_snap(make_event(payload, idempotency_key="exposure:2", source="exposure", ts_ns=T0), T0)
    assert guards.exposure_problem(snap, PLAUS) == "CIM PRB: absurd quantity"


# --- containment ---------------------------------------------------------------------------------


def test_an_absurd_position_is_contained_to_its_symbol():
    """10**400 shares of one symbol (OverflowError in any float arithmetic): that symbol is
    skipped and named, the rest is de-risked, increases are blocked."""
    positions = {"CIM PRB": (25000, "LT", 25.0), "AGNCN": (25000, "LT", 25.0)}
    markets = {s: stub(24.99, 25.01) for s in ("CIM PRB", "AGNCN", "CIM PRC")}
    v = view(positions, EQUITY, markets, sess=hard_window(), universe={"CIM PRC": "MM_PURE"})
    v.positions["NLY PRF"] = replace(v.positions["AGNCN"], qty=10**400)
    v.markets["NLY PRF"] = stub(24.99, 25.01)
    d = decide(v, engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert d.state.mode == "HARD_DERISK"
    assert set(d.symbol_errors) == {"NLY PRF"}
    assert news(d) and all(i.symbol != "NLY PRF" and i.side == "SELL" for i in news(d))
    assert "symbol_errors" in d.trace["increases_blocked"]
    assert "NLY PRF" in d.trace["symbol_errors"]


def test_a_rejected_position_is_skipped_and_blocks_increases():
    markets = {s: stub(24.90, 25.10) for s in ("CIM PRB", "CIM PRC")}
    v = view({"CIM PRB": (20000, "LT", 25.0)}, EQUITY, markets, sess=session(T0, regime="MID"),
             universe={"CIM PRC": "MM_PURE"})
    v.input_problems["CIM PRB"] = "absurd_quantity"
    d = decide(v, engine_rules(), T0)
    assert d.intents == [] and "CIM PRB" in d.symbol_errors
    assert "symbol_errors" in d.trace["increases_blocked"]


def test_a_failing_strategy_does_not_stop_de_risk(monkeypatch):
    from daemons.decision.strategies import GrpanMarketMaker

    def boom(self, symbol, context, out):
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(GrpanMarketMaker, "_quote", boom)
    markets = {"CIM PRB": stub(24.99, 25.01), "CIM PRC": stub(24.90, 25.10)}
    v = view(held(), EQUITY, markets, sess=hard_window(), universe={"CIM PRC": "MM_PURE"})
    d = decide(v, engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert [(i.symbol, i.side) for i in news(d)] == [("CIM PRB", "SELL")]
    assert "CIM PRC" in d.symbol_errors and ("CIM PRC", "evaluation_error") in {(s.symbol, s.reason) for s in d.skips}


def test_absurd_values_never_enter_the_market_record():
    m = Market()
    absurd = Feature.model_construct(symbol="CIM PRB", grpan_price=25.0, concentration_pct=70, print_count=10**400,
                                     last_price=None, deviation=None, windows={},
                                     truth_tick=TruthTick(price=25.0, size=100, venue="NYSE", ts_ns=T0))
    assert guards.apply_feature(m, absurd, T0, T0, PLAUS) == "absurd_quantity"
    assert m == Market()  # ignored whole
    too_dear = Feature.model_construct(symbol="CIM PRB", grpan_price=999_999.0, concentration_pct=70, print_count=3,
                                       last_price=None, deviation=None, windows={}, truth_tick=None)
    assert guards.apply_feature(m, too_dear, T0, T0, PLAUS) == "absurd_price" and m.grpan is None
    assert guards.position_problem(10**400, 24.0, PLAUS) == "absurd_quantity"
    assert guards.position_problem(-(10**9), 24.0, PLAUS) == "absurd_quantity"
    assert guards.position_problem(0, 0.0, PLAUS) is None  # flat is not bad (SPEC 9)
    assert guards.position_problem(500, float("nan"), PLAUS) == "absurd_avg_cost"


# --- the Brain's own clock ------------------------------------------------------------------------


def test_times_from_2100_are_bounded_by_the_brains_clock():
    m = Market()
    assert guards.apply_feature(m, Feature(symbol="CIM PRB", grpan_price=25.0, concentration_pct=70, print_count=3,
                                           truth_tick=TruthTick(price=25.0, size=100, venue="NYSE",
                                                                ts_ns=YEAR_2100_NS)), YEAR_2100_NS, T0, PLAUS) is None
    guards.apply_l1(m, L1(symbol="CIM PRB", bid=24.99, ask=25.01, quote_ts_ns=YEAR_2100_NS), YEAR_2100_NS, T0, PLAUS)
    assert m.quote_ts_ns == T0 and m.truth_ts_ns == T0 and m.feature_ts_ns == T0
    later = T0 + 61 * NS
    assert not m.quote_fresh(later, 60)  # stale after l1_max_age_s on the Brain's clock
    # A record or quote from the future (however it got there) is not fresh, and does not stay alive.
    future = market(24.99, 25.01, truth=25.0, ts_ns=YEAR_2100_NS)
    assert not future.quote_fresh(T0, 60) and not future.truth_fresh(T0, 300)
    record = outstanding("k", "MM_BID", "CIM PRC", "BUY", 200, 24.95, issued_ns=YEAR_2100_NS, ttl_s=60)
    assert record.expired(T0, 30)


def test_intent_created_ns_is_the_brains_clock():
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    v.session = replace(v.session, now_ns=T0 - NS)
    d = decide(v, engine_rules(**NO_STRATEGIES), T0 + 7)
    assert news(d) and all(i.created_ns == T0 + 7 for i in news(d))
    assert all(r.issued_ns == T0 + 7 for r in d.records.values())


def test_session_or_exposure_from_the_future_is_not_fresh():
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window(YEAR_2100_NS))
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert "stale_session" in d.trace["increases_blocked"] and d.intents == []
    v = view(held(), EQUITY, {"CIM PRB": stub(24.99, 25.01)}, sess=hard_window())
    v.exposure = replace(v.exposure, ts_ns=YEAR_2100_NS)
    d = decide(v, engine_rules(**NO_STRATEGIES), T0)
    assert d.state.mode != "NORMAL" and d.intents == []


def test_outstanding_record_roundtrip_keeps_fields():
    record = outstanding("k", "MM_BID", "CIM PRC", "BUY", 200, 24.95)
    assert Outstanding.from_record(record.to_record()) == record


def test_a_held_position_without_any_mark_blocks_increases():
    markets = {"CIM PRC": stub(24.90, 25.10)}
    v = view({"CIM PRB": (20000, "LT", 25.0)}, EQUITY, markets, sess=session(T0, regime="MID"),
             universe={"CIM PRC": "MM_PURE"})
    v.exposure = replace(v.exposure, symbols={})  # the snapshot has no mark for it either
    d = decide(v, engine_rules(strategies={"lt_band": {"enabled": False}}), T0)
    assert d.intents == [] and d.trace["unpriced_positions"] == ["CIM PRB"]
    assert "unpriced_positions" in d.trace["increases_blocked"]
