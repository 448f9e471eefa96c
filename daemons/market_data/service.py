"""qe-market-data: a producer. One synchronous loop drives the feed (Hammer Pro
or IB), turns quotes and trades into `ev.l1` / `ev.prints` events, and appends
them in batches (one atomic Redis call per flush). Feed callbacks never touch
Redis: they only fill an in-memory backlog that the loop flushes.

Never stuck: a dead feed is reconnected with capped, jittered backoff and
everything is re-subscribed; a dead Redis keeps the feed running with a bounded
backlog; a malformed message is logged, counted and skipped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import redis
from prometheus_client import Counter, Gauge
from redis.backoff import ExponentialWithJitterBackoff

from qe import config as qe_config
from qe import daemon as qe_daemon
from qe import metrics
from qe import state as qe_state
from qe.alert_types import RAISED, RESOLVED, AlertState, AlertType
from qe.contracts import Alert, Envelope, Severity, idempotency_key, make_event
from qe.holdings import Holdings, HoldingsReader
from qe.streams import REDIS_ERRORS, Publisher, default_consumer_name, write_heartbeat

from .core import (
    NS_PER_S, Backlog, FeedHealth, GatedQuote, QuoteConfirmer, QuoteGate, ReconnectBackoff, SeenKeys, confirm_blocked,
    confirmation_key, l1_key, print_payload, print_refusal, short_repr,
)
from .feed import Feed, FeedAuthError, FeedDisconnected, FeedError, Halt, Item, Malformed, Notice, Quote, Trade

log = logging.getLogger(__name__)

DAEMON = "market-data"
SOURCE = "market-data"
SEED_SEEN_MAX = 50_000
HEALTH_INTERVAL_S = 1.0
HOLDINGS_INTERVAL_S = 5.0  # positions and open orders are re-read this often (and at every connect)
SESSION_FRESH_NS = 30 * NS_PER_S
# The feed-wide episodes this daemon has raised and not yet resolved, per source (field:
# alert type, value: the episode's ns), committed with the alerts themselves: a process
# killed before its resolve went out leaves them here, and the next process resolves
# them once the feed proves them over (a resolve nobody sends would leave the Brain
# treating every quote as not current, and the operator with a false alarm).
FEED_EPISODES_KEY = "state:market_data:feed_episodes:{source}"
FEED_EPISODE_TYPES = frozenset({AlertType.FEED_DISCONNECTED, AlertType.FEED_STALE})

# Market data's own metrics (only this daemon exports them: see qe.metrics.owned_by).
l1_implausible = metrics.owned_by(DAEMON)(Counter(
    "qe_l1_implausible_total", "Quotes published flagged by the quote gate, by reason", ["source", "reason"],
    registry=None,
))
l1_implausible_symbols = metrics.owned_by(DAEMON)(Gauge(
    "qe_l1_implausible_symbols", "Symbols whose latest quote is implausible (an open episode)", ["source"],
    registry=None,
))
l1_confirmations = metrics.owned_by(DAEMON)(Counter(
    "qe_l1_confirmations_total", "Unchanged quotes re-published to confirm them (not a change)", ["source"],
    registry=None,
))
l1_confirming = metrics.owned_by(DAEMON)(Gauge(
    "qe_l1_confirming", "1 while market data confirms unchanged quotes (feed connected, healthy, not quiet)", ["source"],
    registry=None,
))
symbols_added = metrics.owned_by(DAEMON)(Counter(
    "qe_feed_symbols_added_total",
    "Symbols held or with open orders but missing from the universe file, subscribed by market data", ["source"],
    registry=None,
))


class MarketOpen:
    """Is the market open now? `state:session` (written by the session daemon) when
    it is fresh, otherwise the XNYS calendar (exchange_calendars)."""

    def __init__(self) -> None:
        import exchange_calendars

        self.calendar = exchange_calendars.get_calendar("XNYS")

    def __call__(self, r: redis.Redis, now_ns: int) -> bool:
        try:
            session = qe_state.read_session(r).value  # None: missing or invalid -> the calendar
            if session is not None and abs(now_ns - session.payload.now_ns) <= SESSION_FRESH_NS:
                return session.payload.market_open
        except REDIS_ERRORS:
            pass
        import pandas as pd

        try:
            return bool(self.calendar.is_open_on_minute(pd.Timestamp(now_ns, unit="ns", tz="UTC")))
        except ValueError:  # outside the calendar's range: assume open (stale detection stays on)
            return True


class MarketDataService:
    def __init__(self, context: qe_daemon.Context, feed: Feed, market_open: Any = None) -> None:
        self.context = context
        self.r = context.redis
        self.clock = context.clock
        self.config = context.rules.market_data
        self.runtime = context.rules.runtime
        self.feed = feed
        self.source = feed.name
        self.publisher = Publisher(self.r, context.rules)
        self.backlog = Backlog(self.config.max_pending_l1, self.config.max_pending_prints)
        self.seen = SeenKeys(self.config.seen_prints_memory)
        self.plausibility = context.rules.plausibility
        self.gate = QuoteGate(self.plausibility)
        self.health = FeedHealth(stale_after_ns=int(self.config.stale_after_s * NS_PER_S))
        self.reconnect = ReconnectBackoff(self.config.reconnect_base_s, self.config.reconnect_cap_s)
        self.redis_backoff = ExponentialWithJitterBackoff(cap=self.runtime.backoff_cap_s, base=self.runtime.backoff_base_s)
        self.redis_failures = 0
        self.redis_retry_at = 0.0
        self.market_open = market_open or MarketOpen()
        self.stop = threading.Event()
        self.connected = False
        self.ever_connected = False
        self.next_connect_at = 0.0
        self.down_since_ns = self.clock.now_ns()
        self.next_flush_at = 0.0
        self.next_health_at = 0.0
        self.next_heartbeat_at = 0.0
        self.last_resubscribe_at = 0.0
        self.consumer = context.settings.consumer_name or default_consumer_name(DAEMON)
        self.started_ns = time.time_ns()
        self.malformed_logged = 0
        self.flush_interval_s = self.config.flush_interval_ms / 1000
        self.pending_alerts: list[Envelope] = []
        self.feed_episodes_key = FEED_EPISODES_KEY.format(source=self.source)
        self.open_episodes: dict[AlertType, int] = {}  # FEED_EPISODE_TYPES raised, not resolved
        self.episodes_loaded = False  # an earlier process's open episodes read (before the first connect)
        self.episodes_dirty = False
        # Confirming unchanged quotes (issue 13): the feed as a whole is quiet when no
        # quote or trade arrived for one confirmation interval.
        self.confirmer = QuoteConfirmer(self.config.confirm_interval_s)
        self.confirm_quiet_ns = int(self.config.confirm_interval_s * NS_PER_S)
        self.last_data_ns: int | None = None  # last quote or trade from the feed (not a connect)
        self.confirm_blocked: str | None = "not connected yet"
        self.halted: set[str] = set()
        # No unpriced risk (issue 13): symbols held or with open orders, universe or not.
        self.universe = set(feed.symbols)
        self.holdings = HoldingsReader(self.r)
        self.held_symbols: set[str] = set()
        self.added_symbols: set[str] = set()
        self.next_holdings_at = 0.0
        metrics.feed_connected.labels(self.source).set(0)
        metrics.feed_stale.labels(self.source).set(0)

    # -- lifecycle ----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: Any) -> None:
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
            self.stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self) -> int:
        log.info("market data starting", extra={"source": self.source})
        self.seed_seen()
        while not self.stop.is_set():
            self.step()
        self.flush(force=True)
        self.feed.close()
        log.info("market data stopped", extra={"backlog": len(self.backlog)})
        return 0

    def step(self) -> None:
        now = time.monotonic()
        if not self.episodes_loaded and now >= self.redis_retry_at:
            self.load_episodes()
        if not self.connected and now >= self.next_connect_at and self.episodes_loaded:
            self.connect_feed()
        wait = min(max(self.next_flush_at - now, 0.0), self.flush_interval_s)
        if self.connected:
            try:
                items = self.feed.pump(wait)
            except FeedDisconnected as exc:
                self.on_disconnect(str(exc))
                items = []
            self.take(items)
        else:  # (no connect before the open episodes are read: wake for that read's retry)
            wake_at = self.next_connect_at if self.episodes_loaded else self.redis_retry_at
            self.stop.wait(max(min(wait, wake_at - time.monotonic()), 0.001))
        now = time.monotonic()
        self.confirm_quotes()
        if now >= self.next_flush_at or len(self.backlog) >= self.config.flush_max_events:
            self.flush()
            self.next_flush_at = now + self.flush_interval_s
        if now >= self.next_health_at:
            self.next_health_at = now + HEALTH_INTERVAL_S
            self.check_health()
            if self.connected and now >= self.next_holdings_at:
                self.next_holdings_at = now + HOLDINGS_INTERVAL_S
                self.check_holdings()
            if self.connected:
                self.maintain_feed()
        if now >= self.next_heartbeat_at:
            self.next_heartbeat_at = now + self.runtime.housekeeping_interval_s
            self.heartbeat()
        metrics.beat()

    # -- feed connection --------------------------------------------------------------------------------
    def connect_feed(self) -> None:
        if self.ever_connected:
            metrics.feed_reconnects.labels(self.source).inc()
        try:
            self.feed.connect()
        except FeedAuthError as exc:
            self.retry_later(str(exc), level=logging.ERROR)
            self.alert(AlertType.FEED_AUTH_FAILED, "error", str(exc), episode=self.down_since_ns)
            return
        except FeedError as exc:
            self.retry_later(str(exc), level=logging.WARNING)
            return
        now_ns = self.clock.now_ns()
        self.connected = True
        self.next_holdings_at = 0.0  # re-read positions and open orders right away
        self.reconnect.reset()
        self.health.on_connected(now_ns)
        metrics.feed_connected.labels(self.source).set(1)
        log.info("feed connected", extra={"source": self.source, "reconnect": self.ever_connected})
        down_since = self.open_episodes.get(AlertType.FEED_DISCONNECTED)  # this process's, or an earlier one's
        if down_since is not None:
            self.alert(
                AlertType.FEED_DISCONNECTED, "info", f"{self.source} feed reconnected and re-subscribed",
                episode=down_since, state=RESOLVED,
            )
        self.ever_connected = True

    def retry_later(self, reason: str, level: int) -> None:
        delay = self.reconnect.next_delay()
        self.next_connect_at = time.monotonic() + delay
        log.log(
            level,
            "feed connection failed; retrying",
            extra={"source": self.source, "error": reason, "failures": self.reconnect.failures, "retry_in_s": round(delay, 2)},
        )

    def on_disconnect(self, reason: str) -> None:
        self.feed.close()
        self.connected = False
        self.confirmer.clear()  # quotes of the lost connection are never confirmed on the next
        self.halted.clear()
        self.last_data_ns = None
        self.down_since_ns = self.clock.now_ns()
        metrics.feed_connected.labels(self.source).set(0)
        self.alert(AlertType.FEED_DISCONNECTED, "warning", f"{self.source} feed disconnected: {reason}", episode=self.down_since_ns)
        self.retry_later(reason, level=logging.WARNING)

    def maintain_feed(self) -> None:
        try:
            # Held symbols and symbols with open orders are first in line for IB's scarce
            # tick-by-tick slots (Hammer has none).
            priority = self.held_symbols if self.source == "ibkr" else set()
            self.feed.maintain(self.clock.now_ns(), set(priority))
        except FeedDisconnected as exc:
            self.on_disconnect(str(exc))

    # -- no unpriced risk ----------------------------------------------------------------------------------
    def check_holdings(self) -> None:
        """Every symbol held at the broker or with an open order is subscribed, universe
        file or not (as execution publishes them: qe.holdings). Subscribed ones are never
        unsubscribed; each is logged, counted and alerted once."""
        try:
            holdings = self.holdings.read()
        except REDIS_ERRORS as exc:
            log.warning("could not read positions and orders; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        for problem in holdings.problems[:20]:
            log.warning("unreadable position or order skipped", extra={"detail": problem[:200]})
        self.held_symbols = holdings.symbols
        missing = sorted(holdings.symbols - self.universe - self.added_symbols)
        if not missing:
            return
        try:
            subscribed = set(self.feed.add_symbols(missing))
        except FeedDisconnected as exc:
            self.on_disconnect(str(exc))
            return
        self.added_symbols |= set(missing)
        for symbol in missing:
            self.unpriced_symbol_added(symbol, holdings, symbol in subscribed)

    def unpriced_symbol_added(self, symbol: str, holdings: Holdings, subscribed: bool) -> None:
        qty = holdings.positions.get(symbol, 0)
        orders = sorted(ref for ref, of in holdings.open_orders.items() if of == symbol)
        why = f"position {qty:+d}" if qty else f"open orders {', '.join(orders[:3])}"
        symbols_added.labels(self.source).inc()
        if subscribed:
            log.warning("subscribed a symbol missing from the universe file", extra={"symbol": symbol, "why": why})
            severity: Severity = "warning"
            message = f"{symbol} ({why}) is not in the universe file: market data subscribed it; add it to universe.csv"
        else:
            log.error("a held symbol could not be subscribed: it has no market price", extra={"symbol": symbol, "why": why})
            severity = "error"
            message = f"{symbol} ({why}) is not in the universe file and the {self.source} feed does not know it: unpriced"
        self.alert(
            AlertType.UNPRICED_SYMBOL_SUBSCRIBED, severity, message, episode=0, symbol=symbol,
            data={"source": self.source, "position_qty": qty, "open_orders": orders[:10], "subscribed": subscribed},
            key=idempotency_key("alert", DAEMON, "unpriced_symbol_subscribed", symbol),
        )

    # -- confirming unchanged quotes ----------------------------------------------------------------------
    def confirm_quotes(self) -> None:
        """Re-publish every quote due for a confirmation, while the feed is healthy for it
        (SPEC 6 Marks): same payload and quote_ts_ns, a new envelope ts_ns (the time market
        data vouches for it) and its own idempotency key."""
        now_ns = self.clock.now_ns()
        blocked = confirm_blocked(
            connected=self.connected, farm_broken=bool(self.health.broken), last_data_ns=self.last_data_ns,
            now_ns=now_ns, quiet_after_ns=self.confirm_quiet_ns,
        )
        if blocked != self.confirm_blocked:
            log.info("quote confirmations " + ("paused" if blocked else "running"), extra={"source": self.source, "blocked": blocked})
            self.confirm_blocked = blocked
            l1_confirming.labels(self.source).set(0 if blocked else 1)
        due = self.confirmer.due(now_ns, blocked, self.halted)
        for quote in due:
            event = make_event(quote, idempotency_key=confirmation_key(quote, now_ns), source=SOURCE, ts_ns=now_ns)
            self.backlog.add_l1(quote.symbol, event)
        if due:
            l1_confirmations.labels(self.source).inc(len(due))

    # -- items -> events ------------------------------------------------------------------------------------
    def take(self, items: list[Item]) -> None:
        if not items:
            return
        now_ns = self.clock.now_ns()
        for item in items:
            try:
                self.take_one(item, now_ns)
            except Exception as exc:  # noqa: BLE001 - feed content never stops the daemon
                self.malformed(Malformed("unusable_item", f"{type(item).__name__}: {type(exc).__name__}: {str(exc)[:160]}"))
        metrics.feed_last_update.labels(self.source).set(now_ns / NS_PER_S)
        metrics.feed_backlog.set(len(self.backlog))
        l1_implausible_symbols.labels(self.source).set(self.gate.implausible_symbols)

    def take_one(self, item: Item, now_ns: int) -> None:
        if isinstance(item, Quote):
            metrics.feed_messages.labels(self.source, "l1").inc()
            self.health.on_update(now_ns)
            self.last_data_ns = now_ns
            self.take_quote(item, now_ns)
        elif isinstance(item, Trade):
            metrics.feed_messages.labels(self.source, "print").inc()
            self.health.on_update(now_ns)
            self.last_data_ns = now_ns
            self.take_trade(item, now_ns)
        elif isinstance(item, Halt):
            self.on_halt(item)
        elif isinstance(item, Notice):
            self.on_notice(item)
        elif isinstance(item, Malformed):
            self.malformed(item)

    def take_quote(self, item: Quote, now_ns: int) -> None:
        """Every quote goes through the quote gate before it is published: an implausible
        one is published flagged (never silently dropped), and the symbol's episode is
        alerted once when it starts and once when it ends."""
        gated = self.gate.on_quote(item.l1, now_ns)
        if gated.l1 is None:
            self.malformed(Malformed(gated.refused or "refused", f"{item.l1.symbol}: bid {item.l1.bid} ask {item.l1.ask}"))
            return
        if gated.l1.implausible is not None:
            l1_implausible.labels(self.source, gated.l1.implausible).inc()
        if gated.episode is not None:
            self.quote_episode_alert(gated)
        event = make_event(gated.l1, idempotency_key=l1_key(gated.l1), source=SOURCE, ts_ns=now_ns)
        self.backlog.add_l1(gated.l1.symbol, event)
        self.confirmer.on_published(gated.l1, now_ns)  # confirmed as published: a flag stays

    def on_halt(self, item: Halt) -> None:
        """A halted symbol's quote is not confirmed: it goes stale at its consumers."""
        if item.halted:
            self.halted.add(item.symbol)
            log.warning("symbol halted: its quote is no longer confirmed", extra={"symbol": item.symbol})
        else:
            self.halted.discard(item.symbol)
            log.info("symbol trading again", extra={"symbol": item.symbol})

    def take_trade(self, item: Trade, now_ns: int) -> None:
        refusal = print_refusal(item.tick, now_ns, self.plausibility)
        if refusal is not None:
            tick = item.tick
            detail = f"{tick.symbol}: {short_repr(tick.price)} x {short_repr(tick.size)} at ts_ns {short_repr(tick.ts_ns)}"
            self.malformed(Malformed(refusal, detail))
            return
        if not self.seen.add(item.key):
            metrics.feed_duplicate_prints.labels(self.source).inc()
            return
        try:
            event = make_event(print_payload(item.tick), idempotency_key=item.key, source=SOURCE, ts_ns=now_ns)
        except ValueError as exc:
            self.malformed(Malformed("bad_print", str(exc).splitlines()[0][:200]))
            return
        self.gate.on_print(item.tick, now_ns)  # published: it may become the trusted reference
        self.backlog.add_print(event)

    def quote_episode_alert(self, gated: GatedQuote) -> None:
        change, quote, verdict = gated.episode, gated.l1, gated.verdict
        assert change is not None and quote is not None and gated.episode_since_ns is not None
        since_ns = gated.episode_since_ns
        data = {"source": self.source, "since_ns": since_ns, "bid": quote.bid, "ask": quote.ask}
        if change.started:
            detail = verdict.detail if verdict is not None else ""
            log.warning("implausible quote", extra={"symbol": change.symbol, "problem": change.problem, "detail": detail})
            self.alert(
                AlertType.L1_IMPLAUSIBLE, "warning",
                f"{change.symbol}: implausible quote ({change.problem}: {detail}); published flagged, not a price",
                episode=since_ns, symbol=change.symbol,
                data={**data, "state": "firing", "problem": change.problem, "detail": detail},
            )
        else:
            duration_s = round((self.clock.now_ns() - since_ns) / NS_PER_S, 3)
            log.info("quote plausible again", extra={"symbol": change.symbol, "after_s": duration_s})
            self.alert(
                AlertType.L1_IMPLAUSIBLE, "info", f"resolved: {change.symbol} quote plausible again",
                episode=since_ns, symbol=change.symbol, state=RESOLVED,
                data={**data, "state": "resolved", "duration_s": duration_s},
            )

    def malformed(self, item: Malformed) -> None:
        metrics.feed_malformed.labels(self.source, item.reason).inc()
        self.malformed_logged += 1
        if self.malformed_logged <= 20 or self.malformed_logged % 1000 == 0:
            log.warning(
                "malformed feed message skipped",
                extra={"source": self.source, "reason": item.reason, "detail": item.detail[:200], "count": self.malformed_logged},
            )

    def on_notice(self, notice: Notice) -> None:
        log.info("feed notice", extra={"source": self.source, "code": notice.code, "text": notice.message})
        self.health.on_ib_code(notice.code, notice.message)
        if notice.code in (1101, 1102):
            self.resubscribe(f"IB {notice.code}: connectivity restored")
        self.check_health()

    def resubscribe(self, why: str) -> None:
        log.warning("re-subscribing everything", extra={"source": self.source, "why": why})
        self.last_resubscribe_at = time.monotonic()
        try:
            self.feed.resubscribe()
        except FeedDisconnected as exc:
            self.on_disconnect(str(exc))

    # -- health -------------------------------------------------------------------------------------------------
    def check_health(self) -> None:
        now_ns = self.clock.now_ns()
        market_open = self.market_open(self.r, now_ns)
        change = self.health.evaluate(now_ns, market_open)
        if change is not None:
            metrics.feed_stale.labels(self.source).set(1 if self.health.stale else 0)
            if self.health.stale:
                log.warning("feed stale", extra={"source": self.source, "reason": change})
                self.alert(AlertType.FEED_STALE, "warning", f"{self.source} feed stale: {change}", episode=now_ns)
            else:
                log.info("feed ok again", extra={"source": self.source})
                self.alert(AlertType.FEED_STALE, "info", f"{self.source} feed delivering again",
                           episode=self.open_episodes.get(AlertType.FEED_STALE, now_ns), state=RESOLVED)
        inherited = self.open_episodes.get(AlertType.FEED_STALE)
        if inherited is not None and not self.health.stale and self.connected and self.last_data_ns is not None:
            # An episode an earlier process raised: this one's feed is delivering.
            self.alert(AlertType.FEED_STALE, "info", f"{self.source} feed delivering again (after a restart)",
                       episode=inherited, state=RESOLVED)
        silent = self.health.stale and not self.health.broken
        if silent and self.connected and time.monotonic() - self.last_resubscribe_at >= self.config.stale_after_s:
            self.resubscribe(self.health.reason)

    def alert(
        self, alert_type: AlertType, severity: Severity, message: str, episode: int,
        symbol: str | None = None, data: dict[str, Any] | None = None, key: str | None = None,
        state: AlertState = RAISED,
    ) -> None:
        """Alerts go out with the next flush; the key names the episode (and the symbol
        and severity for per-symbol episodes, so its start and its end differ), so a
        retried append is recognised (ev.alerts dedupes on it). A feed-wide episode's
        raise and resolve also update the open episodes committed with them."""
        payload = Alert(
            alert_type=alert_type, state=state, severity=severity, symbol=symbol, message=message[:500],
            data=data or {"source": self.source},
        )
        if key is not None:
            pass
        elif symbol is None:
            key = idempotency_key("alert", DAEMON, alert_type.value, self.source, episode // 1_000_000, state)
        else:
            phase = "resolved" if state == RESOLVED else severity
            key = idempotency_key("alert", DAEMON, alert_type.value, symbol, episode // 1_000_000, phase)
        self.pending_alerts.append(make_event(payload, idempotency_key=key, source=SOURCE, ts_ns=self.clock.now_ns()))
        if symbol is None and alert_type in FEED_EPISODE_TYPES:
            if state == RESOLVED:
                self.open_episodes.pop(alert_type, None)
            else:
                self.open_episodes[alert_type] = episode
            self.episodes_dirty = True

    def load_episodes(self) -> None:
        """The feed-wide episodes an earlier process left open become this one's: resolved
        once the feed proves them over (connected; delivering)."""
        try:
            raw = self.r.hgetall(self.feed_episodes_key)
        except REDIS_ERRORS as exc:
            self.redis_failed(exc)
            return
        self.episodes_loaded = True
        for name, value in raw.items():
            try:
                kind, episode = AlertType(name.decode()), int(value)
            except ValueError:
                log.warning("unreadable open feed episode ignored", extra={"field": repr(name)[:80], "value": repr(value)[:80]})
                continue
            if kind in FEED_EPISODE_TYPES:
                self.open_episodes.setdefault(kind, episode)
        if self.open_episodes:
            log.info("open feed episodes of an earlier process", extra={"episodes": {k.value: v for k, v in self.open_episodes.items()}})

    # -- Redis ---------------------------------------------------------------------------------------------------
    def flush(self, force: bool = False) -> None:
        if not (self.backlog or self.pending_alerts):
            return
        if not force and time.monotonic() < self.redis_retry_at:
            return
        limit = self.config.flush_max_events
        l1 = self.backlog.l1[:limit]
        prints = [self.backlog.prints[i] for i in range(min(limit, len(self.backlog.prints)))]
        alerts = list(self.pending_alerts)
        effects = self.publisher.effects()
        for _symbol, event in l1:
            effects.publish("ev.l1", event)
        for event in prints:
            effects.publish("ev.prints", event)
        for event in alerts:
            effects.publish("ev.alerts", event)
        episodes_written = self.episodes_dirty
        if episodes_written:  # committed with the alerts that opened or closed them
            effects.command("DEL", self.feed_episodes_key)
            if self.open_episodes:
                effects.hset(self.feed_episodes_key, {kind.value: str(ns) for kind, ns in self.open_episodes.items()})
        try:
            self.publisher.commit(effects)
        except (*REDIS_ERRORS, redis.ResponseError) as exc:
            self.redis_failed(exc)
            return
        del self.backlog.l1[: len(l1)]
        for _ in prints:
            self.backlog.prints.popleft()
        del self.pending_alerts[: len(alerts)]
        if episodes_written:
            self.episodes_dirty = False
        if self.redis_failures:
            log.info("redis reachable again", extra={"after_failures": self.redis_failures, "backlog": len(self.backlog)})
        self.redis_failures = 0
        metrics.redis_up.set(1)
        self._report_drops()
        metrics.feed_backlog.set(len(self.backlog))

    def _report_drops(self) -> None:
        if self.backlog.dropped_prints:
            metrics.feed_dropped.labels("print").inc(self.backlog.dropped_prints)
            log.error("prints dropped while Redis was unreachable", extra={"dropped": self.backlog.dropped_prints})
            self.backlog.dropped_prints = 0
        if self.backlog.collapsed_l1:
            metrics.feed_dropped.labels("l1").inc(self.backlog.collapsed_l1)
            self.backlog.collapsed_l1 = 0

    def redis_failed(self, exc: Exception) -> None:
        metrics.redis_errors.inc()
        metrics.redis_up.set(0)
        self.redis_failures += 1
        delay = self.redis_backoff.compute(self.redis_failures)
        self.redis_retry_at = time.monotonic() + delay
        log.warning(
            "redis error; keeping the backlog and backing off",
            extra={"error": f"{type(exc).__name__}: {exc}", "failures": self.redis_failures, "backlog": len(self.backlog)},
        )

    def heartbeat(self) -> None:
        try:
            write_heartbeat(
                self.r,
                DAEMON,
                self.consumer,
                self.started_ns,
                feed_source=self.source,
                feed_connected=int(self.connected),
                feed_stale=int(self.health.stale),
                feed_stale_reason=self.health.reason,
                backlog=len(self.backlog),
            )
        except REDIS_ERRORS as exc:
            self.redis_failed(exc)

    def seed_seen(self) -> None:
        """Remember the keys of the newest prints already on `ev.prints`, so a
        restarted daemon does not publish again what a getTicks overlap re-sends."""
        limit = min(self.config.seen_prints_memory, SEED_SEEN_MAX)
        keys: list[str] = []
        upper = "+"
        try:
            while len(keys) < limit:
                entries = self.r.xrevrange("ev.prints", max=upper, min="-", count=min(5000, limit - len(keys)))
                if not entries:
                    break
                keys.extend(fields.get(b"idk", b"").decode() for _id, fields in entries)
                upper = "(" + entries[-1][0].decode()
        except REDIS_ERRORS as exc:
            log.warning("could not read recent prints to seed dedupe", extra={"error": str(exc)})
        for key in reversed(keys):
            if key:
                self.seen.add(key)
        log.info("dedupe memory seeded", extra={"keys": len(self.seen)})


def build_feed(context: qe_daemon.Context, symbols: list[str]) -> Feed:
    settings, config = context.settings, context.rules.market_data
    program = f"qe-{DAEMON}"
    if config.source == "hammer":
        from .hammer import HammerFeed

        if settings.hammer_password is None:
            qe_config.exit_config_error(
                program, "QE_HAMMER_PASSWORD_FILE: required when market_data.source is hammer"
            )
        return HammerFeed(
            settings.hammer_url, settings.hammer_password.get_secret_value(), symbols, config.hammer, context.clock
        )
    from .ibkr import IbkrFeed

    return IbkrFeed(
        settings.ib_host, settings.ib_port, settings.ib_client_id_market_data, symbols, config.ibkr, context.clock
    )


def main() -> int:
    context = qe_daemon.start(DAEMON)
    symbols = list(context.universe())
    feed = build_feed(context, symbols)
    service = MarketDataService(context, feed)
    service.install_signal_handlers()
    return service.run()
