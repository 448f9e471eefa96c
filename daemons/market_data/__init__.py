"""qe-market-data: the market data worker (IB or Hammer Pro) -> `ev.l1`, `ev.prints`."""

from __future__ import annotations


def main() -> int:
    from .service import main as service_main

    return service_main()
