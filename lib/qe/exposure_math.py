"""The worst-case exposure formula, shared by exposure, the Brain and execution
(each checks the hard cap with its own view; the formula is one)."""

from __future__ import annotations


def potential_notional(qty: int, open_buy: int, open_sell: int, mark: float) -> float:
    """SPEC: if every open order fills, the worst position is max(|pos + buys|, |pos - sells|)."""
    return max(abs(qty + open_buy), abs(qty - open_sell)) * mark
