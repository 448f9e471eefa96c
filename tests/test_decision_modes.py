"""Mode machine: every rule of SPEC 6 (first match wins) and every hysteresis edge."""

from __future__ import annotations

from dataclasses import replace

import pytest

from daemons.decision.modes import Latches, ModeInputs, Thresholds, blocked_buckets, derive_mode
from daemons.decision.rules import RegimeRule

TH = Thresholds()  # 130 / 123 / 100, bands 1.0 and 2.0
REGIMES = {
    "OPEN": RegimeRule(125, False),
    "EARLY": RegimeRule(125, False),
    "MID": RegimeRule(120, True),
    "LATE": RegimeRule(115, True),
    "CLOSE": RegimeRule(100, True),
}


def inputs(gross, potential=None, *, regime="MID", soft=False, hard=False, halted=False):
    return ModeInputs(
        halted=halted,
        gross_pct=gross,
        potential_pct=gross if potential is None else potential,
        soft_window=soft,
        hard_window=hard,
        regime=regime,
        regime_rule=REGIMES.get(regime),
    )


def unknown(gross, why, **kw):
    """The current snapshot is unusable (`why`); `gross` is the last good one's, or None."""
    return replace(inputs(gross, **kw), exposure_unknown=why)


# (name, inputs, latches before, previous mode, expected mode, expected rule)
CASES = [
    ("halt beats everything", inputs(140, halted=True, hard=True), Latches(), "NORMAL", "HALTED", "operator_halt"),
    ("gross at the cap", inputs(130.0), Latches(), "NORMAL", "CAP_RECOVERY", "hard_cap"),
    ("gross just below the cap", inputs(129.99, 110), Latches(), "NORMAL", "NORMAL", "normal"),
    ("cap beats the hard window", inputs(131, hard=True, soft=True), Latches(), "NORMAL", "CAP_RECOVERY", "hard_cap"),
    ("cap latch holds above 123", inputs(123.5, regime="EARLY"), Latches(cap=True), "CAP_RECOVERY", "CAP_RECOVERY", "cap_recovery_hold"),
    ("cap latch releases at 123", inputs(123.0, 100), Latches(cap=True), "CAP_RECOVERY", "NORMAL", "normal"),
    ("hard window over target", inputs(100.5, hard=True, soft=True, regime="CLOSE"), Latches(), "SOFT_DERISK", "HARD_DERISK", "hard_window"),
    ("hard window at target", inputs(100.0, 99, hard=True, soft=True, regime="CLOSE"), Latches(), "NORMAL", "NORMAL", "normal"),
    ("soft window over target", inputs(105, soft=True, regime="CLOSE"), Latches(), "NORMAL", "SOFT_DERISK", "soft_window"),
    ("soft window latch holds inside the band", inputs(99.5, 99.5, soft=True, regime="CLOSE"), Latches(window=True),
     "SOFT_DERISK", "SOFT_DERISK", "soft_window"),
    ("soft window latch releases below the band", inputs(98.9, 98.9, soft=True, regime="CLOSE"), Latches(window=True), "SOFT_DERISK", "NORMAL", "normal"),
    ("window latch ends with the window", inputs(105, 105, regime="LATE"), Latches(window=True), "SOFT_DERISK", "NORMAL", "normal"),
    ("potential over MID tolerance: de-risk", inputs(110, 121, regime="MID"), Latches(), "NORMAL", "SOFT_DERISK", "tolerance_derisk"),
    ("potential over EARLY tolerance: throttle", inputs(110, 126, regime="EARLY"), Latches(), "NORMAL", "THROTTLE", "tolerance_throttle"),
    ("potential over OPEN tolerance: throttle", inputs(110, 125.5, regime="OPEN"), Latches(), "NORMAL", "THROTTLE", "tolerance_throttle"),
    ("potential at tolerance: normal", inputs(110, 120, regime="MID"), Latches(), "NORMAL", "NORMAL", "normal"),
    ("tolerance latch holds within the band", inputs(110, 118.5, regime="MID"), Latches(tolerance=True), "SOFT_DERISK", "SOFT_DERISK", "tolerance_derisk"),
    ("tolerance latch releases at tolerance - band", inputs(110, 118.0, regime="MID"), Latches(tolerance=True), "SOFT_DERISK", "NORMAL", "normal"),
    ("throttle latch holds within the band", inputs(110, 124, regime="EARLY"), Latches(tolerance=True), "THROTTLE", "THROTTLE", "tolerance_throttle"),
    ("regime moves to LATE: lower tolerance", inputs(110, 116, regime="LATE"), Latches(), "NORMAL", "SOFT_DERISK", "tolerance_derisk"),
    ("throttle becomes de-risk when the regime allows it", inputs(110, 124, regime="MID"), Latches(tolerance=True),
     "THROTTLE", "SOFT_DERISK", "tolerance_derisk"),
    ("no exposure keeps a de-risk mode", inputs(None, None), Latches(), "SOFT_DERISK", "SOFT_DERISK", "exposure_unknown"),
    ("no exposure in the hard window keeps HARD_DERISK", inputs(None, None, hard=True, soft=True, regime="CLOSE"),
     Latches(window=True), "HARD_DERISK", "HARD_DERISK", "exposure_unknown"),
    ("no exposure is never NORMAL", inputs(None, None), Latches(), "NORMAL", "THROTTLE", "exposure_unknown"),
    ("no exposure after a halt is lifted: throttle", inputs(None, None), Latches(), "HALTED", "THROTTLE", "exposure_unknown"),
    ("unknown exposure, last good snapshot in the hard window", unknown(125, "gross_pct nan", hard=True, soft=True,
     regime="CLOSE"), Latches(), "NORMAL", "HARD_DERISK", "hard_window"),
    ("unknown exposure, last good snapshot within limits: throttle, not normal", unknown(90, "gross_pct -5.0"), Latches(),
     "NORMAL", "THROTTLE", "exposure_unknown"),
    ("halt beats unknown exposure", unknown(None, "gross_pct nan", halted=True), Latches(), "NORMAL", "HALTED", "operator_halt"),
]


