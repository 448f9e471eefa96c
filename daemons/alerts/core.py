"""The alerts worker's pure core: rules that look at plain data and say what is true
now (`Finding`, `Occurrence`), and the book that turns those verdicts into alerts
(deduplication, hysteresis, hold-for, escalation, rate limiting).

Nothing here touches Redis or the clock: every function is given `now_ns`, and every
piece of state can be written to / rebuilt from JSON (`to_json` / `from_json`) so the
daemon persists it through Effects and a restart continues exactly where it stopped.

Two kinds of alert:

* conditions (cap breach, stale feed, broker down, lag ...): a rule reports a level
  for a subject: ``set`` (the threshold is crossed), ``clear`` (it is back inside the
  clear threshold: hysteresis), or ``hold`` (in between, or cannot be judged now).
  The book fires one alert when a set condition has held for `for_s`, escalates once
  if its severity rises, and sends one ``resolved`` info alert when it clears;
* occurrences (new daily high/low): one alert per occurrence, rate-limited.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Self

from qe.clock import NEW_YORK, NS_PER_S
from qe.config import AlertsRules, EtfGuardRules, RateLimit
from qe.alert_types import RAISED, RESOLVED, AlertState
from qe.contracts import idempotency_key

Level = Literal["set", "clear", "hold"]
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2, "critical": 3}


def _pct(value: float) -> float:
    return round(value, 4)


class JsonState:
    """A dataclass kept as one compact JSON value: Effects writes it, a restart reads it back."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        return cls(**json.loads(text))


# --- what rules say -------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A rule's verdict on one condition of one subject, now."""

    alert_type: str
    subject: str
    level: Level
    severity: str = "warning"
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    symbol: str | None = None
    since_ns: int | None = None  # when the condition began; None: when first seen
    for_s: float = 0.0  # must hold this long (clock seconds) before it fires

    @property
    def key(self) -> str:
        return condition_key(self.alert_type, self.subject)


@dataclass(frozen=True)
class Occurrence:
    """A one-off event worth an alert (no condition to clear)."""

    alert_type: str
    subject: str
    identity: str  # what makes this occurrence unique (e.g. trading day + price)
    severity: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    symbol: str | None = None


@dataclass(frozen=True)
class AlertOut:
    """An alert to publish on ev.alerts."""

    alert_type: str
    severity: str
    symbol: str | None
    message: str
    data: dict[str, Any]
    idempotency_key: str
    state: AlertState = RAISED


def condition_key(alert_type: str, subject: str) -> str:
    return f"{alert_type}|{subject}"


# --- the book: dedupe, hysteresis, hold-for, escalation, rate limits -------------------


