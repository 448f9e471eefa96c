"""Every alert type any daemon publishes on `ev.alerts`, as one enumeration, and
whether each is a *condition* (raised, later resolved) or a one-off *event*.

The `Alert` contract (qe.contracts) accepts only these types and carries an explicit
`state` (raised | resolved): a reader never guesses a spelling, and never mistakes
the end of a condition for its start. A resolved alert is only valid for a
condition type. New alert types are added here first (the contract refuses others).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

AlertState = Literal["raised", "resolved"]
RAISED: AlertState = "raised"
RESOLVED: AlertState = "resolved"


class AlertType(StrEnum):
    # --- alerts worker (daemons/alerts): conditions over the streams --------------
    EXPOSURE_UNAVAILABLE = "exposure_unavailable"
    HARD_CAP_CURRENT = "hard_cap_current"
    HARD_CAP_POTENTIAL = "hard_cap_potential"
    BUCKET_MAX = "bucket_max"
    BROKER_DOWN = "broker_down"
    BROKER_ORDERS_REFUSED = "broker_orders_refused"
    L1_STALE = "l1_stale"  # one symbol's quotes silent (symbol set)
    L1_FEED_STALE = "l1_feed_stale"  # the whole ev.l1 stream silent (no symbol)
    PRINTS_STALE = "prints_stale"
    PRINTS_FEED_STALE = "prints_feed_stale"
    ETF_MOVE_VS_CLOSE = "etf_move_vs_close"
    ETF_MOVE_FAST = "etf_move_fast"
    DLQ_GROWTH = "dlq_growth"
    CONSUMER_LAG = "consumer_lag"
    NEW_DAILY_HIGH = "new_daily_high"  # event
    NEW_DAILY_LOW = "new_daily_low"  # event
    # --- market data ---------------------------------------------------------------
    FEED_AUTH_FAILED = "feed_auth_failed"  # event
    FEED_DISCONNECTED = "feed_disconnected"  # resolved: reconnected and re-subscribed
    FEED_STALE = "feed_stale"  # the feed (all its quotes) stale; resolved: delivering again
    L1_IMPLAUSIBLE = "l1_implausible"
    UNPRICED_SYMBOL_SUBSCRIBED = "unpriced_symbol_subscribed"  # event
    # --- prints --------------------------------------------------------------------
    PRINT_IMPLAUSIBLE = "print_implausible"
    # --- exposure ---------------------------------------------------------------------
    UNPRICED_POSITION = "unpriced_position"  # a held symbol at its fallback mark; resolved: the market prices it
    # --- decision (the Brain) ------------------------------------------------------
    MODE_CHANGE = "mode_change"  # event
    EXPOSURE_UNKNOWN = "exposure_unknown"  # resolved: exposure known again
    DECISION_EVALUATION_FAILED = "decision_evaluation_failed"  # event
    DECISION_SYMBOL_SKIPPED = "decision_symbol_skipped"  # event
    # --- execution -----------------------------------------------------------------
    ABSURD_BROKER_VALUE = "absurd_broker_value"  # event
    ORDER_VANISHED = "order_vanished"  # event
    ORDER_REJECTED = "order_rejected"  # event
    ORPHAN_ORDER = "orphan_order"  # event
    EXTERNAL_ORDER = "external_order"  # event
    # --- pnl -------------------------------------------------------------------------
    PNL_MISMATCH = "pnl_mismatch"  # one symbol's P&L differs from the broker's; resolved: agrees again


# One-off events: raised once, never resolved. Every other type is a condition.
EVENT_TYPES: frozenset[AlertType] = frozenset({
    AlertType.NEW_DAILY_HIGH,
    AlertType.NEW_DAILY_LOW,
    AlertType.FEED_AUTH_FAILED,
    AlertType.UNPRICED_SYMBOL_SUBSCRIBED,
    AlertType.MODE_CHANGE,
    AlertType.DECISION_EVALUATION_FAILED,
    AlertType.DECISION_SYMBOL_SKIPPED,
    AlertType.ABSURD_BROKER_VALUE,
    AlertType.ORDER_VANISHED,
    AlertType.ORDER_REJECTED,
    AlertType.ORPHAN_ORDER,
    AlertType.EXTERNAL_ORDER,
})
CONDITION_TYPES: frozenset[AlertType] = frozenset(AlertType) - EVENT_TYPES

# While raised, quotes are not current (SPEC 6 Marks): one symbol's (symbol set) ...
SYMBOL_QUOTES_STALE: frozenset[AlertType] = frozenset({AlertType.L1_STALE})
# ... or every quote of the feed (the alert has no symbol: one market data feed per system).
FEED_QUOTES_STALE: frozenset[AlertType] = frozenset({
    AlertType.L1_FEED_STALE, AlertType.FEED_STALE, AlertType.FEED_DISCONNECTED,
})
# Feed-wide episodes whose premise is that no quote can arrive (the feed is not connected;
# ev.l1 is silent): a quote market data vouched for after the raise proves the episode
# over, even when its resolve never comes (its producer killed with the resolve
# unflushed, or restarted without the episode in memory). `feed_stale` is not one: a
# broken data farm may still deliver some quotes, so only its resolve ends it.
FEED_QUOTES_STALE_UNTIL_A_QUOTE: frozenset[AlertType] = frozenset({
    AlertType.L1_FEED_STALE, AlertType.FEED_DISCONNECTED,
})
SYMBOL_PRINTS_STALE: frozenset[AlertType] = frozenset({AlertType.PRINTS_STALE})
FEED_PRINTS_STALE: frozenset[AlertType] = frozenset({AlertType.PRINTS_FEED_STALE})


def state_problem(alert_type: AlertType, state: AlertState) -> str | None:
    """Why this (type, state) pair is not a valid alert, or None."""
    if state == RESOLVED and alert_type in EVENT_TYPES:
        return f"{alert_type.value} is a one-off event: it is never resolved"
    return None
