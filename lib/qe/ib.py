"""The IB client library, and small helpers used by more than one daemon.

ib_async is ib_insync's maintained successor (same API, module renamed); the code
stays importable with ib_insync as a fallback.
"""

from __future__ import annotations

try:  # pragma: no cover - which branch runs depends on what is installed
    import ib_async as ib
except ImportError:  # pragma: no cover
    import ib_insync as ib  # type: ignore[no-redef]

__all__ = ["ib", "stock"]


def stock(symbol: str) -> "ib.Stock":
    """IB contract for a display symbol: symbol as shown, STK, SMART, USD."""
    return ib.Stock(symbol, "SMART", "USD")
