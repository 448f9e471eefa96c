"""De-risk sizing and pricing: soft clamps, stale skips, hard chunks and steps, ranking,
MM before LT, the 100 % stop, cap recovery to 123 %, MM overnight, early close."""

from __future__ import annotations

import pytest

from daemons.decision.derisk import (
    Holding,
    LiveOrder,
    aggressive_price,
    hard_chunk_notional,
    passive_price,
    plan_reduction,
    rank,
)
from dataclasses import replace

from daemons.decision.engine import decide
from daemons.decision.model import Market
from tests.support.brain import DAY, NS, T0, engine_rules, load_rules, market, outstanding, session, view

# --- pricing ---------------------------------------------------------------------------------

PASSIVE = [
    # side, truth, bid, ask, expected
    ("SELL", 25.00, 24.95, 25.05, 24.99),  # truth - 0.01
    ("SELL", 25.00, 24.995, 25.05, 25.00),  # not below the bid (rounded up to the grid)
    ("SELL", 25.00, 25.00, 25.05, 25.00),  # clamped at the bid
    ("BUY", 25.00, 24.95, 25.05, 25.01),  # truth + 0.01
    ("BUY", 25.00, 24.95, 25.005, 25.00),  # not above the ask (rounded down)
    ("BUY", 25.10, 24.95, 25.05, 25.05),  # clamped at the ask
]


@pytest.mark.parametrize("side, truth, bid, ask, expected", PASSIVE)
def test_passive_price(side, truth, bid, ask, expected):
    assert passive_price(side, truth, bid, ask, 0.01) == pytest.approx(expected)


def test_aggressive_price_hits_bid_lifts_ask():
    assert aggressive_price("SELL", 24.97, 25.03) == 24.97
    assert aggressive_price("BUY", 24.97, 25.03) == 25.03


def holding(symbol, qty, mark=25.0, bucket="LT", bid=24.99, ask=25.01, truth=25.0, quote_fresh=True, truth_fresh=True,
            available=None, live=None):
    return Holding(symbol, bucket, qty, mark, bid, ask, truth, quote_fresh, truth_fresh,
                   abs(qty) if available is None else available, live)


def plan(holdings, excess, budget=None, pricing="passive", min_qty=100):
    return plan_reduction(holdings, slot="SOFT_DERISK", purpose="SOFT_DERISK", priority=60, excess_notional=excess,
                          new_budget_notional=excess if budget is None else budget, pricing=pricing, soft_offset=0.01,
                          min_qty=min_qty, reason="test")


def test_ranking_mm_first_then_slippage_then_size():
    hs = [
        holding("LT WIDE", 1000, bid=24.90, ask=25.10),
        holding("LT TIGHT BIG", 2000, bid=24.99, ask=25.01),
        holding("LT TIGHT SMALL", 500, bid=24.99, ask=25.01),
        holding("MM WIDE", 300, bucket="MM_PURE", bid=24.80, ask=25.20),
    ]
    assert [h.symbol for h in rank(hs)] == ["MM WIDE", "LT TIGHT BIG", "LT TIGHT SMALL", "LT WIDE"]


def test_plan_covers_the_excess_in_rank_order_and_stops():
    hs = [holding("A", 1000), holding("B", 1000, bucket="MM_PURE"), holding("C", 1000)]
    result = plan(hs, excess=30_000)  # 1200 shares at $25
    assert [(c.symbol, c.qty, c.side, c.classification) for c in result.candidates] == [
        ("B", 1000, "SELL", "MM_LONG_DEC"), ("A", 200, "SELL", "LT_LONG_DEC")]
    assert all(c.limit_price == 24.99 for c in result.candidates)


def test_plan_short_positions_cover_at_truth_plus_cent():
    result = plan([holding("S", -400, truth=25.00, ask=25.02)], excess=5_000)
    (only,) = result.candidates
    assert (only.side, only.qty, only.limit_price, only.classification) == ("BUY", 200, 25.01, "LT_SHORT_DEC")


