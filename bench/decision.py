"""Benchmark: the decision engine (qe-decision's handler in the real consumer runtime).

1. throughput: a backlog of market events (L1 + features, GRPAN moving so market
   making re-quotes) plus the session worker's 1 s ticks at their real cadence for
   that rate (one per 20,000 events), handled on one core; target >= 20,000 events/s.
   The Brain's own full evaluations run on clock time (every second, and on
   decision-relevant events), as in production.
2. per-event cost with 100 vs 5,000 symbols (same event count, same mix) in a
   steady market (GRPAN fixed, so no re-quotes: with 50x the MM symbols a moving
   market legitimately produces many more intents per event, reported as well);
   target ratio (5,000 / 100) <= 1.3.
3. latency at 2,000 events/s: a producer thread appends paced events; for every
   intent, latency = its stream id (Redis ms) - the stream id of the event that
   caused it; target p99 < 50 ms.

    .venv/bin/python bench/decision.py [--events 150000] [--latency-seconds 15]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from daemons.decision.service import DecisionHandler  # noqa: E402
from qe import config, streams  # noqa: E402
from qe.clock import Clock  # noqa: E402
from qe.contracts import (  # noqa: E402
    L1,
    Account,
    BrokerState,
    BucketExposure,
    Exposure,
    Feature,
    Position,
    Session,
    SymbolExposure,
    TruthTick,
    encode,
    make_event,
)
from qe.daemon import Context  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.raw_streams import append, copy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EQUITY = 50_000_000.0
SESSION_EVERY = 20_000  # one session tick per second at 20,000 events/s


def symbols(count: int) -> list[str]:
    return [f"S{index:05d} PR{chr(65 + index % 26)}" for index in range(count)]


def write_universe(directory: Path, names: list[str]) -> Path:
    path = directory / f"universe-{len(names)}.csv"
    lines = ["symbol,bucket_hint,adv,group,ref_price"]
    lines += [f"{s},{'MM_PURE' if i % 5 == 0 else 'LT'},50000,G,25.00" for i, s in enumerate(names)]
    path.write_text("\n".join(lines) + "\n")
    return path


def event(payload, key: str, ts_ns: int):
    return encode(make_event(payload, idempotency_key=key, source="bench", ts_ns=ts_ns))


def seed(r: redis.Redis, names: list[str]) -> None:
    now = time.time_ns()
    pipe = r.pipeline(transaction=False)
    append(pipe, "ev.broker", event(BrokerState(connected=True, account="DU1", mode="paper"), "b", now))
    append(pipe, "ev.positions", event(Account(account="DU1", net_liquidation=EQUITY), "acct", now))
    held = {}
    for index, symbol in enumerate(names[::2]):  # half the universe held, 100 % gross in all
        bucket = "MM_PURE" if names.index(symbol) % 5 == 0 else "LT"
        qty = int(EQUITY / (len(names) / 2) / 25 / 2)
        held[symbol] = (qty, bucket)
        append(pipe, "ev.positions", event(Position(account="DU1", symbol=symbol, qty=qty, avg_cost=25, bucket=bucket), f"p{index}", now))
    gross = sum(q * 25.0 for q, _b in held.values())
    pct = {b: sum(q * 25.0 for q, bb in held.values() if bb == b) / EQUITY * 100 for b in ("LT", "MM_PURE")}
    exposure = Exposure(
        equity=EQUITY, long_notional=gross, short_notional=0, gross_pct=gross / EQUITY * 100, net_pct=gross / EQUITY * 100,
        potential_gross_pct=gross / EQUITY * 100,
        buckets={"LT": BucketExposure(current_pct=pct["LT"], potential_pct=pct["LT"], target_pct=80, max_pct=90),
                 "MM_PURE": BucketExposure(current_pct=pct["MM_PURE"], potential_pct=pct["MM_PURE"], target_pct=20, max_pct=30)},
        symbols={s: SymbolExposure(qty=q, bucket=b, mark=25.0, mark_source="l1_mid", notional=q * 25.0, open_buy_qty=0,
                                   open_sell_qty=0, potential_notional=q * 25.0) for s, (q, b) in held.items()},
    )
    append(pipe, "ev.exposure", event(exposure, "x", now))
    pipe.execute()


def session_event(seq: int) -> dict[str, str]:
    now = time.time_ns()
    return event(Session(now_ns=now, now_utc="-", now_ny="-", trading_day="2026-11-20", market_open=True, regime="MID",
                         minutes_to_close=90.0, soft_derisk_active=False, hard_derisk_active=False, early_close=False),
                 f"s{seq}", now)


def market_event(names: list[str], rng: random.Random, seq: int, grpan_moves: bool = True) -> tuple[str, dict[str, str]]:
    symbol = rng.choice(names)
    now = time.time_ns()
    if seq % 2:
        mid = 25.0 + rng.randint(-3, 3) / 100
        return "ev.l1", event(L1(symbol=symbol, bid=round(mid - 0.02, 2), ask=round(mid + 0.02, 2), bid_size=300,
                                 ask_size=300), f"l{seq}", now)
    grpan = 25.0 + (rng.randint(-5, 5) / 100 if grpan_moves else 0.0)
    return "ev.features", event(Feature(symbol=symbol, grpan_price=round(grpan, 2), concentration_pct=60, print_count=15,
                                        truth_tick=TruthTick(price=round(grpan, 2), size=100, venue="NYSE", ts_ns=now)),
                                f"f{seq}", now)


class CountingHandler(DecisionHandler):
    """The real handler, counting the events it has handled (no Redis calls to know)."""

    handled = 0

    def handle(self, event, effects) -> None:
        super().handle(event, effects)
        self.handled += 1


def make_consumer(server: RedisServer, names: list[str], directory: Path, consumer_name: str) -> streams.Consumer:
    rules = config.load_rules(ROOT / "etc" / "risk_rules.yaml")
    # A pre-filled backlog carries session/exposure timestamps from when it was
    # written; the freshness gates must not turn the measurement into a cancel storm.
    decision = rules.decision.model_copy(update={"max_session_age_s": 3600.0, "max_exposure_age_s": 3600.0})
    rules = rules.model_copy(update={"decision": decision})
    settings = config.Settings(redis_url=server.url, universe_path=write_universe(directory, names))
    r = redis.Redis(port=server.port, socket_timeout=5)
    context = Context("decision", settings, rules, Clock(), r, logging.getLogger("bench"))
    return streams.Consumer(r=r, daemon="decision", group="decision_engine", handler=CountingHandler(context),
                            rules=rules, clock=Clock(), consumer_name=consumer_name)


def consumed(r: redis.Redis) -> int:
    total = 0
    for stream in ("ev.l1", "ev.features", "ev.session"):
        for group in r.xinfo_groups(copy(stream, "decision_engine")):
            total += group.get("entries-read") or 0
    return total


def warm_up(r: redis.Redis, consumer: streams.Consumer, names: list[str], grpan_moves: bool = True) -> None:
    """Steady state before measuring: every symbol has a market, every MM symbol its quotes."""
    pipe = r.pipeline(transaction=False)
    append(pipe, "ev.session", session_event(-1))
    rng = random.Random(3)
    for index, _symbol in enumerate(names):
        for offset in (0, 1):
            stream, fields = market_event([names[index]], rng, 2 * index + offset, grpan_moves)
            append(pipe, stream, fields)
    pipe.execute()
    while True:
        consumer.run_once()
        lag = sum((g.get("lag") or 0) + g.get("pending", 0) for s in ("ev.l1", "ev.features", "ev.session")
                  for g in r.xinfo_groups(copy(s, "decision_engine")))
        if lag == 0:
            break


def throughput(names: list[str], count: int, directory: Path, grpan_moves: bool = True) -> float:
    """Events/s handling a backlog of `count` market events (+ the session ticks).
    grpan_moves=False: a steady market (GRPAN fixed, quotes and prints still moving):
    no re-quotes, so the cost measured is the Brain's per-event work alone."""
    server = RedisServer(directory / f"redis-{len(names)}-{grpan_moves}", fsync="everysec", test_groups=False).start()
    try:
        r = server.client()
        seed(r, names)
        consumer = make_consumer(server, names, directory, "bench")
        warm_up(r, consumer, names, grpan_moves)
        rng = random.Random(7)
        pipe = r.pipeline(transaction=False)
        for seq in range(count):
            if seq % SESSION_EVERY == 0:
                append(pipe, "ev.session", session_event(seq))
            stream, fields = market_event(names, rng, seq, grpan_moves)
            append(pipe, stream, fields)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        total = count + (count + SESSION_EVERY - 1) // SESSION_EVERY
        handler = consumer.handler
        target = handler.handled + total
        started = time.perf_counter()
        while handler.handled < target:
            consumer.run_once()  # every batch is committed before run_once returns
        elapsed = time.perf_counter() - started
        return total / elapsed
    finally:
        server.stop()


