"""qe-pnl: fills (ev.orders), broker positions (ev.positions), marks (ev.l1,
ev.features) and the day boundary (ev.session) in; ev.pnl, state:pnl and the qe_pnl_*
metrics out, every `pnl.publish_interval_s` and soon after each fill. At the close the
day's final figures are published (final=true), the marks are kept as the next day's
previous closes, and (report.after_close) the end-of-day report is written.

Restart safety: everything the figures depend on is written to the worker's own
hashes with the acks of the events that changed it (state:pnl:*); load() rebuilds
from them, and the figures are recomputed from scratch (qe.pnl.day_pnl) at each
publication, so a restarted worker publishes the same P&L.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from qe import daemon, marks, metrics, state
from qe.alert_types import RAISED, RESOLVED, AlertType
from qe.contracts import Alert, BrokerPnL, Envelope, Position, idempotency_key, make_event
from qe.pnl import DayPnL, Reconciliation, Trade, day_pnl, reconcile
from qe.streams import Effects

from . import core

STREAMS = ("ev.orders", "ev.positions", "ev.l1", "ev.features", "ev.session", "ev.broker_pnl")
OUT_STREAM = "ev.pnl"
SOURCE = "pnl"
DAY_KEY = "state:pnl:day"  # trading_day, open_ns, report_due
FILLS_KEY = "state:pnl:fills"  # exec_id -> the fill (every fill of the current day)
ANCHORS_KEY = "state:pnl:anchors"  # symbol -> the broker position the day starts from
POSITIONS_KEY = "state:pnl:positions"  # symbol -> the latest broker position
MARKS_KEY = "state:pnl:marks"  # symbol -> the mark rule's inputs
CLOSES_KEY = "state:pnl:closes"  # symbol -> its mark at the last close (the next day's previous close)
BROKER_KEY = "state:pnl:broker"  # symbol (ACCOUNT_FIELD: the account) -> the broker's latest P&L (ev.broker_pnl)
MISMATCH_KEY = "state:pnl:mismatch"  # symbol -> its mismatch episode (since, alerted)
ACCOUNT_FIELD = "_account"
MIN_GAP_NS = 1_000_000_000  # a fill publishes at most once per clock second

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _trade_json(trade: Trade) -> str:
    return _dumps({"symbol": trade.symbol, "bucket": trade.bucket, "side": trade.side, "qty": trade.qty, "price": trade.price,
                   "ts_ns": trade.ts_ns, "commission": trade.commission, "seq": trade.seq})


def _trade(exec_id: str, data: dict) -> Trade:
    return Trade(exec_id, data["symbol"], data["bucket"], data["side"], int(data["qty"]), float(data["price"]),
                 int(data["ts_ns"]), None if data["commission"] is None else float(data["commission"]), int(data["seq"]))


class PnlHandler:
    streams = STREAMS

    def __init__(self, context: daemon.Context) -> None:
        self.rules = context.rules
        self.clock = context.clock
        self.log = context.log
        self.home = context.settings.home
        self.redis = context.redis  # the report reads the day's streams (qe.report)
        self.tick_interval_s = 1.0
        self.mark_rules = marks.MarkRules.from_rules(context.rules)
        self.references = {symbol: inst.ref_price for symbol, inst in context.universe().items()}
        self._reset()

    def _reset(self) -> None:
        self.day: str | None = None
        self.open_ns = 0
        self.report_due: str | None = None  # a closed day whose report is still to be written
        self.trades: dict[str, Trade] = {}
        self.anchors: dict[str, core.BrokerPosition] = {}
        self.positions: dict[str, core.BrokerPosition] = {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.closes: dict[str, float] = {}
        self.broker: dict[str, core.BrokerLine] = {}
        self.broker_account: BrokerPnL | None = None
        self.episodes: dict[str, core.Episode] = {}
        self.next_publish_ns = 0
        self.last_publish_ns = 0
        self.dirty = False

    # -- restart: rebuild from Redis ---------------------------------------------------------
    def load(self, r: redis.Redis) -> None:
        self._reset()
        pipe = r.pipeline(transaction=True)
        for key in (DAY_KEY, FILLS_KEY, ANCHORS_KEY, POSITIONS_KEY, MARKS_KEY, CLOSES_KEY, BROKER_KEY, MISMATCH_KEY):
            pipe.hgetall(key)
        day, fills, anchors, positions, inputs, closes, broker, episodes = (state.decode_fields(raw) for raw in pipe.execute())
        self.day = day.get("trading_day")
        self.open_ns = int(day.get("open_ns") or 0)
        self.report_due = day.get("report_due")
        self.trades = {exec_id: _trade(exec_id, data) for exec_id, data in fills.items()}
        self.anchors = {s: core.BrokerPosition.from_json(d) for s, d in anchors.items()}
        self.positions = {s: core.BrokerPosition.from_json(d) for s, d in positions.items()}
        self.inputs = inputs
        self.closes = {s: float(p) for s, p in closes.items()}
        account = broker.pop(ACCOUNT_FIELD, None)
        self.broker_account = BrokerPnL.model_validate(account) if account else None
        self.broker = {s: core.BrokerLine.from_json(d) for s, d in broker.items()}
        self.episodes = {s: core.Episode.from_json(d) for s, d in episodes.items()}
        self.log.info("pnl state loaded", extra={"trading_day": self.day, "fills": len(self.trades),
                                                 "positions": len(self.positions), "report_due": self.report_due})

    # -- events ----------------------------------------------------------------------------
    def handle(self, event: Envelope, effects: Effects) -> None:
        payload: Any = event.payload
        if event.type == "order":
            self._on_order(payload, effects)
        elif event.type == "position":
            self._on_position(event, payload, effects)
        elif event.type == "l1":
            self._on_quote(event, payload, effects)
        elif event.type == "feature":
            self._on_feature(payload, effects)
        elif event.type == "session":
            self._on_session(event, payload, effects)
        elif event.type == "broker_pnl":
            self._on_broker_pnl(event, payload, effects)

    def _on_broker_pnl(self, event: Envelope, figures: Any, effects: Effects) -> None:
        """The broker's own P&L (execution's reqPnL / reqPnLSingle): the latest per symbol."""
        if figures.symbol is None:
            self.broker_account = figures
            effects.hset(BROKER_KEY, {ACCOUNT_FIELD: figures.model_dump_json()})
            return
        seen = self.broker.get(figures.symbol)
        if seen is not None and seen.ts_ns > event.ts_ns:
            return  # an older update read late
        line = core.BrokerLine(figures.position, figures.daily, figures.unrealized, figures.realized, figures.value, event.ts_ns)
        self.broker[figures.symbol] = line
        effects.hset(BROKER_KEY, {figures.symbol: _dumps(line.to_json())})
    def _on_order(self, order: Any, effects: Effects) -> None:
        fill = order.last_fill
        if fill is None:
            return
        seen = self.trades.get(fill.exec_id)
        if seen is not None and (seen.commission is not None or fill.commission is None):
            return  # each execution once; a later copy only brings its commission report
        seq = seen.seq if seen is not None else len(self.trades) + 1
        trade = Trade(fill.exec_id, order.symbol, order.bucket, order.side, fill.qty, fill.price, fill.ts_ns, fill.commission, seq)
        if self.day is not None and core.trading_day_of(trade.ts_ns) < self.day:
            return  # a previous day's execution (read again from the retained stream)
        self.trades[trade.exec_id] = trade
        effects.hset(FILLS_KEY, {trade.exec_id: _trade_json(trade)})
        self.dirty = True

    def _on_position(self, event: Envelope, position: Any, effects: Effects) -> None:
        if not isinstance(position, Position):
            return  # account values: equity is exposure's business
        new = core.BrokerPosition(position.qty, position.bucket, position.avg_cost, event.ts_ns)
        self.positions[position.symbol] = new
        effects.hset(POSITIONS_KEY, {position.symbol: _dumps(new.to_json())})
        if self.day is not None:
            anchor = core.next_anchor(self.anchors.get(position.symbol), new, self.open_ns)
            if anchor != self.anchors.get(position.symbol):
                self.anchors[position.symbol] = anchor
                effects.hset(ANCHORS_KEY, {position.symbol: _dumps(anchor.to_json())})
        self.dirty = True

    def _on_quote(self, event: Envelope, quote: Any, effects: Effects) -> None:
        saved = self.inputs.setdefault(quote.symbol, {})
        saved["problem"] = quote.implausible
        if quote.implausible is None and quote.bid is not None and quote.ask is not None and quote.bid <= quote.ask:
            saved["mid"] = round((quote.bid + quote.ask) / 2, 6)
            saved["vouched_ns"] = event.ts_ns
        effects.hset(MARKS_KEY, {quote.symbol: _dumps(saved)})

    def _on_feature(self, feature: Any, effects: Effects) -> None:
        tick = feature.truth_tick
        if tick is None:
            return
        saved = self.inputs.setdefault(feature.symbol, {})
        if tick.ts_ns >= saved.get("tick_ts_ns", 0):
            saved["tick"], saved["tick_ts_ns"] = tick.price, tick.ts_ns
            effects.hset(MARKS_KEY, {feature.symbol: _dumps(saved)})

    def _on_session(self, event: Envelope, session: Any, effects: Effects) -> None:
        day = session.trading_day
        if day is None or day == self.day:
            return
        now_ns = event.ts_ns
        if self.day is not None and day > self.day:
            self._close_day(now_ns, effects)
        elif self.day is not None:
            return  # an older session event (a backlog read out of order): the day only moves forward
        self.day = day
        self.open_ns = core.iso_to_ns(session.open_utc) or now_ns
        # The day starts from the broker's positions as they are now (re-anchored as they are read).
        self.anchors = {symbol: position for symbol, position in self.positions.items() if position.qty != 0}
        self.trades = {k: t for k, t in self.trades.items() if core.trading_day_of(t.ts_ns) >= day}
        effects.command("DEL", ANCHORS_KEY, FILLS_KEY)
        if self.anchors:
            effects.hset(ANCHORS_KEY, {s: _dumps(a.to_json()) for s, a in self.anchors.items()})
        if self.trades:
            effects.hset(FILLS_KEY, {k: _trade_json(t) for k, t in self.trades.items()})
        effects.hset(DAY_KEY, {"trading_day": _dumps(day), "open_ns": _dumps(self.open_ns)})
        self.log.info("trading day", extra={"trading_day": day, "carried": len(self.anchors)})
        self.dirty = True

    def _close_day(self, now_ns: int, effects: Effects) -> None:
        """The day ended: its final figures, its marks as the next previous closes, its report."""
        assert self.day is not None
        figures = self.figures(now_ns)
        self._publish(now_ns, effects, figures, final=True)
        self.closes = {s: line.mark for s, line in figures.symbols.items() if line.mark is not None}
        for symbol, _saved in self.inputs.items():  # every symbol we have a market price for
            mark = self.mark(symbol, now_ns)
            if mark.price is not None and mark.market_priced:
                self.closes[symbol] = mark.price
        effects.command("DEL", CLOSES_KEY)
        if self.closes:
            effects.hset(CLOSES_KEY, {s: _dumps(p) for s, p in self.closes.items()})
        if self.rules.report.after_close:
            self.report_due = self.day
            effects.hset(DAY_KEY, {"report_due": _dumps(self.day)})
        self.log.info("day closed", extra={"trading_day": self.day, "total": round(figures.account.total, 2),
                                           "realized": round(figures.account.realized, 2), "fills": figures.account.fills})

    # -- the figures -------------------------------------------------------------------------
    def mark(self, symbol: str, now_ns: int) -> marks.Mark[float]:
        saved = self.inputs.get(symbol, {})
        position = self.positions.get(symbol)
        inputs = marks.MarkInputs(
            mid=saved.get("mid"), mid_vouched_ns=saved.get("vouched_ns", 0), quote_problem=saved.get("problem"),
            tick=saved.get("tick"), tick_ts_ns=saved.get("tick_ts_ns", 0),
            avg_cost=position.avg_cost if position is not None and position.avg_cost > 0 else None,
            reference=self.references.get(symbol),
        )
        return marks.resolve(inputs, now_ns, self.mark_rules)

    def figures(self, now_ns: int) -> DayPnL:
        trades = [t for t in self.trades.values() if self.day is None or core.trading_day_of(t.ts_ns) == self.day]
        carried = core.carried(self.anchors, trades, self.closes, self.references)
        symbols = {c.symbol for c in carried} | {t.symbol for t in trades}
        return day_pnl(carried, trades, {symbol: self.mark(symbol, now_ns) for symbol in symbols})

    # -- the periodic tick ---------------------------------------------------------------------
    def tick(self, now_ns: int, effects: Effects) -> None:
        # Only once the close's batch is committed (its report_due is then in Redis, with
        # the final publication): a tick can run before its batch's commit.
        if self.report_due is not None and self.redis.hexists(DAY_KEY, "report_due"):
            self._write_report(self.report_due, effects)
        if self.day is None:
            return
        due = now_ns >= self.next_publish_ns or (self.dirty and now_ns - self.last_publish_ns >= MIN_GAP_NS)
        if due:
            self._publish(now_ns, effects, self.figures(now_ns), final=False)

    def _reconcile(self, now_ns: int, effects: Effects, figures: DayPnL) -> dict[str, Any]:
        """Each symbol against the broker's latest figures of this day (received at or after
        its open): a mismatch lasting pnl.reconcile_grace_s raises one pnl_mismatch alert
        naming the symbol; agreement resolves it."""
        grace_ns = int(self.rules.pnl.reconcile_grace_s * 1e9)
        models = {}
        for symbol in sorted(set(figures.symbols) | set(self.episodes)):
            line = figures.symbols.get(symbol)
            broker = self.broker.get(symbol)
            fresh = broker if broker is not None and broker.ts_ns >= self.open_ns else None
            judged = reconcile(line, fresh.figures if fresh else None) if line is not None else None
            if line is None and self.episodes.get(symbol) is not None and fresh is not None and not fresh.position:
                judged = Reconciliation("ok")  # flat here (no line today) and at the broker
            episode, action = core.next_episode(self.episodes.get(symbol), judged, now_ns, grace_ns)
            if episode != self.episodes.get(symbol):
                if episode is None:
                    self.episodes.pop(symbol, None)
                    effects.hdel(MISMATCH_KEY, symbol)
                else:
                    self.episodes[symbol] = episode
                    effects.hset(MISMATCH_KEY, {symbol: _dumps(episode.to_json())})
            if action is not None:
                self._mismatch_alert(effects, now_ns, symbol, action, judged, episode or self.episodes.get(symbol))
            if line is not None and judged is not None:
                models[symbol] = core.reconciliation_model(judged, episode, fresh.ts_ns if fresh else None)
        return models

    def _mismatch_alert(self, effects: Effects, now_ns: int, symbol: str, action: str, judged: Any, episode: Any) -> None:
        since = episode.since_ns if episode is not None else now_ns
        if action == "raise":
            message = f"{symbol}: P&L differs from the broker's: " + "; ".join(judged.problems)
            data = {"position_diff": judged.position_diff, "realized_diff": judged.realized_diff,
                    "unrealized_diff": judged.unrealized_diff, "daily_diff": judged.daily_diff, "since_ns": since}
            alert = Alert(alert_type=AlertType.PNL_MISMATCH, state=RAISED, severity="warning", symbol=symbol,
                          message=message[:1000], data={k: (round(v, 4) if isinstance(v, float) else v) for k, v in data.items()})
        else:
            alert = Alert(alert_type=AlertType.PNL_MISMATCH, state=RESOLVED, severity="info", symbol=symbol,
                          message=f"{symbol}: P&L agrees with the broker's again", data={})
        key = idempotency_key("alert", AlertType.PNL_MISMATCH, symbol, since, action)
        effects.publish("ev.alerts", make_event(alert, idempotency_key=key, source=SOURCE, ts_ns=now_ns))
        self.log.warning("P&L mismatch with the broker" if action == "raise" else "P&L agrees with the broker again",
                         extra={"symbol": symbol, "problems": list(judged.problems) if judged else []})

    def _publish(self, now_ns: int, effects: Effects, figures: DayPnL, final: bool) -> None:
        assert self.day is not None
        reconciliations = self._reconcile(now_ns, effects, figures)
        mismatched = [s for s, e in self.episodes.items() if e.alerted]
        body = core.payload(self.day, figures, final=final, reconciliations=reconciliations, mismatched=mismatched,
                            broker_account=self.broker_account)
        key = idempotency_key("pnl", self.day, "final" if final else now_ns // MIN_GAP_NS)
        event = make_event(body, idempotency_key=key, source=SOURCE, ts_ns=now_ns)
        effects.publish(OUT_STREAM, event)
        effects.command("DEL", state.PNL)
        effects.hset(state.PNL, state.pnl_fields(event))
        kind = "final" if final else ("fill" if self.dirty else "periodic")
        metrics.pnl_publications.labels(kind).inc()
        self._export(body)
        self.dirty = False
        self.last_publish_ns = now_ns
        self.next_publish_ns = now_ns + int(self.rules.pnl.publish_interval_s * 1e9)

    @staticmethod
    def _export(body: Any) -> None:
        scopes = {"account": body.account, **body.buckets}
        for scope, totals in scopes.items():
            for component in ("realized", "unrealized", "commissions", "total"):
                metrics.pnl_dollars.labels(scope, component).set(getattr(totals, component))
        metrics.pnl_commissions_pending.set(body.account.commissions_pending)
        metrics.pnl_marks_stale.set(body.account.marks_stale)

    def _write_report(self, day: str, effects: Effects) -> None:
        """After the close's commit (this runs at the next tick): the day's report."""
        self.report_due = None
        effects.hdel(DAY_KEY, "report_due")
        try:
            from qe import report

            where = report.write(self.redis, day, self.rules, self.home, generated_ns=self.clock.now_ns())
        except Exception as exc:  # noqa: BLE001 - a failed report never stops the P&L
            metrics.pnl_reports.labels("error").inc()
            self.log.exception("end-of-day report failed", extra={"trading_day": day, "error": repr(exc)})
            return
        metrics.pnl_reports.labels("ok").inc()
        self.log.info("end-of-day report written", extra={"trading_day": day, "path": str(where)})


def run() -> int:
    return daemon.run_consumer("pnl", "pnl", PnlHandler)