def test_plan_skips_stale_symbols_and_says_so():
    hs = [holding("STALEQ", 1000, quote_fresh=False), holding("STALEP", 1000, truth_fresh=False), holding("OK", 500)]
    result = plan(hs, excess=10_000)  # the stale ones rank first (larger) and are passed over
    assert [c.symbol for c in result.candidates] == ["OK"]
    assert sorted((s.symbol, s.reason) for s in result.skips) == [("STALEP", "stale_prints"), ("STALEQ", "stale_l1")]


def test_aggressive_plan_ignores_stale_prints_but_not_stale_quotes():
    hs = [holding("STALEQ", 1000, quote_fresh=False), holding("STALEP", 1000, truth_fresh=False)]
    result = plan(hs, excess=10_000, pricing="aggressive")
    assert [(c.symbol, c.limit_price) for c in result.candidates] == [("STALEP", 24.99)]


def test_plan_reduce_only_and_min_qty():
    hs = [holding("A", 1000, available=50), holding("B", 150)]
    result = plan(hs, excess=100_000)
    assert [(c.symbol, c.qty) for c in result.candidates] == [("B", 150)]  # never more than the position
    assert [(s.symbol, s.reason) for s in result.skips] == [("A", "below_min_qty")]


def test_plan_minimum_order_rounds_up_small_remainders():
    result = plan([holding("A", 1000)], excess=500)  # 20 shares' worth -> one minimum order
    assert result.candidates[0].qty == 100


def test_live_orders_are_kept_while_needed_and_dropped_past_the_target():
    live_a = LiveOrder("k-a", 400, 24.99)
    live_b = LiveOrder("k-b", 400, 24.99)
    hs = [holding("A", 1000, live=live_a, available=600), holding("B", 1000, live=live_b, truth=24.90, bid=24.85, available=600)]
    result = plan(hs, excess=5_000)  # 200 shares: A's live order already covers it
    assert [(c.symbol, c.keep_key) for c in result.candidates] == [("A", "k-a")]
    repriced = plan(hs, excess=50_000)
    kept = {c.symbol: c for c in repriced.candidates if c.keep_key}
    assert kept["B"].limit_price == 24.89  # re-priced to the new truth tick
    new = [c for c in repriced.candidates if not c.keep_key]
    assert new == []  # both symbols have a live order of this slot


def test_nothing_when_at_or_below_target():
    assert plan([holding("A", 1000)], excess=0).candidates == []


def test_hard_chunk_sizes():
    assert hard_chunk_notional(100_000, 100_000, 0.10, 0, 10) == pytest.approx(10_000)
    # prices moved against us: the steps left must still cover today's excess
    assert hard_chunk_notional(100_000, 90_000, 0.10, 5, 10) == pytest.approx(18_000)
    assert hard_chunk_notional(100_000, 30_000, 0.10, 9, 10) == pytest.approx(30_000)  # the last step takes the rest
    assert hard_chunk_notional(100_000, 30_000, 0.10, 10, 10) == 0.0  # no 11th step
    assert hard_chunk_notional(100_000, 5_000, 0.10, 2, 10) == pytest.approx(5_000)  # never past the target


# --- through the engine ------------------------------------------------------------------------

EQUITY = 200_000.0


