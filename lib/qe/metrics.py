"""Prometheus metrics: the standard set every daemon exports (SPEC 7), one place.

Each daemon serves its own registry on its own localhost port. Names follow
Prometheus conventions: `_total` for counters, base units (`_seconds`,
`_ratio` for fractions: 1.25 means 125 % of equity).
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Default metrics port per daemon (override with QE_METRICS_PORT; 0 picks a free one).
DEFAULT_PORTS = {
    "session": 9101,
    "exposure": 9102,
    "market-data": 9103,
    "prints": 9104,
    "alerts": 9105,
    "decision": 9106,
    "execution": 9107,
    "ib-sim": 9108,
}

REGISTRY = CollectorRegistry(auto_describe=True)

events_consumed = Counter(
    "qe_events_consumed_total", "Events handled from a stream", ["stream"], registry=REGISTRY
)
events_published = Counter(
    "qe_events_published_total", "Events appended to a stream", ["stream"], registry=REGISTRY
)
events_deduplicated = Counter(
    "qe_events_deduplicated_total",
    "Appends skipped because their idempotency key was already published",
    ["stream"],
    registry=REGISTRY,
)
events_dead_lettered = Counter(
    "qe_events_dead_lettered_total", "Entries moved to ev.dlq", ["stream", "reason"], registry=REGISTRY
)
handler_errors = Counter(
    "qe_handler_errors_total", "Events whose handler raised (retried, then dead-lettered)", ["stream"], registry=REGISTRY
)
batch_seconds = Histogram(
    "qe_batch_duration_seconds",
    "Time to handle and commit one batch",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
commits_aborted = Counter(
    "qe_commits_aborted_total",
    "Batch commits refused because another consumer had claimed an entry",
    registry=REGISTRY,
)
consumer_lag = Gauge(
    "qe_consumer_lag_entries", "Entries not yet delivered to the group", ["stream", "group"], registry=REGISTRY
)
consumer_pending = Gauge(
    "qe_consumer_pending_entries", "Entries delivered but not acknowledged", ["stream", "group"], registry=REGISTRY
)
entries_claimed = Counter(
    "qe_entries_claimed_total", "Idle entries claimed from other consumers", ["stream"], registry=REGISTRY
)
trimmed_unprocessed = Counter(
    "qe_entries_trimmed_unprocessed_total",
    "Entries trimmed from a stream before this group handled them",
    ["stream"],
    registry=REGISTRY,
)
redis_errors = Counter("qe_redis_errors_total", "Redis connection or command errors", registry=REGISTRY)
redis_up = Gauge("qe_redis_up", "1 while the last Redis call succeeded", registry=REGISTRY)
heartbeat_timestamp = Gauge(
    "qe_heartbeat_timestamp_seconds", "Wall time of the daemon's last loop iteration", registry=REGISTRY
)
broker_connected = Gauge("qe_broker_connected", "1 while connected to the broker", registry=REGISTRY)
decision_mode = Gauge("qe_decision_mode", "1 for the Brain's current mode", ["mode"], registry=REGISTRY)
exposure_gross = Gauge("qe_exposure_gross_ratio", "Current gross exposure / equity", registry=REGISTRY)
exposure_potential_gross = Gauge(
    "qe_exposure_potential_gross_ratio", "Potential gross exposure (all open orders filled) / equity", registry=REGISTRY
)
orders_by_status = Gauge("qe_orders", "Orders known to execution, by status", ["status"], registry=REGISTRY)


def serve(daemon: str, host: str, port: int | None) -> int:
    """Start the metrics endpoint on localhost (by default); returns the bound port."""
    chosen = DEFAULT_PORTS.get(daemon, 0) if port is None else port
    server, _thread = start_http_server(chosen, addr=host, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("metrics endpoint up", extra={"metrics_url": f"http://{host}:{bound}/metrics"})
    return bound


def beat() -> None:
    heartbeat_timestamp.set(time.time())

# Decision engine ("Brain").
decision_intents = Counter(
    "qe_decision_intents_total", "Intents issued by the Brain", ["action", "intent_type"], registry=REGISTRY
)
decision_suppressed = Counter(
    "qe_decision_suppressed_total", "Candidate intents dropped by arbitration, the caps or reconciliation", ["reason"],
    registry=REGISTRY,
)
decision_evaluations = Counter(
    "qe_decision_evaluations_total", "Decision steps run", ["kind"], registry=REGISTRY
)
decision_evaluation_seconds = Histogram(
    "qe_decision_evaluation_seconds",
    "Time of one decision step (pure core)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
    registry=REGISTRY,
)
decision_skips = Counter(
    "qe_decision_symbol_skips_total", "Symbols skipped by a de-risk or strategy step (reported once a day)", ["reason"],
    registry=REGISTRY,
)
