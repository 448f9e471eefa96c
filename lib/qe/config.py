"""Configuration: `etc/risk_rules.yaml` (every rule and number) and the
environment (connections), both validated by pydantic.

An invalid configuration stops a daemon before it does anything: it prints the
exact field and reason and exits with 78 (EX_CONFIG), which supervisord and
systemd are configured to treat as fatal (no restart loop).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .contracts import DLQ_STREAM, STREAM_TYPES

EX_CONFIG = 78
# Streams that must keep at least a whole trading day (SPEC 3): by age, not by count.
FULL_DAY_STREAMS = ("ev.intents", "ev.orders", "ev.positions")
SECONDS_PER_DAY = 86_400


class ConfigError(Exception):
    """Invalid configuration; the message names the file, the field and the reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


IntentPurpose = Literal["CAP_RECOVERY", "HARD_DERISK", "SOFT_DERISK", "MM_OVERNIGHT", "LT_BAND", "MM_QUOTE"]


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
    ttl_s: dict[IntentPurpose, float] = Field(
        default_factory=lambda: {
            "CAP_RECOVERY": 30.0,
            "HARD_DERISK": 30.0,
            "SOFT_DERISK": 90.0,
            "MM_OVERNIGHT": 90.0,
            "LT_BAND": 120.0,
            "MM_QUOTE": 60.0,
        }
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
    """De-risk playbook sizes and prices (the windows themselves come from the session worker)."""

    target_gross_pct: float = Field(default=100.0, gt=0)
    soft_price_offset: float = Field(default=0.01, ge=0)  # sell at truth tick - offset, cover at + offset
    hard_chunk_fraction: float = Field(default=0.10, gt=0, le=1)
    hard_max_steps: int = Field(default=10, ge=1)
    hard_step_interval_s: float = Field(default=10.0, ge=0)
    cap_recovery_pricing: Literal["aggressive", "passive"] = "aggressive"
    mm_overnight_max_pct: float = Field(default=15.0, ge=0)
    l1_max_age_s: float = Field(default=60.0, gt=0)
    truth_tick_max_age_s: float = Field(default=300.0, gt=0)


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


class ArbitrationRules(Section):
    """Intent priorities and suppression thresholds (SPEC 6, Intent arbitration)."""

    priorities: dict[IntentPurpose, int] = Field(
        default_factory=lambda: {
            "CAP_RECOVERY": 100,
            "HARD_DERISK": 80,
            "SOFT_DERISK": 60,
            "MM_OVERNIGHT": 40,
            "LT_BAND": 20,
            "MM_QUOTE": 10,
        }
    )
    drop_mm_increases_above_gross_pct: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _every_purpose_has_a_priority(self) -> "ArbitrationRules":
        missing = sorted(set(IntentPurpose.__args__) - set(self.priorities))  # type: ignore[attr-defined]
        if missing:
            raise ValueError(f"priorities: missing {missing}")
        return self


class RiskRules(Section):
    """The whole of etc/risk_rules.yaml."""

    schema_version: Literal[1] = 1
    streams: dict[str, Retention]
    runtime: Runtime = Runtime()
    decision: DecisionRules = DecisionRules()
    derisk: DeriskRules = DeriskRules()
    strategies: StrategyRules = StrategyRules()
    arbitration: ArbitrationRules = ArbitrationRules()

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
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss|unix)://")
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    consumer_name: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

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
    "QE_CONSUMER_NAME": "consumer_name",
    "QE_METRICS_HOST": "metrics_host",
    "QE_METRICS_PORT": "metrics_port",
    "QE_LOG_LEVEL": "log_level",
}
# Secrets come from files (mode 0600), never from the environment itself.
SECRET_FILES = {"QE_REDIS_PASSWORD_FILE": "redis_password"}


def _describe(exc: ValidationError, names: dict[str, str] | None = None) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        if names:
            location = names.get(location, location)
        value = error.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{location or '<root>'}: {message}{shown}")
    return "\n  ".join(lines)


def _read_secret(path: str, variable: str) -> str:
    secret_path = Path(path)
    try:
        mode = secret_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{variable}: {path} must not be readable by group/others (mode {mode:04o}; want 0600)")
        return secret_path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from exc


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


def load_rules(path: str | Path) -> RiskRules:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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


def exit_config_error(program: str, message: str) -> NoReturn:
    print(f"{program}: invalid configuration: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)
