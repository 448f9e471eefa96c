"""qe-pnl: the trading day's P&L per symbol, bucket and account (SPEC 10), and the
end-of-day report after each close."""


def main() -> int:
    from .service import run

    return run()
