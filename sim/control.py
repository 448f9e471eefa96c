"""Control interface: referee reports and fault injection over HTTP/JSON on 127.0.0.1.

Deliberately tiny (stdlib only): one request per connection, JSON in and out.
``SimControl`` is the client used by tests, benchmarks and the demo.

    GET  /state                      summary: clients, account, positions, faults, market
    GET  /orders[?order_ref=X]       every order received, with its full history
    GET  /fills[?order_ref=X]        every execution
    GET  /requests[?order_ref=X]     every place/modify/cancel/global-cancel request, with its outcome
    GET  /quote?symbol=S             the simulated top of book
    GET  /pnl                        today's P&L (reqPnL / reqPnLSingle figures): account and per symbol
    GET  /referee                    potential gross (current, max: when, which event), counts, log size
    GET  /referee/log[?after=&kind=&order_ref=&limit=]  the ordered referee log (requests, order states, fills, faults)
    POST /referee/reset              the max potential gross starts again from the current value
    POST /drop_connections           {"client_id": optional}
    POST /refuse_connections         {"seconds": 5}
    POST /restart                    {"down_seconds": 5}
    POST /reject_next                {"n": 1, "code": 201, "text": "..."}
    POST /delay_acks                 {"n": 1, "seconds": 3}
    POST /drop_acks                  {"n": 1}
    POST /partial_fills              {"n": 1, "max_qty": 100} or {"n": 1, "fraction": 0.5}
    POST /delay_status               {"n": 1, "seconds": 2, "fills_only": false}
    POST /drop_status                {"n": 1, "fills_only": false}
    POST /drop_on_fill               {"n": 1}
    POST /send_code                  {"code": 1100, "text": optional, "client_id": optional, "req_id": optional (-1)}
    POST /shock                      {"symbol": "CIM PRB" or "all", "pct": -5}
    POST /set_quote                  {"symbol", "bid", "ask", "bid_size", "ask_size", "freeze": true}
    POST /glitch_quote               {"symbol", "bid", "ask", "bid_size", "ask_size"}: a feed glitch (subscribers only)
    POST /unfreeze                   {"symbol": optional}
    POST /print                      {"symbol", "price", "size", "venue", "conditions"}
    POST /config                     {"quote_rate", "print_rate", "max_tick_by_tick", ...}
    POST /halt                       {"symbol"}: trading halt (tick 49 = 1; no quotes, prints, fills)
    POST /resume                     {"symbol"}: the halt ends (tick 49 = 0)
    POST /quiet                      {"symbol", "minutes"}: the quote does not change for that long (simulated clock)
    POST /no_prints                  {"symbol", "minutes"}: no prints for that long (simulated clock)
    POST /reset                      clear faults, unfreeze quotes, reconnect data/IB
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .metrics import FAULT_COMMANDS

# The simulator this serves: a sim.server.SimServer (not imported here: server.py starts
# the control server, so this module stays free of the server to keep imports one-way).
SimServer = Any

log = logging.getLogger("sim.control")

MAX_BODY = 1024 * 1024


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _num(body: dict, key: str, kind: type = float, default: Any = None, required: bool = False) -> Any:
    if key not in body or body[key] is None:
        if required:
            raise ControlError(400, f"missing '{key}'")
        return default
    try:
        return kind(body[key])
    except (TypeError, ValueError):
        raise ControlError(400, f"'{key}' must be a {kind.__name__}") from None


def _known_symbol(sim: "SimServer", symbol: str) -> str:
    if symbol not in sim.market.books:
        raise ControlError(404, f"unknown symbol {symbol!r}")
    return symbol


class ControlServer:
    def __init__(self, sim: "SimServer") -> None:
        self.sim = sim
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, payload = 500, {"error": "internal error"}
        try:
            request_line = (await asyncio.wait_for(reader.readline(), 10)).decode("latin-1").strip()
            method, target, _ = (request_line.split(" ") + ["", "", ""])[:3]
            length = 0
            while True:
                line = (await asyncio.wait_for(reader.readline(), 10)).decode("latin-1").strip()
                if not line:
                    break
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if length > MAX_BODY:
                raise ControlError(413, "body too large")
            raw = await reader.readexactly(length) if length else b""
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ControlError(400, "body must be a JSON object")
            url = urllib.parse.urlsplit(target)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            status, payload = 200, self.route(method.upper(), url.path.rstrip("/") or "/", query, body)
            self._count_fault_command(method.upper(), url.path.strip("/"))
        except ControlError as exc:
            status, payload = exc.status, {"error": exc.message}
        except (json.JSONDecodeError, ValueError) as exc:
            status, payload = 400, {"error": f"bad request: {exc}"}
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except Exception as exc:  # the control port must never take the simulator down
            log.exception("control request failed")
            status, payload = 500, {"error": str(exc)}
        data = json.dumps(payload, default=str).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Too Large"}.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head + data)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _count_fault_command(self, method: str, command: str) -> None:
        if method == "POST" and command in FAULT_COMMANDS:
            self.sim.faults_injected[command] += 1

    def route(self, method: str, path: str, query: dict[str, str], body: dict) -> Any:
        sim = self.sim
        broker = sim.broker
        if method == "GET":
            if path == "/state":
                return sim.state()
            if path == "/orders":
                ref = query.get("order_ref")
                return [o.describe() for o in broker.all_orders() if ref is None or o.order_ref == ref]
            if path == "/requests":
                ref = query.get("order_ref")
                return [r for r in broker.requests if ref is None or r.get("order_ref") == ref]
            if path == "/fills":
                ref = query.get("order_ref")
                return [e.describe() for e in broker.executions if ref is None or e.order_ref == ref]
            if path == "/quote":
                symbol = _known_symbol(sim, query.get("symbol", ""))
                return sim.market.book(symbol).snapshot()
            if path == "/pnl":
                return sim.pnl_report()
            if path == "/referee":
                return dict(broker.referee(), faults=broker.faults.describe())
            if path == "/referee/log":
                after = _num(query, "after", int, default=0)
                limit = _num(query, "limit", int)
                entries = broker.log.read(after, query.get("kind"), query.get("order_ref"), limit)
                return {"entries": entries, "log": broker.log.describe()}
            raise ControlError(404, f"no such resource {path}")
        if method != "POST":
            raise ControlError(405, f"{method} not allowed")
        faults = broker.faults
        if path == "/referee/reset":
            broker.reset_potential_max()
            return broker.referee()
        if path == "/delay_status":
            faults.delay_status_next = _num(body, "n", int, default=1)
            faults.delay_status_seconds = _num(body, "seconds", float, default=2.0)
            faults.status_fills_only = bool(body.get("fills_only", False))
            return faults.describe()
        if path == "/drop_status":
            faults.drop_status_next = _num(body, "n", int, default=1)
            faults.status_fills_only = bool(body.get("fills_only", False))
            return faults.describe()
        if path == "/drop_on_fill":
            faults.drop_on_fill_next = _num(body, "n", int, default=1)
            return faults.describe()
        if path == "/drop_connections":
            return {"dropped": sim.drop_connections(_num(body, "client_id", int))}
        if path == "/refuse_connections":
            seconds = _num(body, "seconds", float, required=True)
            sim.refuse_connections(seconds)
            return {"refusing_seconds": seconds}
        if path == "/restart":
            seconds = _num(body, "down_seconds", float, default=3.0)
            sim.restart(seconds)
            return {"down_seconds": seconds, "open_orders": len(broker.open_orders())}
        if path == "/reject_next":
            faults.reject_next = _num(body, "n", int, default=1)
            faults.reject_code = _num(body, "code", int, default=201)
            faults.reject_text = str(body.get("text") or "Order rejected - reason:Simulated rejection")
            return faults.describe()
        if path == "/delay_acks":
            faults.delay_acks_next = _num(body, "n", int, default=1)
            faults.delay_acks_seconds = _num(body, "seconds", float, default=3.0)
            return faults.describe()
        if path == "/drop_acks":
            faults.drop_acks_next = _num(body, "n", int, default=1)
            return faults.describe()
        if path == "/partial_fills":
            max_qty = _num(body, "max_qty", int)
            fraction = _num(body, "fraction", float)
            if max_qty is None and fraction is None:
                fraction = 0.5
            if fraction is not None and not 0 < fraction < 1:
                raise ControlError(400, "'fraction' must be between 0 and 1")
            faults.partial_next = _num(body, "n", int, default=1)
            faults.partial_max_qty, faults.partial_fraction = max_qty, fraction
            return faults.describe()
        if path == "/send_code":
            code = _num(body, "code", int, required=True)
            sent = sim.send_code(code, body.get("text"), _num(body, "client_id", int), _num(body, "req_id", int, default=-1))
            return {"code": code, "clients": sent}
        if path == "/shock":
            pct = _num(body, "pct", float, required=True)
            try:
                return {"symbols": sim.shock(body.get("symbol"), pct), "pct": pct}
            except KeyError as exc:
                raise ControlError(404, f"unknown symbol {exc}") from None
        if path == "/set_quote":
            symbol = _known_symbol(sim, str(body.get("symbol", "")))
            event = sim.set_quote(
                symbol,
                _num(body, "bid", float, required=True),
                _num(body, "ask", float, required=True),
                _num(body, "bid_size", int),
                _num(body, "ask_size", int),
                bool(body.get("freeze", True)),
            )
            return sim.market.book(event.symbol).snapshot()
        if path == "/glitch_quote":
            symbol = _known_symbol(sim, str(body.get("symbol", "")))
            bid, ask = _num(body, "bid", float, required=True), _num(body, "ask", float, required=True)
            if not (0 <= bid < 1_000_000 and 0 <= ask < 1_000_000):
                raise ControlError(400, "glitch_quote: bid and ask must be >= 0 and < 1,000,000")
            event = sim.glitch_quote(symbol, bid, ask, _num(body, "bid_size", int, default=100), _num(body, "ask_size", int, default=100))
            return {"symbol": symbol, "bid": event.bid / 100, "ask": event.ask / 100, "glitch": True}
        if path == "/unfreeze":
            symbol = body.get("symbol")
            if symbol is not None:
                _known_symbol(sim, symbol)
            sim.market.unfreeze(None if symbol is None else [symbol])
            return {"unfrozen": symbol or "all"}
        if path == "/print":
            symbol = _known_symbol(sim, str(body.get("symbol", "")))
            event = sim.inject_print(
                symbol,
                _num(body, "price", float, required=True),
                _num(body, "size", int, required=True),
                str(body.get("venue") or "NYSE"),
                str(body.get("conditions") or ""),
            )
            return {"symbol": event.symbol, "price": event.price / 100, "size": event.size, "venue": event.venue}
        if path in ("/halt", "/resume"):
            symbol = _known_symbol(sim, str(body.get("symbol", "")))
            sim.halt(symbol, path == "/halt")
            return {"symbol": symbol, "halted": sorted(broker.halted)}
        if path in ("/quiet", "/no_prints"):
            symbol = _known_symbol(sim, str(body.get("symbol", "")))
            minutes = _num(body, "minutes", float, required=True)
            until = sim.clock.now_ns() + int(max(0.0, minutes) * 60e9)
            book = sim.market.book(symbol)
            if path == "/quiet":
                book.quiet_until_ns = until
            else:
                book.no_prints_until_ns = until
            return book.snapshot()
        if path == "/config":
            return self._configure(body)
        if path == "/reset":
            faults.__init__()  # type: ignore[misc]
            sim.market.unfreeze()
            for symbol in sorted(broker.halted):
                sim.halt(symbol, False)
            for book in sim.market.books.values():
                book.quiet_until_ns = book.no_prints_until_ns = 0
            sim.ib_connected = True
            sim.data_farm_ok = True
            return {"reset": True}
        raise ControlError(404, f"no such command {path}")

    def _configure(self, body: dict) -> dict:
        sim = self.sim
        market = sim.market.config
        if "quote_rate" in body:
            market.quote_rate = max(0.0, _num(body, "quote_rate"))
        if "print_rate" in body:
            market.print_rate = max(0.0, _num(body, "print_rate"))
        if "max_tick_by_tick" in body:
            sim.config.max_tick_by_tick = _num(body, "max_tick_by_tick", int)
        if "max_market_data_lines" in body:
            sim.config.max_market_data_lines = _num(body, "max_market_data_lines", int)
        if "account_update_s" in body:
            sim.config.account_update_s = _num(body, "account_update_s")
        if "pnl_update_s" in body:
            sim.config.pnl_update_s = max(0.05, _num(body, "pnl_update_s"))
        if "fill_on_prints" in body:
            sim.broker.fill_on_prints = bool(body["fill_on_prints"])
        if "referee_log_cap" in body:
            sim.config.referee_log_cap = max(1, _num(body, "referee_log_cap", int))
            sim.broker.log.resize(sim.config.referee_log_cap)
        checks = sim.broker.precautions
        for key, kind in (("price_cap_pct", float), ("max_order_size", int), ("max_order_value", float)):
            if key in body:  # null switches the check off
                value = _num(body, key, kind)
                if value is not None and value <= 0:
                    raise ControlError(400, f"'{key}' must be > 0 or null")
                setattr(checks, key, value)
        if "margin_check" in body:
            checks.margin = bool(body["margin_check"])
        return {
            "checks": checks.describe(),
            "quote_rate": market.quote_rate,
            "print_rate": market.print_rate,
            "max_tick_by_tick": sim.config.max_tick_by_tick,
            "max_market_data_lines": sim.config.max_market_data_lines,
            "account_update_s": sim.config.account_update_s,
            "pnl_update_s": sim.config.pnl_update_s,
            "fill_on_prints": sim.broker.fill_on_prints,
            "referee_log_cap": sim.broker.log.cap,
        }


class SimControl:
    """Blocking client for the control interface (stdlib only; safe to use from tests)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"sim control {method} {path}: HTTP {exc.code}: {detail}") from None

    def _post(self, path: str, **body: Any) -> Any:
        return self._request("POST", path, {k: v for k, v in body.items() if v is not None})

    # referee
    def state(self) -> dict:
        return self._request("GET", "/state")

    def orders(self, order_ref: str | None = None) -> list[dict]:
        return self._request("GET", "/orders", query={"order_ref": order_ref})

    def requests(self, order_ref: str | None = None) -> list[dict]:
        return self._request("GET", "/requests", query={"order_ref": order_ref})

    def fills(self, order_ref: str | None = None) -> list[dict]:
        return self._request("GET", "/fills", query={"order_ref": order_ref})

    def quote(self, symbol: str) -> dict:
        return self._request("GET", "/quote", query={"symbol": symbol})

    def halt(self, symbol: str) -> dict:
        """Trading halt for ``symbol`` (IB's halted tick 49 = 1; no quotes, prints or fills)."""
        return self._post("/halt", symbol=symbol)

    def resume(self, symbol: str) -> dict:
        return self._post("/resume", symbol=symbol)

    def quiet(self, symbol: str, minutes: float) -> dict:
        """The symbol's quote does not change for ``minutes`` of simulated time (prints go on)."""
        return self._post("/quiet", symbol=symbol, minutes=minutes)

    def no_prints(self, symbol: str, minutes: float) -> dict:
        """No prints of ``symbol`` for ``minutes`` of simulated time (quotes go on)."""
        return self._post("/no_prints", symbol=symbol, minutes=minutes)

    def pnl(self) -> dict:
        """Today's P&L as reqPnL / reqPnLSingle report it: ``account`` and ``symbols``."""
        return self._request("GET", "/pnl")

    def referee(self) -> dict:
        """{"potential_gross": {"current": {...}, "max": {...}}, "counts": {...}, "log": {...}, "faults": {...}}"""
        return self._request("GET", "/referee")

    def referee_log(
        self, after: int = 0, kind: str | None = None, order_ref: str | None = None, limit: int | None = None
    ) -> dict:
        """{"entries": [...], "log": {...}}; entries with seq > after, oldest first."""
        return self._request("GET", "/referee/log", query={"after": after, "kind": kind, "order_ref": order_ref, "limit": limit})

    def reset_referee(self) -> dict:
        return self._post("/referee/reset")

    # faults
    def drop_connections(self, client_id: int | None = None) -> dict:
        return self._post("/drop_connections", client_id=client_id)

    def refuse_connections(self, seconds: float) -> dict:
        return self._post("/refuse_connections", seconds=seconds)

    def restart(self, down_seconds: float = 3.0) -> dict:
        return self._post("/restart", down_seconds=down_seconds)

    def reject_next(self, n: int = 1, code: int = 201, text: str | None = None) -> dict:
        return self._post("/reject_next", n=n, code=code, text=text)

    def delay_acks(self, n: int = 1, seconds: float = 3.0) -> dict:
        return self._post("/delay_acks", n=n, seconds=seconds)

    def drop_acks(self, n: int = 1) -> dict:
        return self._post("/drop_acks", n=n)

    def partial_fills(self, n: int = 1, fraction: float | None = None, max_qty: int | None = None) -> dict:
        return self._post("/partial_fills", n=n, fraction=fraction, max_qty=max_qty)

    def delay_status(self, n: int = 1, seconds: float = 2.0, fills_only: bool = False) -> dict:
        return self._post("/delay_status", n=n, seconds=seconds, fills_only=fills_only)

    def drop_status(self, n: int = 1, fills_only: bool = False) -> dict:
        return self._post("/drop_status", n=n, fills_only=fills_only)

    def drop_on_fill(self, n: int = 1) -> dict:
        return self._post("/drop_on_fill", n=n)

    def send_code(self, code: int, msg: str | None = None, client_id: int | None = None, req_id: int = -1) -> dict:
        """An error message to clients; with req_id, tied to that request or order id."""
        return self._post("/send_code", code=code, text=msg, client_id=client_id, req_id=req_id)

    # market
    def shock(self, symbol: str | None, pct: float) -> dict:
        return self._post("/shock", symbol=symbol or "all", pct=pct)

    def set_quote(
        self, symbol: str, bid: float, ask: float, bid_size: int | None = None, ask_size: int | None = None, freeze: bool = True
    ) -> dict:
        return self._post("/set_quote", symbol=symbol, bid=bid, ask=ask, bid_size=bid_size, ask_size=ask_size, freeze=freeze)

    def glitch_quote(self, symbol: str, bid: float, ask: float, bid_size: int = 100, ask_size: int = 100) -> dict:
        """A bad quote from the feed only (crossed, zero, stub): the book and the orders ignore it."""
        return self._post("/glitch_quote", symbol=symbol, bid=bid, ask=ask, bid_size=bid_size, ask_size=ask_size)

    def unfreeze(self, symbol: str | None = None) -> dict:
        return self._post("/unfreeze", symbol=symbol)

    def inject_print(self, symbol: str, price: float, size: int, venue: str = "NYSE", conditions: str = "") -> dict:
        return self._post("/print", symbol=symbol, price=price, size=size, venue=venue, conditions=conditions)

    def configure(self, **settings: Any) -> dict:
        """POST /config; ``None`` is sent as null (it switches a check such as ``max_order_size`` off)."""
        return self._request("POST", "/config", settings)

    def reset(self) -> dict:
        return self._post("/reset")
