"""qe-alerts: the alerts no single producer sees (cap/bucket breaches, stale market
data, broker down, new daily high/low, ETF guard, DLQ growth, consumer lag), each
deduplicated, rate-limited and restart-safe. Consumes ev.l1, ev.prints, ev.exposure,
ev.broker, ev.session (group `alerts`); publishes ev.alerts."""


def main() -> int:
    from .service import run

    return run()
