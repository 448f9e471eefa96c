"""The asyncio shell: TCP sessions speaking the TWS API, timers, fault switches.

All decisions live in the pure modules (protocol, market, broker); this module
routes requests to them and their events to the right client sessions:

* order updates go to the client that placed the order and to the master client;
* fills also update positions / account subscribers;
* market events go to the reqMktData and tick-by-tick subscribers of the symbol.

It is the simulator, not a daemon, so asyncio is fine here; everything runs in one
event loop (also when started on a background thread by tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from qe import clock as qe_clock
from qe.universe import load_universe

from . import protocol as P
from .broker import (
    NEW_YORK,
    Account,
    Broker,
    FillReport,
    MarketChange,
    OrderError,
    OrderUpdate,
    PositionChange,
    Precautions,
    exec_fields,
    exec_time_text,
)
from .config import AccountSpec, SimConfig, SimConfigError, load_account
from .contracts import Catalogue
from .handlers_reference import ReferenceHandlers
from .market import Market, MarketConfig, PrintEvent, QuoteEvent

log = logging.getLogger("sim.server")

CODE_TEXT = {
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
    2103: "Market data farm connection is broken:usfarm",
    2104: "Market data farm connection is OK:usfarm",
    2105: "HMDS data farm connection is broken:ushmds",
    2106: "HMDS data farm connection is OK:ushmds",
    2110: "Connectivity between Trader Workstation and server is broken. It will be restored automatically.",
    2158: "Sec-def data farm connection is OK:secdefnj",
}
DUPLICATE_CLIENT_ID = "Unable to connect as the client id is already in use. Retry with a unique client id."

# Requests whose errors ib_async treats as final for the request (not a warning).
_HISTORICAL_FAMILY = {20, 50, 87, 88, 96}

ACCOUNT_VALUE_KEYS_USD = (
    "NetLiquidation",
    "EquityWithLoanValue",
    "TotalCashValue",
    "CashBalance",
    "GrossPositionValue",
    "StockMarketValue",
    "InitMarginReq",
    "MaintMarginReq",
    "FullInitMarginReq",
    "FullMaintMarginReq",
    "AvailableFunds",
    "FullAvailableFunds",
    "ExcessLiquidity",
    "FullExcessLiquidity",
    "BuyingPower",
    "UnrealizedPnL",
    "RealizedPnL",
)
ACCOUNT_VALUE_KEYS_BASE = ("NetLiquidationByCurrency", "CashBalance", "TotalCashBalance", "UnrealizedPnL", "RealizedPnL")


def _money(value: float) -> str:
    return f"{value:.2f}"


@dataclass
class MarketSub:
    session: "Session"
    req_id: int
    kind: str  # "mkt", "Last", "AllLast", "BidAsk", "MidPoint"
    ignore_size: bool = False


@dataclass
class AckHold:
    until: float
    buffer: list[bytes] = field(default_factory=list)


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: "SimServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.version = 0
        self.client_id: int | None = None
        self.peer = ""
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False
        self.market_data_type = 1
        self.mkt_subs: dict[int, MarketSub] = {}
        self.tbt_subs: dict[int, MarketSub] = {}
        self.account_updates = False
        self.positions_sub = False
        self.account_multi: set[int] = set()
        self.summary_subs: dict[int, set[str] | None] = {}
        self.holds: dict[tuple[int, int], AckHold] = {}
        self.dropped_market_msgs = 0
        self.requests = 0

    # --------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.sessions.add(self)
        log.info("client connected", extra={"peer": self.peer})

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.forget_session(self)
        log.info("client disconnected", extra={"peer": self.peer, "client_id": self.client_id, "error": str(exc or "")})

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            if not self.version:
                parsed = P.parse_handshake(bytes(self.buffer[:1100]))
                if parsed is None:
                    return
                handshake, consumed = parsed
                del self.buffer[:consumed]
                version, why = P.negotiate(handshake)
                if version is None:
                    log.warning("client version refused", extra={"peer": self.peer, "min": handshake.min_version,
                                                                  "max": handshake.max_version, "reason": why})
                    if handshake.min_version > P.SERVER_VERSION:
                        self.send(P.handshake_reply(P.SERVER_VERSION, self.server.connection_time_text()))
                    self.close()
                    return
                self.version = version
                self.send(P.handshake_reply(self.version, self.server.connection_time_text()))
            for fields in P.split_frames(self.buffer):
                self.handle(fields)
        except P.ProtocolError as exc:
            log.warning("dropping client: broken stream", extra={"peer": self.peer, "error": str(exc)})
            self.abort()

    def send(self, message: bytes) -> None:
        if self.closed:
            return
        self.out.append(message)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def send_market(self, message: bytes) -> None:
        """Market data may be shed for a client that does not keep up (IB does similar)."""
        if self.transport is not None and self.transport.get_write_buffer_size() > self.server.config.max_write_buffer:
            self.dropped_market_msgs += 1
            return
        self.send(message)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            data = b"".join(self.out)
            self.out.clear()
            self.transport.write(data)
        else:
            self.out.clear()

    def close(self) -> None:
        """Flush, then close (FIN)."""
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        """Drop the connection now (like a network failure)."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    # ---------------------------------------------------------------- requests

    def error(self, req_id: int, code: int, text: str) -> None:
        self.send(P.error(req_id, code, text))

    def handle(self, fields: list[str]) -> None:
        self.requests += 1
        try:
            request = P.decode_request(fields)
        except P.MalformedRequest as exc:
            log.warning("malformed request", extra={"peer": self.peer, "fields": fields[:12], "error": exc.text})
            self.error(exc.req_id, 321, f"Error validating request.-'{exc.msg_id}' : cause - {exc.text}")
            return
        if self.client_id is None and not isinstance(request, P.StartApi):
            log.warning("request before startApi ignored", extra={"peer": self.peer, "msg_id": fields[0]})
            return
        handler = getattr(self.server, "on_" + type(request).__name__, None)
        try:
            if handler is None:  # pragma: no cover - every request type has a handler
                raise NotImplementedError(type(request).__name__)
            handler(self, request)
        except Exception as exc:  # never let one bad request take the server down
            log.exception("request failed", extra={"peer": self.peer, "request": repr(request)[:300]})
            req_id = getattr(request, "req_id", getattr(request, "order_id", -1))
            self.error(req_id if isinstance(req_id, int) else -1, 321, f"Error validating request.-'' : cause - {exc}")


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


