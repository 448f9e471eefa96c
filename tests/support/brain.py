"""Builders for the Brain's plain inputs (pure tests and scenario tests)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from daemons.decision.engine import BrainView, EngineRules
from daemons.decision.service import DecisionHandler
from daemons.decision.model import (
    NS,
    BrainState,
    BucketSnap,
    ExposureSnap,
    Market,
    Outstanding,
    PositionView,
    SessionSnap,
    SymbolSnap,
)
from qe import config
from qe.clock import Clock
from qe.daemon import Context
from qe.exposure_math import potential_notional
from tests.support.processes import REPO

T0 = 1_700_000_000 * NS  # an arbitrary "now"
DAY = "2026-11-20"


def load_rules(**overrides) -> config.RiskRules:
    base = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    document = base.model_dump(mode="json")
    for section, values in overrides.items():
        current = document.get(section, {})
        document[section] = _merge(current, values) if isinstance(values, dict) else values
    return config.RiskRules.model_validate(document)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def engine_rules(**overrides) -> EngineRules:
    return EngineRules.from_rules(load_rules(**overrides))


def session(now_ns: int = T0, *, regime="MID", soft=False, hard=False, market_open=True, day=DAY, early_close=False,
            minutes_to_close=60.0) -> SessionSnap:
    return SessionSnap(
        snapshot_id=f"session:{now_ns}", event_id=f"ev-session-{now_ns}", now_ns=now_ns, trading_day=day,
        market_open=market_open, regime=regime, soft_window=soft, hard_window=hard, early_close=early_close,
        minutes_to_close=minutes_to_close,
    )


def market(bid: float, ask: float, truth: float | None = None, grpan: float | None = None, ts_ns: int = T0,
           print_count: int = 10, concentration: float = 60.0) -> Market:
    return Market(
        bid=bid, ask=ask, quote_ts_ns=ts_ns, truth_price=truth, truth_ts_ns=ts_ns if truth is not None else 0,
        grpan=grpan, concentration_pct=concentration, print_count=print_count, feature_ts_ns=ts_ns,
    )


def exposure(positions: dict[str, tuple[int, str, float]], equity: float, ts_ns: int = T0,
             open_orders: dict[str, tuple[int, int]] | None = None, buckets_max=None,
             orders_through: str | None = None) -> ExposureSnap:
    """positions: symbol -> (qty, bucket, mark). Percentages computed like the exposure worker."""
    open_orders = open_orders or {}
    symbols = {}
    gross = potential = 0.0
    bucket_cur: dict[str, float] = {"LT": 0.0, "MM_PURE": 0.0}
    bucket_pot: dict[str, float] = {"LT": 0.0, "MM_PURE": 0.0}
    for symbol, (qty, bucket, mark) in positions.items():
        buy, sell = open_orders.get(symbol, (0, 0))
        symbols[symbol] = SymbolSnap(qty, bucket, mark, buy, sell)
        gross += abs(qty) * mark
        pn = potential_notional(qty, buy, sell, mark)
        potential += pn
        bucket_cur[bucket] += abs(qty) * mark
        bucket_pot[bucket] += pn
    limits = buckets_max or {"LT": (80.0, 90.0), "MM_PURE": (20.0, 30.0)}
    return ExposureSnap(
        snapshot_id=f"exposure:{ts_ns}", event_id=f"ev-exposure-{ts_ns}", ts_ns=ts_ns, ok=equity > 0, equity=equity,
        gross_pct=gross / equity * 100, potential_pct=potential / equity * 100,
        buckets={b: BucketSnap(bucket_cur[b] / equity * 100, bucket_pot[b] / equity * 100, *limits[b]) for b in limits},
        symbols=symbols, orders_through=orders_through,
    )


def view(positions: dict[str, tuple[int, str, float]], equity: float, markets: dict[str, Market] | None = None,
         *, now_ns: int = T0, sess: SessionSnap | None = None, state: BrainState | None = None,
         universe: dict[str, str] | None = None, broker: bool = True, open_orders=None) -> BrainView:
    v = BrainView(
        state=state or BrainState(trading_day=DAY, broker_connected=broker),
        session=sess or session(now_ns),
        exposure=exposure(positions, equity, ts_ns=now_ns, open_orders=open_orders),
        positions={s: PositionView(q, b) for s, (q, b, _m) in positions.items()},
        markets=dict(markets or {}),
        universe=dict(universe or {}),
    )
    if state is None:
        v.state.broker_connected = broker
    return v


def outstanding(key: str, slot: str, symbol: str, side: str, qty: int, price: float, *, bucket="LT",
                classification="LT_LONG_DEC", issued_ns: int = T0, status=None, purpose=None, ttl_s=90.0,
                last_order_ts_ns=0, last_order_id: str | None = None) -> Outstanding:
    from daemons.decision.model import PURPOSE_OF_SLOT

    return Outstanding(
        key=key, slot=slot, symbol=symbol, side=side, qty=qty, bucket=bucket, classification=classification,
        order_type="LMT", limit_price=price, priority=60, intent_type=purpose or PURPOSE_OF_SLOT[slot], ttl_s=ttl_s,
        issued_ns=issued_ns, last_change_ns=issued_ns, status=status, last_order_ts_ns=last_order_ts_ns,
        last_order_id=last_order_id,
    )


class FixedClock(Clock):
    """A clock a test sets by hand (`clock.now = ...`)."""

    def __init__(self, now_ns: int) -> None:
        self.now = now_ns

    def now_ns(self) -> int:  # type: ignore[override]
        return self.now


def decision_handler(tmp_path: Path, universe: dict[str, str], now_ns: int = T0) -> DecisionHandler:
    """The Brain's real handler (daemons.decision.service) without Redis: the shipped rules,
    a universe file of `universe` (symbol -> bucket hint, ref price 25.00) and a FixedClock."""
    path = tmp_path / "universe.csv"
    path.write_text("symbol,bucket_hint,adv,group,ref_price\n"
                    + "".join(f"{symbol},{bucket},50000,G,25.00\n" for symbol, bucket in universe.items()))
    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    settings = config.Settings(redis_url="redis://127.0.0.1:1/0", universe_path=path)
    context = Context("decision", settings, rules, FixedClock(now_ns), None, logging.getLogger("test"))  # type: ignore[arg-type]
    return DecisionHandler(context)


__all__ = ["NS", "T0", "DAY", "replace", "engine_rules", "session", "market", "exposure", "view", "outstanding", "load_rules",
           "FixedClock", "decision_handler"]
