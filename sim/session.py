"""One client connection: framing, the handshake, decoding, and routing each request to
the server's ``on_<Request>`` handler (sim/handlers_*.py). Also the market-data
subscription and held-ack records kept per session."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from .server import SimServer

log = logging.getLogger("sim.server")


@dataclass
class MarketSub:
    session: "Session"
    req_id: int
    kind: str  # "mkt", "Last", "AllLast", "BidAsk", "MidPoint"
    ignore_size: bool = False
    generic: frozenset[int] = frozenset()  # reqMktData generic ticks served (233 RTVolume, 236 shortable)


@dataclass
class PnLSub:
    """reqPnL (symbol None) or reqPnLSingle subscription; ``last`` = the figures last sent."""

    req_id: int
    symbol: str | None
    last: tuple | None = None


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
        self.pnl_subs: dict[int, PnLSub] = {}
        self.history_subs: dict[int, Any] = {}  # reqId -> handlers_history.HistorySub (keepUpToDate)
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
