"""Prometheus metrics: the standard set every daemon exports (SPEC 7), one place.

Each daemon serves its OWN registry on its own localhost port, holding only the
metrics it owns: a metric is declared unregistered (``registry=None``) together
with the daemons that own it, and ``serve(daemon, ...)`` registers exactly those.
A daemon therefore never exports another daemon's gauge reading a false 0 (the
Brain has no ``qe_exposure_gross_ratio``; session has no ``qe_broker_connected``).

Series an alert needs from the start exist before the endpoint first answers:
the per-stream counters of the streams a daemon consumes and publishes
(``qe.acl.ACCESS``, and the consumer's own stream list again when it starts) are
created at 0, so ``increase()`` sees the first dead letter. Gauges whose value is
not known yet start at NaN ("unknown is not zero"), never at a false 0.
No ``_created`` series (``disable_created_metrics``).

Names follow Prometheus conventions: `_total` for counters, base units
(`_seconds`, `_ratio` for fractions: 1.25 means 125 % of equity).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.registry import Collector

from . import acl

log = logging.getLogger(__name__)

disable_created_metrics()  # no `<name>_created` series: they double the series count

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
    "pnl": 9109,
}

# Labels of qe_events_dead_lettered_total{reason}: every label streams.Consumer uses.
DEAD_LETTER_REASONS = ("invalid", "trimmed", "max_deliveries", "trimmed_unread")

# Who owns a metric: daemon names, or one of these two groups.
EVERY_DAEMON = "every daemon"  # the stream runtime: publishing, Redis, heartbeat
CONSUMERS = "every consuming daemon"  # the consumer loop: consumed, DLQ, lag, batches
PRODUCER_ONLY = frozenset({"market-data"})  # daemons without a consumer group

M = TypeVar("M", bound=Collector)
_OWNERS: dict[Collector, frozenset[str]] = {}


def owned_by(*owners: str) -> Callable[[M], M]:
    """Record which daemons export `metric` (declared with registry=None)."""

    def declare(metric: M) -> M:
        _OWNERS[metric] = frozenset(owners)
        return metric

    return declare


def owns(daemon: str, owners: frozenset[str]) -> bool:
    if daemon in owners or EVERY_DAEMON in owners:
        return True
    return CONSUMERS in owners and daemon not in PRODUCER_ONLY


def collectors_of(daemon: str) -> list[Collector]:
    return [metric for metric, owners in _OWNERS.items() if owns(daemon, owners)]


def all_collectors() -> list[Collector]:
    return list(_OWNERS)


def registry_for(daemon: str) -> CollectorRegistry:
    """A new registry with exactly the metrics `daemon` owns."""
    registry = CollectorRegistry(auto_describe=True)
    for metric in collectors_of(daemon):
        registry.register(metric)
    return registry


def _counter(owners: Iterable[str], name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
    return owned_by(*owners)(Counter(name, doc, list(labels), registry=None))


def _gauge(owners: Iterable[str], name: str, doc: str, labels: Iterable[str] = (), unknown_at_start: bool = False) -> Gauge:
    gauge = owned_by(*owners)(Gauge(name, doc, list(labels), registry=None))
    if unknown_at_start:
        gauge.set(math.nan)
    return gauge


def _histogram(owners: Iterable[str], name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return owned_by(*owners)(Histogram(name, doc, buckets=buckets, registry=None))


ALL = (EVERY_DAEMON,)
CONSUMING = (CONSUMERS,)

# --- the stream runtime (lib/qe/streams.py) --------------------------------------------
events_consumed = _counter(CONSUMING, "qe_events_consumed_total", "Events handled from a stream", ["stream"])
events_published = _counter(ALL, "qe_events_published_total", "Events appended to a stream", ["stream"])
events_deduplicated = _counter(
    ALL, "qe_events_deduplicated_total", "Appends skipped because their idempotency key was already published", ["stream"]
)
events_dead_lettered = _counter(
    CONSUMING, "qe_events_dead_lettered_total", "Entries moved to ev.dlq, by consumed stream and reason", ["stream", "reason"]
)
handler_errors = _counter(
    CONSUMING, "qe_handler_errors_total", "Events whose handler raised (retried, then dead-lettered)", ["stream"]
)
batch_seconds = _histogram(
    CONSUMING,
    "qe_batch_duration_seconds",
    "Time to handle and commit one batch",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
commits_aborted = _counter(
    CONSUMING, "qe_commits_aborted_total", "Batch commits refused because another consumer had claimed an entry"
)
consumer_lag = _gauge(CONSUMING, "qe_consumer_lag_entries", "Entries not yet delivered to the group", ["stream", "group"])
consumer_pending = _gauge(
    CONSUMING, "qe_consumer_pending_entries", "Entries delivered but not acknowledged", ["stream", "group"]
)
entries_claimed = _counter(CONSUMING, "qe_entries_claimed_total", "Idle entries claimed from other consumers", ["stream"])
trimmed_unprocessed = _counter(
    CONSUMING,
    "qe_entries_trimmed_unprocessed_total",
    "Entries trimmed from a stream before this group handled them",
    ["stream"],
)
redis_errors = _counter(ALL, "qe_redis_errors_total", "Redis connection or command errors")
redis_up = _gauge(ALL, "qe_redis_up", "1 while the last Redis call succeeded (NaN before the first)", unknown_at_start=True)
heartbeat_timestamp = _gauge(
    ALL, "qe_heartbeat_timestamp_seconds", "Wall time of the daemon's last loop iteration (its start until the first)"
)

# --- broker and Brain ------------------------------------------------------------------------
broker_connected = _gauge(
    ("execution", "decision"),
    "qe_broker_connected",
    "1 while connected to the broker (execution: its link; decision: as ev.broker last said); NaN until known",
    unknown_at_start=True,
)
decision_mode = _gauge(("decision",), "qe_decision_mode", "1 for the Brain's current mode", ["mode"])

# --- exposure ------------------------------------------------------------------------------
exposure_gross = _gauge(
    ("exposure",), "qe_exposure_gross_ratio", "Current gross exposure / equity (NaN: unknown)", unknown_at_start=True
)
exposure_potential_gross = _gauge(
    ("exposure",),
    "qe_exposure_potential_gross_ratio",
    "Potential gross exposure (all open orders filled) / equity (NaN: unknown)",
    unknown_at_start=True,
)
exposure_marks_stale = _gauge(
    ("exposure",),
    "qe_exposure_marks_stale",
    "Symbols with a position or open order whose mark is stale or missing",
    unknown_at_start=True,
)
exposure_publications = _counter(
    ("exposure",), "qe_exposure_publications_total", "ev.exposure publications, by detail (full or changed)", ["detail"]
)
exposure_events_ignored = _counter(
    ("exposure",), "qe_exposure_events_ignored_total", "Input events the exposure worker could not use, by reason", ["reason"]
)

# --- pnl ---------------------------------------------------------------------------------------
# scope: "account" or a bucket (LT, MM_PURE); component: realized, unrealized, commissions, total.
pnl_dollars = _gauge(
    ("pnl",), "qe_pnl_dollars", "The trading day's P&L in USD (total = realized + unrealized - commissions), by scope "
    "(account or bucket) and component", ["scope", "component"],
)
pnl_commissions_pending = _gauge(
    ("pnl",), "qe_pnl_commissions_pending", "Fills of the day whose commission report has not arrived yet", unknown_at_start=True
)
pnl_marks_stale = _gauge(
    ("pnl",), "qe_pnl_marks_stale", "Open positions valued at a stale, fallback or missing mark", unknown_at_start=True
)
pnl_publications = _counter(("pnl",), "qe_pnl_publications_total", "ev.pnl publications, by kind (periodic, fill, final)", ["kind"])
pnl_reports = _counter(("pnl",), "qe_pnl_reports_total", "End-of-day reports written by qe-pnl, by outcome (ok, error)", ["outcome"])
for _scope in ("account", "LT", "MM_PURE"):
    for _component in ("realized", "unrealized", "commissions", "total"):
        pnl_dollars.labels(_scope, _component).set(math.nan)

# --- session ---------------------------------------------------------------------------------
session_regime = _gauge(("session",), "qe_session_regime", "1 for the current session regime", ["regime"])
session_market_open = _gauge(
    ("session",), "qe_session_market_open", "1 while the exchange session is open", unknown_at_start=True
)
session_seconds_to_close = _gauge(
    ("session",),
    "qe_session_seconds_to_close",
    "Seconds to today's close while open (NaN while closed)",
    unknown_at_start=True,
)

# --- execution -------------------------------------------------------------------------------
orders_by_status = _gauge(("execution",), "qe_orders", "Orders known to execution, by status", ["status"])
intents_received = _counter(("execution",), "qe_intents_received_total", "Intents read by execution", ["action"])
intents_duplicate = _counter(
    ("execution",), "qe_intents_duplicate_total", "Intents whose order already exists (redelivery or duplicate)"
)
orders_sent = _counter(("execution",), "qe_orders_sent_total", "New orders sent to the broker")
orders_rejected = _counter(
    ("execution",), "qe_orders_rejected_total", "Orders refused before the broker, by pre-trade rule", ["rule"]
)
fills = _counter(("execution",), "qe_fills_total", "Executions applied (deduplicated by execId)")

# --- alerts ----------------------------------------------------------------------------------
alerts_emitted = _counter(
    ("alerts",),
    "qe_alerts_emitted_total",
    "Alerts published by qe-alerts, by type, severity and state (firing|resolved|event)",
    ["alert_type", "severity", "state"],
)
alerts_suppressed = _counter(
    ("alerts",), "qe_alerts_suppressed_total", "Alerts held back by the rate limit", ["alert_type"]
)
alerts_active = _gauge(("alerts",), "qe_alerts_active", "Alert conditions firing now, by type", ["alert_type"])
exposure_bucket = _gauge(
    ("alerts",),
    "qe_exposure_bucket_ratio",
    "Bucket exposure / equity from ev.exposure (exported by qe-alerts), by bucket and measure (current, potential, max, target)",
    ["bucket", "measure"],
)
alerts_inputs_ignored = _counter(
    ("alerts",),
    "qe_alerts_inputs_ignored_total",
    "Input events or state the alerts worker could not use, by reason",
    ["reason"],
)

# --- prints/features worker ------------------------------------------------------------
prints_duplicate = _counter(
    ("prints",), "qe_prints_duplicate_total", "Prints skipped because their idempotency key was already seen"
)
prints_too_old = _counter(
    ("prints",),
    "qe_prints_too_old_total",
    "Prints older than everything a full buffer holds (cannot change a window)",
)
prints_unknown_venue = _counter(
    ("prints",), "qe_prints_unknown_venue_total", "Prints on a venue in neither venue list", ["venue"]
)
truth_ticks = _counter(("prints",), "qe_truth_ticks_total", "Prints classified as truth ticks")

# --- market data feed ---------------------------------------------------------------------
FEED = ("market-data",)
feed_connected = _gauge(FEED, "qe_feed_connected", "1 while the market data feed is connected", ["source"])
feed_stale = _gauge(
    FEED, "qe_feed_stale", "1 while the feed is stale (farm broken or silent in market hours)", ["source"]
)
feed_messages = _counter(FEED, "qe_feed_messages_total", "Quotes and trades received from the feed", ["source", "kind"])
feed_malformed = _counter(FEED, "qe_feed_malformed_total", "Feed messages skipped as unusable", ["source", "reason"])
feed_reconnects = _counter(FEED, "qe_feed_reconnects_total", "Feed connection attempts after the first", ["source"])
feed_duplicate_prints = _counter(
    FEED,
    "qe_feed_duplicate_prints_total",
    "Trades not published again because their key was already published",
    ["source"],
)
feed_dropped = _counter(FEED, "qe_feed_dropped_total", "Events dropped or collapsed while Redis was unreachable", ["kind"])
feed_backlog = _gauge(FEED, "qe_feed_backlog_events", "Events waiting to be appended to Redis")
feed_last_update = _gauge(
    FEED, "qe_feed_last_update_timestamp_seconds", "Clock time of the last quote or trade", ["source"]
)
feed_tick_by_tick = _gauge(FEED, "qe_feed_tick_by_tick_subscriptions", "Symbols holding an IB tick-by-tick slot")

# --- decision engine ("Brain") -------------------------------------------------------------
BRAIN = ("decision",)
decision_intents = _counter(BRAIN, "qe_decision_intents_total", "Intents issued by the Brain", ["action", "intent_type"])
decision_suppressed = _counter(
    BRAIN,
    "qe_decision_suppressed_total",
    "Candidate intents dropped by arbitration, the caps or reconciliation",
    ["reason"],
)
decision_evaluations = _counter(BRAIN, "qe_decision_evaluations_total", "Decision steps run", ["kind"])
decision_evaluation_seconds = owned_by(*BRAIN)(
    Histogram(
        "qe_decision_evaluation_seconds",
        "Time of one decision step (pure core)",
        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
        registry=None,
    )
)
decision_skips = _counter(
    BRAIN,
    "qe_decision_symbol_skips_total",
    "Symbols skipped by a de-risk or strategy step (reported once a day)",
    ["reason"],
)


# --- series that exist from the start ----------------------------------------------------------
def declare_consumed(streams: Iterable[str]) -> None:
    """Create a consumer's per-stream counters at 0 (idempotent)."""
    for stream in streams:
        events_consumed.labels(stream)
        handler_errors.labels(stream)
        entries_claimed.labels(stream)
        trimmed_unprocessed.labels(stream)
        for reason in DEAD_LETTER_REASONS:
            events_dead_lettered.labels(stream, reason)


def declare_published(streams: Iterable[str]) -> None:
    for stream in streams:
        events_published.labels(stream)
        events_deduplicated.labels(stream)


def declare_streams_of(daemon: str) -> None:
    """The streams the daemon reads and writes, as its ACL grants them (qe.acl.ACCESS)."""
    access = acl.ACCESS.get(daemon)
    if access is None:
        return
    if daemon not in PRODUCER_ONLY:
        declare_consumed(access.consumes)
    declare_published(access.publishes)


# --- serving ---------------------------------------------------------------------------------
def serve(daemon: str, host: str, port: int | None) -> int:
    """Start the daemon's own metrics endpoint (localhost by default); returns the bound port.

    Everything an alert needs exists before the endpoint first answers."""
    chosen = DEFAULT_PORTS.get(daemon, 0) if port is None else port
    registry = registry_for(daemon)
    declare_streams_of(daemon)
    heartbeat_timestamp.set(time.time())  # the loop has not turned yet: its age counts from the start
    server, _thread = start_http_server(chosen, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("metrics endpoint up", extra={"metrics_url": f"http://{host}:{bound}/metrics"})
    return bound


def beat() -> None:
    heartbeat_timestamp.set(time.time())
