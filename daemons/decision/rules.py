"""The one place where the Brain reads caps, bucket limits and the regime table.

Those numbers belong to the exposure and session sections of risk_rules.yaml
(`exposure.hard_cap_pct`, `exposure.cap_recovery_target_pct`, `exposure.buckets`,
`session.regimes`). The caps are read from `exposure` where that section exists;
otherwise, and for the regime table (whose shape the session section defines), the
SPEC numbers below are used, so the Brain never runs without a cap. Bucket
target/max come with every exposure snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qe.config import RiskRules

# SPEC 6 numbers, used only where the shared sections are absent.
_HARD_CAP_PCT = 130.0
_CAP_RECOVERY_TARGET_PCT = 123.0
_BUCKETS = {"LT": (80.0, 90.0), "MM_PURE": (20.0, 30.0)}  # (target_pct, max_pct)


@dataclass(frozen=True, slots=True)
class RegimeRule:
    tolerance_pct: float  # potential gross above this: THROTTLE or SOFT_DERISK
    derisk_allowed: bool


_REGIMES = {
    "OPEN": RegimeRule(125.0, False),
    "EARLY": RegimeRule(125.0, False),
    "MID": RegimeRule(120.0, True),
    "LATE": RegimeRule(115.0, True),
    "CLOSE": RegimeRule(100.0, True),
    # CLOSED has no tolerance: nothing is traded, so no tolerance mode either.
}


def _section(rules: RiskRules, name: str) -> Any:
    return getattr(rules, name, None)


def hard_cap_pct(rules: RiskRules) -> float:
    return float(getattr(_section(rules, "exposure"), "hard_cap_pct", _HARD_CAP_PCT))


def cap_recovery_target_pct(rules: RiskRules) -> float:
    return float(getattr(_section(rules, "exposure"), "cap_recovery_target_pct", _CAP_RECOVERY_TARGET_PCT))


def bucket_limits(rules: RiskRules) -> dict[str, tuple[float, float]]:
    """(target_pct, max_pct) per bucket, used only until the first exposure snapshot:
    every snapshot carries the exposure worker's own target/max per bucket, and the
    engine takes those."""
    return dict(_BUCKETS)


def regime_table(rules: RiskRules) -> dict[str, RegimeRule]:
    # The SPEC table (this build has no session.regimes section to read it from).
    return dict(_REGIMES)
