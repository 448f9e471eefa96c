"""Benchmark: ticks through qe-market-data (IB source) and qe-prints, with lag.

The IB gateway simulator (its own process) pushes quotes and prints for 500
symbols; qe-market-data (real ib_async client, every symbol on reqMktData and on
a tick-by-tick slot) publishes `ev.l1` / `ev.prints`; qe-prints publishes
`ev.features`. All on a private redis-server. After a warm-up, for `--seconds`:

* ticks/s that reach ev.l1 and ev.prints, and features/s on ev.features;
* lag per event: l1/prints = Redis append time (stream id) - receipt time in
  qe-market-data (event ts_ns); features = feature append time - receipt time
  of the print that caused it;
* end-to-end probes: prints injected through the simulator's control API at a
  known time, timed to ev.prints and to ev.features (sim -> TWS protocol ->
  ib_async -> market_data -> Redis -> prints worker -> Redis).

Baseline in the same run: the events the simulator generated (offered rate).
Target: >= 5,000 ticks/s sustained with p99 lag under 1 s.

    .venv/bin/python bench/market_data.py [--symbols 500] [--seconds 20]
                                          [--quote-rate 9] [--print-rate 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import yaml  # noqa: E402

from sim.testing import start_process  # noqa: E402
from tests.support.processes import DaemonProcess, console_script, daemon_env  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

PROBE_SIZE = 7777


def write_universe(path: Path, count: int) -> list[str]:
    symbols, lines = [], ["symbol,bucket_hint,adv,group,ref_price"]
    for i in range(count):
        symbol = f"B{i // 26:03d} PR{chr(ord('A') + i % 26)}"
        symbols.append(symbol)
        lines.append(f"{symbol},LT,50000,B{i // 26:03d},{18 + (i * 37 % 1200) / 100:.2f}")
    path.write_text("\n".join(lines) + "\n")
    return symbols


def write_rules(path: Path, symbols: int) -> None:
    document = yaml.safe_load((ROOT / "etc" / "risk_rules.yaml").read_text())
    document["market_data"].update(
        {"source": "ibkr", "ibkr": {"max_tick_by_tick": symbols, "connect_timeout_s": 30}}
    )
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def added(r: redis.Redis, stream: str) -> int:
    return r.xinfo_stream(stream)["entries-added"] if r.exists(stream) else 0


def read_window(r: redis.Redis, stream: str, start_ms: int, end_ms: int) -> list[tuple[int, dict]]:
    out, lower = [], f"{start_ms}-0"
    while True:
        entries = r.xrange(stream, min=lower, max=f"{end_ms}-99999999", count=5000)
        if not entries:
            return out
        out.extend((entry_ms(entry_id), json.loads(fields[b"event"])) for entry_id, fields in entries)
        lower = "(" + entries[-1][0].decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--quote-rate", type=float, default=9.0, help="quote updates per symbol per second")
    parser.add_argument("--print-rate", type=float, default=3.0, help="prints per symbol per second")
    parser.add_argument("--probes-per-s", type=float, default=4.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        universe = tmp_path / "universe.csv"
        symbols = write_universe(universe, args.symbols)
        rules = tmp_path / "risk_rules.yaml"
        write_rules(rules, args.symbols)
        server = RedisServer(tmp_path / "redis", fsync="everysec", test_groups=False).start()
        sim = start_process([
            "--universe", str(universe), "--account-file", "none",
            "--quote-rate", "0", "--print-rate", "0",  # quiet until everything is subscribed
            "--max-lines", str(args.symbols + 10), "--max-tbt", str(args.symbols + 10),
        ])
        processes: list[DaemonProcess] = []
        try:
            r = server.client()
            env = daemon_env(server.url, QE_CONFIG=rules, QE_UNIVERSE=universe, QE_IB_PORT=sim.port, QE_LOG_LEVEL="WARNING")
            processes.append(DaemonProcess(console_script("qe-market-data"), env, tmp_path / "md.log").start())
            processes.append(DaemonProcess(console_script("qe-prints"), env, tmp_path / "prints.log").start())
            # ib_async paces requests (45/s): qualifying + subscribing 500 symbols takes a while.
            deadline = time.monotonic() + 120
            while True:
                clients = sim.control.state()["clients"]
                if clients and clients[0]["mkt_subscriptions"] == args.symbols and clients[0]["tbt_subscriptions"] == args.symbols:
                    break
                if time.monotonic() > deadline or not all(process.alive() for process in processes):
                    raise SystemExit(f"market data did not subscribe everything: {clients}\n{processes[0].output()[-3000:]}")
                time.sleep(0.5)
            sim.control.configure(quote_rate=args.quote_rate, print_rate=args.print_rate)
            time.sleep(args.warmup)

            probes: list[tuple[float, float]] = []  # (wall time injected, price)
            stop = threading.Event()

            def probe() -> None:
                n = 0
                while not stop.is_set():
                    price = round(20 + (n % 500) / 100, 2)
                    sent = time.time()
                    sim.control.inject_print(symbols[n % len(symbols)], price, PROBE_SIZE, "NYSE")
                    probes.append((sent, price))
                    n += 1
                    stop.wait(1 / args.probes_per_s)

            state0 = sim.control.state()["market"]["events"]
            counts0 = {s: added(r, s) for s in ("ev.l1", "ev.prints", "ev.features")}
            start_ms = int(time.time() * 1000)
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            time.sleep(args.seconds)
            stop.set()
            prober.join()
            end_ms = int(time.time() * 1000)
            elapsed = (end_ms - start_ms) / 1000
            offered = (sim.control.state()["market"]["events"] - state0) / elapsed
            counts1 = {s: added(r, s) for s in counts0}
            time.sleep(2.0)  # let the tail of the window reach the worker before reading lags

            rates = {s: (counts1[s] - counts0[s]) / elapsed for s in counts0}
            l1 = read_window(r, "ev.l1", start_ms, end_ms)
            prints = read_window(r, "ev.prints", start_ms - 2000, end_ms + 2000)
            features = read_window(r, "ev.features", start_ms, end_ms + 2000)
            l1_lag = [ms / 1000 - e["ts_ns"] / 1e9 for ms, e in l1]
            print_lag = [ms / 1000 - e["ts_ns"] / 1e9 for ms, e in prints if start_ms <= ms <= end_ms]
            received = {e["event_id"]: e["ts_ns"] / 1e9 for _ms, e in prints}
            feature_lag = [ms / 1000 - received[e["causation_id"]] for ms, e in features
                           if e.get("causation_id") in received and ms <= end_ms]

            # Probes: first appearance of each injected print on ev.prints and in a feature.
            probe_prints = {}
            for ms, e in prints:
                p = e["payload"]
                if p["size"] == PROBE_SIZE:
                    probe_prints.setdefault((p["symbol"], p["price"]), (ms / 1000, e["event_id"]))
            probe_print_lag, probe_feature_lag = [], []
            feature_ms_by_cause = {}
            for ms, e in features:
                feature_ms_by_cause.setdefault(e.get("causation_id"), ms / 1000)
            for index, (sent, price) in enumerate(probes):
                found = probe_prints.get((symbols[index % len(symbols)], price))
                if found is None:
                    continue
                probe_print_lag.append(found[0] - sent)
                if found[1] in feature_ms_by_cause:
                    probe_feature_lag.append(feature_ms_by_cause[found[1]] - sent)
            ticks = rates["ev.l1"] + rates["ev.prints"]

            print(f"simulator offered  : {offered:9.0f} events/s ({args.symbols} symbols)")
            print(f"ev.l1              : {rates['ev.l1']:9.0f} /s   "
                  f"lag p50 {percentile(l1_lag, .5) * 1000:6.1f} ms  p99 {percentile(l1_lag, .99) * 1000:6.1f} ms")
            print(f"ev.prints          : {rates['ev.prints']:9.0f} /s   "
                  f"lag p50 {percentile(print_lag, .5) * 1000:6.1f} ms  p99 {percentile(print_lag, .99) * 1000:6.1f} ms")
            print(f"ticks (l1+prints)  : {ticks:9.0f} /s   (target >= 5000, ratio to offered {ticks / offered:.2f})")
            print(f"ev.features        : {rates['ev.features']:9.0f} /s   "
                  f"lag p50 {percentile(feature_lag, .5) * 1000:6.1f} ms  p99 {percentile(feature_lag, .99) * 1000:6.1f} ms (print receipt -> feature)")
            print(f"probes end-to-end  : {len(probe_print_lag)}/{len(probes)} seen; sim -> ev.prints p99 {percentile(probe_print_lag, .99) * 1000:.1f} ms, "
                  f"sim -> ev.features p99 {percentile(probe_feature_lag, .99) * 1000:.1f} ms")
            for process in processes:
                if not process.alive():
                    print(f"{process.command[0]} died:\n{process.output()[-2000:]}")
            print(
                f"RESULT ticks_per_s={ticks:.0f} l1_per_s={rates['ev.l1']:.0f} prints_per_s={rates['ev.prints']:.0f} "
                f"features_per_s={rates['ev.features']:.0f} offered_events_per_s={offered:.0f} "
                f"ratio_to_offered={ticks / offered:.3f} "
                f"l1_lag_p99_s={percentile(l1_lag, .99):.4f} prints_lag_p99_s={percentile(print_lag, .99):.4f} "
                f"features_lag_p99_s={percentile(feature_lag, .99):.4f} "
                f"probe_print_lag_p99_s={percentile(probe_print_lag, .99):.4f} "
                f"probe_feature_lag_p99_s={percentile(probe_feature_lag, .99):.4f} "
                f"probes_seen={len(probe_print_lag)} probes_sent={len(probes)} symbols={args.symbols} seconds={elapsed:.1f}"
            )
        finally:
            for process in processes:
                try:
                    process.terminate(timeout=15)
                except Exception:  # noqa: BLE001
                    process.kill()
            sim.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
