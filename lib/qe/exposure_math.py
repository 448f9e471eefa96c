"""The worst-case exposure formula, in one place for the exposure worker, the
Brain and execution (SPEC 6, Exposure / HARD CAP).

Potential gross of one symbol is its exposure if every open order on one side
fills: max(|position + open buys|, |position - open sells|) times the mark.
Orders on both sides cannot both make it worse, so the worst side counts.
"""

from __future__ import annotations

from typing import TypeVar

Number = TypeVar("Number", int, float)


def potential_qty(qty: int, open_buy_qty: int, open_sell_qty: int) -> int:
    """Worst-case absolute position (shares) if every open order on one side fills."""
    if open_buy_qty < 0 or open_sell_qty < 0:
        raise ValueError(f"open quantities must be >= 0, got buy {open_buy_qty} sell {open_sell_qty}")
    return max(abs(qty + open_buy_qty), abs(qty - open_sell_qty))


def potential_notional(qty: int, open_buy_qty: int, open_sell_qty: int, mark: Number) -> Number:
    """Worst-case notional of one symbol: potential_qty(...) * mark.

    Always >= |qty| * mark, and equal to it when there are no open orders."""
    return potential_qty(qty, open_buy_qty, open_sell_qty) * mark
