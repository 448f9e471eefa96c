"""What a feed hands to the service loop, and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from qe.contracts import L1

from .core import RawTick


@dataclass(frozen=True, slots=True)
class Quote:
    l1: L1


@dataclass(frozen=True, slots=True)
class Trade:
    tick: RawTick
    key: str


@dataclass(frozen=True, slots=True)
class Notice:
    """A status code from the feed (IB error/status codes)."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Halt:
    """A symbol's trading halt began (halted) or ended, as the feed reports it (IB's
    halted tick; Hammer Pro reports none)."""

    symbol: str
    halted: bool


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str
    detail: str


Item = Quote | Trade | Notice | Halt | Malformed


class FeedError(Exception):
    """Connecting or subscribing failed; the service backs off and retries."""


class FeedAuthError(FeedError):
    """The feed refused our credentials (retried too: the operator may fix it)."""


class FeedDisconnected(Exception):
    """The connection went away while streaming."""


class Feed(Protocol):
    name: str

    def connect(self) -> None:
        """Connect, authenticate and subscribe every symbol. Raises FeedError."""

    def pump(self, timeout_s: float) -> list[Item]:
        """Handle incoming traffic for up to timeout_s. Raises FeedDisconnected."""

    def resubscribe(self) -> None:
        """Subscribe everything again on the live connection (stale feed)."""

    def maintain(self, now_ns: int, priority: set[str]) -> None:
        """Periodic upkeep (e.g. rotate IB tick-by-tick slots)."""

    def add_symbols(self, symbols: list[str]) -> list[str]:
        """Subscribe symbols outside the universe file (held or with open orders), now if
        connected and on every later (re)connect; never unsubscribed. Returns those now
        subscribed (IB: qualified) or, when not connected, queued for the next connect.
        Raises FeedDisconnected."""

    def close(self) -> None: ...
