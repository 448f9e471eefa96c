"""qe-session: every clock second, ev.session + state:session (SPEC 3, 6).

Consumes nothing: it runs on the stream runtime with no streams and a 1-second
tick (clock seconds, so a sped-up simulated clock gets one event per simulated
second) for heartbeats, metrics, atomic commits and SIGTERM handling.
"""

from __future__ import annotations

import redis

from qe import config, daemon, metrics, state
from qe.clock import NS_PER_S
from qe.contracts import Envelope, Session, idempotency_key, make_event
from qe.streams import Effects

from .calendar import ExchangeCalendarAdapter, UnknownCalendar
from .core import SessionState, local_date, session_state, utc_from_ns

STREAM = "ev.session"
SOURCE = "session"
REGIMES = ("OPEN", "EARLY", "MID", "LATE", "CLOSE", "CLOSED")


def to_payload(state_: SessionState, now_ns: int) -> Session:
    return Session(
        now_ns=now_ns,
        now_utc=state_.now_utc.isoformat(timespec="milliseconds"),
        now_ny=state_.now_local.isoformat(timespec="milliseconds"),
        trading_day=state_.trading_day.isoformat(),
        market_open=state_.market_open,
        regime=state_.regime,  # type: ignore[arg-type]
        minutes_to_close=None if state_.minutes_to_close is None else round(state_.minutes_to_close, 4),
        soft_derisk_active=state_.soft_derisk_active,
        hard_derisk_active=state_.hard_derisk_active,
        early_close=state_.early_close,
        open_utc=state_.open_utc.isoformat(),
        close_utc=state_.close_utc.isoformat(),
    )


class SessionHandler:
    streams: tuple[str, ...] = ()

    def __init__(self, context: daemon.Context) -> None:
        self.rules = context.rules.session
        self.log = context.log
        self.tick_interval_s = self.rules.publish_interval_s
        try:
            self.calendar = ExchangeCalendarAdapter(self.rules.calendar)
        except UnknownCalendar as exc:
            config.exit_config_error("qe-session", f"{context.settings.rules_file}:\n  session.calendar: {exc}")
        # Build the calendar now (slow once), not in the first tick.
        self.calendar.day(local_date(utc_from_ns(context.clock.now_ns()), self.rules))
        self._last_second: int | None = None
        self._last_regime: str | None = None

    def load(self, r: redis.Redis) -> None:
        """Nothing to rebuild: the session is a function of the clock and the calendar."""

    def handle(self, event: Envelope, effects: Effects) -> None:
        raise RuntimeError("qe-session consumes no stream")

    def build(self, now_ns: int) -> Envelope:
        now_utc = utc_from_ns(now_ns)
        current = session_state(now_utc, self.calendar.day(local_date(now_utc, self.rules)), self.rules)
        return make_event(
            to_payload(current, now_ns),
            idempotency_key=idempotency_key("session", now_ns // NS_PER_S),
            source=SOURCE,
            ts_ns=now_ns,
        )

    def tick(self, now_ns: int, effects: Effects) -> None:
        second = now_ns // NS_PER_S
        if second == self._last_second:
            return  # one event per clock second: its key is the second
        event = self.build(now_ns)
        payload: Session = event.payload  # type: ignore[assignment]
        effects.publish(STREAM, event)
        effects.hset(state.SESSION, state.snapshot_fields(event))
        self._last_second = second
        if payload.regime != self._last_regime:
            self.log.info(
                "regime",
                extra={
                    "regime": payload.regime,
                    "previous": self._last_regime,
                    "now_ny": payload.now_ny,
                    "trading_day": payload.trading_day,
                    "early_close": payload.early_close,
                },
            )
            self._last_regime = payload.regime
        for name in REGIMES:
            metrics.session_regime.labels(name).set(1 if name == payload.regime else 0)
        metrics.session_market_open.set(1 if payload.market_open else 0)
        metrics.session_seconds_to_close.set(payload.minutes_to_close * 60 if payload.minutes_to_close is not None else float("nan"))


def run() -> int:
    return daemon.run_consumer("session", "session", SessionHandler)
