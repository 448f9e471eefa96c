"""Execution's pure core: state machine, pre-trade checks, TTL, modify rule, rate."""

from __future__ import annotations

import dataclasses

import pytest

from daemons.execution import core
from qe.contracts import Intent
from qe.marks import Mark, MarkSource

S = 1_000_000_000
TTL = {"LT": 120, "MM": 60, "HARD_DERISK": 30, "CLOSE_EXIT": 15, "default": 90}
LIMITS = core.Limits(
    hard_cap_pct=130, max_order_notional=250_000, min_order_qty=100, liquidity_adv_divisor=1000, liquidity_min_shares=200,
    collar_pct=5,
)
REF = 24.85  # execution's trusted reference for CIM PRB in these tests (truth tick / GRPAN / trusted mid)
OPEN = core.Gate(account_ok=True, account_reason="paper DU1", halted=False, mode="NORMAL")


def intent(**overrides) -> Intent:
    base = dict(
        intent_id="i", intent_type="LT_BAND", symbol="CIM PRB", side="BUY", qty=200, order_type="LMT",
        limit_price=24.80, bucket="LT", classification="LT_LONG_INC", priority=20, ttl_s=600,
        created_ns=1_000 * S, risk_delta_gross_pct=0.5, reason="test",
    )
    base.update(overrides)
    return Intent(**base)


def record(**overrides) -> core.OrderRecord:
    base = core.record_for_intent(intent(), "intent:k", "qe-ref", expires_ns=1_120 * S, received_ns=1_000 * S)
    return dataclasses.replace(base, **overrides)


def view(positions=None, buys=None, sells=None, marks=None, equity=1_000_000.0) -> core.RiskView:
    positions, buys, sells = positions or {}, buys or {}, sells or {}
    marks = marks or {"CIM PRB": 25.0, "AGNCN": 25.0}
    total = sum(
        core.potential_notional(positions.get(s, 0), buys.get(s, 0), sells.get(s, 0), marks[s])
        for s in set(positions) | set(buys) | set(sells)
    )
    return core.RiskView(equity, positions, buys, sells, marks, total)


# --- TTL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "intent_type, bucket, regime, category, ttl_s",
    [
        ("LT_BAND", "LT", "MID", "LT", 120),
        ("MM_QUOTE", "MM_PURE", "MID", "MM", 60),
        ("HARD_DERISK", "LT", "CLOSE", "HARD_DERISK", 30),  # its own category wins over CLOSE
        ("SOFT_DERISK", "LT", "CLOSE", "CLOSE_EXIT", 15),
        ("SOFT_DERISK", "MM_PURE", "LATE", "MM", 60),
    ],
)
def test_ttl_by_category(intent_type, bucket, regime, category, ttl_s):
    assert core.ttl_category(intent_type, bucket, regime, TTL) == category
    classification = "LT_LONG_DEC" if bucket == "LT" else "MM_LONG_DEC"
    i = intent(intent_type=intent_type, bucket=bucket, classification=classification, side="SELL", ttl_s=600)
    assert core.expires_at_ns(i, regime, TTL, received_ns=i.created_ns) == i.created_ns + ttl_s * S


def test_intent_ttl_shorter_than_category_wins():
    i = intent(ttl_s=10)
    assert core.expires_at_ns(i, "MID", TTL, received_ns=i.created_ns) == i.created_ns + 10 * S


def test_ttl_runs_from_receipt_on_executions_clock_never_from_a_future_created_ns():
    received = 1_000 * S
    in_2100 = intent(ttl_s=10, created_ns=4_102_444_800 * S)
    assert core.expires_at_ns(in_2100, "MID", TTL, received_ns=received) == received + 10 * S
    r = core.record_for_intent(in_2100, "intent:2100", "qe-2100", core.expires_at_ns(in_2100, "MID", TTL, received), received)
    # The record's times are execution's own: a later modify is not held back "until 2100".
    assert (r.created_ns, r.last_price_change_ns, r.expires_ns) == (received, received, received + 10 * S)
    assert core.modify_decision(dataclasses.replace(r, status="SUBMITTED"), 24.70, received + 3 * S, 0.01, 2.5) == "apply"


