"""Helpers for bench/pipeline.py: a generated universe, a seeded account, rules,
and the whole system (IB simulator + every daemon as real subprocesses) on a
private redis-server and one simulated clock.

Nothing here is committed data: the universe, the account file and the rules are
written into a temporary directory at run time.
"""

from __future__ import annotations

import json
import random
import string
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
import yaml  # noqa: E402

from qe import clock as qe_clock  # noqa: E402
from qe import topology  # noqa: E402
from sim.testing import start_process  # noqa: E402
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

NEW_YORK = ZoneInfo("America/New_York")
DAEMONS = ("session", "market-data", "prints", "exposure", "alerts", "decision", "execution")
# A plain Tuesday morning: EARLY regime (tolerance 125 %) for the next ~2 hours, far
# from the close-anchored de-risk windows, so the Brain stays in NORMAL for the run.
DEFAULT_START = datetime(2025, 6, 10, 10, 5, tzinfo=NEW_YORK)
EQUITY = 10_000_000.0


@dataclass(frozen=True)
class Row:
    symbol: str
    bucket: str
    adv: int
    group: str
    ref_price: float


# ----------------------------------------------------------------------------- files


def make_universe(count: int, seed: int = 7) -> list[Row]:
    """`count` valid symbols: ~75 % preferred-style (`XXX PRA`), the rest plain
    tickers (`ABCDN`, as Nasdaq lists some preferreds), plus PFF (the ETF the alerts
    guard watches) as the first row. Issuers have 1-6 series; ~20 % MM_PURE."""
    rng = random.Random(seed)
    rows = [Row("PFF", "LT", 3_000_000, "ETF", 31.50)]
    used = {"PFF"}
    while len(rows) < count:
        issuer = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(2, 4)))
        plain = rng.random() < 0.25
        letters = rng.sample(string.ascii_uppercase[:12], rng.randint(1, 6))
        for letter in sorted(letters):
            symbol = f"{issuer}{letter}" if plain else f"{issuer} PR{letter}"
            if symbol in used or len(rows) >= count:
                continue
            used.add(symbol)
            bucket = "MM_PURE" if rng.random() < 0.2 else "LT"
            adv = rng.choice((15_000, 25_000, 40_000, 60_000, 90_000, 150_000, 250_000))
            ref = round(rng.uniform(17.0, 26.5), 2)
            rows.append(Row(symbol, bucket, adv, issuer, ref))
    return rows