@pytest.mark.parametrize("name, given, latches, previous, mode, rule", CASES, ids=[c[0] for c in CASES])
def test_mode_rules(name, given, latches, previous, mode, rule):
    result = derive_mode(given, latches, previous, TH)
    assert (result.mode, result.rule) == (mode, rule)
    assert result.reason
    if rule == "exposure_unknown" or (given.exposure_unknown and mode != "HALTED"):
        assert "exposure unknown" in result.reason and result.numbers["exposure_unknown"]
    assert "gross_pct" in result.numbers and "potential_gross_pct" in result.numbers


def test_cap_hysteresis_walk():
    """130 enters, 125 holds, 123.01 holds, 123 releases, 129.9 does not re-enter."""
    latches, mode = Latches(), "NORMAL"
    walk = [(129.9, "NORMAL"), (130.0, "CAP_RECOVERY"), (125.0, "CAP_RECOVERY"), (123.01, "CAP_RECOVERY"),
            (123.0, "NORMAL"), (129.9, "NORMAL"), (130.5, "CAP_RECOVERY")]
    for gross, expected in walk:
        result = derive_mode(inputs(gross, 100, regime="EARLY"), latches, mode, TH)
        assert result.mode == expected, (gross, result)
        latches, mode = result.latches, result.mode


def test_halted_still_tracks_the_cap_latch():
    result = derive_mode(inputs(131, halted=True), Latches(), "NORMAL", TH)
    assert result.mode == "HALTED" and result.latches.cap
    resumed = derive_mode(inputs(126, 100, regime="EARLY"), result.latches, "HALTED", TH)
    assert resumed.mode == "CAP_RECOVERY" and resumed.rule == "cap_recovery_hold"


def test_transition_numbers_name_the_cause():
    result = derive_mode(inputs(131.25), Latches(), "NORMAL", TH)
    assert result.numbers["gross_pct"] == 131.25
    assert result.numbers["hard_cap_pct"] == 130.0 and result.numbers["cap_recovery_target_pct"] == 123.0
    assert "131.25" in result.reason


def test_bucket_over_max_is_a_flag_not_a_mode():
    assert blocked_buckets({"LT": (91.0, 90.0), "MM_PURE": (29.0, 30.0)}) == {"LT": {"current_pct": 91.0, "max_pct": 90.0}}
    assert blocked_buckets({"LT": (90.0, 90.0)}) == {}
    assert derive_mode(inputs(110, 110, regime="EARLY"), Latches(), "NORMAL", TH).mode == "NORMAL"


def test_the_strategies_margin_must_exceed_the_tolerance_band():
    """Strategies stop adding at tolerance - margin, the tolerance rule releases at
    tolerance - band: a margin inside the band would let the two fight (issue 13)."""
    from pydantic import ValidationError

    from tests.support.brain import load_rules

    rules = load_rules()
    assert rules.strategies.tolerance_margin_pct > rules.decision.tolerance_exit_band_pct
    for margin, band in ((2.0, 2.0), (1.5, 2.0), (0.0, 0.0)):
        with pytest.raises(ValidationError, match="tolerance_margin_pct"):
            load_rules(strategies={"tolerance_margin_pct": margin}, decision={"tolerance_exit_band_pct": band})
    assert load_rules(strategies={"tolerance_margin_pct": 2.5}).strategies.tolerance_margin_pct == 2.5
    with pytest.raises(ValidationError):
        load_rules(strategies={"tolerance_margin_pct": float("nan")})
