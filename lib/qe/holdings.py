"""What the account holds and has working, as execution publishes it: the symbols with
a non-zero position or an open order. Read by market data so that every symbol carrying
risk is priced, universe file or not (issue 13, "No unpriced risk").

Execution is the writer; its contracts are qe.state's readers:
- `state:positions` (qe.state.read_positions): a flat position is deleted (HDEL).
- `state:orders` (qe.state.read_orders): execution's own orders only.
- `ev.orders`: `qe.contracts.Order` events, the only place external orders (placed
  outside quant-engine, `external: true`) appear. The latest event per orderRef wins.

Typed: every value is validated (pydantic); an entry that does not validate is skipped
and reported, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import redis

from . import state
from .contracts import OPEN_ORDER_STATUSES, DecodeError, Order, decode
from .redis_types import Fields, StreamEntries

ORDERS_STREAM = "ev.orders"


def is_open(status: str) -> bool:
    return status in OPEN_ORDER_STATUSES


def positions_from_hash(raw: dict[bytes, bytes]) -> tuple[dict[str, int], list[str]]:
    """`state:positions` -> ({symbol: non-zero qty}, problems)."""
    positions = state.parse_positions(raw)
    held = {symbol: position.qty for symbol, position in positions.values.items() if position.qty}
    return held, list(positions.problems.values())


def open_orders_from_hash(raw: dict[bytes, bytes]) -> tuple[dict[str, str], list[str]]:
    """`state:orders` -> ({orderRef: symbol} of open orders, problems)."""
    orders = state.parse_orders(raw)
    working = {ref: order.symbol for ref, order in orders.values.items() if order.open}
    return working, list(orders.problems.values())


@dataclass(frozen=True)
class Holdings:
    positions: dict[str, int]  # symbol -> non-zero signed qty
    open_orders: dict[str, str]  # orderRef -> symbol, ours and external
    problems: tuple[str, ...] = ()

    @property
    def symbols(self) -> set[str]:
        """Every symbol that carries risk: held, or with an open order."""
        return set(self.positions) | set(self.open_orders.values())


@dataclass
class OrderEvents:
    """The latest `ev.orders` event per orderRef, read incrementally (XRANGE after the
    last entry seen). Pure apart from `read`."""

    last_id: str = "0-0"
    latest: dict[str, Order] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            self.last_id = entry_id.decode()
            try:
                event = decode(ORDERS_STREAM, fields)
            except DecodeError as exc:
                self.problems.append(f"{ORDERS_STREAM} {self.last_id}: {exc.reason}")
                continue
            order = event.payload
            assert isinstance(order, Order)
            self.latest[order.order_ref] = order

    def read(self, r: redis.Redis, page: int = 1000, max_pages: int = 50) -> None:
        """Read what was appended since the last call (at most page * max_pages entries;
        the rest on the next call)."""
        for _ in range(max_pages):
            entries = cast(StreamEntries, r.xrange(ORDERS_STREAM, min=f"({self.last_id}", max="+", count=page))
            self.apply(entries)
            if len(entries) < page:
                return

    @property
    def open_orders(self) -> dict[str, str]:
        return {ref: order.symbol for ref, order in self.latest.items() if is_open(order.status)}


class HoldingsReader:
    """Reads positions and open orders from Redis as execution writes them."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.order_events = OrderEvents()

    def read(self) -> Holdings:
        """Raises redis errors (the caller retries later)."""
        positions, position_problems = positions_from_hash(cast(Fields, self.r.hgetall(state.POSITIONS)))
        records, record_problems = open_orders_from_hash(cast(Fields, self.r.hgetall(state.ORDERS)))
        self.order_events.read(self.r)
        problems = position_problems + record_problems + self.order_events.problems
        self.order_events.problems = []
        # ev.orders holds the newest status of every order, external ones included; a
        # record in state:orders may be newer than the stream page read so far: an order
        # is open if either says so (never miss risk).
        open_orders = {**self.order_events.open_orders, **records}
        return Holdings(positions=positions, open_orders=open_orders, problems=tuple(problems))