def write_universe(path: Path, rows: list[Row]) -> Path:
    lines = ["symbol,bucket_hint,adv,group,ref_price"]
    lines += [f"{r.symbol},{r.bucket},{r.adv},{r.group},{r.ref_price:.2f}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def seeded_positions(rows: list[Row], exclude: set[str], equity: float = EQUITY, seed: int = 11) -> list[dict]:
    """A portfolio over some of the symbols: LT long ~55 %, LT short ~28 % (long share of
    LT ~66 %, inside the 60-70 % band), MM_PURE ~8 % of equity; gross ~91 %, so the
    Brain is in NORMAL with room for its market making under the 125 % tolerance."""
    rng = random.Random(seed)
    lt = [r for r in rows if r.bucket == "LT" and r.symbol not in exclude]
    mm = [r for r in rows if r.bucket == "MM_PURE" and r.symbol not in exclude]
    rng.shuffle(lt)
    rng.shuffle(mm)
    positions: list[dict] = []

    def fill(candidates: list[Row], target: float, sign: int, bucket: str, max_count: int) -> None:
        chosen = candidates[:max_count]
        if not chosen:
            return
        per = target / len(chosen)
        for row in chosen:
            qty = max(100, int(per / row.ref_price / 100) * 100)
            cost = round(row.ref_price * (1 + rng.uniform(-0.01, 0.01)), 2)
            positions.append({"symbol": row.symbol, "qty": sign * qty, "avg_cost": cost, "bucket": bucket})

    n_long = max(1, min(len(lt) // 2, max(10, len(rows) // 8)))
    n_short = max(1, min(len(lt) - n_long, max(5, len(rows) // 16)))
    fill(lt, 0.55 * equity, +1, "LT", n_long)
    fill(lt[n_long:], 0.28 * equity, -1, "LT", n_short)
    fill(mm, 0.08 * equity, +1, "MM_PURE", max(3, len(rows) // 40))
    return positions


def write_account(path: Path, positions: list[dict], equity: float = EQUITY) -> Path:
    document = {"account": "DU1000001", "currency": "USD", "equity": equity, "positions": positions}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def write_rules(path: Path, symbols: int, mm_symbols: list[str]) -> Path:
    """etc/risk_rules.yaml with: a tick-by-tick slot for every symbol (the simulator
    allows it), and the reference market maker quoting only the probe symbols (its
    intents are what is timed; quoting 200 symbols would saturate execution's 40 msg/s
    token bucket with re-quotes and time the token bucket instead of the pipeline)."""
    document = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
    document["market_data"]["ibkr"].update({"max_tick_by_tick": symbols, "connect_timeout_s": 60})
    document["strategies"]["mm"]["symbols"] = list(mm_symbols)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the system


class PipelineSystem:
    """Redis, the simulator and every daemon, as tests/support/system.py starts them,
    on the generated universe and account, with the clock at `speed` (1.0: the
    simulator's timestamps are wall time shifted by a constant)."""

    def __init__(self, tmp: Path, rows: list[Row], positions: list[dict], mm_symbols: list[str],
                 start: datetime = DEFAULT_START, speed: float = 1.0, log_level: str = "INFO") -> None:
        self.tmp = tmp
        self.rows = rows
        self.symbols = [r.symbol for r in rows]
        self.universe_file = write_universe(tmp / "universe.csv", rows)
        self.account_file = write_account(tmp / "account.yaml", positions)
        self.rules_file = write_rules(tmp / "risk_rules.yaml", len(rows), mm_symbols)
        self.redis_server = RedisServer(tmp / "redis", fsync="everysec", test_groups=False).start()
        self.r = self.redis_server.client()
        anchor = time.time() + 3.0
        self.clock_env = qe_clock.sim_env(start, speed, anchor_wall_s=anchor)
        self.clock = qe_clock.from_env(self.clock_env)
        n = len(rows)
        self.sim = start_process(
            [
                "--universe", str(self.universe_file), "--account-file", str(self.account_file),
                # quiet until everything is subscribed; the benchmark sets the rates
                "--quote-rate", "0", "--print-rate", "0",
                "--max-lines", str(n + 10), "--max-tbt", str(n + 10),
                "--referee-log-cap", "1000000",
            ],
            env=self.clock_env,
            timeout=60,
        )
        self.control = self.sim.control
        self.env = daemon_env(
            self.redis_server.url, QE_IB_PORT=str(self.sim.port), QE_CONFIG=str(self.rules_file),
            QE_UNIVERSE=str(self.universe_file), QE_LOG_LEVEL=log_level, **self.clock_env,
        )
        self.daemons = {
            name: DaemonProcess(console_script(f"qe-{name}"), self.env, tmp / f"{name}.log").start() for name in DAEMONS
        }

    # -- time ---------------------------------------------------------------------------------
    def sim_to_wall(self, ts_ns: int) -> float:
        """A simulator / daemon timestamp (shared simulated clock) as wall epoch seconds."""
        c = self.clock
        return (c.anchor_wall_ns + (ts_ns - c.start_ns) / c.speed) / 1e9  # type: ignore[attr-defined]

    # -- health -------------------------------------------------------------------------------
    def dead(self) -> list[str]:
        return [name for name, p in self.daemons.items() if not p.alive()]

    def check_alive(self) -> None:
        dead = self.dead()
        if dead:
            raise SystemExit("daemons died: " + ", ".join(f"{n}:\n{self.daemons[n].output()[-2500:]}" for n in dead))

    def wait_ready(self, timeout: float = 300.0, progress=print) -> float:
        """Until market data has every symbol on reqMktData and tick-by-tick, and the
        execution client is connected; returns the wall seconds it took."""
        started = time.monotonic()
        n = len(self.symbols)
        last = ""
        while True:
            self.check_alive()
            clients = self.control.state()["clients"]
            md = max(clients, key=lambda c: c["mkt_subscriptions"], default=None)
            status = f"{len(clients)} IB clients; market data {md['mkt_subscriptions'] if md else 0}/{n} quotes, " \
                     f"{md['tbt_subscriptions'] if md else 0}/{n} tick-by-tick"
            if status != last and int(time.monotonic() - started) % 15 == 0:
                progress(f"  waiting: {status}")
                last = status
            if len(clients) >= 2 and md and md["mkt_subscriptions"] >= n and md["tbt_subscriptions"] >= n:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise SystemExit(f"system not ready after {timeout:.0f} s: {status}")
            time.sleep(1.0)

    def stop(self) -> dict[str, int]:
        codes = {}
        for name, process in self.daemons.items():
            try:
                codes[name] = process.terminate(timeout=30)
            except Exception:  # noqa: BLE001
                process.kill()
                codes[name] = -9
        self.sim.stop()
        self.redis_server.stop()
        return codes


# ----------------------------------------------------------------------------- streams


def group_snapshot(r: redis.Redis) -> dict[tuple[str, str], dict]:
    """Per (stream, consumer group): entries read, lag, pending; and per stream the
    entries ever added (XINFO STREAM entries-added), at one moment."""
    out: dict[tuple[str, str], dict] = {}
    # Groups live on their delivery copies (qe.topology): each is reported under its stream.
    for raw in r.scan_iter(match="ev.*", _type="stream"):
        key = raw.decode()
        stream = topology.origin_stream(key)
        added = r.xinfo_stream(key)["entries-added"]
        for group in r.xinfo_groups(key):
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            read = group.get("entries-read")
            lag = group.get("lag")
            out[(stream, name)] = {
                "added": added,
                "read": read if read is not None else added - (lag or 0),
                "lag": lag if lag is not None else added - (read or 0),
                "pending": group["pending"],
            }
    return out


def entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0])


def read_range(r: redis.Redis, stream: str, start_ms: int, end_ms: int | None = None) -> list[tuple[int, dict]]:
    """Entries of `stream` appended between two wall times (ms), decoded."""
    out, lower = [], f"{start_ms}-0"
    upper = "+" if end_ms is None else f"{end_ms}-18446744073709551615"
    while True:
        entries = r.xrange(stream, min=lower, max=upper, count=5000)
        if not entries:
            return out
        out.extend((entry_ms(entry_id), json.loads(fields[b"event"])) for entry_id, fields in entries)
        lower = "(" + entries[-1][0].decode()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


if __name__ == "__main__":  # `make bench` runs every bench/*.py: this one is only helpers
    print("helpers for bench/pipeline.py (nothing to measure here)")