def test_an_intent_that_waited_in_the_stream_is_as_old_as_it_says():
    # created_ns in the past can only shorten the life: an intent that waited 100 s while
    # execution was down does not get a fresh TTL at receipt.
    old = intent(ttl_s=30, created_ns=900 * S)
    assert core.expires_at_ns(old, "MID", TTL, received_ns=1_000 * S) == 930 * S


def test_unknown_category_uses_default():
    assert core.ttl_category("X", "LT", None, {"default": 90}) == "default"


# --- broker status state machine ----------------------------------------------------------------

@pytest.mark.parametrize(
    "start, ib_status, filled, expected",
    [
        ({}, "PreSubmitted", 0, "SUBMITTED"),
        ({}, "Submitted", 0, "SUBMITTED"),
        ({"status": "SUBMITTED"}, "Submitted", 100, "PARTIALLY_FILLED"),
        ({"status": "SUBMITTED"}, "PendingCancel", 0, "PENDING_CANCEL"),
        ({"status": "PENDING_CANCEL"}, "Submitted", 0, "PENDING_CANCEL"),
        ({"status": "SUBMITTED", "cancel_reason": "intent"}, "Cancelled", 0, "CANCELLED"),
        ({"status": "SUBMITTED", "cancel_reason": "ttl"}, "Cancelled", 0, "EXPIRED"),
        ({"last_error_code": 201, "last_error_text": "Order rejected"}, "Cancelled", 0, "REJECTED"),
        ({"status": "SUBMITTED"}, "Inactive", 0, "REJECTED"),
        ({"status": "SUBMITTED"}, "Filled", 200, "FILLED"),
    ],
)
def test_broker_status_transitions(start, ib_status, filled, expected):
    new = core.on_broker_status(record(**start), ib_status, filled)
    assert new is not None and new.status == expected


def test_rejection_carries_code_and_text():
    new = core.on_broker_status(record(last_error_code=201, last_error_text="Order rejected - margin"), "Cancelled", 0)
    assert (new.reject_code, new.reject_reason) == (201, "Order rejected - margin")


@pytest.mark.parametrize("terminal", ["FILLED", "CANCELLED", "REJECTED", "EXPIRED"])
def test_terminal_states_are_final(terminal):
    assert core.on_broker_status(record(status=terminal), "Submitted", 0) is None


def test_same_status_again_is_no_change():
    submitted = core.on_broker_status(record(), "Submitted", 0)
    assert core.on_broker_status(submitted, "Submitted", 0) is None
    assert core.on_broker_status(submitted, "PreSubmitted", 0) is None


def test_unknown_ib_status_is_ignored():
    assert core.on_broker_status(record(), "SomethingNew", 0) is None


def test_errors_alone_never_change_status():
    # ib_async marks an order Cancelled locally on any error; we only remember the error.
    errored = core.on_error(record(status="SUBMITTED"), 202, "Order Canceled - reason:")
    assert errored.status == "SUBMITTED" and errored.last_error_code == 202


def test_fills_accumulate_and_average():
    r = core.on_fill(record(status="SUBMITTED", qty=300), "e1", 100, 24.80)
    assert (r.status, r.filled_qty, r.remaining_qty) == ("PARTIALLY_FILLED", 100, 200)
    assert core.on_fill(r, "e1", 100, 24.80) is None  # the same execId again
    r = core.on_fill(r, "e2", 200, 24.83)
    assert (r.status, r.filled_qty, r.remaining_qty) == ("FILLED", 300, 0)
    assert r.avg_fill_price == pytest.approx((100 * 24.80 + 200 * 24.83) / 300)
    assert core.OrderRecord.from_json(r.to_json()) == r


