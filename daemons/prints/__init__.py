"""qe-prints: the prints/features worker (truth ticks, GRPAN) on `ev.prints` -> `ev.features`."""

from __future__ import annotations


def main() -> int:
    from .service import main as service_main

    return service_main()