def latency(names: list[str], rate: float, seconds: float, directory: Path) -> tuple[list[float], int]:
    server = RedisServer(directory / "redis-latency", fsync="everysec", test_groups=False).start()
    try:
        r = server.client()
        seed(r, names)
        consumer = make_consumer(server, names, directory, "bench-latency")
        warm_up(r, consumer, names)
        stop = threading.Event()
        sent: dict[str, int] = {}  # event id -> stream id ms

        def produce() -> None:
            producer = redis.Redis(port=server.port)
            rng = random.Random(11)
            seq, started = 0, time.perf_counter()
            next_session = 0.0
            while not stop.is_set():
                elapsed = time.perf_counter() - started
                if elapsed >= next_session:
                    append(producer, "ev.session", session_event(seq))
                    next_session += 1.0
                due = int(elapsed * rate)
                while seq < due:
                    stream, fields = market_event(names, rng, seq)
                    entry_id = append(producer, stream, fields)
                    sent[json.loads(fields["event"])["event_id"]] = int(entry_id.split(b"-")[0])
                    seq += 1
                time.sleep(0.001)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            consumer.run_once()
        stop.set()
        thread.join()
        while consumer.handler.handled < len(sent) + 1:  # the backlog left when the producer stopped
            before = consumer.handler.handled
            consumer.run_once()
            if consumer.handler.handled == before:
                break
        latencies = []
        for entry_id, fields in r.xrange("ev.intents"):
            cause = json.loads(fields[b"event"]).get("causation_id")
            if cause in sent:
                latencies.append(int(entry_id.split(b"-")[0]) - sent[cause])
        return latencies, len(sent)
    finally:
        server.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        small, large = symbols(100), symbols(5000)
        rate_small = throughput(small, args.events, directory)
        rate_large = throughput(large, args.events, directory)
        moving_ratio = rate_small / rate_large
        steady_small = throughput(small, args.events, directory, grpan_moves=False)
        steady_large = throughput(large, args.events, directory, grpan_moves=False)
        ratio = steady_small / steady_large
        print(f"throughput 100 symbols  : {rate_small:10.0f} events/s  (target >= 20000; GRPAN moving, quotes re-priced)")
        print(f"throughput 5000 symbols : {rate_large:10.0f} events/s  (same events; 50x the quotes to re-price)")
        print(f"steady market           : {steady_small:10.0f} / {steady_large:.0f} events/s (100 / 5000 symbols)")
        print(f"per-event cost ratio    : {ratio:10.3f}  (5000 vs 100 symbols, steady market; target <= 1.3)")
        print(f"                          {moving_ratio:10.3f}  (5000 vs 100 symbols, GRPAN moving: includes the extra intents)")
        latencies, sent = latency(small, 2000.0, args.latency_seconds, directory)
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        print(f"latency at 2000 ev/s    : {len(latencies)} intents from {sent} events; p50 {p50:.0f} ms, p99 {p99:.0f} ms "
              f"(target p99 < 50 ms)")
        print(
            f"RESULT events_per_s={rate_small:.0f} events_per_s_5000_symbols={rate_large:.0f} "
            f"steady_events_per_s={steady_small:.0f} steady_events_per_s_5000_symbols={steady_large:.0f} "
            f"cost_ratio_5000_vs_100={ratio:.3f} cost_ratio_moving_5000_vs_100={moving_ratio:.3f} "
            f"latency_p50_s={p50 / 1000:.4f} latency_p99_s={p99 / 1000:.4f} latency_samples={len(latencies)}"
        )


if __name__ == "__main__":
    main()
