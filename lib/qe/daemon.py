"""What every daemon's main() does before its loop: config (or exit 78), JSON
logs, the clock, the metrics endpoint, the Redis client, the liveness beat
(`qe.liveness`: every second, and a stopped marker on a clean exit), signal handling."""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from typing import Callable

import redis

from . import clock as clock_module
from . import config, liveness, log, metrics, streams
from .universe import Instrument, UniverseError, load_universe


@dataclass
class Context:
    daemon: str
    settings: config.Settings
    rules: config.RiskRules
    clock: clock_module.Clock
    redis: redis.Redis
    log: logging.Logger

    def universe(self) -> dict[str, Instrument]:
        try:
            return load_universe(self.settings.universe_file)
        except UniverseError as exc:
            config.exit_config_error(f"qe-{self.daemon}", str(exc))


def start(daemon: str) -> Context:
    """Validate configuration and set up the process. Every start-up failure (rules,
    environment, secrets, clock, Redis URL, metrics endpoint) exits 78 with the exact
    field: no traceback, no restart loop."""
    program = f"qe-{daemon}"
    try:
        return _start(daemon)
    except config.ConfigError as exc:
        config.exit_config_error(program, str(exc))


def _start(daemon: str) -> Context:
    settings = config.load_settings()
    rules = config.load_rules(settings.rules_file)
    try:
        clock = clock_module.from_env()
    except clock_module.ClockConfigError as exc:
        raise config.ConfigError(str(exc)) from None
    # Credentials before anything listens: a missing or 0644 per-daemon password file
    # (QE_REDIS_SECRETS_DIR) is a configuration error, not a traceback at first use.
    settings.redis_credentials(daemon)
    logger = log.setup(daemon, settings.log_level)
    serve_metrics(daemon, settings.metrics_host, settings.metrics_port)
    r = redis_client(settings, rules, daemon)
    # From here on `qe status` sees the daemon: `ok` while it beats, `stopped` after a
    # clean exit, `down` once the beat expires or its PID is gone.
    liveness.Beat(r, daemon).start().stop_at_exit()
    logger.info("starting", extra={"clock": clock.describe(), "config": str(settings.rules_file),
                                   "redis_url": settings.redis_url_redacted})
    return Context(daemon, settings, rules, clock, r, logger)


def _port_field(daemon: str, port: int | None) -> str:
    if port is None:
        return f"QE_METRICS_PORT (unset: {daemon}'s default {metrics.DEFAULT_PORTS.get(daemon, 0)})"
    return "QE_METRICS_PORT"


def metrics_endpoint_error(exc: OSError, host: str, port: int, port_field: str = "QE_METRICS_PORT") -> config.ConfigError:
    """Why the metrics endpoint cannot listen, naming the setting to change."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return config.ConfigError(f"QE_METRICS_HOST: cannot resolve {host!r}: {reason}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return config.ConfigError(f"QE_METRICS_HOST: {host!r} is not an address of this machine: {reason}")
    return config.ConfigError(f"{port_field}: cannot listen on {host}:{port}: {reason}")


def check_metrics_endpoint(host: str, port: int | None) -> None:
    """What `serve_metrics` needs, without serving: the host resolves to an address of
    this machine, and a set port is free (binds like the HTTP server, then closes)."""
    wanted = port or 0
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, wanted, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            probe.bind(address)
    except OSError as exc:
        raise metrics_endpoint_error(exc, host, wanted) from None


def serve_metrics(daemon: str, host: str, port: int | None) -> int:
    try:
        return metrics.serve(daemon, host, port)
    except OSError as exc:
        chosen = metrics.DEFAULT_PORTS.get(daemon, 0) if port is None else port
        raise metrics_endpoint_error(exc, host, chosen, _port_field(daemon, port)) from None


def redis_client(settings: config.Settings, rules: config.RiskRules, daemon: str) -> redis.Redis:
    try:
        return streams.connect(settings, rules, retry_commands=False, user=daemon)
    except (TypeError, ValueError) as exc:
        # The URL was checked when the settings were loaded; this is the last guard.
        raise config.ConfigError(f"QE_REDIS_URL: {config.redact(str(exc))}") from None


def run_consumer(daemon: str, group: str, make_handler: Callable[[Context], streams.Handler]) -> int:
    """The whole main() of a consuming daemon: start, build the handler, loop."""
    context = start(daemon)
    handler = make_handler(context)
    consumer = streams.Consumer(
        r=context.redis,
        daemon=daemon,
        group=group,
        handler=handler,
        rules=context.rules,
        clock=context.clock,
        consumer_name=context.settings.consumer_name,
    )
    consumer.install_signal_handlers()
    return consumer.run()