@dataclass
class Condition(JsonState):
    alert_type: str
    subject: str
    symbol: str | None
    since_ns: int
    firing: bool = False  # held for its for_s
    announced: str | None = None  # severity last announced; None: not announced yet
    held_back: bool = False  # a firing was refused by the rate limit (counted once)
    severity: str = "warning"
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RateWindow:
    sent_ns: list[int] = field(default_factory=list)
    suppressed: int = 0  # alerts held back since the last one let through

    def to_json(self) -> str:
        return json.dumps({"sent_ns": self.sent_ns, "suppressed": self.suppressed}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "RateWindow":
        raw = json.loads(text)
        return cls([int(x) for x in raw.get("sent_ns", [])], int(raw.get("suppressed", 0)))


class AlertBook:
    """Every active or pending condition and every rate window; which entries changed
    since the last `take_changes` (what the daemon writes back to Redis)."""

    def __init__(self, rate_limit: Callable[[str], RateLimit]) -> None:
        self.rate_limit = rate_limit
        self.conditions: dict[str, Condition] = {}
        self.rates: dict[str, RateWindow] = {}
        self._changed_conditions: set[str] = set()
        self._changed_rates: set[str] = set()
        self.suppressed: dict[str, int] = {}  # alert type -> alerts held back (drained by the daemon)

    # -- persistence -------------------------------------------------------------------
    def restore(self, conditions: Mapping[str, str | bytes], rates: Mapping[str, str | bytes]) -> list[str]:
        """Rebuild from persisted JSON; returns the keys that could not be read (skipped)."""
        self.conditions, self.rates = {}, {}
        self._changed_conditions, self._changed_rates = set(), set()
        bad = []
        for key, text in conditions.items():
            try:
                self.conditions[key] = Condition.from_json(text)
            except (ValueError, TypeError):
                bad.append(key)
        for key, text in rates.items():
            try:
                self.rates[key] = RateWindow.from_json(text)
            except (ValueError, TypeError, AttributeError):
                bad.append(key)
        return bad

    def take_changes(self) -> tuple[dict[str, str], list[str], dict[str, str], list[str]]:
        """(conditions to write, conditions to delete, rate windows to write, to delete)."""
        cond_set = {k: self.conditions[k].to_json() for k in self._changed_conditions if k in self.conditions}
        cond_del = sorted(k for k in self._changed_conditions if k not in self.conditions)
        rate_set = {k: self.rates[k].to_json() for k in self._changed_rates if self.rates.get(k) is not None}
        rate_del = sorted(k for k in self._changed_rates if k not in self.rates)
        self._changed_conditions, self._changed_rates = set(), set()
        return cond_set, cond_del, rate_set, rate_del

    def active(self) -> dict[str, int]:
        """Firing conditions per alert type (for the gauge)."""
        counts: dict[str, int] = {}
        for cond in self.conditions.values():
            if cond.firing:
                counts[cond.alert_type] = counts.get(cond.alert_type, 0) + 1
        return counts

    # -- rate limiting -------------------------------------------------------------------
    def _admit(self, alert_type: str, subject: str, now_ns: int, count: bool = True) -> tuple[bool, int]:
        """Take a slot in the (alert type, subject) window; returns (allowed, alerts
        suppressed before this one). `count=False`: a retry of an alert already counted."""
        limit = self.rate_limit(alert_type)
        key = condition_key(alert_type, subject)
        window = self.rates.get(key) or RateWindow()
        horizon = now_ns - int(limit.window_s * NS_PER_S)
        window.sent_ns = [ts for ts in window.sent_ns if ts > horizon]
        self._changed_rates.add(key)
        if len(window.sent_ns) >= limit.max_alerts:
            if count:
                window.suppressed += 1
                self.suppressed[alert_type] = self.suppressed.get(alert_type, 0) + 1
            self.rates[key] = window
            return False, 0
        suppressed, window.suppressed = window.suppressed, 0
        window.sent_ns.append(now_ns)
        self.rates[key] = window
        return True, suppressed

    def prune_rates(self, now_ns: int) -> None:
        """Forget windows with nothing left in them (keeps the state small)."""
        for key, window in list(self.rates.items()):
            alert_type = key.split("|", 1)[0]
            horizon = now_ns - int(self.rate_limit(alert_type).window_s * NS_PER_S)
            if window.suppressed == 0 and all(ts <= horizon for ts in window.sent_ns):
                del self.rates[key]
                self._changed_rates.add(key)

    # -- conditions ----------------------------------------------------------------------
    def apply(
        self, findings: Iterable[Finding], now_ns: int, complete: Mapping[str, str] | None = None
    ) -> list[AlertOut]:
        """Apply verdicts. `complete` maps alert types whose rule judged every subject
        it knows to the reason why the others are over: any active condition of such a
        type that got no finding is cleared with that reason."""
        out: list[AlertOut] = []
        seen: set[str] = set()
        for finding in findings:
            seen.add(finding.key)
            if finding.level == "clear":
                self._clear(finding.key, finding.message, dict(finding.data), now_ns, out)
            else:
                self._hold_or_set(finding, now_ns, out)
        for alert_type, reason in (complete or {}).items():
            for key, cond in list(self.conditions.items()):
                if cond.alert_type == alert_type and key not in seen:
                    self._clear(key, f"{alert_type} {cond.subject}: {reason}", {}, now_ns, out)
        return out

    def _hold_or_set(self, finding: Finding, now_ns: int, out: list[AlertOut]) -> None:
        key = finding.key
        cond = self.conditions.get(key)
        if cond is None:
            if finding.level != "set":
                return  # hold: in the hysteresis band, and nothing to keep
            since = finding.since_ns if finding.since_ns is not None else now_ns
            cond = Condition(finding.alert_type, finding.subject, finding.symbol, since)
            self.conditions[key] = cond
            self._changed_conditions.add(key)
        if finding.level == "set":
            cond.severity = finding.severity
        if finding.message:
            cond.message = finding.message
        if finding.data:
            cond.data = dict(finding.data)
        if not cond.firing:
            if now_ns - cond.since_ns < finding.for_s * NS_PER_S:
                return
            cond.firing = True
            self._changed_conditions.add(key)
        escalated = cond.announced is not None and SEVERITY_RANK[cond.severity] > SEVERITY_RANK[cond.announced]
        if cond.announced is not None and not escalated:
            return
        allowed, suppressed = self._admit(cond.alert_type, cond.subject, now_ns, count=not cond.held_back)
        if not allowed:
            if not cond.held_back:
                cond.held_back = True
                self._changed_conditions.add(key)
            return
        cond.announced, cond.held_back = cond.severity, False
        self._changed_conditions.add(key)
        data = {**cond.data, "state": "firing", "since_ns": cond.since_ns}
        if escalated:
            data["escalated"] = True
        if suppressed:
            data["suppressed_before"] = suppressed
        out.append(
            AlertOut(
                cond.alert_type,
                cond.severity,
                cond.symbol,
                cond.message,
                data,
                idempotency_key("alert", cond.alert_type, cond.subject, cond.since_ns, cond.severity),
            )
        )

    def _clear(self, key: str, message: str, data: dict[str, Any], now_ns: int, out: list[AlertOut]) -> None:
        cond = self.conditions.pop(key, None)
        if cond is None:
            return
        self._changed_conditions.add(key)
        if cond.announced is None:
            return  # never announced (still pending, or held back): nothing to resolve
        out.append(
            AlertOut(
                cond.alert_type,
                "info",
                cond.symbol,
                message or f"resolved: {cond.message}",
                {
                    **data,
                    "state": "resolved",
                    "since_ns": cond.since_ns,
                    "duration_s": round((now_ns - cond.since_ns) / NS_PER_S, 3),
                    "announced_severity": cond.announced,
                },
                idempotency_key("alert", cond.alert_type, cond.subject, cond.since_ns, "resolved"),
                RESOLVED,
            )
        )

    # -- occurrences -----------------------------------------------------------------------
    def occur(self, occurrence: Occurrence, now_ns: int) -> AlertOut | None:
        allowed, suppressed = self._admit(occurrence.alert_type, occurrence.subject, now_ns)
        if not allowed:
            return None
        data = {**occurrence.data, "state": "event"}
        if suppressed:
            data["suppressed_before"] = suppressed
        return AlertOut(
            occurrence.alert_type,
            occurrence.severity,
            occurrence.symbol,
            occurrence.message,
            data,
            idempotency_key("alert", occurrence.alert_type, occurrence.subject, occurrence.identity),
        )


# --- exposure: hard cap and bucket max --------------------------------------------------


def _band(value: float, set_at: float, clear_below: float, strictly_above: bool = False) -> Level:
    crossed = value > set_at if strictly_above else value >= set_at
    if crossed:
        return "set"
    return "clear" if value <= clear_below else "hold"


def exposure_findings(exposure: Any, hard_cap_pct: float, rules: AlertsRules, ts_ns: int) -> list[Finding]:
    """Hard cap on current / potential gross (>= cap), bucket current above its max.
    `exposure` is an `Exposure` payload (or anything with its attributes)."""
    findings: list[Finding] = []
    if exposure.status != "ok":
        findings.append(
            Finding(
                "exposure_unavailable", "exposure", "set", "error",
                f"exposure cannot be computed: {exposure.error or 'unknown error'}",
                {"equity": exposure.equity, "error": exposure.error}, since_ns=ts_ns,
            )
        )
        return findings  # the cap conditions keep their state: nothing to judge them by
    findings.append(Finding("exposure_unavailable", "exposure", "clear", message="exposure computable again"))
    clear_below = hard_cap_pct - rules.cap_hysteresis_pct
    for alert_type, label, value, severity in (
        ("hard_cap_current", "current gross", exposure.gross_pct, "critical"),
        ("hard_cap_potential", "potential gross", exposure.potential_gross_pct, "error"),
    ):
        if value is None:
            continue
        level = _band(value, hard_cap_pct, clear_below)
        data = {
            "gross_pct": exposure.gross_pct,
            "potential_gross_pct": exposure.potential_gross_pct,
            "hard_cap_pct": hard_cap_pct,
            "clear_below_pct": clear_below,
            "equity": exposure.equity,
        }
        if level == "set":
            message = f"{label} {value:.2f}% >= hard cap {hard_cap_pct:g}%"
        elif level == "clear":
            message = f"{label} {value:.2f}% back at or below {clear_below:g}%"
        else:
            message = ""
        findings.append(Finding(alert_type, "account", level, severity, message, data, since_ns=ts_ns))
    for bucket, numbers in sorted(exposure.buckets.items()):
        clear_at = numbers.max_pct - rules.bucket_hysteresis_pct
        level = _band(numbers.current_pct, numbers.max_pct, clear_at, strictly_above=True)
        data = {
            "bucket": bucket,
            "current_pct": _pct(numbers.current_pct),
            "potential_pct": _pct(numbers.potential_pct),
            "max_pct": numbers.max_pct,
            "target_pct": numbers.target_pct,
            "clear_below_pct": clear_at,
        }
        if level == "set":
            message = f"bucket {bucket} at {numbers.current_pct:.2f}% of equity, above its max {numbers.max_pct:g}%"
        elif level == "clear":
            message = f"bucket {bucket} at {numbers.current_pct:.2f}%, back at or below {clear_at:g}%"
        else:
            message = ""
        findings.append(Finding("bucket_max", bucket, level, "error", message, data, since_ns=ts_ns))
    return findings


# --- broker ------------------------------------------------------------------------------


@dataclass
class BrokerWatch(JsonState):
    """The latest broker state from ev.broker and since when it has been so."""

    connected: bool | None = None
    orders_allowed: bool = True
    reason: str = ""
    account: str | None = None
    last_code: int | None = None
    down_since_ns: int | None = None
    refused_since_ns: int | None = None

    def update(self, connected: bool, orders_allowed: bool, reason: str, account: str | None,
               last_code: int | None, ts_ns: int) -> None:
        if not connected and self.down_since_ns is None:
            self.down_since_ns = ts_ns
        elif connected:
            self.down_since_ns = None
        refused = connected and not orders_allowed
        if refused and self.refused_since_ns is None:
            self.refused_since_ns = ts_ns
        elif not refused:
            self.refused_since_ns = None
        self.connected, self.orders_allowed, self.reason = connected, orders_allowed, reason
        self.account, self.last_code = account, last_code

    def findings(self, market_open: bool, rules: AlertsRules) -> list[Finding]:
        if self.connected is None:
            return []
        data = {"connected": self.connected, "orders_allowed": self.orders_allowed, "reason": self.reason,
                "account": self.account, "last_code": self.last_code, "market_open": market_open}
        if self.connected:
            down = Finding("broker_down", "broker", "clear", message=f"broker reconnected: {self.reason}", data=data)
        else:
            # A nightly gateway restart outside market hours is worth a warning, not a page.
            severity = "critical" if market_open else "warning"
            down = Finding("broker_down", "broker", "set", severity, f"broker disconnected: {self.reason}", data,
                           since_ns=self.down_since_ns, for_s=rules.broker_down_for_s)
        if self.refused_since_ns is not None:
            refused = Finding("broker_orders_refused", "broker", "set", "error",
                              f"broker connected but orders are refused: {self.reason}", data,
                              since_ns=self.refused_since_ns)
        else:
            refused = Finding("broker_orders_refused", "broker", "clear", message="broker accepts orders again", data=data)
        return [down, refused]


# --- session: is the market open now? -------------------------------------------------------


@dataclass(frozen=True)
class MarketHours:
    """The current or next session from the latest ev.session: [open_ns, close_ns)."""

    open_ns: int
    close_ns: int
    trading_day: str | None

    def is_open(self, now_ns: int) -> bool:
        return self.open_ns <= now_ns < self.close_ns


def iso_to_ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


def new_york_day(ts_ns: int) -> str:
    """The New York calendar date of an instant: the trading day a print belongs to."""
    return datetime.fromtimestamp(ts_ns // NS_PER_S, tz=NEW_YORK).date().isoformat()


# --- stale market data -------------------------------------------------------------------------


STALE_TYPES = {"l1": ("l1_stale", "l1_feed_stale"), "prints": ("prints_stale", "prints_feed_stale")}


def stale_findings(
    kind: Literal["l1", "prints"],
    last_seen_ns: Mapping[str, int],
    feed_last_ns: int | None,
    symbols: Iterable[str],
    now_ns: int,
    market: MarketHours | None,
    caught_up: bool,
    symbol_after_s: float,
    feed_after_s: float,
    watching_since_ns: int = 0,
) -> tuple[list[Finding], dict[str, str]]:
    """Findings for stale L1 or prints (per symbol and stream-wide) and the alert types
    judged completely (see `AlertBook.apply`). Judged only while the market is open
    and this worker is caught up with the stream; when the market is closed every
    staleness condition is over. Silence counts from the later of the open and the
    moment this worker began watching: it cannot vouch for silence it did not see."""
    symbol_type, feed_type = STALE_TYPES[kind]
    if market is None or not caught_up:
        return [], {}  # cannot judge: keep whatever is active
    if not market.is_open(now_ns):
        return [], {symbol_type: "market closed", feed_type: "market closed"}
    stream = f"ev.{kind}"
    watch_from = max(market.open_ns, watching_since_ns)
    feed_from = max(feed_last_ns or watch_from, watch_from)
    feed_silence_s = (now_ns - feed_from) / NS_PER_S
    feed_data = {"stream": stream, "silent_s": round(feed_silence_s, 3), "threshold_s": feed_after_s,
                 "last_event_ns": feed_last_ns}
    if feed_silence_s >= feed_after_s:
        feed = Finding(feed_type, stream, "set", "error",
                       f"no {stream} event for {feed_silence_s:.0f}s while the market is open", feed_data,
                       since_ns=feed_from + int(feed_after_s * NS_PER_S))
    else:
        feed = Finding(feed_type, stream, "clear", message=f"{stream} flowing again", data=feed_data)
    findings = [feed]
    if feed.level == "set":
        # The whole stream is silent: one alert says it; per-symbol ones wait.
        findings += [Finding(symbol_type, symbol, "hold", symbol=symbol) for symbol in symbols]
        return findings, {}
    for symbol in symbols:
        seen = last_seen_ns.get(symbol)
        silence_from = max(seen or watch_from, watch_from)
        silence_s = (now_ns - silence_from) / NS_PER_S
        data = {"stream": stream, "silent_s": round(silence_s, 3), "threshold_s": symbol_after_s, "last_event_ns": seen}
        if silence_s >= symbol_after_s:
            findings.append(Finding(symbol_type, symbol, "set", "warning",
                                    f"{symbol}: no {stream} event for {silence_s:.0f}s while the market is open",
                                    data, symbol=symbol, since_ns=silence_from + int(symbol_after_s * NS_PER_S)))
        else:
            findings.append(Finding(symbol_type, symbol, "clear", message=f"{symbol}: {stream} fresh again",
                                    data=data, symbol=symbol))
    return findings, {symbol_type: "no longer watched"}


# --- consumer lag and the dead-letter stream ---------------------------------------------------


@dataclass(frozen=True)
class GroupLag:
    stream: str
    group: str
    lag: int | None  # None: Redis cannot tell (e.g. entries deleted mid-stream)
    pending: int
    last_delivered_id: str | None = None


def lag_findings(groups: Iterable[GroupLag], rules: AlertsRules) -> tuple[list[Finding], dict[str, str]]:
    findings = []
    for group in groups:
        if group.group in rules.consumer_lag_ignore_groups:
            continue
        subject = f"{group.stream}/{group.group}"
        if group.lag is None:
            findings.append(Finding("consumer_lag", subject, "hold"))
            continue
        limit = rules.lag_limit(group.stream)
        clear_at = limit * rules.consumer_lag_clear_ratio
        level = _band(group.lag, limit, clear_at, strictly_above=True)
        severity = "error" if group.lag >= limit * rules.consumer_lag_error_factor else "warning"
        data = {"stream": group.stream, "group": group.group, "lag": group.lag, "pending": group.pending,
                "limit": limit, "clear_at": clear_at}
        if level == "set":
            message = f"group {group.group} is {group.lag} entries behind on {group.stream} (limit {limit})"
        elif level == "clear":
            message = f"group {group.group} caught up on {group.stream} (lag {group.lag})"
        else:
            message = ""
        findings.append(Finding("consumer_lag", subject, level, severity, message, data, for_s=rules.consumer_lag_for_s))
    return findings, {"consumer_lag": "group no longer exists"}


@dataclass
class DlqWatch(JsonState):
    """Growth of ev.dlq between checks, from its `entries-added` counter (trimming
    does not hide growth)."""

    last_added: int | None = None
    episode_start_added: int | None = None
    last_growth_ns: int | None = None

    def observe(self, entries_added: int, length: int, now_ns: int, rules: AlertsRules) -> list[Finding]:
        if self.last_added is None or entries_added < self.last_added:
            # First look (what is already there is not growth) or the stream was recreated.
            self.last_added, self.episode_start_added, self.last_growth_ns = entries_added, None, None
            return [Finding("dlq_growth", "ev.dlq", "clear", message="ev.dlq reset")]
        if entries_added > self.last_added:
            if self.episode_start_added is None:
                self.episode_start_added = self.last_added
            self.last_added, self.last_growth_ns = entries_added, now_ns
        if self.episode_start_added is None:
            return [Finding("dlq_growth", "ev.dlq", "clear")]
        new_entries = self.last_added - self.episode_start_added
        data = {"new_entries": new_entries, "length": length, "entries_added": entries_added}
        quiet_s = (now_ns - (self.last_growth_ns or now_ns)) / NS_PER_S
        if quiet_s >= rules.dlq_quiet_s:
            self.episode_start_added, self.last_growth_ns = None, None
            return [Finding("dlq_growth", "ev.dlq", "clear",
                            message=f"ev.dlq stopped growing ({new_entries} new dead letters)", data=data)]
        severity = "error" if new_entries >= rules.dlq_error_entries else "warning"
        return [Finding("dlq_growth", "ev.dlq", "set", severity,
                        f"ev.dlq is growing: {new_entries} new dead letters (length {length}); see `qe dlq list`",
                        data, since_ns=now_ns)]


# --- new daily high / low -------------------------------------------------------------------------


@dataclass
class DayRange(JsonState):
    day: str
    high: float
    low: float
    prints: int  # prints counted today, capped at the rule's minimum (enough to know)


class DailyRanges:
    """Per symbol, the day's high and low from prints of at least `min_size` shares;
    a new day (New York date of the trade) starts a new range."""

    def __init__(self, min_size: int, min_prints: int) -> None:
        self.min_size, self.min_prints = min_size, min_prints
        self.ranges: dict[str, DayRange] = {}
        self.changed: set[str] = set()

    def on_print(self, symbol: str, price: float, size: int, day: str) -> list[Occurrence]:
        if size < self.min_size:
            return []
        current = self.ranges.get(symbol)
        if current is None or day > current.day:
            self.ranges[symbol] = DayRange(day, price, price, 1)
            self.changed.add(symbol)
            return []
        if day < current.day:
            return []  # a late print of an earlier day does not move today's range
        occurrences = []
        established = current.prints >= self.min_prints
        base = {"price": price, "size": size, "trading_day": day, "prints_today_at_least": current.prints}
        if price > current.high:
            if established:
                occurrences.append(Occurrence(
                    "new_daily_high", symbol, f"{day}:{price:.4f}", "info",
                    f"{symbol} new daily high {price:.2f} (previous {current.high:.2f}, low {current.low:.2f})",
                    {**base, "previous_high": current.high, "low": current.low}, symbol))
            current.high = price
            self.changed.add(symbol)
        elif price < current.low:
            if established:
                occurrences.append(Occurrence(
                    "new_daily_low", symbol, f"{day}:{price:.4f}", "info",
                    f"{symbol} new daily low {price:.2f} (previous {current.low:.2f}, high {current.high:.2f})",
                    {**base, "previous_low": current.low, "high": current.high}, symbol))
            current.low = price
            self.changed.add(symbol)
        if current.prints < self.min_prints:
            current.prints += 1
            self.changed.add(symbol)
        return occurrences


# --- ETF guard -------------------------------------------------------------------------------------


@dataclass
class EtfState(JsonState):
    day: str | None = None
    last_price: float | None = None
    last_ts_ns: int | None = None
    prev_close: float | None = None  # the last print of the previous trading day seen
    prev_close_day: str | None = None
    window: list[list[float]] = field(default_factory=list)  # [trade ts ns, price], oldest first


class EtfGuard:
    """Two triggers per guarded ETF: the move from the previous close (previous close =
    the last print of the previous trading day seen on ev.prints, else the universe's
    ref_price) and the move within the last `move_window_s` (the last price against
    the window's lowest and highest print)."""

    def __init__(self, rules: EtfGuardRules, ref_prices: Mapping[str, float]) -> None:
        self.rules = rules
        self.ref_prices = dict(ref_prices)
        self.states: dict[str, EtfState] = {}
        self.changed: set[str] = set()

    def guards(self, symbol: str) -> bool:
        return symbol in self.rules.symbols

    def on_print(self, symbol: str, price: float, ts_ns: int, day: str) -> list[Finding]:
        state = self.states.setdefault(symbol, EtfState())
        if state.day is not None and day < state.day:
            return []  # a late print of an earlier day: today's reference does not change
        if state.day is not None and day > state.day:
            state.prev_close, state.prev_close_day = state.last_price, state.day
        state.day, state.last_price, state.last_ts_ns = day, price, ts_ns
        state.window.append([ts_ns, price])
        if len(state.window) > self.rules.max_window_prints:
            del state.window[: len(state.window) - self.rules.max_window_prints]
        self.changed.add(symbol)
        return [self._vs_close(symbol, state, ts_ns), self._in_window(symbol, state, ts_ns)]

    def evaluate(self, now_ns: int) -> list[Finding]:
        """The window trigger as time passes (a move ages out of the window)."""
        return [self._in_window(symbol, state, now_ns) for symbol, state in sorted(self.states.items())
                if state.last_price is not None]

    def _vs_close(self, symbol: str, state: EtfState, ts_ns: int) -> Finding:
        reference, source = state.prev_close, "previous_day_last_print"
        if reference is None:
            reference, source = self.ref_prices.get(symbol), "universe_ref_price"
        if reference is None or state.last_price is None:
            return Finding("etf_move_vs_close", symbol, "hold", symbol=symbol)
        move_cents = round((state.last_price - reference) * 100, 4)
        threshold = self.rules.move_vs_close_cents
        clear_at = threshold - self.rules.hysteresis_cents
        level = _band(abs(move_cents), threshold, clear_at - 1e-9)
        data = {"price": state.last_price, "previous_close": reference, "previous_close_source": source,
                "previous_close_day": state.prev_close_day, "move_cents": move_cents, "threshold_cents": threshold}
        direction = "up" if move_cents > 0 else "down"
        message = {
            "set": f"{symbol} {direction} {abs(move_cents):.0f} cents vs previous close {reference:.2f} (at {state.last_price:.2f})",
            "clear": f"{symbol} back within {clear_at:g} cents of previous close {reference:.2f} (at {state.last_price:.2f})",
            "hold": "",
        }[level]
        return Finding("etf_move_vs_close", symbol, level, "warning", message, data, symbol=symbol, since_ns=ts_ns)

    def _in_window(self, symbol: str, state: EtfState, now_ns: int) -> Finding:
        horizon = now_ns - int(self.rules.move_window_s * NS_PER_S)
        while state.window and state.window[0][0] < horizon:
            state.window.pop(0)
            self.changed.add(symbol)
        last = state.last_price
        prices = [price for _ts, price in state.window]
        if last is None or not prices:
            rise = drop = 0.0
            low = high = last
        else:
            low, high = min(prices), max(prices)
            rise, drop = round((last - low) * 100, 4), round((high - last) * 100, 4)
        move_cents = max(rise, drop)
        threshold = self.rules.move_window_cents
        clear_at = threshold - self.rules.hysteresis_cents
        level = _band(move_cents, threshold, clear_at - 1e-9)
        direction = "up" if rise >= drop else "down"
        window_min = self.rules.move_window_s / 60
        data = {"price": last, "window_low": low, "window_high": high, "move_cents": move_cents,
                "direction": direction, "window_s": self.rules.move_window_s, "threshold_cents": threshold}
        message = {
            "set": f"{symbol} moved {direction} {move_cents:.0f} cents within {window_min:g} minutes (at {last})",
            "clear": f"{symbol} move within {window_min:g} minutes back under {clear_at:g} cents",
            "hold": "",
        }[level]
        return Finding("etf_move_fast", symbol, level, "warning", message, data, symbol=symbol, since_ns=now_ns)
