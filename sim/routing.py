"""Routing: broker events to the client sessions that should hear them (the owner of an
order, and the master client when one is configured), with the ack and status faults.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import protocol as P
from .broker import FillReport, MarketChange, OrderError, OrderUpdate, PositionChange
from .session import AckHold

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger("sim.server")


class OrderRouting:
    """Broker events to client sessions."""

    def order_sessions(self, client_id: int) -> list[Session]:
        """Who hears about an order: its own client, and the master client."""
        result = []
        for session in self.api_sessions():
            if session.client_id == client_id or (
                self.config.master_client_id is not None and session.client_id == self.config.master_client_id
            ):
                result.append(session)
        return result

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
