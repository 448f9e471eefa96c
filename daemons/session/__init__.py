"""qe-session: the trading session (regime, de-risk windows) every clock second."""


def main() -> int:
    from .service import run

    return run()
