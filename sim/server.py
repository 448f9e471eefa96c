"""The asyncio shell of the IB gateway simulator: ``SimServer`` holds the state (market,
broker, sessions) and the start-up; the request handlers and the rest live in parts a
newcomer can find:

* ``session.py``           one TCP client: framing, handshake, request -> ``on_<Request>``
* ``handlers_orders.py``   placeOrder (what-if, modify), cancel, global cancel, open/completed orders, executions
* ``handlers_market.py``   contract details, reqMktData, tick-by-tick, the market timer
* ``handlers_account.py``  positions, account updates / summary, the account timer
* ``handlers_reference.py`` reference data, news, scanner, WSH, FA, ... (answers or IB's errors)
* ``routing.py``           broker events -> the owning client (and a configured master)
* ``faults.py``            faults on command (drops, refusals, restart, codes, shocks)
* ``introspection.py``     ``state()`` for the control API / referee
* ``control.py``           the control HTTP server (started from ``start``)

All decisions live in the pure modules (protocol, market, broker). Everything runs in one
event loop (also when started on a background thread by tests).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from qe import clock as qe_clock
from qe.universe import load_universe

from . import protocol as P
from .broker import NEW_YORK, Account, Broker, Precautions
from .config import AccountSpec, SimConfig, SimConfigError, load_account
from .contracts import Catalogue
from .control import ControlServer
from .faults import CODE_TEXT, FaultControls
from .handlers_account import AccountHandlers
from .handlers_history import HistoryHandlers
from .handlers_market import MarketDataHandlers
from .handlers_orders import OrderHandlers
from .handlers_reference import ReferenceHandlers
from .history import History
from .introspection import Introspection
from .market import Market, MarketConfig
from .routing import OrderRouting
from .session import MarketSub, Session

log = logging.getLogger("sim.server")

DUPLICATE_CLIENT_ID = "Unable to connect as the client id is already in use. Retry with a unique client id."

# Requests whose errors ib_async treats as final for the request (not a warning).
_HISTORICAL_FAMILY = {20, 50, 87, 88, 96}

__all__ = ["SimServer", "SimThread", "Session", "MarketSub", "main"]


class OrderIdStore:
    """The account's highest order id in a small file, so nextValidId stays above every id
    seen across simulator processes (IB keeps it across gateway restarts). No file: memory only."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.saved = 0

    def load(self) -> int:
        if not self.path or not os.path.exists(self.path):
            return 0
        try:
            with open(self.path) as f:
                self.saved = int(json.load(f)["max_order_id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SimConfigError(f"{self.path}: unreadable order-id file: {exc}") from exc
        return self.saved

    def save(self, max_order_id: int) -> None:
        if not self.path or max_order_id <= self.saved:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"max_order_id": max_order_id}, f)
        os.replace(tmp, self.path)
        self.saved = max_order_id


