"""Hammer Pro WebSocket feed (SPEC 6): synchronous `websockets` client.

Session: optional `CONNECTED` banner, `connect` with the password, then
`enumDataStreamers`, `startDataStreamer` (ready on a `dataStreamerStateUpdate`
reporting `IdleOrStreaming`), L1 subscriptions in batches of 50, and `L1Update`
pushes. Prints come from polling `getTicks` (see core.TickPoller): requests are
sent without waiting, replies are matched by `reqID`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Sequence
from zoneinfo import ZoneInfo

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from qe.clock import Clock
from qe.config import HammerFeed as HammerConfig
from qe.universe import to_hammer

from .core import (
    NS_PER_S, MalformedMessage, TickPoller, chunks, keyed_batch, parse_l1_update, parse_ticks, short_repr,
)
from .feed import FeedAuthError, FeedDisconnected, FeedError, Item, Malformed, Quote, Trade

log = logging.getLogger(__name__)

READY_STATE = "IdleOrStreaming"


def _ok(message: dict[str, Any]) -> bool:
    return str(message.get("success", "")).upper() == "OK"


class HammerFeed:
    name = "hammer"

    def __init__(
        self, url: str, password: str, symbols: Sequence[str], config: HammerConfig, clock: Clock
    ) -> None:
        self.url = url
        self.password = password
        self.symbols = list(symbols)
        self.known = frozenset(self.symbols)
        self.config = config
        self.clock = clock
        self.zone = ZoneInfo(config.naive_time_zone)
        self.poller = TickPoller(self.symbols, config.ticks_sweep_interval_s, config.ticks_max_requests_per_s)
        self.ws: ClientConnection | None = None
        self.streamer_id: str | None = None
        self.next_req = 0
        self.ticks_requests: dict[str, str] = {}  # reqID -> display symbol
        self.items: list[Item] = []
        self.subscribe_batches: list[int] = []

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        timeout = self.config.request_timeout_s
        try:
            self.ws = connect(
                self.url, open_timeout=timeout, close_timeout=2, proxy=None, max_size=2**24, compression=None
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise FeedError(f"cannot connect to Hammer Pro at {self.url}: {type(exc).__name__}: {exc}") from None
        try:
            reply = self._request({"cmd": "connect", "pwd": self.password}, "connect")
            if not _ok(reply):
                raise FeedAuthError(
                    f"Hammer Pro refused the password from QE_HAMMER_PASSWORD_FILE: {reply.get('result', reply)!r}"
                )
            self.streamer_id = self._choose_streamer()
            self._start_streamer(self.streamer_id)
            self._subscribe_all()
        except FeedDisconnected as exc:
            self.close()
            raise FeedError(f"Hammer Pro closed the connection during setup: {exc}") from None
        except FeedError:
            self.close()
            raise
        self.poller.reset()
        self.ticks_requests.clear()
        log.info(
            "hammer feed ready",
            extra={"url": self.url, "streamer": self.streamer_id, "symbols": len(self.symbols)},
        )

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail any way
                pass
            self.ws = None

    def _choose_streamer(self) -> str:
        reply = self._request({"cmd": "enumDataStreamers"}, "enumDataStreamers")
        result = reply.get("result")
        if isinstance(result, dict):
            result = result.get("streamers", [])
        streamers = result if isinstance(result, list) else []
        ids = [s.get("streamerID") if isinstance(s, dict) else s for s in streamers]
        ids = [str(i) for i in ids if i]
        wanted = self.config.streamer_id
        if wanted:
            if ids and wanted not in ids:
                raise FeedError(f"Hammer Pro has no data streamer {wanted!r} (has {ids})")
            return wanted
        if not ids:
            raise FeedError(f"Hammer Pro listed no data streamers: {reply!r}")
        return ids[0]

    def _start_streamer(self, streamer_id: str) -> None:
        reply = self._request({"cmd": "startDataStreamer", "streamerID": streamer_id}, "startDataStreamer")
        if not _ok(reply):
            raise FeedError(f"startDataStreamer {streamer_id} failed: {reply.get('result', reply)!r}")
        self._wait_for(
            lambda m: m.get("cmd") == "dataStreamerStateUpdate"
            and isinstance(m.get("result"), dict)
            and m["result"].get("streamerID", streamer_id) == streamer_id
            and m["result"].get("state") == READY_STATE,
            f"data streamer {streamer_id} to report {READY_STATE}",
        )

    def _subscribe_all(self) -> None:
        hammer_symbols = [to_hammer(symbol) for symbol in self.symbols]
        self.subscribe_batches = []
        for batch in chunks(hammer_symbols, self.config.l1_batch_size):
            reply = self._request(
                {"cmd": "subscribe", "sub": "L1", "streamerID": self.streamer_id, "sym": batch}, "subscribe"
            )
            if not _ok(reply):
                raise FeedError(f"L1 subscribe of {len(batch)} symbols failed: {reply.get('result', reply)!r}")
            self.subscribe_batches.append(len(batch))

    def resubscribe(self) -> None:
        if self.ws is None:
            return
        log.warning("re-subscribing L1 on the live connection")
        try:
            self._subscribe_all()
        except FeedError as exc:
            raise FeedDisconnected(str(exc)) from None
        self.poller.reset()

    def maintain(self, now_ns: int, priority: set[str]) -> None:
        pass

    def add_symbols(self, symbols: list[str]) -> list[str]:
        """Symbols outside the universe file (held or with open orders): subscribed now on
        a live connection (and on every later connect), their ticks polled like the rest."""
        new = [symbol for symbol in dict.fromkeys(symbols) if symbol not in self.known]
        if not new:
            return []
        self.symbols.extend(new)
        self.known = frozenset(self.symbols)
        self.poller.symbols.extend(new)
        for symbol in new:
            self.poller.due[symbol] = None
        if self.ws is None:
            return new
        for batch in chunks([to_hammer(symbol) for symbol in new], self.config.l1_batch_size):
            try:
                reply = self._request(
                    {"cmd": "subscribe", "sub": "L1", "streamerID": self.streamer_id, "sym": batch}, "subscribe"
                )
            except FeedError as exc:  # no reply in time: the connection is not usable
                raise FeedDisconnected(str(exc)) from None
            if not _ok(reply):
                raise FeedDisconnected(f"L1 subscribe of {batch} failed: {reply.get('result', reply)!r}")
        return new

    # -- requests --------------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> str:
        self.next_req += 1
        req_id = str(self.next_req)
        message = {**message, "reqID": req_id}
        assert self.ws is not None
        try:
            self.ws.send(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise FeedDisconnected(f"send failed: {exc}") from None
        return req_id

    def _request(self, message: dict[str, Any], cmd: str) -> dict[str, Any]:
        req_id = self._send(message)
        return self._wait_for(
            lambda m: m.get("cmd") == cmd and str(m.get("reqID", req_id)) == req_id, f"reply to {cmd}"
        )

    def _wait_for(self, match, what: str) -> dict[str, Any]:
        """Read until a message matches; everything else is handled as usual."""
        deadline = time.monotonic() + self.config.request_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FeedError(f"Hammer Pro: timed out after {self.config.request_timeout_s:g}s waiting for {what}")
            message = self._receive(remaining)
            if message is None:
                continue
            if match(message):
                return message
            self._dispatch(message)

    def _receive(self, timeout_s: float) -> dict[str, Any] | None:
        """One message, or None (timeout, banner, malformed: recorded in items)."""
        assert self.ws is not None
        try:
            raw = self.ws.recv(timeout=timeout_s)
        except TimeoutError:
            return None
        except ConnectionClosed as exc:
            raise FeedDisconnected(f"connection closed: {exc}") from None
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        text = raw.strip()
        if text == "CONNECTED":
            return None
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: 100k nested `[`
            reason = "too_deep" if isinstance(exc, RecursionError) else "bad_json"
            self.items.append(Malformed(reason, f"{type(exc).__name__}: {str(exc)[:80]}: {text[:80]!r}"))
            return None
        if not isinstance(message, dict):
            self.items.append(Malformed("not_an_object", text[:120]))
            return None
        return message

    # -- streaming ---------------------------------------------------------------------------------
    def pump(self, timeout_s: float) -> list[Item]:
        if self.ws is None:
            raise FeedDisconnected("not connected")
        deadline = time.monotonic() + timeout_s
        self._poll_ticks()
        while True:
            remaining = deadline - time.monotonic()
            message = self._receive(max(remaining, 0.0))
            if message is not None:
                self._dispatch(message)
            elif remaining <= 0:
                break
            if len(self.items) >= 5000:
                break
        items, self.items = self.items, []
        return items

    def _poll_ticks(self) -> None:
        timeout_ns = int(self.config.request_timeout_s * NS_PER_S)
        for symbol in self.poller.next_requests(time.monotonic_ns(), timeout_ns):
            req_id = self._send(
                {"cmd": "getTicks", "sym": to_hammer(symbol), "lastFew": self.config.ticks_last_few, "tradesOnly": True}
            )
            self.ticks_requests[req_id] = symbol
        if len(self.ticks_requests) > 10 * len(self.symbols) + 100:
            self.ticks_requests.clear()  # replies that never came; the poller already gave up on them

    def _dispatch(self, message: dict[str, Any]) -> None:
        cmd = message.get("cmd")
        try:
            if cmd == "L1Update":
                quote, volume = parse_l1_update(message.get("result"), self.clock.now_ns())
                if quote.symbol not in self.known:
                    self.items.append(Malformed("unknown_symbol", quote.symbol))
                    return
                self.poller.on_l1(quote.symbol, volume, quote.last)
                self.items.append(Quote(quote))
            elif cmd == "getTicks":
                self._on_ticks(message)
            elif cmd == "dataStreamerStateUpdate":
                result = message.get("result") or {}
                if isinstance(result, dict) and result.get("streamerID") == self.streamer_id and result.get("state") != READY_STATE:
                    log.warning("hammer data streamer changed state", extra={"state": result.get("state")})
        except MalformedMessage as exc:
            self.items.append(Malformed(exc.reason, str(exc)[:200]))
        except Exception as exc:  # noqa: BLE001 - feed content never stops the daemon
            self.items.append(Malformed("undecodable", f"{cmd if isinstance(cmd, str) else '?'}: {type(exc).__name__}"[:200]))

    def _on_ticks(self, message: dict[str, Any]) -> None:
        req_id = message.get("reqID")
        symbol = self.ticks_requests.pop(req_id, None) if isinstance(req_id, str) else None
        if symbol is None and isinstance(req_id, int) and not isinstance(req_id, bool):
            symbol = self.ticks_requests.pop(str(req_id), None)
        if symbol is None:
            return  # a reply to a request from before a reconnect
        self.poller.on_reply(symbol)
        if not _ok(message):
            self.items.append(Malformed("ticks_failed", f"{symbol}: {short_repr(message.get('result'))}"))
            return
        ticks, skipped = parse_ticks(symbol, message.get("result"), self.zone)
        for _ in range(skipped):
            self.items.append(Malformed("bad_tick", symbol))
        for tick, key in keyed_batch(ticks):
            self.items.append(Trade(tick, key))
