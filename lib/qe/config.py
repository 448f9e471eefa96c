"""Configuration: `etc/risk_rules.yaml` (every rule and number) and the
environment (connections), both validated by pydantic.

An invalid configuration stops a daemon before it does anything: it prints the
exact field and reason and exits with 78 (EX_CONFIG), which supervisord and
systemd are configured to treat as fatal (no restart loop).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from datetime import time
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
import redis
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from .contracts import DLQ_STREAM, STREAM_TYPES, Bucket

EX_CONFIG = 78
# Streams that must keep at least a whole trading day (SPEC 3): by age, not by count.
FULL_DAY_STREAMS = ("ev.intents", "ev.orders", "ev.positions", "ev.decision_journal")
# Streams added after rules files (and archived days' copies of them) were written: the
# rule they get when a file has none.
LATER_STREAM_DEFAULTS = {"ev.decision_journal": {"minid_age_s": 259200}}
SECONDS_PER_DAY = 86_400


class ConfigError(Exception):
    """Invalid configuration; the message names the file, the field and the reason."""


class Section(BaseModel):
    # Strict: a number must be written as a number. YAML reads `yes`/`on` as true and
    # pydantic would otherwise take true as 1 and "130" as 130; 100.0 is no int. And
    # .nan/.inf are no limit.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Retention(Section):
    """Exactly one rule: approximate MAXLEN (entries) or MINID by age (seconds)."""

    maxlen: int | None = Field(default=None, gt=0)
    minid_age_s: int | None = Field(default=None, gt=0)
    # Producer-side dedupe: an XADD carrying an idempotency key already seen
    # within this many seconds is skipped (SET NX marker, atomic with the XADD).
    dedupe_ttl_s: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> "Retention":
        if (self.maxlen is None) == (self.minid_age_s is None):
            raise ValueError("set exactly one of maxlen or minid_age_s")
        return self


class ArchiveRules(Section):
    """The day as a record (SPEC 11, docs/archive.md): `qe archive DAY` writes every
    stream's entries of a New York day to Parquet under `directory` (relative to
    QE_HOME unless absolute). With `enabled`, producers' retention never trims an entry
    of a day not yet archived (the `archive:floor` guard in qe.streams)."""

    enabled: bool = False
    directory: str = Field(default="var/archive", min_length=1, max_length=1024)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    row_group_rows: int = Field(default=100_000, ge=1_000, le=10_000_000)


class Runtime(Section):
    batch_size: int = Field(default=100, ge=1, le=10_000)
    block_ms: int = Field(default=1000, ge=1)
    socket_timeout_s: float = Field(default=5.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
    claim_min_idle_s: float = Field(default=60.0, gt=0)
    claim_interval_s: float = Field(default=10.0, gt=0)
    housekeeping_interval_s: float = Field(default=5.0, gt=0)
    backoff_base_s: float = Field(default=0.2, gt=0)
    backoff_cap_s: float = Field(default=10.0, gt=0)
    handler_retry_cap_s: float = Field(default=5.0, gt=0)
    group_start_id: Literal["0", "$"] = "0"

    @model_validator(mode="after")
    def _block_below_socket_timeout(self) -> "Runtime":
        # A BLOCK at or above the socket timeout would look like a dead connection.
        if self.block_ms >= self.socket_timeout_s * 1000:
            raise ValueError(
                f"block_ms ({self.block_ms}) must be below socket_timeout_s*1000 ({self.socket_timeout_s * 1000:g})"
            )
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff_cap_s must be >= backoff_base_s")
        return self


# --- session (SPEC 6, Session) ------------------------------------------------------

REGIME_NAMES = ("OPEN", "EARLY", "MID", "LATE", "CLOSE")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


def _parse_hhmm(value: Any) -> time:
    if isinstance(value, time):
        return value
    # YAML 1.1 reads an unquoted 12:00 as the base-60 integer 720: insist on text.
    if not isinstance(value, str):
        raise ValueError(f"must be a quoted 'HH:MM' local time (an unquoted 12:00 reads as the number 720), got {value!r}")
    match = _HHMM.match(value.strip())
    if match is None:
        raise ValueError(f"must be 'HH:MM' (24 h), got {value!r}")
    return time(int(match.group(1)), int(match.group(2)))


class RegimeRules(Section):
    """What the Brain may do in one regime."""

    gross_tolerance_pct: float = Field(gt=0, le=1000)
    derisk_allowed: bool


DEFAULT_REGIMES: dict[str, RegimeRules] = {
    "OPEN": RegimeRules(gross_tolerance_pct=125, derisk_allowed=False),
    "EARLY": RegimeRules(gross_tolerance_pct=125, derisk_allowed=False),
    "MID": RegimeRules(gross_tolerance_pct=120, derisk_allowed=True),
    "LATE": RegimeRules(gross_tolerance_pct=115, derisk_allowed=True),
    "CLOSE": RegimeRules(gross_tolerance_pct=100, derisk_allowed=True),
}


class SessionRules(Section):
    """Trading session boundaries. Every boundary after the open is anchored to the
    day's actual close from the exchange calendar (13:00 on early-close days)."""

    calendar: str = Field(default="XNYS", min_length=1)
    timezone: str = "America/New_York"
    open_regime_minutes: int = Field(default=30, gt=0, le=390)
    early_regime_end: time = time(12, 0)
    mid_regime_end: time = time(15, 0)
    close_regime_minutes: int = Field(default=15, gt=0, le=390)
    soft_derisk_minutes_before_close: float = Field(default=15, gt=0, le=390)
    hard_derisk_minutes_before_close: float = Field(default=2, gt=0, le=390)
    publish_interval_s: float = Field(default=1.0, gt=0, le=60)
    regimes: dict[str, RegimeRules] = Field(default_factory=lambda: dict(DEFAULT_REGIMES))

    @field_validator("early_regime_end", "mid_regime_end", mode="before")
    @classmethod
    def _hhmm(cls, value: Any) -> time:
        return _parse_hhmm(value)

    @field_serializer("early_regime_end", "mid_regime_end")
    def _as_hhmm(self, value: time) -> str:
        # Dump as written, so a dumped config validates again (round trip).
        return value.strftime("%H:%M")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("regimes")
    @classmethod
    def _all_regimes(cls, value: dict[str, RegimeRules]) -> dict[str, RegimeRules]:
        unknown = sorted(set(value) - set(REGIME_NAMES))
        if unknown:
            raise ValueError(f"unknown regime(s) {unknown}; known: {list(REGIME_NAMES)}")
        missing = [name for name in REGIME_NAMES if name not in value]
        if missing:
            raise ValueError(f"missing regime(s) {missing}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> "SessionRules":
        if self.early_regime_end >= self.mid_regime_end:
            raise ValueError(
                f"early_regime_end ({self.early_regime_end:%H:%M}) must be before mid_regime_end ({self.mid_regime_end:%H:%M})"
            )
        if self.hard_derisk_minutes_before_close >= self.soft_derisk_minutes_before_close:
            raise ValueError(
                f"hard_derisk_minutes_before_close ({self.hard_derisk_minutes_before_close:g}) must be below "
                f"soft_derisk_minutes_before_close ({self.soft_derisk_minutes_before_close:g})"
            )
        return self


# --- exposure (SPEC 6, Marks / Exposure / HARD CAP) ------------------------------------


class BucketLimits(Section):
    target_pct: float = Field(ge=0, le=1000)
    max_pct: float = Field(gt=0, le=1000)

    @model_validator(mode="after")
    def _target_within_max(self) -> "BucketLimits":
        if self.target_pct > self.max_pct:
            raise ValueError(f"target_pct ({self.target_pct:g}) must not exceed max_pct ({self.max_pct:g})")
        return self


BUCKET_NAMES: tuple[str, ...] = ("LT", "MM_PURE")


class ExposureRules(Section):
    """Exposure limits and the exposure worker's marks and publication cadence.
    Safety-critical: no built-in defaults, every field must be in the file."""

    hard_cap_pct: float = Field(gt=0, le=1000)
    cap_recovery_target_pct: float = Field(gt=0, le=1000)
    buckets: dict[Bucket, BucketLimits]
    default_bucket: Bucket
    l1_max_age_s: float = Field(gt=0, le=86_400)
    truth_tick_max_age_s: float = Field(gt=0, le=86_400)
    publish_interval_s: float = Field(gt=0, le=3600)
    # A change of this many percentage points of gross or potential gross since the
    # last publication is material (position, order and equity changes always are).
    material_change_pct: float = Field(gt=0, le=100)
    min_publish_gap_s: float = Field(gt=0, le=60)
    mark_check_interval_s: float = Field(gt=0, le=3600)
    # How long a terminal order is remembered so a late update cannot reopen it;
    # no shorter than the retention of ev.orders.
    terminal_order_memory_s: int = Field(ge=3600, le=30 * SECONDS_PER_DAY)

    @field_validator("buckets")
    @classmethod
    def _all_buckets(cls, value: dict[str, BucketLimits]) -> dict[str, BucketLimits]:
        missing = [name for name in BUCKET_NAMES if name not in value]
        if missing:
            raise ValueError(f"missing bucket(s) {missing}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ExposureRules":
        if self.cap_recovery_target_pct >= self.hard_cap_pct:
            raise ValueError(
                f"cap_recovery_target_pct ({self.cap_recovery_target_pct:g}) must be below hard_cap_pct ({self.hard_cap_pct:g})"
            )
        if self.min_publish_gap_s > self.publish_interval_s:
            raise ValueError(f"min_publish_gap_s ({self.min_publish_gap_s:g}) must not exceed publish_interval_s ({self.publish_interval_s:g})")
        if self.mark_check_interval_s > self.publish_interval_s:
            raise ValueError(
                f"mark_check_interval_s ({self.mark_check_interval_s:g}) must not exceed publish_interval_s ({self.publish_interval_s:g})"
            )
        return self


class ExecutionRules(Section):
    """The execution service (SPEC 6, Execution). Safety-critical: no built-in
    defaults, every field must be in the file."""

    # TTL by category; an intent's own ttl_s applies when shorter. "default" is required.
    ttl_s_by_category: dict[str, float]
    modify_min_price_change: float = Field(gt=0, le=100)
    modify_min_interval_s: float = Field(ge=0, le=3600)
    max_order_notional: float = Field(gt=0, le=100_000_000)  # USD per order
    min_order_qty: int = Field(ge=1, le=1_000_000)
    liquidity_adv_divisor: int = Field(ge=1, le=1_000_000)
    liquidity_min_shares: int = Field(ge=1, le=10_000_000)
    max_messages_per_s: float = Field(gt=0, lt=50)  # IB allows 50 msg/s
    message_burst: int = Field(ge=1, le=50)
    hidden_buckets: list[Literal["LT", "MM_PURE"]]
    block_ms: int = Field(ge=1, le=200)  # short reads: broker callbacks wait at most this
    connect_timeout_s: float = Field(gt=0, le=600)
    reconnect_base_s: float = Field(gt=0, le=3600)
    reconnect_cap_s: float = Field(gt=0, le=3600)
    confirm_delay_s: float = Field(ge=0, le=600)
    mode_poll_interval_s: float = Field(gt=0, le=60)
    account_publish_interval_s: float = Field(gt=0, le=3600)

    @model_validator(mode="after")
    def _valid_ttls(self) -> "ExecutionRules":
        if "default" not in self.ttl_s_by_category:
            raise ValueError("ttl_s_by_category needs a 'default' entry")
        bad = {k: v for k, v in self.ttl_s_by_category.items() if not 0 < v <= SECONDS_PER_DAY}
        if bad:
            raise ValueError(f"ttl_s_by_category values must be > 0 and <= {SECONDS_PER_DAY}, got {bad}")
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must be >= reconnect_base_s")
        return self


LIT_VENUES = (
    "NYSE", "ARCA", "NSDQ", "NASDAQ", "ISLAND", "BATS", "BYX", "EDGX", "EDGA", "DRCTEDGE", "EDGEA",
    "IEX", "AMEX", "NYSEAMER", "NYSENAT", "PHLX", "PSX", "BEX", "CHX", "MEMX", "PEARL", "LTSE", "CBOE",
)
DARK_VENUES = ("FNRA", "ADFN", "FINRA", "TRF", "OTC", "DARK", "D")


def _hundredths(value: float) -> bool:
    return abs(value * 100 - round(value * 100)) < 1e-9


class PrintsRules(Section):
    """Truth ticks and GRPAN (SPEC 6) for the prints/features worker."""

    # Venue classes. A venue in neither list is treated as `unknown_venue_class`
    # (dark by default: a mislabelled dark print must not pass as a lit one).
    lit_venues: tuple[str, ...] = LIT_VENUES
    dark_venues: tuple[str, ...] = DARK_VENUES
    unknown_venue_class: Literal["dark", "lit"] = "dark"
    # Truth tick: size >= truth_min_size on a lit venue; exactly one of
    # dark_truth_sizes on a dark venue.
    truth_min_size: int = Field(default=15, ge=1)
    dark_truth_sizes: tuple[int, ...] = (100, 200)
    # GRPAN weights (multiples of 0.01). Prints under grpan_min_size weigh 0 and
    # are not part of any window.
    grpan_min_size: int = Field(default=20, ge=1)
    weight_lit: float = Field(default=1.0, gt=0)
    weight_dark_truth_size: float = Field(default=1.0, gt=0)
    weight_dark_round_lot: float = Field(default=0.4, gt=0)
    dark_round_lot_min: int = Field(default=300, ge=100)
    weight_dark_other: float = Field(default=0.2, gt=0)
    concentration_band: float = Field(default=0.04, ge=0)
    last_n: int = Field(default=15, ge=1, le=1000)
    windows_s: dict[str, int] = Field(
        default_factory=lambda: {"10m": 600, "30m": 1800, "1h": 3600, "3h": 10800, "1d": 86400}
    )
    @field_validator("lit_venues", "dark_venues", "dark_truth_sizes", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        # YAML has lists, not tuples; strict mode would refuse a list for a tuple.
        return tuple(value) if isinstance(value, list) else value

    # Prints kept per symbol (all sizes, in arrival order; the oldest arrival is
    # dropped first). Also the memory of idempotency keys for dedupe.
    buffer_cap: int = Field(default=5000, ge=20, le=1_000_000)
    stale_check_interval_s: float = Field(default=10.0, gt=0)
    # Entries read per batch (instead of runtime.batch_size): under a backlog a
    # bigger batch coalesces more prints into one feature per symbol.
    batch_size: int = Field(default=500, ge=1, le=10_000)

    @model_validator(mode="after")
    def _consistent(self) -> "PrintsRules":
        both = sorted(set(self.lit_venues) & set(self.dark_venues))
        if both:
            raise ValueError(f"venues listed as both lit and dark: {both}")
        for name in ("weight_lit", "weight_dark_truth_size", "weight_dark_round_lot", "weight_dark_other"):
            if not _hundredths(getattr(self, name)):
                raise ValueError(f"{name} must be a multiple of 0.01")
        if not _hundredths(self.concentration_band):
            raise ValueError("concentration_band must be a multiple of 0.01")
        if not self.windows_s:
            raise ValueError("windows_s: at least one time window")
        for name, seconds in self.windows_s.items():
            if seconds <= 0:
                raise ValueError(f"windows_s.{name} must be > 0")
            if name == f"last{self.last_n}":
                raise ValueError(f"windows_s: {name!r} is the name of the last-{self.last_n} window")
        return self


class IbkrFeed(Section):
    """IB (ib_async) as the market data source."""

    market_data_type: Literal[1, 2, 3, 4] = 1  # 1 live, 2 frozen, 3 delayed, 4 delayed-frozen
    # IB allows only a few simultaneous tick-by-tick subscriptions per client.
    max_tick_by_tick: int = Field(default=3, ge=0, le=10_000)
    # Symbols beyond the cap take turns: every rotation_s the non-priority slots
    # move on to the next symbols of the universe.
    tick_by_tick_rotation_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)


class HammerFeed(Section):
    """Hammer Pro WebSocket as the market data source."""

    streamer_id: str | None = None  # None: the first streamer enumDataStreamers lists
    l1_batch_size: int = Field(default=50, ge=1, le=50)
    ticks_last_few: int = Field(default=20, ge=1, le=1000)
    # getTicks is polled for a symbol when its L1 shows new volume, and every
    # symbol is swept at least every ticks_sweep_interval_s; at most
    # ticks_max_requests_per_s requests in all.
    ticks_sweep_interval_s: float = Field(default=30.0, gt=0)
    ticks_max_requests_per_s: float = Field(default=50.0, gt=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    # Hammer times without a UTC offset are read in this zone.
    naive_time_zone: str = "America/New_York"


class MarketDataRules(Section):
    source: Literal["ibkr", "hammer"] = "ibkr"
    # Events wait in memory at most flush_interval_ms (or until flush_max_events)
    # and are then appended in one atomic Redis call.
    flush_interval_ms: int = Field(default=50, ge=1, le=5000)
    flush_max_events: int = Field(default=2000, ge=1)
    # Backlog bounds while Redis is unreachable: L1 collapses to the latest quote
    # per symbol beyond max_pending_l1; prints beyond max_pending_prints are
    # dropped oldest first (counted and logged).
    max_pending_l1: int = Field(default=20_000, ge=100)
    max_pending_prints: int = Field(default=500_000, ge=100)
    # Print idempotency keys remembered to drop re-sent prints before publishing.
    seen_prints_memory: int = Field(default=200_000, ge=1000)
    # No update for this long while the market is open: the feed is stale.
    stale_after_s: float = Field(default=90.0, gt=0)
    # Reconnect: capped exponential backoff with full jitter (SPEC: 3 s doubling to 60 s).
    reconnect_base_s: float = Field(default=3.0, gt=0)
    reconnect_cap_s: float = Field(default=60.0, gt=0)
    # Unchanged quotes are re-published ("confirmed") at least this often while the feed
    # is healthy (SPEC 6 Marks); at most a third of exposure.l1_max_age_s (checked below).
    confirm_interval_s: float = Field(default=10.0, gt=0, le=300)
    ibkr: IbkrFeed = IbkrFeed()
    hammer: HammerFeed = HammerFeed()

    @model_validator(mode="after")
    def _backoff(self) -> "MarketDataRules":
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must be >= reconnect_base_s")
        return self
# --- alerts (SPEC 6, Alerts) -----------------------------------------------------------


class RateLimit(Section):
    """At most `max_alerts` alerts of one alert type for one subject per `window_s`."""

    max_alerts: int = Field(ge=1, le=10_000)
    window_s: float = Field(gt=0, le=86_400)


class EtfGuardRules(Section):
    """ETF guard: alert when an ETF (PFF) moves `move_vs_close_cents` from the previous
    close, or `move_window_cents` within `move_window_s`. A condition clears only once
    the move is `hysteresis_cents` back inside its threshold."""

    symbols: list[str] = Field(default_factory=lambda: ["PFF"])
    move_vs_close_cents: float = Field(default=20, gt=0)
    move_window_cents: float = Field(default=10, gt=0)
    move_window_s: float = Field(default=300, gt=0, le=86_400)
    hysteresis_cents: float = Field(default=3, ge=0)
    max_window_prints: int = Field(default=2000, ge=10, le=100_000)

    @model_validator(mode="after")
    def _hysteresis_below_thresholds(self) -> "EtfGuardRules":
        smallest = min(self.move_vs_close_cents, self.move_window_cents)
        if self.hysteresis_cents >= smallest:
            raise ValueError(f"hysteresis_cents ({self.hysteresis_cents:g}) must be below both move thresholds ({smallest:g})")
        return self


DEFAULT_RATE_LIMITS: dict[str, RateLimit] = {
    "default": RateLimit(max_alerts=3, window_s=300),
    "new_daily_high": RateLimit(max_alerts=2, window_s=900),
    "new_daily_low": RateLimit(max_alerts=2, window_s=900),
}


class AlertsRules(Section):
    """The alerts worker (qe-alerts): thresholds, hysteresis and rate limits."""

    check_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Per alert type (and one subject: a symbol, a bucket, a stream/group); "default"
    # applies to every type not listed. Resolved alerts are not limited: they pair
    # one-to-one with firing alerts that were let through.
    rate_limits: dict[str, RateLimit] = Field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    # Hard cap and bucket max: a breach clears only this many points below the limit.
    cap_hysteresis_pct: float = Field(default=1.0, ge=0, le=50)
    bucket_hysteresis_pct: float = Field(default=1.0, ge=0, le=50)
    # Broker disconnected for this long (clock seconds) before it is alerted.
    broker_down_for_s: float = Field(default=5, ge=0)
    # Stale market data while the market is open (from ev.session): no L1 / print for a
    # symbol, or on the whole stream, for this long. Silence counts from the open at the
    # earliest. Per-symbol checks cover the symbols held or with open orders (from
    # ev.exposure) or the whole universe.
    l1_stale_after_s: float = Field(default=120, gt=0)
    prints_stale_after_s: float = Field(default=1800, gt=0)
    l1_feed_stale_after_s: float = Field(default=30, gt=0)
    prints_feed_stale_after_s: float = Field(default=300, gt=0)
    stale_symbols: Literal["held", "universe"] = "held"
    # Staleness is not judged while this worker itself is further behind on ev.l1 /
    # ev.prints than this (it would be measuring its own lag).
    self_lag_tolerance_entries: int = Field(default=1000, ge=0)
    # New daily high/low: prints of at least this size (odd lots do not set the
    # consolidated high/low), alerts only once the symbol has this many such prints today.
    daily_range_min_size: int = Field(default=100, ge=1)
    daily_range_min_prints: int = Field(default=3, ge=1)
    etf_guard: EtfGuardRules = EtfGuardRules()
    # ev.dlq growth: fires when entries were added since the previous check, clears after
    # dlq_quiet_s without growth; error once this many arrived in one episode.
    dlq_quiet_s: float = Field(default=60, gt=0)
    dlq_error_entries: int = Field(default=50, ge=1)
    # Consumer lag (XINFO GROUPS `lag`) per stream (or "default"), held for lag_for_s;
    # clears at or below limit * clear_ratio; error at limit * error_factor.
    consumer_lag_limits: dict[str, int] = Field(
        default_factory=lambda: {"default": 1000, "ev.l1": 20_000, "ev.prints": 20_000}
    )
    consumer_lag_for_s: float = Field(default=10, ge=0)
    consumer_lag_clear_ratio: float = Field(default=0.5, ge=0, lt=1)
    consumer_lag_error_factor: float = Field(default=10, gt=1)
    # Groups that only read for monitoring/debugging (SPEC 3): never alerted on.
    consumer_lag_ignore_groups: list[str] = Field(default_factory=lambda: ["workers"])

    @field_validator("rate_limits")
    @classmethod
    def _default_rate_limit(cls, value: dict[str, RateLimit]) -> dict[str, RateLimit]:
        if "default" not in value:
            raise ValueError("rate_limits needs a 'default' entry")
        return value

    @field_validator("consumer_lag_limits")
    @classmethod
    def _known_lag_streams(cls, value: dict[str, int]) -> dict[str, int]:
        if "default" not in value:
            raise ValueError("consumer_lag_limits needs a 'default' entry")
        known = set(STREAM_TYPES) | {DLQ_STREAM, "default"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown stream(s) {unknown}")
        bad = {k: v for k, v in value.items() if v < 1}
        if bad:
            raise ValueError(f"limits must be >= 1, got {bad}")
        return value

    def rate_limit(self, alert_type: str) -> RateLimit:
        return self.rate_limits.get(alert_type, self.rate_limits["default"])

    def lag_limit(self, stream: str) -> int:
        return self.consumer_lag_limits.get(stream, self.consumer_lag_limits["default"])
IntentPurpose = Literal["CAP_RECOVERY", "HARD_DERISK", "SOFT_DERISK", "MM_OVERNIGHT", "LT_BAND", "MM_QUOTE"]
_V = TypeVar("_V")


def _purposes(values: dict[IntentPurpose, _V]) -> dict[IntentPurpose, _V]:
    """Identity: types a default factory's dict literal by purpose (a bare lambda's infers str keys)."""
    return values


class DecisionRules(Section):
    """The Brain's cadence, data-freshness gates, hysteresis bands and order hygiene."""

    evaluate_interval_s: float = Field(default=1.0, gt=0)  # full evaluation at least this often (clock s)
    evaluate_min_gap_s: float = Field(default=0.2, ge=0)  # relevant events closer than this are coalesced
    tick_interval_s: float = Field(default=0.25, gt=0)
    strategy_refresh_interval_s: float = Field(default=15.0, gt=0)  # re-run market making for every symbol
    market_flush_interval_s: float = Field(default=5.0, ge=0)  # persist the market cache this often
    max_exposure_age_s: float = Field(default=45.0, gt=0)  # older snapshot: no risk-increasing intent
    max_session_age_s: float = Field(default=5.0, gt=0)  # older session state: no risk-increasing intent
    derisk_max_exposure_age_s: float = Field(default=300.0, gt=0)  # older snapshot: no de-risk sizing either
    window_exit_band_pct: float = Field(default=1.0, ge=0)  # leave SOFT/HARD_DERISK only at gross <= target - band
    tolerance_exit_band_pct: float = Field(default=2.0, ge=0)  # leave tolerance THROTTLE/SOFT at potential <= tol - band
    min_order_qty: int = Field(default=100, ge=1)
    reprice_min_change: float = Field(default=0.01, ge=0.01)  # MODIFY only for a move of at least this
    reprice_min_interval_s: float = Field(default=2.5, ge=0)  # ... and at least this long after the last change
    unacked_grace_s: float = Field(default=30.0, ge=0)  # an intent never acknowledged is dead after ttl + grace
    fill_settle_timeout_s: float = Field(default=10.0, ge=0)  # wait for a position update after a fill
    # After execution rejects an order, no new order on that symbol for this long:
    # a rule that refused it will refuse a retry too (no reject storms).
    reject_cooldown_s: float = Field(default=30.0, ge=0)
    ttl_s: dict[IntentPurpose, float] = Field(
        default_factory=lambda: _purposes({
            "CAP_RECOVERY": 30.0,
            "HARD_DERISK": 30.0,
            "SOFT_DERISK": 90.0,
            "MM_OVERNIGHT": 90.0,
            "LT_BAND": 120.0,
            "MM_QUOTE": 60.0,
        })
    )

    @model_validator(mode="after")
    def _every_purpose_has_a_ttl(self) -> "DecisionRules":
        missing = sorted(set(IntentPurpose.__args__) - set(self.ttl_s))  # type: ignore[attr-defined]
        if missing:
            raise ValueError(f"ttl_s: missing {missing}")
        if any(value <= 0 for value in self.ttl_s.values()):
            raise ValueError("ttl_s: every ttl must be > 0")
        return self


class DeriskRules(Section):
    """De-risk playbook sizes and prices (the windows themselves come from the session
    worker). Safety-critical: no built-in defaults, every field must be in the file."""

    target_gross_pct: float = Field(gt=0, le=1000)
    soft_price_offset: float = Field(ge=0, le=100)  # sell at truth tick - offset, cover at + offset
    hard_chunk_fraction: float = Field(gt=0, le=1)
    hard_max_steps: int = Field(ge=1, le=1000)
    hard_step_interval_s: float = Field(ge=0, le=3600)
    cap_recovery_pricing: Literal["aggressive", "passive"]
    mm_overnight_max_pct: float = Field(ge=0, le=1000)
    l1_max_age_s: float = Field(gt=0, le=86_400)
    truth_tick_max_age_s: float = Field(gt=0, le=86_400)


class MarketMakingStrategy(Section):
    """Reference MM_PURE strategy: quote both sides around the GRPAN price."""

    enabled: bool = True
    symbols: list[str] = Field(default_factory=list)  # empty: every MM_PURE symbol of the universe
    edge: float = Field(default=0.05, ge=0.01)  # bid = GRPAN - edge, offer = GRPAN + edge
    quote_size: int = Field(default=200, ge=1)
    max_position_shares: int = Field(default=1000, ge=0)
    min_concentration_pct: float = Field(default=0.0, ge=0, le=100)
    min_print_count: int = Field(default=1, ge=0)
    max_feature_age_s: float = Field(default=300.0, gt=0)
    requote_threshold: float = Field(default=0.01, ge=0.01)


class LtBandStrategy(Section):
    """LT band keeping: LT long share of the LT bucket within [long_min_pct, long_max_pct]."""

    enabled: bool = True
    long_min_pct: float = Field(default=60.0, ge=0, le=100)
    long_max_pct: float = Field(default=70.0, ge=0, le=100)
    order_notional_pct: float = Field(default=0.5, gt=0)  # one corrective order: this % of equity
    price_offset: float = Field(default=0.01, ge=0)
    max_live_orders: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _band_ordered(self) -> "LtBandStrategy":
        if self.long_min_pct > self.long_max_pct:
            raise ValueError("long_min_pct must be <= long_max_pct")
        return self


class StrategyRules(Section):
    mm: MarketMakingStrategy = MarketMakingStrategy()
    lt_band: LtBandStrategy = LtBandStrategy()
    # No strategy increase may take potential gross above the regime's tolerance less
    # this margin (so quoting never re-triggers the tolerance de-risk). Must exceed
    # decision.tolerance_exit_band_pct (checked in RiskRules).
    tolerance_margin_pct: float = Field(default=3.0, ge=0, le=100)


class ArbitrationRules(Section):
    """Intent priorities and suppression thresholds (SPEC 6, Intent arbitration)."""

    priorities: dict[IntentPurpose, int] = Field(
        default_factory=lambda: _purposes({
            "CAP_RECOVERY": 100,
            "HARD_DERISK": 80,
            "SOFT_DERISK": 60,
            "MM_OVERNIGHT": 40,
            "LT_BAND": 20,
            "MM_QUOTE": 10,
        })
    )
    drop_mm_increases_above_gross_pct: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _every_purpose_has_a_priority(self) -> "ArbitrationRules":
        missing = sorted(set(IntentPurpose.__args__) - set(self.priorities))  # type: ignore[attr-defined]
        if missing:
            raise ValueError(f"priorities: missing {missing}")
        return self


class QuoteGateRules(Section):
    """The quote gate (SPEC 9): when an L1 quote may become a mark or a price anchor."""

    # Wide: the spread is above BOTH limits (a few cents on a $5 issue is many percent).
    max_spread_cents: float = Field(gt=0, le=100_000)
    max_spread_pct: float = Field(gt=0, le=100)
    # Jump: the mid this far from the trusted reference (truth tick / GRPAN / last
    # trusted mark) with no print near the new mid confirming it.
    max_jump_pct: float = Field(gt=0, le=100)
    max_size: int = Field(gt=0, le=10**12)  # bid/ask size above this: absurd


class PrintGateRules(Section):
    """Prints excluded from truth ticks and GRPAN (SPEC 9), counted."""

    max_deviation_pct: float = Field(gt=0, le=100)  # from the trusted reference
    max_size: int = Field(gt=0, le=10**12)
    max_age_s: float = Field(gt=0)  # trade time this far behind the reader's clock: absurd
    # A far print counts once this many excluded prints just before it agree with it.
    confirm_prints: int = Field(ge=1, le=100)


class PlausibilityRules(Section):
    """Every number from outside is hostile until checked (SPEC 9). No defaults: the
    section and every field must be present in the file."""

    max_price: float = Field(gt=0, le=1_000_000)  # any price above this is rejected by the contracts
    max_quantity: int = Field(gt=0, le=10**12)  # shares: positions, orders, prints, sizes
    max_future_skew_s: float = Field(gt=0, le=86_400)  # timestamps ahead of the reader's clock
    quote: QuoteGateRules
    prints: PrintGateRules
    # Every order price (new or modified) lies within collar_pct of the trusted reference.
    collar_pct: float = Field(gt=0, le=50)


class PnlRules(Section):
    """The P&L worker (qe-pnl, SPEC 10)."""

    # ev.pnl and state:pnl every this many clock seconds (and after each fill, rate-limited to it).
    publish_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # A symbol's difference with the broker's P&L (reqPnLSingle) raises pnl_mismatch once it
    # has lasted this long (the broker's figures and ours arrive a second or two apart).
    reconcile_grace_s: float = Field(default=15.0, ge=0, le=3600)


class ReportRules(Section):
    """The end-of-day report (`qe report DAY`; written by qe-pnl after each close)."""

    # Relative paths are taken from QE_HOME. One folder per trading day inside.
    directory: str = Field(default="run/reports", min_length=1, max_length=1024)
    keep_days: int = Field(default=90, ge=1, le=3650)  # older report folders are deleted
    after_close: bool = True  # qe-pnl writes the day's report once the market has closed


class RiskRules(Section):
    """The whole of etc/risk_rules.yaml."""

    schema_version: Literal[1] = 1
    streams: dict[str, Retention]
    runtime: Runtime = Runtime()
    session: SessionRules = SessionRules()
    # Safety-critical sections (exposure caps, execution limits, de-risk, collars):
    # required, with every field written out. A missing one is an error, never a default.
    exposure: ExposureRules
    execution: ExecutionRules
    prints: PrintsRules = PrintsRules()
    market_data: MarketDataRules = MarketDataRules()
    alerts: AlertsRules = AlertsRules()
    decision: DecisionRules = DecisionRules()
    derisk: DeriskRules
    strategies: StrategyRules = StrategyRules()
    arbitration: ArbitrationRules = ArbitrationRules()
    plausibility: PlausibilityRules
    archive: ArchiveRules = ArchiveRules()
    pnl: PnlRules = PnlRules()
    report: ReportRules = ReportRules()

    @field_validator("streams", mode="before")
    @classmethod
    def _later_streams_default(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {**LATER_STREAM_DEFAULTS, **value}
        return value

    @model_validator(mode="after")
    def _regime_tolerances_within_hard_cap(self) -> "RiskRules":
        for name in REGIME_NAMES:
            regime = self.session.regimes[name]
            if regime.gross_tolerance_pct > self.exposure.hard_cap_pct:
                raise ValueError(
                    f"session.regimes.{name}.gross_tolerance_pct ({regime.gross_tolerance_pct:g}) is above "
                    f"exposure.hard_cap_pct ({self.exposure.hard_cap_pct:g})"
                )
        return self

    @model_validator(mode="after")
    def _strategy_margin_beyond_the_tolerance_band(self) -> "RiskRules":
        # Strategies stop adding at tolerance - margin; the tolerance rule releases at
        # tolerance - band. With margin <= band, quotes placed right after the release
        # would sit inside the band the mode machine just left: the two would fight.
        margin, band = self.strategies.tolerance_margin_pct, self.decision.tolerance_exit_band_pct
        if margin <= band:
            raise ValueError(
                f"strategies.tolerance_margin_pct ({margin:g}) must be greater than "
                f"decision.tolerance_exit_band_pct ({band:g})"
            )
        return self

    @model_validator(mode="after")
    def _quotes_confirmed_well_within_their_max_age(self) -> "RiskRules":
        # A quote is current while now - its last confirmation <= l1_max_age_s: two lost
        # or late confirmations must not make a healthy quote stale.
        if self.market_data.confirm_interval_s * 3 > self.exposure.l1_max_age_s:
            raise ValueError(
                f"market_data.confirm_interval_s ({self.market_data.confirm_interval_s:g}) must be at most a third of "
                f"exposure.l1_max_age_s ({self.exposure.l1_max_age_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _every_stream_has_retention(self) -> "RiskRules":
        known = set(STREAM_TYPES) | {DLQ_STREAM}
        unknown = sorted(set(self.streams) - known)
        if unknown:
            raise ValueError(f"streams: unknown stream(s) {unknown}; known: {sorted(known)}")
        missing = sorted(known - set(self.streams))
        if missing:
            raise ValueError(f"streams: no retention rule for {missing}")
        for stream in FULL_DAY_STREAMS:
            rule = self.streams[stream]
            if rule.minid_age_s is None or rule.minid_age_s < SECONDS_PER_DAY:
                raise ValueError(f"streams.{stream}: must keep a whole trading day: minid_age_s >= {SECONDS_PER_DAY}")
        return self


class Settings(BaseModel):
    """Connection settings from the environment (documented in etc/qe.env.example)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(default=Path("."), description="QE_HOME: where etc/ lives")
    config_path: Path | None = Field(default=None, description="QE_CONFIG")
    universe_path: Path | None = Field(default=None, description="QE_UNIVERSE")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", max_length=2048)
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    # One Redis ACL user per daemon: user qe-<daemon>, password in <dir>/qe-<daemon>.pass.
    redis_secrets_dir: Path | None = None
    consumer_name: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ib_host: str = "127.0.0.1"
    ib_port: int = Field(default=4002, ge=1, le=65535)
    ib_client_id_execution: int = Field(default=7, ge=0)
    ib_account: str | None = None  # which managed account to trade; default: the first
    ib_mode: Literal["paper", "live"] = "paper"
    ib_live_accounts: list[str] = Field(default_factory=list)
    ib_client_id_market_data: int = Field(default=12, ge=0)
    hammer_url: str = Field(default="ws://127.0.0.1:16400", max_length=2048)
    hammer_password: SecretStr | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("hammer_url")
    @classmethod
    def _hammer_url(cls, value: str) -> str:
        _check_network_url(value, ("ws", "wss"))
        return value

    @field_validator("metrics_host", "ib_host")
    @classmethod
    def _host_name(cls, value: str) -> str:
        if not value or len(value) > 253 or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError("must be a host name or address (no spaces, at most 253 characters)")
        return value

    def __repr_args__(self) -> Any:
        # repr/str of the settings never show a password written into a URL.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in ("redis_url", "hammer_url") else value

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL as it may be printed or logged: any password replaced."""
        return redact_url(self.redis_url)

    @field_validator("ib_live_accounts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

    def redis_credentials(self, user: str) -> tuple[str | None, str | None]:
        """(username, password) for this process: explicit QE_REDIS_USERNAME /
        QE_REDIS_PASSWORD_FILE win; else the per-daemon user from QE_REDIS_SECRETS_DIR;
        else none (Redis's default user)."""
        if self.redis_username or self.redis_password:
            return self.redis_username, self.redis_password.get_secret_value() if self.redis_password else None
        if self.redis_secrets_dir is not None:
            name = f"qe-{user}"
            return name, _read_secret(str(self.redis_secrets_dir / f"{name}.pass"), "QE_REDIS_SECRETS_DIR")
        return None, None

    @property
    def rules_file(self) -> Path:
        return self.config_path or self.home / "etc" / "risk_rules.yaml"

    @property
    def universe_file(self) -> Path:
        return self.universe_path or self.home / "etc" / "universe.csv"


# Environment variable -> Settings field.
ENV_FIELDS = {
    "QE_HOME": "home",
    "QE_CONFIG": "config_path",
    "QE_UNIVERSE": "universe_path",
    "QE_REDIS_URL": "redis_url",
    "QE_REDIS_USERNAME": "redis_username",
    "QE_REDIS_SECRETS_DIR": "redis_secrets_dir",
    "QE_CONSUMER_NAME": "consumer_name",
    "QE_METRICS_HOST": "metrics_host",
    "QE_METRICS_PORT": "metrics_port",
    "QE_LOG_LEVEL": "log_level",
    "QE_IB_HOST": "ib_host",
    "QE_IB_PORT": "ib_port",
    "QE_IB_CLIENT_ID_EXECUTION": "ib_client_id_execution",
    "QE_IB_ACCOUNT": "ib_account",
    "QE_IB_MODE": "ib_mode",
    "QE_IB_LIVE_ACCOUNTS": "ib_live_accounts",
    "QE_IB_CLIENT_ID_MARKET_DATA": "ib_client_id_market_data",
    "QE_HAMMER_URL": "hammer_url",
}
# Secrets come from files (mode 0600), never from the environment itself.
SECRET_FILES = {"QE_REDIS_PASSWORD_FILE": "redis_password", "QE_HAMMER_PASSWORD_FILE": "hammer_password"}


# --- URLs and secrets ----------------------------------------------------------------------

REDIS_SCHEMES = ("redis", "rediss", "unix")
# user:password@ after a scheme (the password greedy to the token's last '@': it may
# hold one), and password= in a query string.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s:/@]*):[^\s]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&;]password=)[^&#\s'\"]*")


def redact(text: str) -> str:
    """Text with every URL password replaced by *** (user names kept); idempotent."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1\2:***@", text))


def redact_url(url: str) -> str:
    """A URL for display: user kept, password replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return redact(url)
        netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
        return _QUERY_PASSWORD.sub(r"\1***", urlunsplit(parts._replace(netloc=netloc)))
    except ValueError:
        return redact(url)


def _check_network_url(url: str, schemes: tuple[str, ...]) -> SplitResult:
    """Scheme, host and port of a URL; ValueError naming what is wrong (never the URL)."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"cannot be parsed ({exc})") from None
    if parts.scheme not in schemes:
        raise ValueError(f"unknown scheme {parts.scheme!r}; use {' or '.join(s + '://' for s in schemes)}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("no host")
        if port == 0:
            raise ValueError("the port must be a number from 1 to 65535")
    return parts


def check_redis_url(url: str) -> str:
    """The URL if redis-py will accept it as given; ValueError saying why not."""
    parts = _check_network_url(url, REDIS_SCHEMES)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket path (unix:///path/to/redis.sock)")
    else:
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"the database (path) must be a number, got {database!r}")
    try:
        # What the client itself will do with it, short of connecting: query options
        # it cannot parse, or does not know, fail here instead of at the first command.
        pool = redis.ConnectionPool.from_url(url)
        pool.make_connection()
        pool.disconnect()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not usable by the Redis client: {redact(str(exc))}") from None
    return url


def _shown(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(exc: ValidationError, names: dict[str, str] | None = None) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        if names:
            location = names.get(location, location)
        value = error.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {_shown(value)})"
        message = redact(error["msg"].removeprefix("Value error, "))
        lines.append(f"{location or '<root>'}: {message}{shown}")
    return "\n  ".join(lines)


MAX_SECRET_BYTES = 4096


def _read_secret(path: str, variable: str) -> str:
    """A password from its file: a regular file, mode 0600 (or stricter), one line."""
    secret_path = Path(path)
    try:
        info = secret_path.stat()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{variable}: {path} is not a regular file")
    mode = info.st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{variable}: {path} must not be readable by group/others (mode {mode:04o}; want 0600)")
    try:
        secret = read_text_file(secret_path, MAX_SECRET_BYTES).strip()
    except ValueError as exc:
        raise ConfigError(f"{variable}: {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{variable}: {path} is empty")
    if "\n" in secret:
        raise ConfigError(f"{variable}: {path} must hold the password on one line")
    return secret


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {field: env[var] for var, field in ENV_FIELDS.items() if env.get(var, "") != ""}
    for var, field in SECRET_FILES.items():
        if env.get(var):
            values[field] = _read_secret(env[var], var)
    try:
        return Settings(**values)
    except ValidationError as exc:
        names = {field: var for var, field in {**ENV_FIELDS, **SECRET_FILES}.items()}
        raise ConfigError("environment:\n  " + _describe(exc, names)) from None


# --- reading the rules file --------------------------------------------------------------
# The rules file is a few KiB; anything near this is not a rules file (or is an attack).
MAX_CONFIG_BYTES = 1 << 20
# Deeper nesting than any rules need; also keeps PyYAML's recursive composer far from
# Python's recursion limit (100k nested `[` would raise RecursionError).
MAX_YAML_DEPTH = 32


def read_text_file(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The text of a configuration file, or ValueError saying why it is not one:
    not a regular file, unreadable, larger than max_bytes, binary (NUL), not UTF-8."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ValueError("not a regular file")
            data = handle.read(max_bytes + 1)  # never more: a huge file is refused, not read
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes (the limit for a configuration file)")
    if b"\0" in data:
        raise ValueError(f"binary, not text (NUL byte at offset {data.index(bytes(1))})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (invalid byte at offset {exc.start})") from None


class _YamlRefused(Exception):
    """A YAML construct the rules file may not use; the message names the line."""


class _RulesLoader(yaml.SafeLoader):
    """SafeLoader without the constructs that make a rules file ambiguous or explosive:
    anchors and aliases ("billion laughs"), merge keys, nesting beyond MAX_YAML_DEPTH.
    Duplicate keys are found by `_check_keys` on the composed tree."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # types-PyYAML leaves Parser.peek_event unannotated
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _YamlRefused(f"line {line}: YAML anchors and aliases (&name, *name) are not allowed; write the values out")
        if self.depth >= MAX_YAML_DEPTH:
            raise _YamlRefused(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_keys(loader: _RulesLoader, node: yaml.Node, path: tuple[str, ...]) -> None:
    """Refuse duplicate keys (the last one would silently win: a second `exposure:`
    replaces the whole section), merge keys and non-scalar keys, at every level."""
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_keys(loader, item, (*path, str(index)))
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[Any, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise _YamlRefused(f"line {line}: merge keys (<<) are not allowed; write the keys out")
        if not isinstance(key_node, yaml.ScalarNode):
            raise _YamlRefused(f"line {line}: a key must be a plain value, not a list or mapping")
        key = loader.construct_object(key_node)
        dotted = ".".join((*path, str(key)))
        if key in first_line:
            raise _YamlRefused(f"duplicate key {dotted!r} at line {line} (first at line {first_line[key]})")
        first_line[key] = line
        _check_keys(loader, value_node, (*path, str(key)))


def parse_yaml(text: str) -> Any:
    """One YAML document, strictly (see _RulesLoader); ValueError with a one-line reason."""
    loader = _RulesLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(loader, node, ())
        return loader.construct_document(node)
    except _YamlRefused as exc:
        raise ValueError(str(exc)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"not valid YAML: {' '.join(filter(None, (exc.context, exc.problem)))}{where}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_rules(path: str | Path) -> RiskRules:
    path = Path(path)
    try:
        document = parse_yaml(read_text_file(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return RiskRules.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{path}:\n  " + _describe(exc)) from None


def load_or_exit(program: str, environ: dict[str, str] | None = None) -> tuple[Settings, RiskRules]:
    """Settings + rules, or print the exact problem and exit 78 (EX_CONFIG)."""
    try:
        settings = load_settings(environ)
        return settings, load_rules(settings.rules_file)
    except ConfigError as exc:
        exit_config_error(program, str(exc))


# Error output stays readable (and a hostile file cannot flood the logs).
MAX_ERROR_LINES = 50
MAX_ERROR_BYTES = 8192
MAX_LINE_CHARS = 400


def bounded(text: str, max_lines: int = MAX_ERROR_LINES, max_bytes: int = MAX_ERROR_BYTES) -> str:
    """At most max_lines lines and about max_bytes bytes, then '... N more lines'."""
    lines = text.splitlines() or [""]
    kept: list[str] = []
    size = 0
    for line in lines:
        if len(line) > MAX_LINE_CHARS:
            line = line[: MAX_LINE_CHARS - 3] + "..."
        cost = len(line.encode()) + 1
        if len(kept) == max_lines or size + cost > max_bytes:
            break
        kept.append(line)
        size += cost
    if len(kept) < len(lines):
        kept.append(f"... {len(lines) - len(kept)} more lines")
    return "\n".join(kept)


def error_text(program: str, message: str) -> str:
    """The one way a configuration error is shown: redacted and bounded."""
    return bounded(redact(f"{program}: invalid configuration: {message}"))


def exit_config_error(program: str, message: str) -> NoReturn:
    """Every start-up failure ends here: the exact field and reason, exit 78 (EX_CONFIG)."""
    print(error_text(program, message), file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)