def portfolio(gross_pct=125.0):
    """LT longs + an MM long and short; gross = gross_pct at marks of $25."""
    shares = int(gross_pct / 100 * EQUITY / 25)
    lt = shares - 2000
    return {
        "CIM PRB": (lt // 2, "LT", 25.0),
        "AGNCN": (lt - lt // 2, "LT", 25.0),
        "CIM PRC": (1200, "MM_PURE", 25.0),
        "NLY PRG": (-800, "MM_PURE", 25.0),
    }


def markets(**overrides):
    base = {
        "CIM PRB": market(24.99, 25.01, truth=25.00),
        "AGNCN": market(24.98, 25.03, truth=25.00),
        "CIM PRC": market(24.97, 25.03, truth=25.01),
        "NLY PRG": market(24.96, 25.04, truth=24.99),
    }
    base.update(overrides)
    return base


def test_soft_window_orders_at_truth_tick_proximity():
    v = view(portfolio(125), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True, minutes_to_close=14))
    d = decide(v, engine_rules(), T0)
    assert d.state.mode == "SOFT_DERISK" and d.transition.rule == "soft_window"
    new = {i.intent.symbol: i.intent for i in d.intents if i.intent.intent_type == "SOFT_DERISK"}
    assert new["CIM PRC"].limit_price == 25.00 and new["CIM PRC"].side == "SELL"  # truth 25.01 - 0.01
    assert new["NLY PRG"].limit_price == 25.00 and new["NLY PRG"].side == "BUY"  # truth 24.99 + 0.01
    soft = [i.intent for i in d.intents if i.intent.intent_type == "SOFT_DERISK"]
    reduced = sum(i.qty * 25.0 for i in soft)
    assert reduced >= 0.25 * EQUITY  # 125 % -> 100 %
    assert reduced < 0.25 * EQUITY + 2 * 100 * 25  # not much past it (minimum orders, a merged LT band order)
    assert all(i.priority == 60 and i.classification.endswith("_DEC") for i in soft)
    # The rest, if anything, is an LT band decrease (allowed outside HARD_DERISK).
    assert all(i.intent.intent_type == "LT_BAND" and i.intent.classification == "LT_LONG_DEC"
               for i in d.intents if i.intent.intent_type != "SOFT_DERISK")


def test_soft_window_stale_symbol_is_skipped_and_reported_once():
    stale = market(24.97, 25.03, truth=25.01, ts_ns=T0 - 400 * NS)  # quote and prints both stale
    v = view(portfolio(125), EQUITY, markets(**{"CIM PRC": stale}), sess=session(T0, regime="CLOSE", soft=True))
    d = decide(v, engine_rules(), T0)
    assert "CIM PRC" not in {i.intent.symbol for i in d.intents}
    assert [(s.symbol, s.reason) for s in d.skips] == [("CIM PRC", "stale_l1")]
    v.reported_skips.add(f"{DAY}|CIM PRC|SOFT_DERISK|stale_l1")
    assert decide(v, engine_rules(), T0).skips == []


def test_hard_window_first_step_is_ten_percent_of_the_excess_at_the_bid():
    v = view(portfolio(110), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True, hard=True, minutes_to_close=1.9))
    d = decide(v, engine_rules(), T0)
    assert d.state.mode == "HARD_DERISK"
    excess = 0.10 * EQUITY
    sized = sum(i.intent.qty * 25.0 for i in d.intents)
    assert 0.10 * excess <= sized <= 0.10 * excess + 100 * 25
    (first,) = d.intents
    assert first.intent.symbol == "CIM PRC" and first.intent.limit_price == 24.97  # MM first, hits the bid
    assert d.state.hard_steps == 1 and d.state.hard_excess_notional == pytest.approx(excess, rel=1e-2)


def test_hard_steps_wait_for_the_interval_and_stop_at_ten():
    rules = engine_rules()
    v = view(portfolio(110), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True, hard=True))
    d = decide(v, rules, T0)
    v.state = d.state
    for record in d.records.values():
        record.status = "FILLED"
        record.filled_qty = record.qty
        v.put_record(record)
    v.session = session(T0 + 5 * NS, regime="CLOSE", soft=True, hard=True)
    again = decide(v, rules, T0 + 5 * NS)  # within hard_step_interval_s (10 s)
    assert [i for i in again.intents if i.intent.action == "NEW"] == []
    v.session = session(T0 + 11 * NS, regime="CLOSE", soft=True, hard=True)
    later = decide(v, rules, T0 + 11 * NS)
    assert [i.intent.action for i in later.intents] == ["NEW"] and later.state.hard_steps == 2
    v.state = later.state
    v.state.hard_steps = 10
    assert decide(v, rules, T0 + 30 * NS).intents == []


