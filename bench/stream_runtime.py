"""Benchmark: the consumer runtime against a bare redis-py loop, in one run.

bare:     XREADGROUP COUNT 100 + one XACK per batch, json decode only
runtime:  the same batches through qe.streams.Consumer: full pydantic
          validation, one state write per event, atomic Lua commit with acks

Prints both rates and their ratio (target >= 0.5), and the runtime's RSS at the
start and end of a long run (memory must stay flat).

    .venv/bin/python bench/stream_runtime.py [--events 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from qe import config, functions, streams, topology  # noqa: E402
from qe.clock import Clock  # noqa: E402
from qe.contracts import L1, encode, make_event  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

SYMBOLS = [f"SYM{i:03d} PRA" for i in range(500)]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fill(r: redis.Redis, count: int, start: int = 0) -> None:
    pipe = r.pipeline(transaction=False)
    for n in range(start, start + count):
        symbol = SYMBOLS[n % len(SYMBOLS)]
        event = make_event(
            L1(symbol=symbol, bid=24.0 + (n % 7) / 100, ask=24.1, bid_size=300, ask_size=500),
            idempotency_key=f"l1:{symbol}:{n}",
            source="bench",
            ts_ns=time.time_ns(),
        )
        pipe.fcall("qe_append", 0, "ev.l1", "", *(item for pair in encode(event).items() for item in pair))
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


def bare_loop(r: redis.Redis, count: int) -> float:
    bare_copy = topology.delivery_stream("ev.l1", "bare")
    r.xgroup_create(bare_copy, "bare", id="0")
    seen = 0
    started = time.perf_counter()
    while seen < count:
        reply = r.xreadgroup("bare", "b1", {bare_copy: ">"}, count=100, block=1000)
        for _stream, items in reply:
            ids = []
            for entry_id, fields in items:
                json.loads(fields[b"event"])
                ids.append(entry_id)
            r.xack(bare_copy, "bare", *ids)
            seen += len(ids)
    return seen / (time.perf_counter() - started)


class LatestQuote:
    """One state write per event: the latest quote per symbol."""

    streams = ("ev.l1",)
    tick_interval_s = None

    def __init__(self) -> None:
        self.handled = 0

    def load(self, r) -> None:
        pass

    def handle(self, event, effects) -> None:
        self.handled += 1
        quote = event.payload
        effects.hset(f"bench:quote:{quote.symbol}", {"bid": quote.bid, "ask": quote.ask, "ts_ns": event.ts_ns})

    def tick(self, now_ns, effects) -> None:
        pass


def runtime_loop(consumer: streams.Consumer, count: int) -> float:
    """Run until the handler has seen `count` events in all (every batch committed)."""
    started = time.perf_counter()
    first = consumer.handler.handled
    while consumer.handler.handled < count:
        consumer.run_once()
    return (consumer.handler.handled - first) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5, help="runtime rounds for the memory check")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory), fsync="everysec").start()
        try:
            r = server.client()
            # Both loops read their own delivery copy of ev.l1 (qe.topology), fed by the fan-out.
            functions.load(r, {"bare": ("ev.l1",), "runtime": ("ev.l1",)})
            rules = config.load_rules(Path(__file__).resolve().parents[1] / "etc" / "risk_rules.yaml")
            fill(r, args.events)
            bare_rate = bare_loop(r, args.events)

            consumer = streams.Consumer(
                r=redis.Redis(port=server.port, socket_timeout=5),
                daemon="bench",
                group="runtime",
                handler=LatestQuote(),
                rules=rules,
                clock=Clock(),
                consumer_name="bench-1",
            )
            runtime_rate = runtime_loop(consumer, args.events)
            ratio = runtime_rate / bare_rate
            print(f"bare redis-py loop : {bare_rate:10.0f} events/s")
            print(f"qe runtime         : {runtime_rate:10.0f} events/s  (pydantic + state write + atomic commit)")
            print(f"ratio              : {ratio:10.2f}  (target >= 0.5)")

            # Memory: keep feeding the same consumer; RSS must not grow with events handled.
            rss_start = rss_bytes()
            handled = args.events
            for _round in range(args.rounds):
                for key in ("ev.l1", *(topology.delivery_stream("ev.l1", group) for group in ("bare", "runtime"))):
                    r.xtrim(key, maxlen=0, approximate=False)
                fill(r, args.events, start=handled)
                handled += args.events
                runtime_loop(consumer, handled)
            rss_end = rss_bytes()
            growth = (rss_end - rss_start) / rss_start
            print(f"runtime RSS        : start {rss_start / 2**20:.1f} MiB, end {rss_end / 2**20:.1f} MiB "
                  f"after {handled - args.events} more events ({growth * 100:+.1f} %)")
            print(
                f"RESULT bare_events_per_s={bare_rate:.0f} runtime_events_per_s={runtime_rate:.0f} "
                f"ratio={ratio:.3f} rss_start_bytes={rss_start} rss_end_bytes={rss_end} "
                f"events_in_memory_run={handled - args.events}"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
