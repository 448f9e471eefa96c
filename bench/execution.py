"""Benchmark: intents from ev.intents to orders acknowledged by the IB simulator.

The real qe-execution daemon, the simulator as a separate process (empty $1M paper
account, still market), a private Redis. Intents are published at a steady rate held
under IB's 50 msg/s (default 40/s); each is a resting 100-share limit order. Latency is
measured per intent from its XADD to the SUBMITTED order event execution publishes once
the simulator has acknowledged the order (and, for reference, to the simulator's own
receipt of the placeOrder).

    .venv/bin/python bench/execution.py [--rate 40] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qe import config, streams  # noqa: E402
from qe.contracts import Feature, Intent, TruthTick, intent_id_for, make_event, order_ref_for  # noqa: E402
from qe.universe import load_universe  # noqa: E402
from sim.testing import start_process  # noqa: E402
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=40.0, help="intents per second (IB allows 50 msg/s)")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    universe = load_universe(REPO / "etc" / "universe.csv")
    symbols = [s for s in universe if s != "PFF"]
    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        server = RedisServer(directory / "redis", fsync="everysec", test_groups=False).start()
        sim = start_process(["--account-file", "none", "--quote-rate", "0", "--print-rate", "0"])
        env = daemon_env(server.url, QE_IB_PORT=str(sim.port), QE_CONSUMER_NAME="bench-execution", QE_LOG_LEVEL="WARNING")
        execution = DaemonProcess(console_script("qe-execution"), env, directory / "execution.log").start()
        try:
            r = server.client()
            wait_until(lambda: r.hget("state:broker", "connected") == b"true", timeout=30, message="execution connected")
            time.sleep(1.0)
            publisher = streams.Publisher(r, rules)
            # Execution checks every price against its own trusted reference (collar):
            # give it one per symbol, as the prints worker would (a truth tick / GRPAN).
            for symbol in symbols:
                ref = universe[symbol].ref_price
                feature = Feature(symbol=symbol, grpan_price=ref, concentration_pct=80.0, print_count=10, last_price=ref,
                                  truth_tick=TruthTick(price=ref, size=100, venue="NYSE", ts_ns=time.time_ns()))
                publisher.publish("ev.features", make_event(feature, idempotency_key=f"bench:feature:{symbol}", source="bench",
                                                            ts_ns=time.time_ns()))
            wait_until(lambda: r.hlen("state:execution:prices") >= len(symbols), timeout=30, message="references known")
            total = int(args.rate * args.seconds)
            published_ns: dict[str, int] = {}
            started = time.perf_counter()
            for n in range(total):
                target = started + n / args.rate
                while (delay := target - time.perf_counter()) > 0:
                    time.sleep(min(delay, 0.002))
                symbol = symbols[n % len(symbols)]
                key = f"intent:bench:{n}"
                intent = Intent(
                    intent_id=intent_id_for(key), intent_type="LT_BAND", symbol=symbol, side="BUY", qty=100,
                    order_type="LMT", limit_price=round(universe[symbol].ref_price * 0.97, 2), bucket="LT",
                    classification="LT_LONG_INC", priority=20, ttl_s=600, created_ns=time.time_ns(),
                    risk_delta_gross_pct=0.25, reason="benchmark",
                )
                published_ns[order_ref_for(key)] = time.time_ns()
                publisher.publish("ev.intents", make_event(intent, idempotency_key=key, source="bench", ts_ns=time.time_ns()))
            publish_span = time.perf_counter() - started

            def acknowledged() -> dict[str, int]:
                seen = {}
                for _id, fields in r.xrange("ev.orders"):
                    event = json.loads(fields[b"event"])
                    if event["payload"]["status"] == "SUBMITTED":
                        seen.setdefault(event["payload"]["order_ref"], event["ts_ns"])
                return seen

            wait_until(lambda: len(acknowledged()) >= total, timeout=60, interval=0.2, message="all acknowledged")
            acks = acknowledged()
            elapsed = (max(acks.values()) - min(published_ns.values())) / 1e9
            latencies = [(acks[ref] - published_ns[ref]) / 1e9 for ref in published_ns]
            received = {req["order_ref"]: req["ts_ns"] for req in sim.control.requests() if req["event"] == "place"}
            to_broker = [(received[ref] - published_ns[ref]) / 1e9 for ref in published_ns if ref in received]
            rejected = sum(1 for _id, f in r.xrange("ev.orders") if b'"REJECTED"' in f[b"event"])
            p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
            print(f"intents            : {total} at {args.rate:g}/s (published over {publish_span:.2f} s), rejected {rejected}")
            print(f"acknowledged       : {len(acks)} in {elapsed:.2f} s = {len(acks) / elapsed:.1f} intents/s")
            print(f"intent -> ack      : p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms (target p99 < 50 ms)")
            print(f"intent -> broker   : p50 {percentile(to_broker, 0.5) * 1000:.1f} ms, p99 {percentile(to_broker, 0.99) * 1000:.1f} ms")
            print(
                f"RESULT intents={total} rate_per_s={args.rate:g} acked_per_s={len(acks) / elapsed:.2f} "
                f"p50_s={p50:.4f} p99_s={p99:.4f} max_s={max(latencies):.4f} "
                f"to_broker_p99_s={percentile(to_broker, 0.99):.4f} rejected={rejected}"
            )
        finally:
            execution.terminate()
            sim.stop()
            server.stop()


if __name__ == "__main__":
    main()
