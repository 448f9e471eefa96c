"""The mode machine (SPEC 6, Decision modes): a pure function of plain inputs.

Rules, first match wins:
  1. operator halt                                   -> HALTED
  2. current gross >= hard cap (130)                 -> CAP_RECOVERY, held until gross <= 123
  3. hard window and gross > target (100)            -> HARD_DERISK
  4. soft window and gross > target                  -> SOFT_DERISK
  5. potential > regime tolerance                    -> SOFT_DERISK where the regime allows
                                                        de-risk, else THROTTLE
  6. otherwise                                       -> NORMAL (a bucket over its max only
                                                        blocks increases in that bucket)
Unknown exposure (none, in error, NaN/negative/missing numbers) is never NORMAL:
see derive_mode.

Hysteresis: every rule that can flap is a latch. It is set when its entry
condition holds and released only when the measure is back below a lower
threshold: CAP_RECOVERY at the cap-recovery target (123), the de-risk windows at
target - window_exit_band_pct, the tolerance rule at tolerance -
tolerance_exit_band_pct. The latches are part of the persisted state, so a
restarted Brain derives the same mode from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from qe.contracts import REDUCE_ONLY_MODES

from .rules import RegimeRule

DERISK_MODES = REDUCE_ONLY_MODES  # the de-risk modes are exactly the reduce-only ones (qe.contracts)
# Severity of the alert announcing a transition *into* each mode.
MODE_SEVERITY = {
    "NORMAL": "info",
    "THROTTLE": "warning",
    "SOFT_DERISK": "warning",
    "HARD_DERISK": "error",
    "CAP_RECOVERY": "critical",
    "HALTED": "critical",
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    hard_cap_pct: float = 130.0
    cap_recovery_target_pct: float = 123.0
    derisk_target_pct: float = 100.0
    window_exit_band_pct: float = 1.0
    tolerance_exit_band_pct: float = 2.0


@dataclass(frozen=True, slots=True)
class Latches:
    cap: bool = False  # CAP_RECOVERY entered and gross not yet back to the recovery target
    window: bool = False  # a de-risk window rule fired and gross not yet below target - band
    tolerance: bool = False  # the tolerance rule fired and potential not yet below tolerance - band


@dataclass(frozen=True, slots=True)
class ModeInputs:
    halted: bool
    gross_pct: float | None  # None: no usable exposure snapshot (equity <= 0, none yet)
    potential_pct: float | None  # the Brain's potential gross (snapshot + unacknowledged intents)
    soft_window: bool
    hard_window: bool
    regime: str | None
    regime_rule: RegimeRule | None
    # Why the current exposure is unknown (None: known). With a last good snapshot
    # still usable for de-risk, gross_pct is that snapshot's; otherwise gross_pct is None.
    exposure_unknown: str | None = None


@dataclass(frozen=True, slots=True)
class ModeResult:
    mode: str
    rule: str  # machine-readable name of the rule that decided
    reason: str  # one line for the operator
    numbers: dict[str, Any] = field(default_factory=dict)
    latches: Latches = Latches()


def derive_mode(inputs: ModeInputs, latches: Latches, previous_mode: str, th: Thresholds) -> ModeResult:
    """The mode for these inputs, given the latches carried from the previous evaluation.

    Unknown is not zero: with the exposure unknown the mode is never NORMAL "within
    every limit". Without any usable gross a de-risk mode in force is kept (its
    latches too) and anything else becomes THROTTLE; with a last good snapshot the
    rules run on it, and NORMAL becomes THROTTLE."""
    result = _derive(inputs, latches, previous_mode, th)
    why = inputs.exposure_unknown
    if (why is None and inputs.gross_pct is not None) or inputs.halted:
        return result
    why = why or "no usable exposure snapshot"
    numbers = {**result.numbers, "exposure_unknown": why}
    if inputs.gross_pct is None:
        mode = previous_mode if previous_mode in DERISK_MODES else "THROTTLE"
        reason = f"exposure unknown ({why}): no risk increase; " + (
            f"{mode} kept" if mode == previous_mode else "no gross to judge the limits by")
        return ModeResult(mode, "exposure_unknown", reason, numbers, result.latches)
    if result.mode == "NORMAL":
        reason = f"exposure unknown ({why}): no risk increase (last good snapshot within every limit)"
        return ModeResult("THROTTLE", "exposure_unknown", reason, numbers, result.latches)
    reason = f"{result.reason} (exposure unknown: {why}; judged on the last good snapshot)"
    return replace(result, reason=reason, numbers=numbers)


def _derive(inputs: ModeInputs, latches: Latches, previous_mode: str, th: Thresholds) -> ModeResult:
    gross, potential = inputs.gross_pct, inputs.potential_pct
    numbers: dict[str, Any] = {
        "gross_pct": _round(gross),
        "potential_gross_pct": _round(potential),
        "regime": inputs.regime,
        "soft_window": inputs.soft_window,
        "hard_window": inputs.hard_window,
    }
    latches = _update_latches(inputs, latches, th)

    if inputs.halted:
        return ModeResult("HALTED", "operator_halt", "operator halt", numbers, latches)
    if gross is None:
        # Without a usable exposure snapshot no numeric rule can be judged (derive_mode
        # turns this into THROTTLE or the de-risk mode in force).
        return ModeResult(previous_mode, "no_exposure", "no usable exposure snapshot", numbers, latches)

    if latches.cap:
        numbers.update(hard_cap_pct=th.hard_cap_pct, cap_recovery_target_pct=th.cap_recovery_target_pct)
        if gross >= th.hard_cap_pct:
            reason = f"gross {gross:.2f}% >= hard cap {th.hard_cap_pct:g}%"
            return ModeResult("CAP_RECOVERY", "hard_cap", reason, numbers, latches)
        reason = f"gross {gross:.2f}% still above cap-recovery target {th.cap_recovery_target_pct:g}%"
        return ModeResult("CAP_RECOVERY", "cap_recovery_hold", reason, numbers, latches)

    if latches.window:
        numbers.update(target_pct=th.derisk_target_pct, exit_below_pct=th.derisk_target_pct - th.window_exit_band_pct)
        if inputs.hard_window:
            reason = f"hard de-risk window and gross {gross:.2f}% > target {th.derisk_target_pct:g}%"
            return ModeResult("HARD_DERISK", "hard_window", reason, numbers, latches)
        if gross > th.derisk_target_pct:
            reason = f"soft de-risk window and gross {gross:.2f}% > target {th.derisk_target_pct:g}%"
        else:
            reason = (f"soft de-risk window: gross {gross:.2f}% held until below "
                      f"{th.derisk_target_pct - th.window_exit_band_pct:g}% (hysteresis)")
        return ModeResult("SOFT_DERISK", "soft_window", reason, numbers, latches)

    if latches.tolerance and inputs.regime_rule is not None and potential is not None:
        tolerance = inputs.regime_rule.tolerance_pct
        numbers.update(tolerance_pct=tolerance, exit_below_pct=tolerance - th.tolerance_exit_band_pct)
        if potential > tolerance:
            text = f"potential gross {potential:.2f}% over {inputs.regime} tolerance {tolerance:g}%"
        else:
            text = (f"potential gross {potential:.2f}% held until below {inputs.regime} tolerance {tolerance:g}% "
                    f"- {th.tolerance_exit_band_pct:g} (hysteresis)")
        if inputs.regime_rule.derisk_allowed:
            return ModeResult("SOFT_DERISK", "tolerance_derisk", text, numbers, latches)
        return ModeResult("THROTTLE", "tolerance_throttle", text + " (no de-risk in this regime)", numbers, latches)

    if inputs.regime is None:
        # No session yet: the regime's tolerance is unknown, so "within every limit"
        # cannot be claimed (unknown is not zero).
        return ModeResult("THROTTLE", "no_session", "no session yet: regime tolerance unknown", numbers, latches)
    return ModeResult("NORMAL", "normal", "within every limit", numbers, latches)


def _update_latches(inputs: ModeInputs, latches: Latches, th: Thresholds) -> Latches:
    gross, potential = inputs.gross_pct, inputs.potential_pct
    if gross is None:
        return latches
    cap = gross >= th.hard_cap_pct or (latches.cap and gross > th.cap_recovery_target_pct)
    in_window = inputs.soft_window or inputs.hard_window
    window = in_window and (
        gross > th.derisk_target_pct or (latches.window and gross > th.derisk_target_pct - th.window_exit_band_pct)
    )
    tolerance = False
    if inputs.regime_rule is not None and potential is not None:
        limit = inputs.regime_rule.tolerance_pct
        tolerance = potential > limit or (latches.tolerance and potential > limit - th.tolerance_exit_band_pct)
    return replace(latches, cap=cap, window=window, tolerance=tolerance)


def blocked_buckets(buckets: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """Buckets over their max: {bucket: numbers}. `buckets` maps name -> (current_pct, max_pct)."""
    return {
        name: {"current_pct": round(current, 4), "max_pct": maximum}
        for name, (current, maximum) in sorted(buckets.items())
        if current > maximum
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