def test_hard_derisk_cancels_live_soft_orders_and_does_not_oversell():
    v = view(portfolio(110), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True, hard=True))
    v.state.mode = "SOFT_DERISK"
    soft = outstanding("soft-1", "SOFT_DERISK", "CIM PRC", "SELL", 1200, 25.00, bucket="MM_PURE",
                       classification="MM_LONG_DEC", issued_ns=T0 - 60 * NS, status="SUBMITTED")
    v.put_record(soft)
    d = decide(v, engine_rules(), T0)
    actions = [(i.intent.action, i.intent.symbol, i.intent.intent_type) for i in d.intents]
    assert ("CANCEL", "CIM PRC", "SOFT_DERISK") in actions
    # CIM PRC is fully covered by the order being cancelled: the hard step goes elsewhere.
    assert ("NEW", "CIM PRC", "HARD_DERISK") not in actions
    assert any(a == ("NEW", "NLY PRG", "HARD_DERISK") for a in actions)


def test_derisk_stops_at_the_target():
    v = view(portfolio(100), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True, hard=True))
    d = decide(v, engine_rules(), T0)
    assert d.state.mode != "HARD_DERISK" and [i for i in d.intents if i.intent.intent_type.endswith("DERISK")] == []


def test_live_soft_orders_cancelled_once_the_target_is_reached():
    v = view(portfolio(99.5), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True))
    v.state.mode = "SOFT_DERISK"
    v.state.latches = v.state.latches.__class__(window=True)  # 99.5 % is inside the exit band: mode held
    v.put_record(outstanding("soft-1", "SOFT_DERISK", "CIM PRB", "SELL", 300, 24.99, status="SUBMITTED"))
    d = decide(v, engine_rules(), T0)
    assert d.state.mode == "SOFT_DERISK"
    assert [(i.intent.action, i.intent.target_intent_key) for i in d.intents] == [("CANCEL", "soft-1")]


def test_cap_recovery_reduces_to_123_aggressively():
    v = view(portfolio(131), EQUITY, markets(), sess=session(T0, regime="EARLY"))
    d = decide(v, engine_rules(), T0)
    assert d.state.mode == "CAP_RECOVERY"
    cap = [i.intent for i in d.intents if i.intent.intent_type == "CAP_RECOVERY"]
    reduced = sum(i.qty * 25.0 for i in cap)
    assert 0.08 * EQUITY <= reduced <= 0.08 * EQUITY + 25  # 131 % -> 123 %, whole shares
    assert all(i.priority == 100 and i.classification.endswith("_DEC") for i in cap)
    assert [(i.symbol, i.side, i.limit_price) for i in cap] == [("CIM PRC", "SELL", 24.97)]  # hits the bid
    assert not any(i.intent.classification.endswith("_INC") for i in d.intents)


def test_mm_overnight_leftover_at_the_open():
    positions = {"CIM PRB": (4000, "LT", 25.0), "CIM PRC": (1400, "MM_PURE", 25.0)}  # MM = 17.5 % of 200k
    v = view(positions, EQUITY, markets(), sess=session(T0, regime="OPEN", minutes_to_close=380))
    v.state.trading_day = "2026-11-19"  # yesterday: the first evaluation of the new day
    d = decide(v, engine_rules(), T0)
    assert d.state.trading_day == DAY and d.state.mm_overnight_active
    (intent,) = [i.intent for i in d.intents if i.intent.intent_type == "MM_OVERNIGHT"]
    assert (intent.symbol, intent.side, intent.qty, intent.priority) == ("CIM PRC", "SELL", 200, 40)  # 2.5 % of 200k
    later = view(positions, EQUITY, markets(), sess=session(T0, regime="OPEN"))
    later.state = d.state
    later.state.mm_overnight_checked_day = DAY
    positions_small = {"CIM PRB": (4000, "LT", 25.0), "CIM PRC": (1000, "MM_PURE", 25.0)}
    small = view(positions_small, EQUITY, markets(), sess=session(T0, regime="OPEN"))
    small.state = d.state
    assert not decide(small, engine_rules(), T0).state.mm_overnight_active


