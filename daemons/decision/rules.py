"""The one place where the Brain reads caps, bucket limits and the regime table.

They live in the shared sections of risk_rules.yaml: `exposure.hard_cap_pct`,
`exposure.cap_recovery_target_pct`, `exposure.buckets` (also read by the exposure
worker and execution) and `session.regimes` (also read by the session worker).
Bucket target/max also come with every exposure snapshot; these are used until the
first one arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from qe.config import RiskRules


@dataclass(frozen=True, slots=True)
class RegimeRule:
    tolerance_pct: float  # potential gross above this: THROTTLE or SOFT_DERISK
    derisk_allowed: bool


def hard_cap_pct(rules: RiskRules) -> float:
    return float(rules.exposure.hard_cap_pct)


def cap_recovery_target_pct(rules: RiskRules) -> float:
    return float(rules.exposure.cap_recovery_target_pct)


def bucket_limits(rules: RiskRules) -> dict[str, tuple[float, float]]:
    """(target_pct, max_pct) per bucket."""
    return {name: (limits.target_pct, limits.max_pct) for name, limits in rules.exposure.buckets.items()}


def regime_table(rules: RiskRules) -> dict[str, RegimeRule]:
    """Tolerance and de-risk permission per regime. CLOSED has no entry: nothing is
    traded then, so no tolerance mode either."""
    return {
        name: RegimeRule(regime.gross_tolerance_pct, regime.derisk_allowed)
        for name, regime in rules.session.regimes.items()
    }
