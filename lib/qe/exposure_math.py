"""Exposure arithmetic shared by the exposure worker and the decision engine."""

from __future__ import annotations


def potential_notional(qty: int, open_buy: int, open_sell: int, mark: float) -> float:
    """Worst-case notional of one symbol if every open order fills (SPEC 6, Exposure):
    max(|pos + open_buy_qty|, |pos - open_sell_qty|) * mark."""
    return max(abs(qty + open_buy), abs(qty - open_sell)) * mark