def test_mm_overnight_not_triggered_when_first_seen_mid_day():
    positions = {"CIM PRC": (1400, "MM_PURE", 25.0)}
    v = view(positions, EQUITY, markets(), sess=session(T0, regime="MID"))
    v.state.trading_day = "2026-11-19"
    d = decide(v, engine_rules(), T0)
    assert not d.state.mm_overnight_active and [i for i in d.intents if i.intent.intent_type == "MM_OVERNIGHT"] == []


def test_early_close_day_follows_the_session_windows():
    """On an early-close day the session worker raises the windows at 12:45 / 12:58;
    the Brain acts on them exactly as at 15:45 / 15:58 (no clock arithmetic of its own)."""
    soft = session(T0, regime="CLOSE", soft=True, early_close=True, minutes_to_close=14)
    d = decide(view(portfolio(125), EQUITY, markets(), sess=soft), engine_rules(), T0)
    assert d.state.mode == "SOFT_DERISK"
    hard = session(T0, regime="CLOSE", soft=True, hard=True, early_close=True, minutes_to_close=1.5)
    d2 = decide(view(portfolio(125), EQUITY, markets(), sess=hard), engine_rules(), T0)
    assert d2.state.mode == "HARD_DERISK"
    regular_late = session(T0, regime="LATE", early_close=True, minutes_to_close=30)
    assert decide(view(portfolio(112), EQUITY, markets(), sess=regular_late), engine_rules(), T0).state.mode == "NORMAL"


def test_reductions_wait_for_positions_after_a_fill():
    """A fill was seen but not its position update: the gross is unknown, so live
    orders are kept and no new one is sized until the position arrives (or the
    settle timeout passes)."""
    v = view(portfolio(125), EQUITY, markets(), sess=session(T0, regime="CLOSE", soft=True))
    v.state.mode = "SOFT_DERISK"
    v.put_record(outstanding("soft-1", "SOFT_DERISK", "CIM PRC", "SELL", 600, 25.00, bucket="MM_PURE",
                             classification="MM_LONG_DEC", status="PARTIALLY_FILLED"))
    v.settling["CIM PRC"] = T0 - NS
    rules = engine_rules(strategies={"lt_band": {"enabled": False}})
    d = decide(v, rules, T0)
    assert d.intents == []  # the live order is kept as it is, nothing new
    assert d.trace["plan"]["awaiting_positions"] is True
    v.settling["CIM PRC"] = T0 - 11 * NS  # fill_settle_timeout_s (10 s) passed: plan again
    assert {i.intent.symbol for i in decide(v, rules, T0).intents if i.intent.action == "NEW"} == {"NLY PRG", "CIM PRB"}


def test_an_odd_lot_position_is_closed_whole_and_orders_respect_the_liquidity_cap():
    odd = holding("ODD", 50)
    plan_odd = plan([odd], excess=100_000.0)
    assert [c.qty for c in plan_odd.candidates] == [50]  # below the 100 minimum, but the whole position
    big = replace(holding("BIG", 5000), max_order_qty=200)
    assert [c.qty for c in plan([big], excess=100_000.0).candidates] == [200]


# --- issue 13: quiet quotes, reduce-only room --------------------------------------------------