def test_fill_after_terminal_filled_still_counts():
    r = core.on_fill(record(status="FILLED", qty=200, filled_qty=100, avg_fill_price=24.8, exec_ids=("e1",)), "e2", 100, 24.9)
    assert (r.status, r.filled_qty) == ("FILLED", 200)


def test_fill_racing_a_cancel_wins_when_complete():
    r = core.on_fill(record(status="CANCELLED", qty=200), "e1", 200, 24.9)
    assert r.status == "FILLED"


# --- modify rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "new_price, elapsed_s, expected",
    [
        (24.81, 3.0, "apply"),
        (24.81, 2.0, "wait"),
        (24.805, 3.0, "ignore"),  # less than a cent
        (24.80, 9.0, "ignore"),
        (24.70, 2.5, "apply"),
    ],
)
def test_modify_needs_a_cent_and_2_5_seconds(new_price, elapsed_s, expected):
    r = record(status="SUBMITTED", last_price_change_ns=1_000 * S)
    now = 1_000 * S + int(elapsed_s * S)
    assert core.modify_decision(r, new_price, now, 0.01, 2.5) == expected


def test_modify_of_finished_or_cancelling_order_is_ignored():
    for status in ("FILLED", "PENDING_CANCEL", "CANCELLED"):
        assert core.modify_decision(record(status=status), 25.5, 10**12 * S, 0.01, 2.5) == "ignore"


# --- pre-trade checks ------------------------------------------------------------------------------

def test_clean_increase_passes():
    assert core.check_new_order(intent(), view(positions={"CIM PRB": 1000}), LIMITS, OPEN, adv=61_000, reference=REF) is None


@pytest.mark.parametrize(
    "gate, rule",
    [
        (core.Gate(False, "configured for paper but connected to U123", False, "NORMAL"), "account_interlock"),
        (core.Gate(True, "", True, "NORMAL"), "halted"),
        (core.Gate(True, "", False, "SOFT_DERISK"), "reduce_only"),
        (core.Gate(True, "", False, "HARD_DERISK"), "reduce_only"),
        (core.Gate(True, "", False, "CAP_RECOVERY"), "reduce_only"),
    ],
)
def test_gates_refuse_increases(gate, rule):
    assert core.check_new_order(intent(), view(), LIMITS, gate, adv=61_000, reference=REF).rule == rule


def test_decreases_pass_in_derisk_modes():
    sell = intent(side="SELL", classification="LT_LONG_DEC", qty=500, intent_type="HARD_DERISK")
    gate = core.Gate(True, "", False, "HARD_DERISK")
    assert core.check_new_order(sell, view(positions={"CIM PRB": 1000}), LIMITS, gate, adv=1_000_000, reference=REF) is None


def test_halted_refuses_even_decreases():
    sell = intent(side="SELL", classification="LT_LONG_DEC", qty=500)
    assert core.check_new_order(sell, view(positions={"CIM PRB": 1000}), LIMITS, core.Gate(True, "", True, "HALTED"), 61_000, reference=REF).rule == "halted"


def test_decrease_never_crosses_zero_counting_working_orders():
    sell = intent(side="SELL", classification="LT_LONG_DEC", qty=600)
    rejection = core.check_new_order(sell, view(positions={"CIM PRB": 1000}, sells={"CIM PRB": 500}), LIMITS, OPEN, 61_000, reference=REF)
    assert rejection.rule == "reduce_only" and "cross zero" in rejection.reason
    cover = intent(side="BUY", classification="LT_SHORT_DEC", qty=300)
    assert core.check_new_order(cover, view(positions={"CIM PRB": -300}), LIMITS, OPEN, 1_000_000, reference=REF) is None
    assert core.check_new_order(cover, view(positions={"CIM PRB": 300}), LIMITS, OPEN, 61_000, reference=REF).rule == "reduce_only"


