"""Reconciliation (pure): our order records against what the broker reports after a
start or a reconnect — open orders of all clients, completed orders, executions
since the session start. Matching is by orderRef (ours: qe.contracts.is_our_order_ref)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qe.contracts import TERMINAL_ORDER_STATUSES, is_our_order_ref

from .core import OrderRecord, on_broker_status, on_fill



@dataclass(frozen=True)
class BrokerOrder:
    order_ref: str
    order_id: int
    perm_id: int
    client_id: int
    status: str  # IB status text
    filled: float
    symbol: str
    side: str
    qty: float
    limit_price: float | None
    open: bool  # from the open orders (True) or the completed orders (False)


@dataclass(frozen=True)
class BrokerFill:
    exec_id: str
    order_ref: str
    order_id: int
    perm_id: int
    symbol: str
    side: str
    qty: int
    price: float
    ts_ns: int


@dataclass(frozen=True)
class Step:
    """One change of one record, in the order it happened: the record after it and the
    execution that made it (None for a status or id change). Every step is published."""

    record: OrderRecord
    fill: BrokerFill | None = None


@dataclass
class Reconciliation:
    records: dict[str, OrderRecord] = field(default_factory=dict)  # changed records only (final state)
    steps: list[Step] = field(default_factory=list)  # every change, in order: one per new fill, one per status change
    fills: list[tuple[str, BrokerFill]] = field(default_factory=list)  # (order_ref, fill) newly applied
    external: list[BrokerOrder] = field(default_factory=list)  # not placed by us: report, leave alone
    orphans: list[BrokerOrder] = field(default_factory=list)  # our prefix but no record: report
    resubmit: list[str] = field(default_factory=list)  # PENDING_SUBMIT, not at the broker, not expired
    awaiting_ack: list[str] = field(default_factory=list)  # would be resubmitted, but its send may still be on its way
    rejected: list[str] = field(default_factory=list)  # never acknowledged, the broker answered with an error
    expired: list[str] = field(default_factory=list)  # PENDING_SUBMIT, not at the broker, expired: never sent
    vanished: list[str] = field(default_factory=list)  # acknowledged, live, but unknown to the broker now


def reconcile(
    records: dict[str, OrderRecord],
    broker_orders: list[BrokerOrder],
    fills: list[BrokerFill],
    now_ns: int,
    in_flight: frozenset[str] = frozenset(),
) -> Reconciliation:
    """`in_flight`: orderRefs whose place is queued or was sent on this connection less
    than the ack timeout ago. The broker may not show them yet; they are never
    resubmitted (a repeat would reach the broker as a modify), only awaited."""
    result = Reconciliation()
    current = dict(records)

    def update(new: OrderRecord | None, fill: BrokerFill | None = None) -> None:
        if new is not None:
            current[new.order_ref] = new
            result.records[new.order_ref] = new
            result.steps.append(Step(new, fill))

    seen_refs: set[str] = set()
    # Fills first: a completed order's status then lands on an already-filled record.
    for fill in sorted(fills, key=lambda f: (f.ts_ns, f.exec_id)):
        record = current.get(fill.order_ref)
        if record is None:
            continue
        seen_refs.add(fill.order_ref)
        applied = on_fill(_adopt(record, fill.order_id, fill.perm_id), fill.exec_id, fill.qty, fill.price)
        if applied is not None:
            update(applied, fill)
            result.fills.append((fill.order_ref, fill))
    # Open orders before completed ones, so a final status is applied last.
    for order in sorted(broker_orders, key=lambda o: not o.open):
        if not is_our_order_ref(order.order_ref):
            result.external.append(order)
            continue
        record = current.get(order.order_ref)
        if record is None:
            result.orphans.append(order)
            continue
        seen_refs.add(order.order_ref)
        adopted = _adopt(record, order.order_id, order.perm_id)
        if adopted is not record:
            update(adopted)
        update(on_broker_status(current[order.order_ref], order.status, order.filled))
    for ref, record in current.items():
        if ref in seen_refs or record.status in TERMINAL_ORDER_STATUSES:
            continue
        if not record.acknowledged:
            if record.last_error_code is not None:
                result.rejected.append(ref)
            elif record.expires_ns <= now_ns:
                result.expired.append(ref)
            elif ref in in_flight:
                result.awaiting_ack.append(ref)
            else:
                result.resubmit.append(ref)
        else:
            result.vanished.append(ref)
    return result


def _adopt(record: OrderRecord, order_id: int, perm_id: int) -> OrderRecord:
    """Take the broker's ids onto our record (after a crash between send and record)."""
    changes = {}
    if order_id and record.broker_order_id != order_id:
        changes["broker_order_id"] = order_id
    if perm_id and record.perm_id != perm_id:
        changes["perm_id"] = perm_id
    return dataclasses.replace(record, **changes) if changes else record
