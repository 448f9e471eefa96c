"""Benchmark: the exposure worker's cost per input event at 100 and at 5,000 symbols.

The book is incremental (subtract a symbol's old contribution, add the new one), so
the cost of one event must not grow with the number of positions: target ratio
per_event_s_5000 / per_event_s_100 <= 1.3.

core:     ExposureHandler.handle() on decoded events: book update + Effects built
          (what one event costs the worker, without Redis), best of --rounds runs
runtime:  the same kind of events through qe.streams.Consumer against a private
          redis-server: decode, handle, change publications every 250 ms, atomic Lua
          commit with the acks (wall clock; periodic work included as it comes).
          With few symbols a change publication coalesces many events into the same
          few symbol lines; with many symbols each event dirties its own line, so a
          part of the runtime ratio is publication work per event, still O(1).
          Rounds alternate between the sizes; best round per size.
periodic: one full publication and one mark refresh at each size (time-driven, O(n))

    .venv/bin/python bench/exposure.py [--events 20000] [--rounds 7] [--runtime-events 10000] [--runtime-rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from daemons.exposure.service import ExposureHandler  # noqa: E402
from qe import config, streams  # noqa: E402
from qe.clock import Clock  # noqa: E402
from qe.contracts import L1, Account, Feature, Order, Position, TruthTick, encode, make_event  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.raw_streams import append  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = (100, 5000)


def symbol_names(count: int) -> list[str]:
    return [f"S{index:04d} PR{chr(65 + index % 26)}" for index in range(count)]


class Events:
    """A seeded stream of realistic inputs over `count` symbols: setup + a timed mix
    (60 % quotes, 15 % truth ticks, 15 % order updates, 10 % position changes)."""

    def __init__(self, count: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.symbols = symbol_names(count)
        self.base = {symbol: self.rng.randint(2000, 2600) for symbol in self.symbols}  # cents
        self.qty = {symbol: self.rng.choice([-1, 1]) * self.rng.randint(1, 20) * 100 for symbol in self.symbols}
        self.orders: dict[str, tuple[int, int]] = {}  # symbol -> (order sequence, filled)
        self.n = 0

    def _event(self, payload, ts_ns: int | None = None):
        self.n += 1
        return make_event(payload, idempotency_key=f"bench:{self.n}", source="bench", ts_ns=ts_ns or time.time_ns())

    def setup(self) -> list[tuple[str, object]]:
        equity = sum(abs(q) * self.base[s] / 100 for s, q in self.qty.items())  # gross ~ 100 %
        events = [("ev.positions", self._event(Account(account="DU1", net_liquidation=equity)))]
        for symbol in self.symbols:
            cents = self.base[symbol]
            events.append(("ev.l1", self._event(L1(symbol=symbol, bid=cents / 100, ask=(cents + 2) / 100))))
            bucket = "LT" if self.rng.random() < 0.8 else "MM_PURE"
            events.append(("ev.positions", self._event(Position(account="DU1", symbol=symbol, qty=self.qty[symbol], avg_cost=cents / 100, bucket=bucket))))
            events.append(("ev.orders", self._event(self._next_order_update(symbol))))
        return events

    def _next_order_update(self, symbol: str) -> Order:
        """Each symbol works one 500-share order: SUBMITTED, fills of 100 (the last one
        FILLED, terminal), then the next order. Every update is a real state change."""
        sequence, filled = self.orders.get(symbol, (0, -100))
        filled += 100
        if filled > 500:
            sequence, filled = sequence + 1, 0
        self.orders[symbol] = (sequence, filled)
        status = "SUBMITTED" if filled == 0 else "FILLED" if filled == 500 else "PARTIALLY_FILLED"
        return Order(order_ref=f"ref-{symbol}-{sequence}", symbol=symbol, side="BUY" if self.qty[symbol] > 0 else "SELL",
                     qty=500, limit_price=self.base[symbol] / 100, bucket="LT", status=status, filled_qty=filled,
                     remaining_qty=500 - filled)

    def mix(self, count: int) -> list[tuple[str, object]]:
        events = []
        for _ in range(count):
            symbol = self.rng.choice(self.symbols)
            roll = self.rng.random()
            cents = self.base[symbol] + self.rng.randint(-5, 5)
            if roll < 0.60:
                events.append(("ev.l1", self._event(L1(symbol=symbol, bid=cents / 100, ask=(cents + self.rng.randint(1, 4)) / 100))))
            elif roll < 0.75:
                tick = TruthTick(price=cents / 100, size=100, venue="NYSE", ts_ns=time.time_ns())
                feature = Feature(symbol=symbol, grpan_price=cents / 100, concentration_pct=60.0, print_count=5, truth_tick=tick)
                events.append(("ev.features", self._event(feature)))
            elif roll < 0.90:
                events.append(("ev.orders", self._event(self._next_order_update(symbol))))
            else:
                self.qty[symbol] += self.rng.choice([-100, 100])
                events.append(("ev.positions", self._event(Position(account="DU1", symbol=symbol, qty=self.qty[symbol], avg_cost=cents / 100, bucket="LT"))))
        return events


def make_handler(rules: config.RiskRules) -> ExposureHandler:
    context = SimpleNamespace(rules=rules, clock=Clock(), log=logging.getLogger("bench"), universe=dict)
    return ExposureHandler(context)  # type: ignore[arg-type]


class CoreRun:
    """One handler with `count` symbols set up, measured round by round."""

    def __init__(self, rules: config.RiskRules, count: int) -> None:
        self.generator = Events(count)
        self.handler = make_handler(rules)
        self.policy = streams.StreamPolicy(rules.streams)
        effects = streams.Effects(self.policy)
        for _stream, event in self.generator.setup():
            self.handler.handle(event, effects)
        started = time.perf_counter()
        self.handler.tick(time.time_ns(), streams.Effects(self.policy))  # mark refresh + full publication
        self.full_publication_s = time.perf_counter() - started
        started = time.perf_counter()
        self.handler.book.refresh_marks(time.time_ns())
        self.mark_refresh_s = time.perf_counter() - started
        self.best = float("inf")

    def round(self, events: int) -> None:
        mix = self.generator.mix(events)
        handle, policy = self.handler.handle, self.policy
        batch = streams.Effects(policy)
        started = time.perf_counter()
        for index, (_stream, event) in enumerate(mix):
            if index % 100 == 0:  # a fresh Effects per batch of 100, as the runtime does
                batch = streams.Effects(policy)
            handle(event, batch)
        self.best = min(self.best, (time.perf_counter() - started) / events)


def core_per_event(rules: config.RiskRules, events: int, rounds: int) -> dict[int, CoreRun]:
    """Best per-event seconds of handle() + Effects at each size. Rounds alternate
    between the sizes so that machine load hits both alike."""
    runs = {size: CoreRun(rules, size) for size in SIZES}
    for _ in range(rounds):
        for run in runs.values():
            run.round(events)
    for run in runs.values():
        book = run.handler.book
        assert book.totals_units == book.recount(), "running totals drifted from a recount"
    return runs


class RuntimeRun:
    """A real Consumer on its own private redis-server with `count` symbols set up."""

    def __init__(self, rules: config.RiskRules, count: int, directory: Path) -> None:
        self.server = RedisServer(directory / f"redis-{count}", fsync="everysec", test_groups=False).start()
        self.r = self.server.client()
        self.generator = Events(count)
        self.handler = make_handler(rules)
        self.handled = 0
        handle = self.handler.handle

        def counting_handle(event, effects) -> None:
            self.handled += 1
            handle(event, effects)

        self.handler.handle = counting_handle  # type: ignore[method-assign]
        self.tick_s = 0.0  # time in the handler's tick (publications, mark refresh)
        tick = self.handler.tick

        def timed_tick(now_ns, effects) -> None:
            started = time.perf_counter()
            tick(now_ns, effects)
            self.tick_s += time.perf_counter() - started

        self.handler.tick = timed_tick  # type: ignore[method-assign]
        self.consumer = streams.Consumer(r=redis.Redis(port=self.server.port, socket_timeout=5), daemon="bench-exposure",
                                         group="exposure", handler=self.handler, rules=rules, clock=Clock(),
                                         consumer_name="bench-1")
        setup = self.generator.setup()
        self.fill(setup)
        self.run_until(len(setup))  # warm-up: groups, load, set-up events, first full publication
        # Publish what the set-up left dirty, so the timed rounds carry only their own work.
        time.sleep(rules.exposure.min_publish_gap_s * 1.5)
        for _ in range(3):
            self.consumer.run_once()
        self.best = float("inf")
        self.best_tick = float("inf")

    def fill(self, items) -> None:
        pipe = self.r.pipeline(transaction=False)
        for stream, event in items:
            append(pipe, stream, encode(event))
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()

    def run_until(self, total: int) -> None:
        while self.handled < total:  # run_once handles a batch and commits it before returning
            self.consumer.run_once()

    def round(self, events: int) -> None:
        self.fill(self.generator.mix(events))
        self.tick_s = 0.0
        started = time.perf_counter()
        self.run_until(self.handled + events)
        elapsed = time.perf_counter() - started
        if elapsed / events < self.best:
            self.best, self.best_tick = elapsed / events, self.tick_s / events

    def stop(self) -> None:
        self.server.stop()


def runtime_per_event(rules: config.RiskRules, events: int, rounds: int) -> dict[int, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as directory:
        runs = {size: RuntimeRun(rules, size, Path(directory)) for size in SIZES}
        try:
            for _ in range(rounds):
                for run in runs.values():
                    run.round(events)
            return {size: (run.best, run.best_tick) for size, run in runs.items()}
        finally:
            for run in runs.values():
                run.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runtime-events", type=int, default=10_000, help="events per runtime round")
    parser.add_argument("--runtime-rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")

    core = core_per_event(rules, args.events, args.rounds)
    for size, run in core.items():
        print(f"core    {size:5d} symbols: {run.best * 1e6:8.2f} us/event   "
              f"(full publication {run.full_publication_s * 1e3:7.2f} ms, mark refresh {run.mark_refresh_s * 1e3:6.2f} ms)")
    ratio = core[5000].best / core[100].best
    print(f"core    ratio 5000/100: {ratio:.3f}  (target <= 1.3)")

    runtime = runtime_per_event(rules, args.runtime_events, args.runtime_rounds)
    for size in SIZES:
        per_event, in_tick = runtime[size]
        print(f"runtime {size:5d} symbols: {per_event * 1e6:8.2f} us/event   (decode + handle + publications + Lua commit; "
              f"of which {in_tick * 1e6:.2f} in the tick: change publications, mark refresh)")
    runtime_ratio = runtime[5000][0] / runtime[100][0]
    print(f"runtime ratio 5000/100: {runtime_ratio:.3f}  (with many symbols fewer events share a published symbol line)")
    print(
        f"RESULT per_event_s_100={core[100].best:.9f} per_event_s_5000={core[5000].best:.9f} ratio={ratio:.3f} "
        f"runtime_per_event_s_100={runtime[100][0]:.9f} runtime_per_event_s_5000={runtime[5000][0]:.9f} "
        f"runtime_ratio={runtime_ratio:.3f} full_publication_s_5000={core[5000].full_publication_s:.6f} "
        f"mark_refresh_s_5000={core[5000].mark_refresh_s:.6f}"
    )


if __name__ == "__main__":
    main()