def test_min_order_qty_except_closing_an_odd_lot():
    assert core.check_new_order(intent(qty=50), view(), LIMITS, OPEN, 61_000, reference=REF).rule == "min_order_qty"
    close = intent(side="SELL", classification="LT_LONG_DEC", qty=50)
    assert core.check_new_order(close, view(positions={"CIM PRB": 50}), LIMITS, OPEN, 61_000, reference=REF) is None


def test_liquidity_cap_is_adv_over_1000_with_floor_200():
    assert core.check_new_order(intent(qty=300), view(), LIMITS, OPEN, adv=500_000, reference=REF) is None
    assert core.check_new_order(intent(qty=300), view(), LIMITS, OPEN, adv=100_000, reference=REF).rule == "liquidity_cap"
    assert core.check_new_order(intent(qty=200), view(), LIMITS, OPEN, adv=10_000, reference=REF) is None


def test_max_order_notional():
    big = intent(qty=20_000, limit_price=24.80)
    assert core.check_new_order(big, view(), LIMITS, OPEN, adv=10**9, reference=REF).rule == "max_order_notional"


def test_hard_cap_counts_positions_working_orders_and_this_order():
    # 1,000,000 equity; 1,280,000 potential already (51,200 shares at 25).
    positions = {"CIM PRB": 40_000}
    buys = {"CIM PRB": 11_200}
    ok = intent(qty=400, limit_price=25.0)  # +10,000 -> 129.0 %
    too_much = intent(qty=2_000, limit_price=25.0)  # +50,000 -> 133.0 %
    v = view(positions=positions, buys=buys)
    assert core.check_new_order(ok, v, LIMITS, OPEN, adv=10**9, reference=REF) is None
    rejection = core.check_new_order(too_much, v, LIMITS, OPEN, adv=10**9, reference=REF)
    assert rejection.rule == "hard_cap" and "133.00% > hard cap 130%" in rejection.reason


def test_hard_cap_lets_reducing_orders_through_above_the_cap():
    sell = intent(side="SELL", classification="LT_LONG_DEC", qty=1000, limit_price=25.0)
    v = view(positions={"CIM PRB": 60_000})  # 150 %
    assert core.check_new_order(sell, v, LIMITS, OPEN, adv=10**9, reference=REF) is None


def test_the_issues_repro_a_position_outside_the_universe_counts_at_its_fallback_and_blocks_increases():
    """40,000 sh @ $25 priced by the market plus 14,000 sh with no market price (average
    cost $25): 135 % gross, not 100 %; a BUY is refused, a decrease still goes."""
    marks = {
        "CIM PRB": Mark(25.0, MarkSource.L1_MID),
        "ZZZ PRA": Mark(25.0, MarkSource.FALLBACK, "no market price yet: the broker's average cost"),
    }
    v = core.risk_view(1_000_000.0, {"CIM PRB": 40_000, "ZZZ PRA": 14_000}, {}, {}, marks)
    assert v.potential_gross_notional == 1_350_000.0 and v.unpriced.keys() == {"ZZZ PRA"}
    rejection = core.check_new_order(intent(qty=200, limit_price=25.0), v, LIMITS, OPEN, adv=10**9, reference=REF)
    assert rejection.rule == "unpriced_positions" and "ZZZ PRA" in rejection.reason
    sell = intent(side="SELL", classification="LT_LONG_DEC", qty=1000, limit_price=25.0)
    assert core.check_new_order(sell, v, LIMITS, OPEN, adv=10**9, reference=REF) is None
    # Priced by the market: the hard cap decides (135 % + the order > 130 %).
    priced = core.risk_view(1_000_000.0, {"CIM PRB": 40_000, "ZZZ PRA": 14_000}, {}, {},
                            {**marks, "ZZZ PRA": Mark(25.0, MarkSource.TRUTH_TICK)})
    assert core.check_new_order(intent(qty=200, limit_price=25.0), priced, LIMITS, OPEN, adv=10**9, reference=REF).rule == "hard_cap"


