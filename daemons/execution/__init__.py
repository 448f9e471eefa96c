"""qe-execution: the only process that talks to the broker.

Consumes ev.intents (group execution_service) plus the L1 marks, operator control
and session it needs for its own checks; publishes ev.orders, ev.positions,
ev.broker, ev.alerts and keeps state:orders, state:positions, state:broker.
"""

from __future__ import annotations

from qe import daemon, streams

GROUP = "execution_service"


def main() -> int:
    from .broker import BrokerLink
    from .service import ExecutionService

    context = daemon.start("execution")
    rules, settings = context.rules.execution, context.settings
    broker = BrokerLink(
        settings.ib_host,
        settings.ib_port,
        settings.ib_client_id_execution,
        connect_timeout_s=rules.connect_timeout_s,
        reconnect_base_s=rules.reconnect_base_s,
        reconnect_cap_s=rules.reconnect_cap_s,
    )
    consumer = streams.Consumer(
        r=context.redis,
        daemon="execution",
        group=GROUP,
        handler=ExecutionService(context, broker),
        rules=context.rules,
        clock=context.clock,
        consumer_name=settings.consumer_name,
        block_ms=rules.block_ms,
    )
    consumer.install_signal_handlers()
    try:
        return consumer.run()
    finally:
        broker.disconnect()