class SimServer(
    OrderHandlers, MarketDataHandlers, AccountHandlers, HistoryHandlers, ReferenceHandlers, OrderRouting, FaultControls, Introspection
):
    def __init__(self, config: SimConfig, clock: qe_clock.Clock | None = None) -> None:
        self.config = config
        self.clock = clock or qe_clock.from_env()
        self.started_wall = time.time()
        self.universe = load_universe(config.universe_path)
        self.catalogue = Catalogue(self.universe.values())
        self.account_spec = self._load_account_spec()
        # Previous closes: the account file's prev_close where given, else the universe's ref_price.
        closes = {symbol: inst.ref_price for symbol, inst in self.universe.items()}
        closes.update({p.symbol: p.prev_close for p in self.account_spec.positions if p.prev_close is not None})
        self.market = Market(
            closes,
            seed=config.seed,
            config=MarketConfig(quote_rate=config.quote_rate, print_rate=config.print_rate),
            now_ns=self.clock.now_ns,
        )
        self.broker = self._new_broker(self.account_spec)
        self.history = History(config.seed, self.clock.now_ns(), {s: b.ref for s, b in self.market.books.items()})
        self.order_ids = OrderIdStore(config.order_id_file)
        self.broker.saw_order_id(self.order_ids.load())
        self.sessions: set[Session] = set()
        self.mkt_by_symbol: dict[str, list[MarketSub]] = {}
        self.tbt_by_symbol: dict[str, list[MarketSub]] = {}
        self.last_quote: dict[str, tuple[int, int, int, int]] = {
            s: (b.bid, b.ask, b.bid_size, b.ask_size) for s, b in self.market.books.items()
        }
        self.last_venue: dict[str, str] = {}
        self.listener: asyncio.base_events.Server | None = None
        self.control: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = config.port
        self.control_port = config.control_port
        self.refusing_until = 0.0
        self.ib_connected = True  # 1100 clears it, 1101/1102 set it again
        self.data_farm_ok = True  # 2103 clears it, 2104 sets it again
        self.tasks: list[asyncio.Task] = []
        self.market_events = 0
        self.ticks_sent = 0
        self.stopped: asyncio.Event | None = None  # created in start(), on the loop
        self.faults_injected: collections.Counter[str] = collections.Counter()  # control API fault commands
        self.metrics: Any = None  # sim.metrics.MetricsEndpoint when config.metrics_port is set

    def _load_account_spec(self) -> AccountSpec:
        if self.config.account_path:
            return load_account(self.config.account_path, self.universe)
        return AccountSpec("DU0000001", "USD", 1_000_000.0, None, ())

    def _new_broker(self, spec: AccountSpec) -> Broker:
        marks = {s: b.mid / 100 for s, b in self.market.books.items()}
        account = Account(spec.account_id, spec.starting_cash(marks), spec.currency)
        for p in spec.positions:
            account.set_position(p.symbol, p.qty, p.avg_cost, p.bucket)
        boot = int(self.started_wall)
        return Broker(
            account,
            self.market,
            self.catalogue,
            buckets={s: i.bucket_hint for s, i in self.universe.items()},
            now_ns=self.clock.now_ns,
            exec_id_prefix=self.config.extra.get("exec_id_prefix") or f"{boot & 0xFFFFFFFF:08x}",
            perm_id_base=int(self.config.extra.get("perm_id_base") or 1_000_000_000 + (boot % 100_000) * 10_000),
            fill_on_prints=self.config.fill_on_prints,
            referee_log_cap=self.config.referee_log_cap,
            precautions=Precautions(**spec.checks),
            trading_sessions=self.config.sessions if spec.sessions is None else spec.sessions,
        )

    async def start(self) -> None:
        """Start-up, in order: the TWS API listener, the control server, the timers. Further
        services started with the simulator (e.g. a metrics endpoint) belong in here."""
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        await self._listen()
        self.control = ControlServer(self)
        self.control_port = await self.control.start(self.config.control_host, self.config.control_port)
        self._start_timers()
        if self.config.metrics_port is not None:
            from .metrics import MetricsEndpoint

            self.metrics = MetricsEndpoint(self, self.config.metrics_host, self.config.metrics_port)
        self._log_listening()

    def _start_timers(self) -> None:
        self.tasks.append(asyncio.create_task(self._market_loop(), name="market"))
        self.tasks.append(asyncio.create_task(self._account_loop(), name="account"))
        self.tasks.append(asyncio.create_task(self._pnl_loop(), name="pnl"))
        self.tasks.append(asyncio.create_task(self._history_loop(), name="history"))
        self.tasks.append(asyncio.create_task(self._session_loop(), name="sessions"))

    def _log_listening(self) -> None:
        log.info(
            "listening",
            extra={
                "host": self.config.host,
                "port": self.port,
                "control_port": self.control_port,
                "metrics_port": self.metrics.port if self.metrics is not None else None,
                "account": self.broker.account.account_id,
                "symbols": len(self.universe),
                "seed": self.config.seed,
                "clock": self.clock.describe(),
            },
        )

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(
            lambda: Session(self), self.config.host, self.port, reuse_address=True, start_serving=True
        )
        self.port = self.listener.sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        self._close_listener()
        if self.control is not None:
            await self.control.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for session in list(self.sessions):
            session.close()
        if self.stopped is not None:
            self.stopped.set()

    def connection_time_text(self) -> str:
        now = datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=timezone.utc).astimezone(NEW_YORK)
        return now.strftime("%Y%m%d %H:%M:%S ") + (now.tzname() or "EST")

    def api_sessions(self) -> list[Session]:
        return [s for s in self.sessions if s.client_id is not None and not s.closed]

    def session_for(self, client_id: int) -> Session | None:
        for session in self.sessions:
            if session.client_id == client_id and not session.closed:
                return session
        return None

    def forget_session(self, session: Session) -> None:
        self.sessions.discard(session)
        self._drop_market_subs(session)

    def on_StartApi(self, s: Session, r: P.StartApi) -> None:
        if s.client_id is not None:
            s.error(-1, 321, "Error validating request.-'startApi' : cause - API already started")
            return
        other = self.session_for(r.client_id)
        if other is not None and other is not s:
            log.warning("duplicate client id refused", extra={"client_id": r.client_id, "peer": s.peer})
            s.error(-1, 326, DUPLICATE_CLIENT_ID)
            s.close()
            return
        s.client_id = r.client_id
        s.send(P.managed_accounts([self.broker.account.account_id]))
        s.send(P.next_valid_id(self.broker.next_order_id(r.client_id)))
        if self.config.farm_codes_on_connect:
            for code in (2104, 2106, 2158) if self.data_farm_ok else (2103, 2106, 2158):
                s.error(-1, code, CODE_TEXT[code])
        if not self.ib_connected:
            s.error(-1, 1100, CODE_TEXT[1100])
        log.info("api started", extra={"client_id": r.client_id, "peer": s.peer})

    def on_ReqIds(self, s: Session, r: P.ReqIds) -> None:
        s.send(P.next_valid_id(self.broker.next_order_id(s.client_id or 0)))

    def on_ReqManagedAccts(self, s: Session, r: P.ReqManagedAccts) -> None:
        s.send(P.managed_accounts([self.broker.account.account_id]))

    def on_ReqCurrentTime(self, s: Session, r: P.ReqCurrentTime) -> None:
        s.send(P.current_time(self.clock.now_ns() // 1_000_000_000))

    def on_ReqMarketDataType(self, s: Session, r: P.ReqMarketDataType) -> None:
        if r.market_data_type not in (1, 2, 3, 4):
            s.error(-1, 321, f"Error validating request.-'marketDataType' : cause - invalid type {r.market_data_type}")
            return
        s.market_data_type = r.market_data_type

    def on_Unsupported(self, s: Session, r: P.Unsupported) -> None:
        log.info("unsupported request", extra={"msg_id": r.msg_id, "request": r.name, "client_id": s.client_id})
        if r.msg_id == 10:
            s.error(r.req_id, 10092, "Deep market data is not supported by the IB gateway simulator.")
        elif r.msg_id in _HISTORICAL_FAMILY:
            s.error(r.req_id, 162, f"Historical Market Data Service error message:{r.name} is not supported by the IB gateway simulator")
        elif r.name.startswith("message "):
            s.error(-1, 321, f"Error validating request.-'{r.msg_id}' : cause - Unknown message id {r.msg_id}")
        else:
            s.error(r.req_id, 321, f"Error validating request.-'{r.name}' : cause - {r.name} is not supported by the IB gateway simulator")


# ------------------------------------------------------------------- embedding


class SimThread:
    """The simulator on a background thread with its own event loop (tests, tools)."""

    def __init__(self, config: SimConfig, clock: qe_clock.Clock | None = None) -> None:
        self.config = config
        self.clock = clock
        self.server: SimServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> "SimThread":
        self.thread = threading.Thread(target=self._run, name="ib-sim", daemon=True)
        self.thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("simulator did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.server = SimServer(self.config, self.clock)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surface start-up errors to the caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def control_port(self) -> int:
        assert self.server is not None
        return self.server.control_port

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the simulator's loop and return its result (thread-safe)."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is None or self.server is None or self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.thread is not None:
                self.thread.join(timeout)


# ------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    env = SimConfig.from_env()
    p = argparse.ArgumentParser(prog="qe-ib-sim", description="IB gateway simulator (TWS API, server version 176)")
    p.add_argument("--host", default=env.host, help="listen address (QE_SIM_HOST)")
    p.add_argument("--port", type=int, default=env.port, help="TWS API port, 0 = any free port (QE_SIM_PORT, default 4002)")
    p.add_argument("--control-port", type=int, default=env.control_port, help="control HTTP port, 0 = any (QE_SIM_CONTROL_PORT)")
    p.add_argument("--metrics-port", type=int, default=-1 if env.metrics_port is None else env.metrics_port,
                   help="Prometheus metrics port, 0 = any, -1 = none (QE_SIM_METRICS_PORT; the demo uses 9108)")
    p.add_argument("--universe", default=env.universe_path, help="universe CSV (QE_SIM_UNIVERSE)")
    p.add_argument("--account-file", default=env.account_path, help="account YAML (QE_SIM_ACCOUNT); 'none' = empty account")
    p.add_argument("--seed", type=int, default=env.seed, help="market seed (QE_SIM_SEED)")
    p.add_argument("--quote-rate", type=float, default=env.quote_rate, help="quote updates / symbol / wall second")
    p.add_argument("--print-rate", type=float, default=env.print_rate, help="prints / symbol / wall second")
    p.add_argument("--tick-interval", type=float, default=env.tick_interval_s, help="market timer period, seconds")
    p.add_argument("--max-tbt", type=int, default=env.max_tick_by_tick, help="max tick-by-tick subscriptions (10190 beyond)")
    p.add_argument("--max-lines", type=int, default=env.max_market_data_lines, help="max market data lines (101 beyond)")
    p.add_argument("--account-update-s", type=float, default=env.account_update_s, help="account push period, seconds")
    p.add_argument("--master-client-id", type=int, default=env.master_client_id if env.master_client_id is not None else -1,
                   help="client id that sees every order (-1: none)")
    p.add_argument("--order-id-file", default=env.order_id_file,
                   help="file keeping the highest order id across restarts (QE_SIM_ORDER_ID_FILE; default: none)")
    p.add_argument("--referee-log-cap", type=int, default=env.referee_log_cap,
                   help="entries kept in the referee log (QE_SIM_REFEREE_LOG_CAP, default 100000)")
    p.add_argument("--no-fill-on-prints", action="store_true", help="resting limits fill only when quotes cross them")
    p.add_argument("--sessions", action="store_true", default=env.sessions,
                   help="trading sessions on the XNYS calendar: fills in regular hours, DAY expiry (QE_SIM_SESSIONS=1)")
    p.add_argument("--log-level", default=os.environ.get("QE_LOG_LEVEL", "INFO"))
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    account = None if str(args.account_file).lower() in ("", "none") else args.account_file
    return SimConfig(
        universe_path=args.universe,
        account_path=account,
        host=args.host,
        port=args.port,
        control_port=args.control_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        seed=args.seed,
        quote_rate=args.quote_rate,
        print_rate=args.print_rate,
        tick_interval_s=args.tick_interval,
        max_tick_by_tick=args.max_tbt,
        max_market_data_lines=args.max_lines,
        account_update_s=args.account_update_s,
        master_client_id=None if args.master_client_id < 0 else args.master_client_id,
        fill_on_prints=not args.no_fill_on_prints,
        referee_log_cap=args.referee_log_cap,
        order_id_file=args.order_id_file or None,
        sessions=args.sessions,
    )


async def _serve(config: SimConfig) -> None:
    server = SimServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(_shutdown(server, s)))
    assert server.stopped is not None
    await server.stopped.wait()


async def _shutdown(server: SimServer, sig: signal.Signals) -> None:
    log.info("signal received, stopping", extra={"signal": sig.name})
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    from qe.log import setup

    args = build_parser().parse_args(argv)
    setup("ib-sim", args.log_level)
    try:
        config = config_from_args(args)
        asyncio.run(_serve(config))
    except (SimConfigError, qe_clock.ClockConfigError, ValueError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        print(f"qe-ib-sim: {exc}", file=sys.stderr)
        return 78 if not isinstance(exc, OSError) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