def test_a_symbol_without_any_price_is_unpriced_not_zero():
    v = core.risk_view(1_000_000.0, {"CIM PRB": 1000}, {"ZZZ PRA": 500}, {}, {"CIM PRB": Mark(25.0, MarkSource.L1_MID),
                                                                             "ZZZ PRA": Mark(None, MarkSource.NONE, "no price")})
    assert v.unpriced == {"ZZZ PRA": "no price"}
    assert core.check_new_order(intent(), v, LIMITS, OPEN, adv=10**9, reference=REF).rule == "unpriced_positions"


def test_no_equity_means_no_added_exposure():
    rejection = core.check_new_order(intent(), view(equity=None), LIMITS, OPEN, adv=10**9, reference=REF)
    assert rejection.rule == "hard_cap" and "equity unknown" in rejection.reason


def modify(price: float, target: core.OrderRecord | None = None, qty: int | None = None, gate=OPEN, adv=61_000, reference=REF):
    target = target or record(status="SUBMITTED")
    return core.check_modify(target, price, target.qty if qty is None else qty, LIMITS, gate, adv, reference=reference)


def test_modify_gate():
    assert modify(24.90) is None
    assert modify(24.90, gate=core.Gate(True, "", True, "HALTED")).rule == "halted"
    assert modify(24.90, gate=core.Gate(False, "configured for paper but connected to U123", False, "NORMAL")).rule == "account_interlock"


# --- price collar (SPEC 9), on new orders and on modifies -----------------------------------------------

@pytest.mark.parametrize(
    "side, classification, price",
    [("SELL", "LT_LONG_DEC", 0.01), ("BUY", "LT_LONG_INC", 2400.00), ("SELL", "LT_LONG_DEC", 23.60), ("BUY", "LT_LONG_INC", 26.10)],
)
def test_a_new_order_outside_the_collar_is_refused_both_ways(side, classification, price):
    # 5 % around 24.85: 23.61 .. 26.09. A decrease is not exempt: selling at $0.01 moves money too.
    order = intent(side=side, classification=classification, limit_price=price)
    rejection = core.check_new_order(order, view(positions={"CIM PRB": 1000}), LIMITS, OPEN, 61_000, reference=REF)
    assert rejection.rule == "collar"
    assert f"price {price:.2f} outside 23.61..26.09" in rejection.reason and "trusted reference 24.85" in rejection.reason


@pytest.mark.parametrize("price", [23.61, 26.09, 24.85])
def test_a_price_on_the_collar_edge_passes(price):
    order = intent(side="SELL", classification="LT_LONG_DEC", limit_price=price)
    assert core.check_new_order(order, view(positions={"CIM PRB": 1000}), LIMITS, OPEN, 61_000, reference=REF) is None


@pytest.mark.parametrize("classification, side", [("LT_LONG_INC", "BUY"), ("LT_LONG_DEC", "SELL")])
def test_without_a_trusted_reference_no_price_can_be_checked_and_nothing_is_sent(classification, side):
    order = intent(side=side, classification=classification, limit_price=24.80)
    rejection = core.check_new_order(order, view(positions={"CIM PRB": 1000}), LIMITS, OPEN, 61_000, reference=None)
    assert rejection.rule == "collar" and "no trusted reference for CIM PRB" in rejection.reason


def test_a_market_order_has_no_price_to_collar_and_is_refused():
    order = intent(side="SELL", classification="LT_LONG_DEC", order_type="MKT", limit_price=None)
    rejection = core.check_new_order(order, view(positions={"CIM PRB": 1000}), LIMITS, OPEN, 61_000, reference=REF)
    assert rejection.rule == "collar" and "no limit price" in rejection.reason


@pytest.mark.parametrize("price", [999_999.99, 0.01, 26.10, 23.60])
def test_a_modify_outside_the_collar_is_refused(price):
    rejection = modify(price)
    assert rejection.rule == "collar" and "outside 23.61..26.09" in rejection.reason
    assert modify(24.90, reference=None).rule == "collar"  # nothing to check against


