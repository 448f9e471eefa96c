"""qe-exposure: current and potential (worst-case) exposure from positions, open
orders, marks and equity."""


def main() -> int:
    from .service import run

    return run()
