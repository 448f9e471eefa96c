"""Request handlers: orders (place / what-if / modify / cancel / global cancel), open and
completed orders, executions.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import protocol as P
from .broker import exec_fields, exec_time_text

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger("sim.server")


class OrderHandlers:
    """Order requests."""

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
