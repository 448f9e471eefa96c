"""Benchmark: can qe-alerts keep up with the market data streams?

Both sides run the same consumer runtime over the same mix of ev.l1 and ev.prints
events (500 symbols, 3 quotes per print) in one run:

baseline: a handler that does nothing (the runtime's own cost: read, pydantic, commit)
alerts:   the real AlertsHandler (arrival times, daily ranges, ETF guard, persistence)

Prints both rates, their ratio, and the cost of one periodic check (XINFO of every
stream + staleness/lag/DLQ rules) with every symbol watched.

    .venv/bin/python bench/alerts.py [--events 60000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from daemons.alerts.core import MarketHours  # noqa: E402
from daemons.alerts.service import AlertsHandler  # noqa: E402
from qe import config, daemon, streams  # noqa: E402
from qe.clock import Clock  # noqa: E402
from qe.contracts import L1, Print, encode, make_event  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.raw_streams import append, copy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = [f"SYM{i:03d} PRA" for i in range(499)] + ["PFF"]


def fill(r: redis.Redis, count: int) -> None:
    pipe = r.pipeline(transaction=False)
    now = time.time_ns()
    for n in range(count):
        symbol = SYMBOLS[n % len(SYMBOLS)]
        price = 24.0 + (n % 37) / 100
        if n % 4 == 3:
            payload, stream = Print(symbol=symbol, price=price, size=100 * (1 + n % 3), venue="ARCA", trade_ts_ns=now + n), "ev.prints"
        else:
            payload, stream = L1(symbol=symbol, bid=price, ask=price + 0.05, bid_size=300, ask_size=500), "ev.l1"
        event = make_event(payload, idempotency_key=f"{stream}:{n}", source="bench", ts_ns=now + n)
        append(pipe, stream, encode(event))
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


class Noop:
    streams = ("ev.l1", "ev.prints", "ev.exposure", "ev.broker", "ev.session")
    tick_interval_s = None

    def load(self, r) -> None:
        pass

    def handle(self, event, effects) -> None:
        pass

    def tick(self, now_ns, effects) -> None:
        pass


def drain(consumer: streams.Consumer, r: redis.Redis, group: str) -> float:
    """Events/s until the group has read and acknowledged everything."""
    total = r.xlen("ev.l1") + r.xlen("ev.prints")
    started = time.perf_counter()
    while True:
        consumer.run_once()
        done = all(
            g["lag"] == 0 and g["pending"] == 0
            for stream in ("ev.l1", "ev.prints")
            for g in r.xinfo_groups(copy(stream, group)) if g["name"].decode() == group
        )
        if done:
            return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=60_000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory), fsync="everysec", test_groups=False).start()
        try:
            r = server.client()
            rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
            settings = config.load_settings({"QE_HOME": str(REPO), "QE_REDIS_URL": server.url})
            rules = rules.model_copy(update={"alerts": rules.alerts.model_copy(update={"stale_symbols": "universe"})})
            fill(r, args.events)

            def consumer(group: str, handler) -> streams.Consumer:
                return streams.Consumer(r=redis.Redis(port=server.port, socket_timeout=5), daemon=f"bench-{group}",
                                        group=group, handler=handler, rules=rules, clock=Clock(), consumer_name=f"{group}-1")

            baseline_rate = drain(consumer("baseline", Noop()), r, "baseline")
            context = daemon.Context("alerts", settings, rules, Clock(), redis.Redis(port=server.port, socket_timeout=5),
                                     logging.getLogger("bench.alerts"))
            handler = AlertsHandler(context)
            handler.tick_interval_s = None  # measure the event path alone; the tick is timed below
            alerts_consumer = consumer("alerts", handler)
            alerts_rate = drain(alerts_consumer, r, "alerts")

            # One periodic check with all 500 symbols watched (universe mode), timed in isolation.
            now = time.time_ns()
            handler.market = MarketHours(now - 3600 * 10**9, now + 3600 * 10**9, None)  # market open: staleness judged
            tick_ms = []
            for _ in range(50):
                effects = streams.Effects(streams.StreamPolicy(rules.streams))
                started = time.perf_counter()
                handler.tick(time.time_ns(), effects)
                tick_ms.append((time.perf_counter() - started) * 1000)
            ratio = alerts_rate / baseline_rate
            print(f"runtime, no-op handler : {baseline_rate:9.0f} events/s")
            print(f"qe-alerts handler      : {alerts_rate:9.0f} events/s  (ratio {ratio:.2f})")
            print(f"periodic check         : median {statistics.median(tick_ms):.2f} ms, max {max(tick_ms):.2f} ms")
            print(
                f"RESULT baseline_events_per_s={baseline_rate:.0f} alerts_events_per_s={alerts_rate:.0f} "
                f"ratio={ratio:.3f} tick_median_s={statistics.median(tick_ms) / 1000:.5f} tick_max_s={max(tick_ms) / 1000:.5f}"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
