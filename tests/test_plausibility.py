"""The quote gate, the print gate and the collar (SPEC 9): pure rules, no Redis."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qe import config, plausibility
from qe.plausibility import PrintProblem, QuoteProblem

REPO = Path(__file__).resolve().parents[1]
RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml").plausibility


def verdict(bid, ask, reference=25.0, confirming=None, **sizes):
    return plausibility.quote_verdict(bid, ask, reference=reference, confirming_price=confirming, rules=RULES.quote, **sizes)


def test_normal_quote_is_plausible_with_its_mid():
    result = verdict(24.90, 25.10)
    assert result.plausible and result.mid == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("bid", "ask", "problem"),
    [
        (0.01, 999_999.0, QuoteProblem.WIDE_SPREAD),  # the stub quote
        (25.10, 24.90, QuoteProblem.CROSSED),
        (25.00, 25.00, QuoteProblem.CROSSED),  # locked: no mid to trust either
        (1.00, 25.10, QuoteProblem.WIDE_SPREAD),
        (28.00, 28.20, QuoteProblem.JUMP),  # 12 % away, no print confirms it
        (float("nan"), 25.10, QuoteProblem.NOT_FINITE),
        (float("inf"), None, QuoteProblem.NOT_FINITE),
        (-1.0, 25.10, QuoteProblem.NOT_FINITE),
        (0.01, None, QuoteProblem.JUMP),  # a one-sided stub bid
        (None, 999_999.0, QuoteProblem.JUMP),
    ],
)
def test_implausible_quotes(bid, ask, problem):
    result = verdict(bid, ask)
    assert result.problem is problem and result.mid is None and not result.plausible


def test_wide_needs_both_limits():
    # 60 cents on a $25 issue is 2.4 %: wide in cents only, so still plausible.
    assert verdict(24.70, 25.30).plausible
    # 6 % of a $5 issue is 30 cents: wide in percent only.
    assert verdict(4.85, 5.15, reference=5.0).plausible
    assert verdict(24.30, 25.70).problem is QuoteProblem.WIDE_SPREAD


def test_one_sided_quote_is_valid_without_mid():
    result = verdict(24.95, None)
    assert result.plausible and result.mid is None


def test_jump_confirmed_by_a_print_is_plausible():
    assert verdict(28.00, 28.20, confirming=28.05).plausible
    assert verdict(28.00, 28.20, confirming=25.00).problem is QuoteProblem.JUMP


def test_without_reference_only_shape_is_checked():
    assert verdict(28.00, 28.20, reference=None).plausible
    assert verdict(0.01, 999_999.0, reference=None).problem is QuoteProblem.WIDE_SPREAD


def test_absurd_size():
    assert verdict(24.9, 25.1, bid_size=10**300).problem is QuoteProblem.ABSURD_SIZE


def test_trusted_reference_order():
    assert plausibility.trusted_reference(25.1, 25.0, 24.9) == 25.1
    assert plausibility.trusted_reference(None, 25.0, 24.9) == 25.0
    assert plausibility.trusted_reference(None, None, 24.9) == 24.9
    assert plausibility.trusted_reference(math.nan, None, None) is None
    assert plausibility.trusted_reference(None, None, None) is None


def problem(price, size=100, age_s=1.0, reference=25.0, recent=()):
    return plausibility.print_problem(price, size, age_s=age_s, reference=reference, recent_excluded=recent, rules=RULES.prints)


def test_print_gate():
    assert problem(25.05) is None
    assert problem(0.01) is PrintProblem.FAR_FROM_REFERENCE
    assert problem(25.0, size=10**9) is PrintProblem.ABSURD_SIZE
    assert problem(25.0, age_s=10 * 86_400) is PrintProblem.TOO_OLD
    assert problem(math.nan) is PrintProblem.NOT_FINITE
    assert problem(30.0, reference=None) is None


def test_far_prints_that_agree_with_each_other_are_a_real_move():
    assert problem(29.0, recent=(29.0, 29.1)) is PrintProblem.FAR_FROM_REFERENCE  # two are not enough
    assert problem(29.0, recent=(29.0, 29.1, 28.9)) is None
    assert problem(29.0, recent=(0.01, 29.0, 29.1, 28.9)) is None  # only the last three count
    assert problem(29.0, recent=(29.0, 0.01, 28.9)) is PrintProblem.FAR_FROM_REFERENCE


def test_collar():
    assert plausibility.collar_bounds(25.0, 5) == (23.75, 26.25)
    assert plausibility.collar_bounds(24.99, 5) == (23.75, 26.23)  # rounded inward
    assert plausibility.within_collar(23.75, 25.0, 5)
    assert not plausibility.within_collar(23.74, 25.0, 5)
    assert not plausibility.within_collar(0.01, 25.0, 5)
    assert plausibility.clamp_to_collar(0.01, 25.0, 5) == 23.75
    assert plausibility.clamp_to_collar(999_999.0, 25.0, 5) == 26.25
    assert plausibility.clamp_to_collar(25.13, 25.0, 5) == 25.13


def test_one_change_per_episode():
    assert plausibility.episode_change("AGNCN", False, None) is None
    started = plausibility.episode_change("AGNCN", False, "wide_spread")
    assert started is not None and started.started and started.problem == "wide_spread"
    assert plausibility.episode_change("AGNCN", True, "jump") is None  # same episode
    ended = plausibility.episode_change("AGNCN", True, None)
    assert ended is not None and not ended.started