class SimServer(ReferenceHandlers):
    def __init__(self, config: SimConfig, clock: qe_clock.Clock | None = None) -> None:
        self.config = config
        self.clock = clock or qe_clock.from_env()
        self.started_wall = time.time()
        self.universe = load_universe(config.universe_path)
        self.catalogue = Catalogue(self.universe.values())
        self.market = Market(
            {symbol: inst.ref_price for symbol, inst in self.universe.items()},
            seed=config.seed,
            config=MarketConfig(quote_rate=config.quote_rate, print_rate=config.print_rate),
            now_ns=self.clock.now_ns,
        )
        self.account_spec = self._load_account_spec()
        self.broker = self._new_broker(self.account_spec)
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

    # ----------------------------------------------------------------- set-up

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
        )

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        await self._listen()
        from .control import ControlServer  # late import: control depends on this module

        self.control = ControlServer(self)
        self.control_port = await self.control.start(self.config.control_host, self.config.control_port)
        self.tasks.append(asyncio.create_task(self._market_loop(), name="market"))
        self.tasks.append(asyncio.create_task(self._account_loop(), name="account"))
        log.info(
            "listening",
            extra={
                "host": self.config.host,
                "port": self.port,
                "control_port": self.control_port,
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
        for session in list(self.sessions):
            session.close()
        if self.stopped is not None:
            self.stopped.set()

    def connection_time_text(self) -> str:
        now = datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=timezone.utc).astimezone(NEW_YORK)
        return now.strftime("%Y%m%d %H:%M:%S ") + (now.tzname() or "EST")

    # ---------------------------------------------------------------- sessions

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

    def _drop_market_subs(self, session: Session) -> None:
        for sub in list(session.mkt_subs.values()):
            self._remove_sub(self.mkt_by_symbol, sub)
        for sub in list(session.tbt_subs.values()):
            self._remove_sub(self.tbt_by_symbol, sub)
        session.mkt_subs.clear()
        session.tbt_subs.clear()

    def _remove_sub(self, index: dict[str, list[MarketSub]], sub: MarketSub) -> None:
        for subs in index.values():
            if sub in subs:
                subs.remove(sub)

    def order_sessions(self, client_id: int) -> list[Session]:
        """Who hears about an order: its own client, and the master client."""
        result = []
        for session in self.api_sessions():
            if session.client_id == client_id or (
                self.config.master_client_id is not None and session.client_id == self.config.master_client_id
            ):
                result.append(session)
        return result

    def tbt_count(self) -> int:
        return sum(len(s.tbt_subs) for s in self.sessions)

    def mkt_count(self) -> int:
        return sum(len(s.mkt_subs) for s in self.sessions)

    # -------------------------------------------------------- request handlers

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

    def on_ReqContractDetails(self, s: Session, r: P.ReqContractDetails) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        exchange = r.contract.exchange or "SMART"
        s.send(P.contract_details(r.req_id, info, exchange, *self._trading_hours()))
        s.send(P.contract_details_end(r.req_id))

    def _trading_hours(self) -> tuple[str, str]:
        day = datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=timezone.utc).astimezone(NEW_YORK).strftime("%Y%m%d")
        return f"{day}:0400-{day}:2000", f"{day}:0930-{day}:1600"

    # ---- market data

    def on_ReqMktData(self, s: Session, r: P.ReqMktData) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        if r.req_id in s.mkt_subs:
            s.error(r.req_id, 322, f"Error processing request.-'{r.req_id}' : cause - Duplicate ticker id")
            return
        if not r.snapshot and self.mkt_count() >= self.config.max_market_data_lines:
            s.error(r.req_id, 101, f"Max number of tickers has been reached ({self.config.max_market_data_lines})")
            return
        s.send(P.tick_req_params(r.req_id, info.min_tick, "9c0001", 3))
        s.send(P.market_data_type(r.req_id, 1))
        if self.data_farm_ok and self.ib_connected:
            self._send_snapshot(s, r.req_id, info.symbol)
        if r.snapshot or r.regulatory_snapshot:
            s.send(P.tick_snapshot_end(r.req_id))
            return
        sub = MarketSub(s, r.req_id, "mkt")
        s.mkt_subs[r.req_id] = sub
        self.mkt_by_symbol.setdefault(info.symbol, []).append(sub)

    def _send_snapshot(self, s: Session, req_id: int, symbol: str) -> None:
        book = self.market.book(symbol)
        send = s.send
        send(P.tick_price(req_id, P.BID, P.price_text(book.bid), book.bid_size, 1))
        send(P.tick_price(req_id, P.ASK, P.price_text(book.ask), book.ask_size, 1))
        if book.last:
            send(P.tick_price(req_id, P.LAST, P.price_text(book.last), book.last_size, 0))
        if book.high:
            send(P.tick_price(req_id, P.HIGH, P.price_text(book.high), 0, 0))
            send(P.tick_price(req_id, P.LOW, P.price_text(book.low), 0, 0))
        send(P.tick_size(req_id, P.VOLUME, book.volume))
        send(P.tick_price(req_id, P.CLOSE, P.price_text(book.ref), 0, 0))
        if book.last_ts_ns:
            send(P.tick_string(req_id, P.LAST_TIMESTAMP, str(book.last_ts_ns // 1_000_000_000)))
        if book.last_venue:
            send(P.tick_string(req_id, P.LAST_EXCHANGE, book.last_venue))
        send(P.tick_generic(req_id, P.HALTED, 0))

    def on_CancelMktData(self, s: Session, r: P.CancelMktData) -> None:
        sub = s.mkt_subs.pop(r.req_id, None)
        if sub is None:
            s.error(r.req_id, 300, f"Can't find EId with tickerId:{r.req_id}")
            return
        self._remove_sub(self.mkt_by_symbol, sub)

    def on_ReqTickByTick(self, s: Session, r: P.ReqTickByTick) -> None:
        info = self.catalogue.resolve(r.contract)
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        if r.tick_type not in P.TBT_TYPES:
            s.error(r.req_id, 10189, f"Failed to request tick-by-tick data:Invalid tick type '{r.tick_type}'")
            return
        if r.req_id in s.tbt_subs:
            s.error(r.req_id, 322, f"Error processing request.-'{r.req_id}' : cause - Duplicate ticker id")
            return
        if self.tbt_count() >= self.config.max_tick_by_tick:
            s.error(r.req_id, 10190, "Max number of tick-by-tick requests has been reached.")
            return
        sub = MarketSub(s, r.req_id, r.tick_type, r.ignore_size)
        s.tbt_subs[r.req_id] = sub
        self.tbt_by_symbol.setdefault(info.symbol, []).append(sub)
        if r.tick_type == "BidAsk" and self.data_farm_ok and self.ib_connected:
            book = self.market.book(info.symbol)
            s.send(
                P.tick_by_tick_bid_ask(
                    r.req_id, self.clock.now_ns() // 1_000_000_000, P.price_text(book.bid), P.price_text(book.ask),
                    book.bid_size, book.ask_size,
                )
            )

    def on_CancelTickByTick(self, s: Session, r: P.CancelTickByTick) -> None:
        sub = s.tbt_subs.pop(r.req_id, None)
        if sub is None:
            log.info("cancel of unknown tick-by-tick request", extra={"req_id": r.req_id, "client_id": s.client_id})
            return
        self._remove_sub(self.tbt_by_symbol, sub)

    # ---- orders

    def on_PlaceOrder(self, s: Session, r: P.PlaceOrder) -> None:
        assert s.client_id is not None
        info = self.catalogue.resolve(r.contract)
        if r.what_if:
            self._what_if(s, r, info)
        else:
            ack = self._take_ack_fault()
            events = self.broker.place(s.client_id, r, info)
            self.dispatch(events, origin=s, ack_fault=ack)
        self.order_ids.save(self.broker.max_order_id)

    def _what_if(self, s: Session, r: P.PlaceOrder, info: P.ContractInfo | None) -> None:
        """A what-if preview: one openOrder carrying the margin and commission figures; no order."""
        result = self.broker.what_if(r, info)
        if isinstance(result, tuple):
            s.error(r.order_id, *result)
            return
        assert info is not None
        fields = P.OrderFields(
            order_id=r.order_id, client_id=s.client_id or 0, perm_id=0, contract=info, action=r.action,
            total_quantity=r.total_quantity, order_type=r.order_type,
            lmt_price=r.lmt_price if r.order_type == "LMT" else None, aux_price=None, tif=r.tif or "DAY",
            account=self.broker.account.account_id, order_ref=r.order_ref, outside_rth=r.outside_rth,
            hidden=r.hidden, display_size=r.display_size, parent_id=r.parent_id, status="PreSubmitted",
            remaining=r.total_quantity, extra={"what_if": True, "order_state": result.order_state()},
        )
        s.send(P.open_order(fields))

    def on_CancelOrder(self, s: Session, r: P.CancelOrder) -> None:
        assert s.client_id is not None
        ack = self._take_ack_fault()
        self.dispatch(self.broker.cancel(s.client_id, r.order_id), origin=s, ack_fault=ack)

    def on_ReqGlobalCancel(self, s: Session, r: P.ReqGlobalCancel) -> None:
        self.dispatch(self.broker.global_cancel(s.client_id if s.client_id is not None else -1), origin=s, ack_fault=None)

    def _take_ack_fault(self) -> tuple[str, float] | None:
        faults = self.broker.faults
        if faults.drop_acks_next > 0:
            faults.drop_acks_next -= 1
            return ("drop", 0.0)
        if faults.delay_acks_next > 0:
            faults.delay_acks_next -= 1
            return ("delay", faults.delay_acks_seconds)
        return None

    def _visible_orders(self, s: Session, all_clients: bool) -> list:
        master = self.config.master_client_id
        if all_clients or (master is not None and s.client_id == master):
            return self.broker.open_orders()
        return self.broker.open_orders(s.client_id)

    def _send_open_orders(self, s: Session, all_clients: bool) -> None:
        for order in self._visible_orders(s, all_clients):
            snapshot = order.fields()
            s.send(P.open_order(snapshot))
            s.send(P.order_status(snapshot))
        s.send(P.open_order_end())

    def on_ReqOpenOrders(self, s: Session, r: P.ReqOpenOrders) -> None:
        self._send_open_orders(s, all_clients=False)

    def on_ReqAllOpenOrders(self, s: Session, r: P.ReqAllOpenOrders) -> None:
        self._send_open_orders(s, all_clients=True)

    def on_ReqAutoOpenOrders(self, s: Session, r: P.ReqAutoOpenOrders) -> None:
        if s.client_id != 0:
            s.error(-1, 321, "Error validating request.-'autoOpenOrders' : cause - only client id 0 may bind manual orders")

    def on_ReqCompletedOrders(self, s: Session, r: P.ReqCompletedOrders) -> None:
        for order in self.broker.completed_orders():
            status = order.status
            completed_status = {"Filled": "Filled", "Cancelled": "Cancelled by Trader"}.get(status, order.reject_reason)
            s.send(P.completed_order(order.fields(exec_time_text(order.updated_ns), completed_status)))
        s.send(P.completed_orders_end())

    def on_ReqExecutions(self, s: Session, r: P.ReqExecutions) -> None:
        # Any client sees the account's executions (narrowed by the filter, clientId 0 = all).
        executions = [e for e in self.broker.find_executions(r.filter) if self.catalogue.get(e.symbol)]
        for e in executions:
            s.send(P.exec_details(r.req_id, self.catalogue.by_symbol[e.symbol], exec_fields(e)))
        s.send(P.exec_details_end(r.req_id))
        for e in executions:
            s.send(P.commission_report(e.exec_id, e.commission, "USD", e.realized_pnl))

    # ---- account

    def on_ReqPositions(self, s: Session, r: P.ReqPositions) -> None:
        account = self.broker.account
        for info, pos, _mark in self.broker.portfolio():
            if pos.qty:
                s.send(P.position(account.account_id, info, float(pos.qty), round(pos.avg_cost, 8)))
        s.send(P.position_end())
        s.positions_sub = True

    def on_CancelPositions(self, s: Session, r: P.CancelPositions) -> None:
        s.positions_sub = False

    def on_ReqPositionsMulti(self, s: Session, r: P.ReqPositionsMulti) -> None:
        account = self.broker.account
        if not r.account or r.account == account.account_id:
            for info, pos, _mark in self.broker.portfolio():
                if pos.qty:
                    s.send(P.position_multi(r.req_id, account.account_id, info, float(pos.qty), round(pos.avg_cost, 8), r.model_code))
        s.send(P.position_multi_end(r.req_id))

    def on_CancelPositionsMulti(self, s: Session, r: P.CancelPositionsMulti) -> None:
        pass

    def account_value_rows(self) -> list[tuple[str, str, str]]:
        values = self.broker.account_values()
        account = self.broker.account
        rows = [
            ("AccountCode", account.account_id, ""),
            ("AccountType", "INDIVIDUAL", ""),
            ("AccountReady", "true", ""),
            ("Currency", "USD", "USD"),
            ("Cushion", f"{values['Cushion']:.6f}", ""),
            ("Leverage-S", f"{values['Leverage']:.4f}", ""),
            ("DayTradesRemaining", "-1", ""),
        ]
        rows += [(key, _money(values[key]), "USD") for key in ACCOUNT_VALUE_KEYS_USD]
        base = {
            "NetLiquidationByCurrency": values["NetLiquidation"],
            "CashBalance": values["CashBalance"],
            "TotalCashBalance": values["CashBalance"],
            "UnrealizedPnL": values["UnrealizedPnL"],
            "RealizedPnL": values["RealizedPnL"],
        }
        rows += [(key, _money(base[key]), "BASE") for key in ACCOUNT_VALUE_KEYS_BASE]
        rows.append(("NetLiquidationByCurrency", _money(values["NetLiquidation"]), "USD"))
        return rows

    def _send_account_values(self, s: Session) -> None:
        account_id = self.broker.account.account_id
        for key, value, currency in self.account_value_rows():
            s.send(P.account_value(key, value, currency, account_id))

    def _send_portfolio(self, s: Session, symbols: set[str] | None = None) -> None:
        account_id = self.broker.account.account_id
        for info, pos, mark in self.broker.portfolio():
            if symbols is not None and info.symbol not in symbols:
                continue
            if not pos.qty and symbols is None:
                continue
            s.send(
                P.portfolio_value(
                    info,
                    float(pos.qty),
                    round(mark, 4),
                    round(pos.qty * mark, 2),
                    round(pos.avg_cost, 8),
                    round(pos.qty * (mark - pos.avg_cost), 2) if pos.qty else 0.0,
                    round(pos.realized_pnl, 2),
                    account_id,
                )
            )

    def _account_time_text(self) -> str:
        now = datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=timezone.utc).astimezone(NEW_YORK)
        return now.strftime("%H:%M")

    def on_ReqAccountUpdates(self, s: Session, r: P.ReqAccountUpdates) -> None:
        account_id = self.broker.account.account_id
        if not r.subscribe:
            s.account_updates = False
            return
        if r.account and r.account != account_id:
            s.error(-1, 321, f"Error validating request.-'acctCode' : cause - unknown account {r.account!r}")
            s.send(P.account_download_end(r.account))
            return
        s.account_updates = True
        self._send_account_values(s)
        self._send_portfolio(s)
        s.send(P.account_update_time(self._account_time_text()))
        s.send(P.account_download_end(account_id))

    def on_ReqAccountUpdatesMulti(self, s: Session, r: P.ReqAccountUpdatesMulti) -> None:
        account_id = self.broker.account.account_id
        if not r.account or r.account in (account_id, "All"):
            for key, value, currency in self.account_value_rows():
                s.send(P.account_update_multi(r.req_id, account_id, r.model_code, key, value, currency))
            s.account_multi.add(r.req_id)
        s.send(P.account_update_multi_end(r.req_id))

    def on_CancelAccountUpdatesMulti(self, s: Session, r: P.CancelAccountUpdatesMulti) -> None:
        s.account_multi.discard(r.req_id)

    def _summary_rows(self) -> dict[str, tuple[str, str]]:
        values = self.broker.account_values()
        rows = {key: (_money(values[key]), "USD") for key in ACCOUNT_VALUE_KEYS_USD if key in values}
        rows["TotalCashValue"] = (_money(values["TotalCashValue"]), "USD")
        rows["SettledCash"] = (_money(values["TotalCashValue"]), "USD")
        rows["AccruedCash"] = ("0.00", "USD")
        rows["AccountType"] = ("INDIVIDUAL", "")
        rows["Cushion"] = (f"{values['Cushion']:.6f}", "")
        rows["Leverage"] = (f"{values['Leverage']:.4f}", "")
        rows["DayTradesRemaining"] = ("-1", "")
        rows["RegTEquity"] = (_money(values["NetLiquidation"]), "USD")
        rows["RegTMargin"] = (_money(values["InitMarginReq"]), "USD")
        rows["SMA"] = (_money(max(0.0, values["AvailableFunds"])), "USD")
        return rows

    def _send_summary(self, s: Session, req_id: int, tags: set[str] | None) -> None:
        account_id = self.broker.account.account_id
        for tag, (value, currency) in self._summary_rows().items():
            if tags is None or tag in tags:
                s.send(P.account_summary(req_id, account_id, tag, value, currency))
        s.send(P.account_summary_end(req_id))

    def on_ReqAccountSummary(self, s: Session, r: P.ReqAccountSummary) -> None:
        tags = {t.strip() for t in r.tags.split(",") if t.strip()}
        wanted = None if not tags or "All" in tags else tags
        s.summary_subs[r.req_id] = wanted
        self._send_summary(s, r.req_id, wanted)

    def on_CancelAccountSummary(self, s: Session, r: P.CancelAccountSummary) -> None:
        s.summary_subs.pop(r.req_id, None)

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

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, events: list, origin: Session | None = None, ack_fault: tuple[str, float] | None = None) -> None:
        """Turn broker events into messages for the sessions that should see them."""
        changed_positions: set[str] = set()
        for event in events:
            if isinstance(event, MarketChange):
                self.publish_market(event.event)
            elif isinstance(event, PositionChange):
                changed_positions.add(event.symbol)
            elif isinstance(event, OrderUpdate):
                messages = [P.open_order(event.snapshot)] if event.open_order else []
                messages.append(P.order_status(event.snapshot))
                acked_by_fault = event.ack and ack_fault is not None
                status_fault = None if acked_by_fault else self._take_status_fault(event)
                if status_fault is not None:
                    # Lost, or late, for every client that would hear it; reqOpenOrders /
                    # reqCompletedOrders still tell the truth.
                    if status_fault[0] == "delay":
                        for target in self.order_sessions(event.client_id):
                            self._deliver(target, (event.client_id, event.order_id), messages, True, status_fault)
                    continue
                self._order_messages(event.client_id, event.order_id, messages, event.ack, origin, ack_fault)
            elif isinstance(event, FillReport):
                messages = [P.exec_details(-1, event.contract, event.execution)]
                self._order_messages(event.client_id, event.order_id, messages, False, origin, ack_fault)
                report = P.commission_report(event.execution.exec_id, event.commission, "USD", event.realized_pnl)
                self._order_messages(event.client_id, event.order_id, [report], False, origin, ack_fault)
            elif isinstance(event, OrderError):
                message = P.error(event.order_id, event.code, event.text)
                targets = self.order_sessions(event.client_id)
                # Errors about an order go to its own client only (as in IB): never to
                # another client under an id that is not its own (a global cancel of
                # another client's order while that client is away tells no one).
                targets = [t for t in targets if t.client_id == event.client_id]
                for target in targets:
                    self._deliver(target, (event.client_id, event.order_id), [message], event.ack and target is origin, ack_fault)
        if changed_positions:
            self.publish_positions(changed_positions)

    def _take_status_fault(self, event: OrderUpdate) -> tuple[str, float] | None:
        """The armed status fault for this order update, if it applies (and is used up by it)."""
        faults = self.broker.faults
        if faults.status_fills_only and event.ack:
            return None
        detail = {"client_id": event.client_id, "order_id": event.order_id, "perm_id": event.perm_id,
                  "order_ref": event.snapshot.order_ref, "status": event.snapshot.status, "filled": event.snapshot.filled}
        if faults.drop_status_next > 0:
            faults.drop_status_next -= 1
            self.broker.log_fault("status_dropped", **detail)
            log.info("order status dropped (fault)", extra=detail)
            return ("drop", 0.0)
        if faults.delay_status_next > 0:
            faults.delay_status_next -= 1
            self.broker.log_fault("status_delayed", seconds=faults.delay_status_seconds, **detail)
            return ("delay", faults.delay_status_seconds)
        return None

    def _order_messages(
        self, client_id: int, order_id: int, messages: list[bytes], ack: bool, origin: Session | None,
        ack_fault: tuple[str, float] | None,
    ) -> None:
        for target in self.order_sessions(client_id):
            is_origin_ack = ack and target is origin
            self._deliver(target, (client_id, order_id), messages, is_origin_ack, ack_fault)

    def _deliver(
        self, target: Session, key: tuple[int, int], messages: list[bytes], is_ack: bool, ack_fault: tuple[str, float] | None
    ) -> None:
        hold = target.holds.get(key)
        if is_ack and ack_fault is not None:
            mode, seconds = ack_fault
            if mode == "drop":
                log.info("ack dropped (fault)", extra={"client_id": key[0], "order_id": key[1]})
                return
            if hold is None:
                hold = target.holds[key] = AckHold(until=time.monotonic() + seconds)
                assert self.loop is not None
                self.loop.call_later(seconds, self._release_hold, target, key)
        if hold is not None:
            hold.buffer.extend(messages)
            return
        for message in messages:
            target.send(message)

    def _release_hold(self, target: Session, key: tuple[int, int]) -> None:
        hold = target.holds.pop(key, None)
        if hold is None or target.closed:
            return
        log.info("delayed acks released", extra={"client_id": key[0], "order_id": key[1], "messages": len(hold.buffer)})
        for message in hold.buffer:
            target.send(message)

    def publish_positions(self, symbols: set[str]) -> None:
        account = self.broker.account
        for session in self.api_sessions():
            if session.positions_sub:
                for symbol in symbols:
                    info = self.catalogue.get(symbol)
                    pos = account.positions.get(symbol)
                    if info is not None and pos is not None:
                        session.send(P.position(account.account_id, info, float(pos.qty), round(pos.avg_cost, 8)))
            if session.account_updates:
                self._send_portfolio(session, symbols)
                self._send_account_values(session)
            for req_id in session.account_multi:
                for key, value, currency in self.account_value_rows():
                    session.send(P.account_update_multi(req_id, account.account_id, "", key, value, currency))

    # ------------------------------------------------------------ market data

    def publish_market(self, event: QuoteEvent | PrintEvent) -> None:
        self.market_events += 1
        if not (self.data_farm_ok and self.ib_connected):
            if isinstance(event, QuoteEvent):
                self.last_quote[event.symbol] = (event.bid, event.ask, event.bid_size, event.ask_size)
            return
        symbol = event.symbol
        mkt = self.mkt_by_symbol.get(symbol)
        tbt = self.tbt_by_symbol.get(symbol)
        if isinstance(event, QuoteEvent):
            prev = self.last_quote.get(symbol, (0, 0, 0, 0))
            self.last_quote[symbol] = (event.bid, event.ask, event.bid_size, event.ask_size)
            if mkt:
                self._publish_quote(mkt, event, prev)
            if tbt:
                epoch_s = event.ts_ns // 1_000_000_000
                bid, ask = P.price_text(event.bid), P.price_text(event.ask)
                price_changed = (event.bid, event.ask) != prev[:2]
                for sub in tbt:
                    if sub.kind == "BidAsk":
                        if sub.ignore_size and not price_changed:
                            continue
                        sub.session.send_market(P.tick_by_tick_bid_ask(sub.req_id, epoch_s, bid, ask, event.bid_size, event.ask_size))
                        self.ticks_sent += 1
                    elif sub.kind == "MidPoint" and price_changed:
                        sub.session.send_market(P.tick_by_tick_mid_point(sub.req_id, epoch_s, (event.bid + event.ask) / 200))
                        self.ticks_sent += 1
        else:
            if mkt:
                self._publish_print(mkt, event)
            if tbt:
                epoch_s = event.ts_ns // 1_000_000_000
                price = P.price_text(event.price)
                for sub in tbt:
                    if sub.kind in ("AllLast", "Last"):
                        tick_type = P.TBT_ALL_LAST if sub.kind == "AllLast" else P.TBT_LAST
                        sub.session.send_market(
                            P.tick_by_tick_last(sub.req_id, tick_type, epoch_s, price, event.size, 0, event.venue, event.conditions)
                        )
                        self.ticks_sent += 1

    def _publish_quote(self, subs: list[MarketSub], q: QuoteEvent, prev: tuple[int, int, int, int]) -> None:
        # Only what changed, like TWS: a price tick carries its size; a size-only change is a size tick.
        parts: list[tuple[int, str, int, bool]] = []  # (tick type, price text or "", size, is price)
        if q.bid != prev[0]:
            parts.append((P.BID, P.price_text(q.bid), q.bid_size, True))
        elif q.bid_size != prev[2]:
            parts.append((P.BID_SIZE, "", q.bid_size, False))
        if q.ask != prev[1]:
            parts.append((P.ASK, P.price_text(q.ask), q.ask_size, True))
        elif q.ask_size != prev[3]:
            parts.append((P.ASK_SIZE, "", q.ask_size, False))
        if not parts:
            return
        for sub in subs:
            for tick_type, price, size, is_price in parts:
                if is_price:
                    sub.session.send_market(P.tick_price(sub.req_id, tick_type, price, size, 1))
                else:
                    sub.session.send_market(P.tick_size(sub.req_id, tick_type, size))
                self.ticks_sent += 1

    def _publish_print(self, subs: list[MarketSub], t: PrintEvent) -> None:
        book = self.market.book(t.symbol)
        price = P.price_text(t.price)
        epoch = str(t.ts_ns // 1_000_000_000)
        new_high = t.price == book.high
        new_low = t.price == book.low
        venue_changed = self.last_venue.get(t.symbol) != t.venue
        self.last_venue[t.symbol] = t.venue
        for sub in subs:
            send = sub.session.send_market
            rid = sub.req_id
            send(P.tick_price(rid, P.LAST, price, t.size, 0))
            send(P.tick_size(rid, P.VOLUME, book.volume))
            send(P.tick_string(rid, P.LAST_TIMESTAMP, epoch))
            self.ticks_sent += 2
            if venue_changed:
                send(P.tick_string(rid, P.LAST_EXCHANGE, t.venue))
            if new_high:
                send(P.tick_price(rid, P.HIGH, price, 0, 0))
                self.ticks_sent += 1
            if new_low:
                send(P.tick_price(rid, P.LOW, price, 0, 0))
                self.ticks_sent += 1

    def market_event(self, event: QuoteEvent | PrintEvent) -> None:
        """A market event from the model or a control command: publish it, then let orders react."""
        self.publish_market(event)
        events = self.broker.on_market(event)
        if events:
            self._drop_owner_mid_fill(events)
            self.dispatch(events)

    def _drop_owner_mid_fill(self, events: list) -> None:
        """Fault: a resting order just filled (booked at the broker); its client's connection
        drops before the execDetails / orderStatus go out, so it must reconcile to learn of it."""
        faults = self.broker.faults
        if faults.drop_on_fill_next <= 0:
            return
        fill = next((e for e in events if isinstance(e, FillReport)), None)
        if fill is None or self.session_for(fill.client_id) is None:
            return  # nobody to cut off: the fault waits for the next fill
        faults.drop_on_fill_next -= 1
        self.broker.log_fault(
            "connection_dropped_mid_fill", client_id=fill.client_id, order_id=fill.order_id, perm_id=fill.perm_id,
            order_ref=fill.execution.order_ref, exec_id=fill.execution.exec_id,
        )
        self.drop_connections(fill.client_id)

    async def _market_loop(self) -> None:
        interval = self.config.tick_interval_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            dt, last = now - last, now
            try:
                for event in self.market.advance(min(dt, 1.0)):
                    self.market_event(event)
            except Exception:  # the timer must survive anything
                log.exception("market step failed")

    async def _account_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.config.account_update_s))
            try:
                for session in self.api_sessions():
                    if session.account_updates:
                        self._send_account_values(session)
                        self._send_portfolio(session)
                        session.send(P.account_update_time(self._account_time_text()))
                    for req_id in session.account_multi:
                        for key, value, currency in self.account_value_rows():
                            session.send(P.account_update_multi(req_id, self.broker.account.account_id, "", key, value, currency))
                    for req_id, tags in session.summary_subs.items():
                        self._send_summary(session, req_id, tags)
            except Exception:
                log.exception("account update failed")

    # ------------------------------------------------------------------ faults

    def drop_connections(self, client_id: int | None = None) -> int:
        victims = [s for s in list(self.sessions) if client_id is None or s.client_id == client_id]
        for session in victims:
            session.abort()
            self.forget_session(session)
        log.warning("connections dropped (fault)", extra={"count": len(victims), "client_id": client_id})
        return len(victims)

    def refuse_connections(self, seconds: float) -> None:
        """Close the listening socket for ``seconds``: connects get ECONNREFUSED."""
        assert self.loop is not None
        self._close_listener()
        self.refusing_until = time.monotonic() + seconds
        log.warning("refusing connections (fault)", extra={"seconds": seconds})
        self.loop.call_later(seconds, lambda: asyncio.ensure_future(self._reopen()))

    async def _reopen(self) -> None:
        if self.listener is not None or time.monotonic() < self.refusing_until - 0.01:
            return
        for attempt in range(50):
            try:
                await self._listen()
                log.info("accepting connections again", extra={"port": self.port})
                return
            except OSError as exc:  # pragma: no cover - port briefly unavailable
                log.warning("re-listen failed, retrying", extra={"error": str(exc), "attempt": attempt})
                await asyncio.sleep(0.1)

    def restart(self, down_seconds: float) -> None:
        """Gateway restart: every client dropped, no connections for a while; orders live on."""
        log.warning("simulated gateway restart", extra={"down_seconds": down_seconds})
        self.drop_connections()
        self.refuse_connections(down_seconds)

    def send_code(self, code: int, text: str | None = None, client_id: int | None = None, req_id: int = -1) -> int:
        text = text or CODE_TEXT.get(code, f"Simulated status code {code}")
        if code in (1100, 2110):
            self.ib_connected = False
        elif code in (1101, 1102):
            self.ib_connected = True
        elif code == 2103:
            self.data_farm_ok = False
        elif code == 2104:
            self.data_farm_ok = True
        targets = [s for s in self.api_sessions() if client_id is None or s.client_id == client_id]
        for session in targets:
            session.error(req_id, code, text)
            if code == 1101:
                # "data lost": market data subscriptions are gone; clients must resubscribe.
                self._drop_market_subs(session)
        if code in (1101, 1102, 2104):
            # Data is flowing again: refresh every subscriber from the current book.
            for session in targets:
                for req_id, sub in session.mkt_subs.items():
                    symbol = self._symbol_of(sub)
                    if symbol:
                        self._send_snapshot(session, req_id, symbol)
        log.warning("status code sent (fault)", extra={"code": code, "clients": len(targets)})
        return len(targets)

    def _symbol_of(self, sub: MarketSub) -> str | None:
        for symbol, subs in self.mkt_by_symbol.items():
            if sub in subs:
                return symbol
        return None

    def shock(self, symbol: str | None, pct: float) -> list[str]:
        symbols = list(self.universe) if symbol in (None, "", "all", "ALL") else [symbol]
        for s in symbols:
            if s not in self.universe:
                raise KeyError(s)
        for event in self.market.shock(symbols, pct):
            self.market_event(event)
        return symbols

    def set_quote(self, symbol: str, bid: float, ask: float, bid_size: int | None, ask_size: int | None, freeze: bool) -> QuoteEvent:
        event = self.market.set_quote(symbol, bid, ask, bid_size, ask_size, freeze)
        self.market_event(event)
        return event

    def inject_print(self, symbol: str, price: float, size: int, venue: str, conditions: str) -> PrintEvent:
        event = self.market.inject_print(symbol, price, size, venue, conditions)
        self.market_event(event)
        return event

    def state(self) -> dict[str, Any]:
        values = self.broker.account_values()
        account = self.broker.account
        return {
            "port": self.port,
            "control_port": self.control_port,
            "accepting": self.listener is not None,
            "ib_connected": self.ib_connected,
            "data_farm_ok": self.data_farm_ok,
            "clock": self.clock.describe(),
            "now_ns": self.clock.now_ns(),
            "clients": [
                {
                    "client_id": s.client_id,
                    "peer": s.peer,
                    "mkt_subscriptions": len(s.mkt_subs),
                    "tbt_subscriptions": len(s.tbt_subs),
                    "dropped_market_msgs": s.dropped_market_msgs,
                }
                for s in sorted(self.api_sessions(), key=lambda s: s.client_id or 0)
            ],
            "account": {
                "account_id": account.account_id,
                "paper": account.account_id.startswith("DU"),
                "cash": round(account.cash, 2),
                "net_liquidation": round(values["NetLiquidation"], 2),
                "gross_position_value": round(values["GrossPositionValue"], 2),
                "long_value": round(values["LongMarketValue"], 2),
                "short_value": round(-values["ShortMarketValue"], 2),
                "gross_pct": round(100 * values["GrossPositionValue"] / values["NetLiquidation"], 3)
                if values["NetLiquidation"]
                else None,
                "realized_pnl": round(account.realized_pnl, 2),
                "commissions": round(account.commissions, 2),
                "values": {k: round(v, 4) for k, v in values.items()},
            },
            "positions": [
                {
                    "symbol": pos.symbol,
                    "qty": pos.qty,
                    "avg_cost": round(pos.avg_cost, 6),
                    "mark": round(mark, 4),
                    "market_value": round(pos.qty * mark, 2),
                    "bucket": pos.bucket,
                    "realized_pnl": round(pos.realized_pnl, 2),
                }
                for info, pos, mark in self.broker.portfolio()
            ],
            "open_orders": len(self.broker.open_orders()),
            "orders": len(self.broker.all_orders()),
            "executions": len(self.broker.executions),
            "faults": self.broker.faults.describe(),
            "checks": self.broker.precautions.describe(),
            "referee": self.broker.referee(),
            "market": {
                "quote_rate": self.market.config.quote_rate,
                "print_rate": self.market.config.print_rate,
                "events": self.market_events,
                "ticks_sent": self.ticks_sent,
                "frozen": [s for s, b in self.market.books.items() if b.frozen],
            },
            "limits": {
                "max_tick_by_tick": self.config.max_tick_by_tick,
                "max_market_data_lines": self.config.max_market_data_lines,
            },
        }


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
