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
exposure_marks_stale = Gauge(
    "qe_exposure_marks_stale", "Symbols with a position or open order whose mark is stale or missing", registry=REGISTRY
)
exposure_publications = Counter(
    "qe_exposure_publications_total", "ev.exposure publications, by detail (full or changed)", ["detail"], registry=REGISTRY
)
exposure_events_ignored = Counter(
    "qe_exposure_events_ignored_total", "Input events the exposure worker could not use, by reason", ["reason"], registry=REGISTRY
)
session_regime = Gauge("qe_session_regime", "1 for the current session regime", ["regime"], registry=REGISTRY)
session_market_open = Gauge("qe_session_market_open", "1 while the exchange session is open", registry=REGISTRY)
session_seconds_to_close = Gauge(
    "qe_session_seconds_to_close", "Seconds to today's close while open (NaN while closed)", registry=REGISTRY
)
orders_by_status = Gauge("qe_orders", "Orders known to execution, by status", ["status"], registry=REGISTRY)
intents_received = Counter("qe_intents_received_total", "Intents read by execution", ["action"], registry=REGISTRY)
intents_duplicate = Counter(
    "qe_intents_duplicate_total", "Intents whose order already exists (redelivery or duplicate)", registry=REGISTRY
)
orders_sent = Counter("qe_orders_sent_total", "New orders sent to the broker", registry=REGISTRY)
orders_rejected = Counter(
    "qe_orders_rejected_total", "Orders refused before the broker, by pre-trade rule", ["rule"], registry=REGISTRY
)
fills = Counter("qe_fills_total", "Executions applied (deduplicated by execId)", registry=REGISTRY)

alerts_emitted = Counter(
    "qe_alerts_emitted_total", "Alerts published by qe-alerts, by type, severity and state (firing|resolved|event)",
    ["alert_type", "severity", "state"], registry=REGISTRY,
)
alerts_suppressed = Counter(
    "qe_alerts_suppressed_total", "Alerts held back by the rate limit", ["alert_type"], registry=REGISTRY
)
alerts_active = Gauge("qe_alerts_active", "Alert conditions firing now, by type", ["alert_type"], registry=REGISTRY)
exposure_bucket = Gauge(
    "qe_exposure_bucket_ratio",
    "Bucket exposure / equity from ev.exposure (exported by qe-alerts), by bucket and measure (current, potential, max, target)",
    ["bucket", "measure"], registry=REGISTRY,
)
alerts_inputs_ignored = Counter(
    "qe_alerts_inputs_ignored_total", "Input events or state the alerts worker could not use, by reason", ["reason"],
    registry=REGISTRY,
)

def serve(daemon: str, host: str, port: int | None) -> int:
    """Start the metrics endpoint on localhost (by default); returns the bound port."""
    chosen = DEFAULT_PORTS.get(daemon, 0) if port is None else port
    server, _thread = start_http_server(chosen, addr=host, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("metrics endpoint up", extra={"metrics_url": f"http://{host}:{bound}/metrics"})
    return bound


def beat() -> None:
    heartbeat_timestamp.set(time.time())

# --- prints/features worker ------------------------------------------------------------
prints_duplicate = Counter(
    "qe_prints_duplicate_total", "Prints skipped because their idempotency key was already seen", registry=REGISTRY
)
prints_too_old = Counter(
    "qe_prints_too_old_total", "Prints older than everything a full buffer holds (cannot change a window)",
    registry=REGISTRY,
)
prints_unknown_venue = Counter(
    "qe_prints_unknown_venue_total", "Prints on a venue in neither venue list", ["venue"], registry=REGISTRY
)
truth_ticks = Counter("qe_truth_ticks_total", "Prints classified as truth ticks", registry=REGISTRY)

# --- market data feed ---------------------------------------------------------------------
feed_connected = Gauge("qe_feed_connected", "1 while the market data feed is connected", ["source"], registry=REGISTRY)
feed_stale = Gauge("qe_feed_stale", "1 while the feed is stale (farm broken or silent in market hours)", ["source"], registry=REGISTRY)
feed_messages = Counter("qe_feed_messages_total", "Quotes and trades received from the feed", ["source", "kind"], registry=REGISTRY)
feed_malformed = Counter(
    "qe_feed_malformed_total", "Feed messages skipped as unusable", ["source", "reason"], registry=REGISTRY
)
feed_reconnects = Counter("qe_feed_reconnects_total", "Feed connection attempts after the first", ["source"], registry=REGISTRY)
feed_duplicate_prints = Counter(
    "qe_feed_duplicate_prints_total", "Trades not published again because their key was already published",
    ["source"], registry=REGISTRY,
)
feed_dropped = Counter(
    "qe_feed_dropped_total", "Events dropped or collapsed while Redis was unreachable", ["kind"], registry=REGISTRY
)
feed_backlog = Gauge("qe_feed_backlog_events", "Events waiting to be appended to Redis", registry=REGISTRY)
feed_last_update = Gauge(
    "qe_feed_last_update_timestamp_seconds", "Clock time of the last quote or trade", ["source"], registry=REGISTRY
)
feed_tick_by_tick = Gauge(
    "qe_feed_tick_by_tick_subscriptions", "Symbols holding an IB tick-by-tick slot", registry=REGISTRY
)

# --- decision engine ("Brain") -------------------------------------------------------------
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