def test_a_modify_is_held_to_the_order_notional_and_the_liquidity_cap():
    # 10,000 shares at 24.85 = 248,500 (under 250,000) with ADV 10M; the modify to 25.10
    # (inside the collar) makes it 251,000.
    big = record(status="SUBMITTED", qty=10_000, limit_price=24.85)
    assert modify(25.00, target=big, adv=10_000_000) is None
    rejection = modify(25.10, target=big, adv=10_000_000)
    assert rejection.rule == "max_order_notional" and "251,000.00 above 250,000.00" in rejection.reason
    # The same order after the universe's ADV fell to 61,000 (cap 200 shares): refused.
    rejection = modify(24.90, target=big, adv=61_000)
    assert rejection.rule == "liquidity_cap" and "qty 10000 above" in rejection.reason


def test_a_modify_changes_the_price_only():
    assert modify(24.90, qty=5_000).rule == "modify_qty"


def test_a_refused_modify_is_published_under_its_own_ref_never_as_the_live_order():
    target = record(status="SUBMITTED", broker_order_id=7, filled_qty=0)
    denial = core.modify_denial(target, "modify:k:1", "qe-mod", 999_999.99, "collar: ...", 2_000 * S)
    assert (denial.order_ref, denial.intent_key, denial.status, denial.broker_order_id) == ("qe-mod", "modify:k:1", "REJECTED", None)
    assert (denial.reject_code, denial.reject_reason, denial.limit_price) == (None, "collar: ...", 999_999.99)
    assert target.status == "SUBMITTED"


@pytest.mark.parametrize("equity", [float("nan"), float("inf"), -1.0, 0.0, None])
def test_equity_that_is_not_a_positive_finite_number_blocks_increases(equity):
    rejection = core.check_new_order(intent(), view(equity=equity), LIMITS, OPEN, adv=61_000, reference=REF)
    if equity == float("inf"):
        assert rejection.rule == "hard_cap"
    else:
        assert rejection.rule == "hard_cap" and "equity unknown" in rejection.reason


@pytest.mark.parametrize(
    "qty, avg_cost, problem",
    [
        (float("inf"), 24.0, "not a whole number"),
        (float("nan"), 24.0, "not a whole number"),
        (100.5, 24.0, "not a whole number"),
        (1e400, 24.0, "not a whole number"),
        (-1e12, 24.0, "beyond 100,000,000 shares"),
        (3200.0, float("nan"), "average cost nan"),
    ],
)
def test_absurd_broker_positions_are_named(qty, avg_cost, problem):
    assert problem in core.broker_position_problem(qty, avg_cost, 100_000_000)


def test_sane_broker_positions_and_flat_ones_pass():
    assert core.broker_position_problem(3200.0, 24.65, 100_000_000) is None
    assert core.broker_position_problem(0.0, 0.0, 100_000_000) is None  # flat, not a bad price
    assert core.usable_equity(float("nan")) is None and core.usable_equity(1e6) == 1e6


# --- account interlock --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "account, mode, allow, ok",
    [
        ("DU1234567", "paper", frozenset(), True),
        ("U1234567", "paper", frozenset(), False),
        ("DU1234567", "live", frozenset({"DU1234567"}), False),
        ("U1234567", "live", frozenset(), False),
        ("U1234567", "live", frozenset({"U1234567"}), True),
        (None, "paper", frozenset(), False),
    ],
)
def test_account_interlock(account, mode, allow, ok):
    assert core.account_interlock(account, mode, allow)[0] is ok


# --- token bucket ---------------------------------------------------------------------------------------

def test_token_bucket_holds_the_rate():
    bucket = core.TokenBucket(rate_per_s=40, burst=5)
    sent = sum(bucket.take(0.0) for _ in range(10))
    assert sent == 5  # the burst
    taken = [bucket.take(t / 1000) for t in range(1, 1001)]  # one try per ms for a second
    assert 38 <= sum(taken) <= 41
    assert bucket.wait_s() > 0 or bucket.tokens >= 1
