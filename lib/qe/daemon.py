"""What every daemon's main() does before its loop: config (or exit 78), JSON
logs, the clock, the metrics endpoint, the Redis client, signal handling."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import redis

from . import clock as clock_module
from . import config, log, metrics, streams
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
    """Validate configuration (exit 78 on any error) and set up the process."""
    program = f"qe-{daemon}"
    settings, rules = config.load_or_exit(program)
    try:
        clock = clock_module.from_env()
    except clock_module.ClockConfigError as exc:
        config.exit_config_error(program, str(exc))
    logger = log.setup(daemon, settings.log_level)
    metrics.serve(daemon, settings.metrics_host, settings.metrics_port)
    r = streams.connect(settings, rules, retry_commands=False, user=daemon)
    logger.info("starting", extra={"clock": clock.describe(), "config": str(settings.rules_file)})
    return Context(daemon, settings, rules, clock, r, logger)


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
