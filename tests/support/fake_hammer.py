"""A fake Hammer Pro WebSocket server built from the message shapes in SPEC 6, for
tests and the Hammer-side benchmark. It runs in a thread of the test process
(websockets' synchronous server) and records what clients did.

Speaks: `CONNECTED` banner; `connect` (password check: a wrong one gets
`success: FAIL` and the connection is closed); `enumDataStreamers`;
`startDataStreamer` (replies, then pushes `dataStreamerStateUpdate` Starting ->
IdleOrStreaming); `subscribe` L1 (batch sizes recorded per connection);
`getTicks` (the newest `lastFew` trades of the symbol's tape, so consecutive
polls overlap). The test pushes `L1Update`s, adds trades to the tape, injects raw
text, and drops every connection.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve


@dataclass
class ClientRecord:
    connection: ServerConnection
    authenticated: bool = False
    subscribe_batches: list[int] = field(default_factory=list)
    subscribed: set[str] = field(default_factory=set)
    ticks_requests: list[str] = field(default_factory=list)


class FakeHammer:
    def __init__(self, password: str = "hammer-secret", streamers: tuple[str, ...] = ("GSMQUOTES",), banner: bool = True) -> None:
        self.password = password
        self.streamers = streamers
        self.banner = banner
        self.lock = threading.Lock()
        self.clients: list[ClientRecord] = []
        self.auth_attempts: list[tuple[str, bool]] = []
        self.tape: dict[str, list[dict[str, Any]]] = {}
        self.ticks_request_counts: Counter[str] = Counter()  # all connections, ever
        self.server = serve(self._handle, "127.0.0.1", 0, compression=None, ping_interval=None)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hammer", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> "FakeHammer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.drop_connections()
        self.server.shutdown()
        self.thread.join(timeout=5)

    # -- what the test does --------------------------------------------------------------------------
    def add_trade(self, sym: str, t: Any, p: float, s: int, e: str, b: float | None = None, a: float | None = None) -> None:
        with self.lock:
            self.tape.setdefault(sym, []).append({"t": t, "p": p, "s": s, "e": e, "b": b, "a": a})

    def push_l1(self, sym: str, **fields: Any) -> int:
        """Send an L1Update to every client subscribed to sym; returns how many got it."""
        message = json.dumps({"cmd": "L1Update", "result": {"sym": sym, **fields}})
        return self._broadcast(message, lambda client: sym in client.subscribed)

    def send_raw(self, text: str) -> int:
        return self._broadcast(text, lambda client: client.authenticated)

    def drop_connections(self) -> None:
        with self.lock:
            clients = list(self.clients)
        for client in clients:
            try:
                client.connection.socket.close()  # abrupt: no close frame, like a crash
            except OSError:
                pass

    # -- what the test reads ----------------------------------------------------------------------------
    def authenticated_clients(self) -> list[ClientRecord]:
        with self.lock:
            return [client for client in self.clients if client.authenticated]

    def ticks_requests(self, sym: str) -> int:
        with self.lock:
            return self.ticks_request_counts[sym]

    # -- server side ------------------------------------------------------------------------------------
    def _broadcast(self, text: str, wanted) -> int:
        with self.lock:
            targets = [client for client in self.clients if wanted(client)]
        sent = 0
        for client in targets:
            try:
                client.connection.send(text)
                sent += 1
            except (ConnectionClosed, OSError):
                pass
        return sent

    def _handle(self, connection: ServerConnection) -> None:
        client = ClientRecord(connection)
        with self.lock:
            self.clients.append(client)
        try:
            if self.banner:
                connection.send("CONNECTED")
            for raw in connection:
                message = json.loads(raw)
                reply = self._answer(client, message)
                if reply is None:
                    continue
                connection.send(json.dumps(reply))
                if message.get("cmd") == "connect" and not client.authenticated:
                    connection.close()
                    return
                if message.get("cmd") == "startDataStreamer" and reply.get("success") == "OK":
                    for state in ("Starting", "IdleOrStreaming"):
                        update = {"cmd": "dataStreamerStateUpdate", "result": {"streamerID": message["streamerID"], "state": state}}
                        connection.send(json.dumps(update))
        except (ConnectionClosed, OSError):
            pass
        finally:
            with self.lock:
                if client in self.clients:
                    self.clients.remove(client)

    def _answer(self, client: ClientRecord, message: dict[str, Any]) -> dict[str, Any] | None:
        cmd = message.get("cmd")
        base = {"cmd": cmd, "reqID": message.get("reqID")}
        if cmd == "connect":
            ok = message.get("pwd") == self.password
            with self.lock:
                self.auth_attempts.append((str(message.get("pwd")), ok))
            client.authenticated = ok
            return {**base, "success": "OK" if ok else "FAIL", "result": "" if ok else "Invalid password"}
        if not client.authenticated:
            return {**base, "success": "FAIL", "result": "not connected"}
        if cmd == "enumDataStreamers":
            return {**base, "success": "OK", "result": [{"streamerID": s, "name": s, "isSet": True} for s in self.streamers]}
        if cmd == "startDataStreamer":
            ok = message.get("streamerID") in self.streamers
            return {**base, "success": "OK" if ok else "FAIL", "result": "" if ok else "unknown streamer"}
        if cmd == "subscribe":
            symbols = list(message.get("sym") or [])
            with self.lock:
                client.subscribe_batches.append(len(symbols))
                client.subscribed.update(symbols)
            return {**base, "success": "OK", "result": {"sub": message.get("sub"), "sym": symbols}}
        if cmd == "getTicks":
            sym = message.get("sym")
            last_few = int(message.get("lastFew") or 10)
            with self.lock:
                client.ticks_requests.append(sym)
                self.ticks_request_counts[sym] += 1
                data = list(self.tape.get(sym, [])[-last_few:])
            return {**base, "success": "OK", "result": {"sym": sym, "data": data}}
        return {**base, "success": "FAIL", "result": f"unknown command {cmd!r}"}