def quiet_markets(now: int) -> dict:
    """Every quote unchanged for 10 minutes (quote_ts_ns) but confirmed by market data
    5 s ago (the envelope ts_ns), ingested as the handler does; truth ticks 30 s old."""
    from daemons.decision import guards
    from qe.contracts import L1

    rules = load_rules().plausibility
    out = {}
    for symbol, m in markets().items():
        quiet = Market(truth_price=m.truth_price, truth_ts_ns=now - 30 * NS, grpan=m.truth_price, feature_ts_ns=now - 30 * NS)
        l1 = L1(symbol=symbol, bid=m.bid, ask=m.ask, bid_size=500, ask_size=500, quote_ts_ns=now - 600 * NS)
        assert guards.apply_l1(quiet, l1, now - 5 * NS, now, rules) is None
        out[symbol] = quiet
    return out


def test_cap_recovery_acts_on_a_quiet_book_whose_quotes_are_confirmed():
    v = view(portfolio(135), EQUITY, quiet_markets(T0), sess=session(T0, regime="EARLY"))
    d = decide(v, engine_rules(), T0)
    assert d.state.mode == "CAP_RECOVERY"
    assert [i for i in d.intents if i.intent.intent_type == "CAP_RECOVERY"], d.skips
    assert "stale_l1" not in {s.reason for s in d.skips}


def test_hard_derisk_acts_on_a_quiet_book_and_stops_once_confirmations_stop():
    sess = session(T0, regime="CLOSE", hard=True, minutes_to_close=1.5)
    v = view(portfolio(110), EQUITY, quiet_markets(T0), sess=sess)
    d = decide(v, engine_rules(), T0)
    assert d.state.mode == "HARD_DERISK"
    assert [i for i in d.intents if i.intent.intent_type == "HARD_DERISK"]
    # No confirmation for more than l1_max_age_s (feed down, farm broken, halted):
    # not current any more, skipped as stale.
    later = T0 + 56 * NS
    v2 = view(portfolio(110), EQUITY, quiet_markets(T0), sess=session(later, regime="CLOSE", hard=True, minutes_to_close=1))
    d2 = decide(v2, engine_rules(), later)
    assert not [i for i in d2.intents if i.intent.intent_type == "HARD_DERISK" and i.intent.action == "NEW"]
    assert "stale_l1" in {s.reason for s in d2.skips}


def test_reduce_only_room_adds_the_orders_the_snapshot_does_not_include():
    """The issue's repro: short 5,472 with 369 working in the snapshot and 100 of the
    Brain's own not yet in it: room 5,003 (not 5,472 - max(369, 100) = 5,103)."""
    from daemons.decision.engine import _holding
    from daemons.decision.evaluation import Evaluation

    positions = {"NLY PRG": (-5472, "MM_PURE", 25.0)}
    v = view(positions, EQUITY, {"NLY PRG": market(24.96, 25.04, truth=24.99)}, open_orders={"NLY PRG": (369, 0)})
    v.exposure = v.good_exposure = replace(v.exposure, orders_through="1700000000000-7")
    v.put_record(outstanding("ours", "CAP_RECOVERY", "NLY PRG", "BUY", 100, 25.04, bucket="MM_PURE",
                             classification="MM_SHORT_DEC", status="SUBMITTED", last_order_id="1700000000000-9"))
    ev = Evaluation(v, engine_rules(), T0)
    assert ev.open_reducing_qty("NLY PRG", -5472) == 469
    holding = _holding(ev, "HARD_DERISK", "NLY PRG", v.positions["NLY PRG"])
    assert holding.available == 5003
    # Once the snapshot includes our order it is counted once, in the snapshot's 469.
    v.exposure = v.good_exposure = replace(v.exposure, orders_through="1700000000000-9",
                                           symbols={"NLY PRG": replace(v.exposure.symbols["NLY PRG"], open_buy=469)})
    assert Evaluation(v, engine_rules(), T0).open_reducing_qty("NLY PRG", -5472) == 469
