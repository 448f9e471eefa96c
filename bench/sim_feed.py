"""Benchmark: market-data ticks per second the IB simulator delivers to one ib_async client.

Starts the simulator as a subprocess (its own core) on a temporary 500-symbol
universe, subscribes one ib_async client to reqMktData for every symbol, and
counts the ticks the client receives (entries of Ticker.ticks, i.e. every bid /
ask / last price or size update ib_async decodes) during the measurement window.

    .venv/bin/python bench/sim_feed.py [--symbols 500] [--seconds 10]
                                       [--quote-rate 20] [--print-rate 8]

Ends with one line: RESULT ticks_per_s=... symbols=... seconds=... offered_events_per_s=...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ib_async import IB, Stock

from sim.testing import start_process


def write_universe(path: Path, count: int) -> list[str]:
    symbols = []
    lines = ["symbol,bucket_hint,adv,group,ref_price"]
    for i in range(count):
        symbol = f"B{i // 26:03d} PR{chr(ord('A') + i % 26)}"
        symbols.append(symbol)
        lines.append(f"{symbol},LT,50000,B{i // 26:03d},{18 + (i * 37 % 1200) / 100:.2f}")
    path.write_text("\n".join(lines) + "\n")
    return symbols


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quote-rate", type=float, default=20.0, help="quote updates per symbol per second")
    parser.add_argument("--print-rate", type=float, default=8.0, help="prints per symbol per second")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        universe = Path(tmp) / "universe.csv"
        symbols = write_universe(universe, args.symbols)
        sim = start_process(
            [
                "--universe", str(universe), "--account-file", "none", "--quote-rate", str(args.quote_rate),
                "--print-rate", str(args.print_rate), "--max-lines", str(args.symbols + 10),
            ]
        )
        ib = IB()
        try:
            ib.connect("127.0.0.1", sim.port, clientId=1, timeout=20)
            # Client-side request pacing is not what is measured: subscribe at once.
            ib.client.MaxRequests = 0
            contracts = [Stock(symbol, "SMART", "USD") for symbol in symbols]
            ib.qualifyContracts(*contracts)
            tickers = [ib.reqMktData(contract) for contract in contracts]
            counter = {"ticks": 0, "updates": 0}

            def on_pending(pending) -> None:
                counter["updates"] += 1
                for ticker in pending:
                    counter["ticks"] += len(ticker.ticks) + len(ticker.tickByTicks)

            ib.pendingTickersEvent += on_pending
            ib.sleep(args.warmup)
            live = sum(1 for t in tickers if t.bid == t.bid and t.bid > 0)
            counter["ticks"] = 0
            start = time.perf_counter()
            ib.sleep(args.seconds)
            elapsed = time.perf_counter() - start
            ticks = counter["ticks"]
            clients = sim.control.state()["clients"]
            shed = sum(c["dropped_market_msgs"] for c in clients)
        finally:
            ib.disconnect()
            sim.stop()
    rate = ticks / elapsed
    offered = args.symbols * (args.quote_rate + args.print_rate)
    print(f"symbols subscribed with live quotes: {live}/{args.symbols}")
    print(f"ticks received: {ticks} in {elapsed:.2f} s -> {rate:,.0f} ticks/s (sim offered {offered:,.0f} market events/s)")
    print(f"market data messages shed by the simulator for a slow client: {shed}")
    print(
        f"RESULT ticks_per_s={rate:.0f} symbols={args.symbols} seconds={elapsed:.2f} "
        f"offered_events_per_s={offered:.0f} ticks={ticks} subscribed={live} shed_messages={shed}"
    )
    return 0 if live == args.symbols else 1


if __name__ == "__main__":
    sys.exit(main())
