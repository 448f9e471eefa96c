"""The simulator's Prometheus endpoint (the demo's `ib-sim` scrape target, port 9108).

What the referee knows, as metrics: orders received, fills, faults injected through
the control API and faults the broker actually applied, connected API clients, and
the broker-side potential gross (current and the worst seen).

The numbers live on the simulator's asyncio loop; a scrape (on the HTTP server's
thread) reads them through that loop, so it never sees a half-updated broker.
"""

from __future__ import annotations

import asyncio
import logging
import math
from http.server import HTTPServer
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .server import SimServer

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0

# Fault commands of the control API (sim/control.py), counted when accepted.
FAULT_COMMANDS = (
    "drop_connections", "refuse_connections", "restart", "reject_next", "delay_acks", "drop_acks",
    "partial_fills", "delay_status", "drop_status", "drop_on_fill", "send_code", "shock", "set_quote",
)
# Faults the broker applies and writes to the referee log (Broker.log_fault).
FIRED_FAULTS = ("forced_partial", "status_dropped", "status_delayed", "connection_dropped_mid_fill")


def snapshot(sim: "SimServer") -> dict[str, Any]:
    """The referee's numbers, read on the simulator's loop."""
    broker = sim.broker
    referee = broker.referee()
    potential = referee["potential_gross"]
    current = (potential.get("current") or {}).get("pct")
    worst = (potential.get("max") or {}).get("pct")
    counts = referee["counts"]
    return {
        "orders": counts["orders"],
        "orders_rejected": counts["rejected"],
        "open_orders": counts["open_orders"],
        "fills": counts["fills"],
        "filled_shares": counts["filled_shares"],
        "faults_injected": dict(sim.faults_injected),
        "faults_fired": dict(broker.faults_fired),
        "connected_clients": len(sim.api_sessions()),
        "accepting": 1 if sim.listener is not None else 0,
        "potential_gross_ratio": math.nan if current is None else current / 100,
        "potential_gross_max_ratio": math.nan if worst is None else worst / 100,
    }


def _labelled_counter(name: str, doc: str, label: str, known: tuple[str, ...], values: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in sorted(set(known) | set(values)):
        family.add_metric([key], values.get(key, 0))
    return family


def families(numbers: dict[str, Any]) -> list[Metric]:
    return [
        CounterMetricFamily("qe_sim_orders", "Orders received by the simulated broker (rejected included)",
                            value=numbers["orders"]),
        CounterMetricFamily("qe_sim_orders_rejected", "Orders the simulated broker refused outright",
                            value=numbers["orders_rejected"]),
        GaugeMetricFamily("qe_sim_open_orders", "Orders live at the simulated broker", value=numbers["open_orders"]),
        CounterMetricFamily("qe_sim_fills", "Executions at the simulated broker", value=numbers["fills"]),
        CounterMetricFamily("qe_sim_filled_shares", "Shares executed at the simulated broker",
                            value=numbers["filled_shares"]),
        _labelled_counter("qe_sim_faults_injected", "Fault commands accepted by the control API, by command",
                          "fault", FAULT_COMMANDS, numbers["faults_injected"]),
        _labelled_counter("qe_sim_faults_fired", "Faults the simulated broker applied (referee log), by fault",
                          "fault", FIRED_FAULTS, numbers["faults_fired"]),
        GaugeMetricFamily("qe_sim_connected_clients", "API clients connected now", value=numbers["connected_clients"]),
        GaugeMetricFamily("qe_sim_accepting_connections", "1 while the simulator accepts connections (0: refusing)",
                          value=numbers["accepting"]),
        GaugeMetricFamily("qe_sim_referee_potential_gross_ratio",
                          "Broker-side potential gross / NetLiquidation now (NaN: no NetLiquidation)",
                          value=numbers["potential_gross_ratio"]),
        GaugeMetricFamily("qe_sim_referee_potential_gross_max_ratio",
                          "Worst broker-side potential gross / NetLiquidation since start or /referee/reset",
                          value=numbers["potential_gross_max_ratio"]),
    ]


class SimCollector:
    def __init__(self, sim: "SimServer", loop: asyncio.AbstractEventLoop) -> None:
        self.sim = sim
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        async def read() -> dict[str, Any]:
            return snapshot(self.sim)

        numbers = asyncio.run_coroutine_threadsafe(read(), self.loop).result(SCRAPE_TIMEOUT_S)
        yield from families(numbers)


class MetricsEndpoint:
    """The HTTP endpoint; `port` is the bound one (0 asks for any free port)."""

    def __init__(self, sim: "SimServer", host: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SimCollector(sim, asyncio.get_running_loop()))
        self.server: HTTPServer
        self.server, _thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self.server.server_address[1]
        log.info("metrics endpoint up", extra={"metrics_url": f"http://{host}:{self.port}/metrics"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
