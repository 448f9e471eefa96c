"""A whole afternoon, 15:30 -> close, driven by synthetic events (no simulator).

The real handler runs in the real consumer runtime on a real Redis, on a manual
clock the test advances. The test plays every other daemon: the session worker
(regimes and windows from the XNYS close, 16:00 or 13:00 on an early-close day),
the exposure worker (snapshots every 15 s and after every fill), market data (a
steady market: bid 24.95 / ask 25.05, truth ticks at 25.00) and execution (acks
every NEW intent, applies MODIFY and CANCEL, fills passive orders slowly (100
shares every 90 s) and marketable ones at once, expires orders at their TTL).

Checks: the mode sequence, soft intents at truth tick -/+ $0.01, hard intents at
the bid / ask in chunks of ~10 % of the excess, every intent reduce-only, and gross
<= 100 % by the close; the same on an early-close day.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from daemons.decision.service import DecisionHandler
from qe import config, streams
from qe.clock import Clock, to_ns
from qe.contracts import (
    L1,
    Account,
    BrokerState,
    BucketExposure,
    Exposure,
    Feature,
    Order,
    Position,
    Session,
    SymbolExposure,
    TruthTick,
    make_event,
    order_ref_for,
)
from qe.daemon import Context
from qe.exposure_math import potential_notional
from tests.support.brain import load_rules
from tests.support.processes import REPO

NY = ZoneInfo("America/New_York")
EQUITY = 1_000_000.0
BID, ASK, TRUTH, MID = 24.95, 25.05, 25.00, 25.00
# 125 % gross: LT longs and a short, MM inventory long and short.
PORTFOLIO = {
    "CIM PRB": (14000, "LT"),
    "AGNCN": (12000, "LT"),
    "NLY PRF": (10000, "LT"),
    "NYCB PRU": (-4000, "LT"),
    "CIM PRC": (6000, "MM_PURE"),
    "NLY PRG": (-4000, "MM_PURE"),
}
STEP_S = 2


class ManualClock(Clock):
    def __init__(self, start_ns: int) -> None:
        self.t = start_ns

    def now_ns(self) -> int:
        return self.t

    def wall_seconds(self, sim_seconds: float) -> float:
        return 0.0  # the consumer's tick runs on every loop: the test owns time

    def describe(self) -> str:
        return "manual"


@dataclass
class LiveOrder:
    key: str
    symbol: str
    side: str
    qty: int
    price: float
    bucket: str
    intent_type: str
    created_ns: int
    ttl_s: float
    filled: int = 0
    fills_done: int = 0  # passive fills so far (one per 90 s of age)

    @property
    def remaining(self) -> int:
        return self.qty - self.filled


class Afternoon:
    def __init__(self, r, close: datetime, clock: ManualClock) -> None:
        self.r = r
        self.close = close
        self.clock = clock
        self.publisher = streams.Publisher(r, load_rules())
        self.positions = {s: q for s, (q, _b) in PORTFOLIO.items()}
        self.buckets = {s: b for s, (_q, b) in PORTFOLIO.items()}
        self.orders: dict[str, LiveOrder] = {}
        self.seen_intents = "0-0"
        self.intents: list[dict] = []
        self.seq = 0
        self.last_exposure_ns = 0
        self.modes: list[tuple[datetime, str]] = []

    # -- publishing ---------------------------------------------------------------------
    def publish(self, stream: str, payload) -> None:
        self.seq += 1
        event = make_event(payload, idempotency_key=f"world:{stream}:{self.seq}", source="world", ts_ns=self.clock.now_ns())
        self.publisher.publish(stream, event)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.t / 1e9, tz=NY)

    def session(self) -> None:
        now = self.now()
        minutes = (self.close - now).total_seconds() / 60
        is_open = minutes > 0
        regime = "CLOSED" if not is_open else ("CLOSE" if minutes <= 15 else "LATE")
        self.publish("ev.session", Session(
            now_ns=self.clock.t, now_utc=now.astimezone(ZoneInfo("UTC")).isoformat(), now_ny=now.isoformat(),
            trading_day=now.date().isoformat(), market_open=is_open, regime=regime,
            minutes_to_close=max(minutes, 0.0) if is_open else None,
            soft_derisk_active=is_open and minutes <= 15, hard_derisk_active=is_open and minutes <= 2,
            early_close=self.close.hour == 13, close_utc=self.close.astimezone(ZoneInfo("UTC")).isoformat()))

    def market(self) -> None:
        for symbol in PORTFOLIO:
            self.publish("ev.l1", L1(symbol=symbol, bid=BID, ask=ASK, bid_size=1000, ask_size=1000))
            self.publish("ev.features", Feature(symbol=symbol, grpan_price=TRUTH, concentration_pct=70, print_count=15,
                                                truth_tick=TruthTick(price=TRUTH, size=100, venue="NYSE", ts_ns=self.clock.t)))

    def gross_pct(self) -> float:
        return sum(abs(q) * MID for q in self.positions.values()) / EQUITY * 100

    def exposure(self) -> None:
        open_buy = {s: 0 for s in PORTFOLIO}
        open_sell = {s: 0 for s in PORTFOLIO}
        for order in self.orders.values():
            (open_buy if order.side == "BUY" else open_sell)[order.symbol] += order.remaining
        symbols, buckets = {}, {"LT": [0.0, 0.0], "MM_PURE": [0.0, 0.0]}
        potential = 0.0
        for symbol, qty in self.positions.items():
            pn = potential_notional(qty, open_buy[symbol], open_sell[symbol], MID)
            potential += pn
            buckets[self.buckets[symbol]][0] += abs(qty) * MID
            buckets[self.buckets[symbol]][1] += pn
            symbols[symbol] = SymbolExposure(qty=qty, bucket=self.buckets[symbol], mark=MID, mark_source="l1_mid",
                                             notional=qty * MID, open_buy_qty=open_buy[symbol],
                                             open_sell_qty=open_sell[symbol], potential_notional=pn)
        long_n = sum(q * MID for q in self.positions.values() if q > 0)
        short_n = sum(-q * MID for q in self.positions.values() if q < 0)
        limits = {"LT": (80.0, 90.0), "MM_PURE": (20.0, 30.0)}
        self.publish("ev.exposure", Exposure(
            equity=EQUITY, long_notional=long_n, short_notional=short_n, gross_pct=(long_n + short_n) / EQUITY * 100,
            net_pct=(long_n - short_n) / EQUITY * 100, potential_gross_pct=potential / EQUITY * 100,
            buckets={b: BucketExposure(current_pct=v[0] / EQUITY * 100, potential_pct=v[1] / EQUITY * 100,
                                       target_pct=limits[b][0], max_pct=limits[b][1]) for b, v in buckets.items()},
            symbols=symbols))
        self.last_exposure_ns = self.clock.t

    def order_event(self, order: LiveOrder, status: str) -> None:
        self.publish("ev.orders", Order(order_ref=order_ref_for(order.key), intent_key=order.key, symbol=order.symbol,
                                        side=order.side, qty=order.qty, limit_price=order.price, bucket=order.bucket,
                                        status=status, filled_qty=order.filled, remaining_qty=order.remaining))

    # -- execution ----------------------------------------------------------------------
    def execute(self) -> bool:
        changed = False
        for entry_id, fields in self.r.xrange("ev.intents", min=f"({self.seen_intents}"):
            self.seen_intents = entry_id.decode()
            envelope = json.loads(fields[b"event"])
            intent = envelope["payload"]
            self.intents.append({**intent, "key": envelope["idempotency_key"], "at": self.now()})
            if intent["action"] == "NEW":
                order = LiveOrder(envelope["idempotency_key"], intent["symbol"], intent["side"], intent["qty"],
                                  intent["limit_price"], intent["bucket"], intent["intent_type"], self.clock.t, intent["ttl_s"])
                self.orders[order.key] = order
                self.order_event(order, "SUBMITTED")
            elif intent["target_intent_key"] in self.orders:
                order = self.orders[intent["target_intent_key"]]
                if intent["action"] == "MODIFY":
                    order.price = intent["limit_price"]
                    self.order_event(order, "SUBMITTED")
                else:
                    del self.orders[order.key]
                    self.order_event(order, "CANCELLED")
            changed = True
        return changed

    def fill(self) -> bool:
        """Marketable orders fill at once; passive ones 100 shares every 90 s (a thin
        afternoon: soft de-risk alone does not get to 100 % before the hard window)."""
        changed = False
        for key, order in list(self.orders.items()):
            marketable = (order.side == "SELL" and order.price <= BID) or (order.side == "BUY" and order.price >= ASK)
            age_s = (self.clock.t - order.created_ns) / 1e9
            if self.clock.t > order.created_ns + order.ttl_s * 1e9:
                del self.orders[key]
                self.order_event(order, "EXPIRED")
                changed = True
                continue
            if marketable:
                qty = order.remaining
            elif age_s >= 90 * (order.fills_done + 1):
                order.fills_done += 1
                qty = min(order.remaining, 100)
            else:
                continue
            order.filled += qty
            sign = 1 if order.side == "BUY" else -1
            self.positions[order.symbol] += sign * qty
            done = order.remaining == 0
            if done:
                del self.orders[key]
            self.order_event(order, "FILLED" if done else "PARTIALLY_FILLED")
            self.publish("ev.positions", Position(account="DU1", symbol=order.symbol, qty=self.positions[order.symbol],
                                                  avg_cost=25.0, bucket=self.buckets[order.symbol]))
            changed = True
        return changed


class CountingHandler(DecisionHandler):
    """The real handler; counts the world's events it has handled, so the test only
    calls the consumer when there is something to read (an empty blocking read
    would cost Redis's timer resolution, ~100 ms, every time)."""

    world_events = 0

    def handle(self, event, effects) -> None:
        super().handle(event, effects)
        if event.source == "world":
            self.world_events += 1


def run_afternoon(r, day: datetime, close: datetime, minutes: int = 30) -> Afternoon:
    start = close - timedelta(minutes=minutes)
    clock = ManualClock(to_ns(start))
    rules = load_rules(
        runtime={"block_ms": 5, "batch_size": 500},
        decision={"evaluate_min_gap_s": 0.0},
        strategies={"mm": {"enabled": False}, "lt_band": {"enabled": False}},
    )
    settings = config.Settings(home=REPO)
    context = Context("decision", settings, rules, clock, r, logging.getLogger("scenario"))
    handler = CountingHandler(context)
    consumer = streams.Consumer(r=r, daemon="decision", group="decision_engine", handler=handler,
                                rules=rules, clock=clock, consumer_name="scenario")
    world = Afternoon(r, close, clock)
    world.publish("ev.broker", BrokerState(connected=True, account="DU1", mode="paper"))
    world.publish("ev.positions", Account(account="DU1", net_liquidation=EQUITY))
    for symbol, qty in world.positions.items():
        world.publish("ev.positions", Position(account="DU1", symbol=symbol, qty=qty, avg_cost=25.0, bucket=world.buckets[symbol]))
    world.market()
    world.exposure()
    end = to_ns(close + timedelta(seconds=30))
    while clock.t <= end:
        world.session()
        if clock.t - world.last_exposure_ns >= 15e9:
            world.exposure()
        if int(clock.t / 1e9) % 30 == 0:
            world.market()
        for _ in range(6):  # let the Brain see this step's events and the world answer its intents
            while handler.world_events < world.seq:
                consumer.run_once()
            changed = world.execute()
            changed = world.fill() or changed
            if changed:
                world.exposure()
            else:
                break
        mode = json.loads(r.hget("state:decision", "mode") or b'"NORMAL"')
        if not world.modes or world.modes[-1][1] != mode:
            world.modes.append((world.now(), mode))
        clock.t += STEP_S * 1_000_000_000
    return world


def check_afternoon(world: Afternoon, close: datetime) -> None:
    modes = [mode for _at, mode in world.modes]
    assert modes[:3] == ["SOFT_DERISK", "HARD_DERISK", "NORMAL"], world.modes
    at = {mode: when for when, mode in world.modes}
    assert close - timedelta(minutes=2) <= at["HARD_DERISK"] < close - timedelta(minutes=1)

    new = [i for i in world.intents if i["action"] == "NEW"]
    assert new and all(i["classification"].endswith("_DEC") for i in new)  # every one reduce-only
    soft = [i for i in new if i["intent_type"] == "SOFT_DERISK"]
    hard = [i for i in new if i["intent_type"] == "HARD_DERISK"]
    assert soft and hard
    for intent in soft:  # truth tick -/+ 1 cent, inside the bid/ask
        assert intent["limit_price"] == (24.99 if intent["side"] == "SELL" else 25.01), intent
    for intent in [i for i in world.intents if i["action"] == "MODIFY" and i["intent_type"] == "SOFT_DERISK"]:
        assert intent["limit_price"] == (24.99 if intent["side"] == "SELL" else 25.01)
    for intent in hard:  # longs hit the bid, shorts lift the ask
        assert intent["limit_price"] == (BID if intent["side"] == "SELL" else ASK), intent
        assert close - timedelta(minutes=2) <= intent["at"] < close
    # MM_PURE before LT in the hard ranking; chunks of ~10 % of the excess.
    first_step = [i for i in hard if i["at"] == hard[0]["at"]]
    assert first_step[0]["bucket"] == "MM_PURE" or all(i["bucket"] == "LT" for i in hard)
    excess = hard[0]["trace"]["numbers"]["excess_at_start_notional"]
    step_notional = sum(i["qty"] * MID for i in first_step)
    assert 0.10 * excess <= step_notional <= 0.10 * excess + 100 * MID * len(first_step)
    steps = sorted({i["trace"]["numbers"]["step"] for i in hard})
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 10
    assert world.gross_pct() <= 100.0 + 1e-9, world.gross_pct()
    # Nothing was ever sold beyond a position (no side flipped).
    for symbol, (qty, _bucket) in PORTFOLIO.items():
        assert world.positions[symbol] * qty >= 0 and abs(world.positions[symbol]) <= abs(qty)


@pytest.mark.slow
def test_afternoon_on_a_normal_day(r):
    day = datetime(2026, 11, 20, tzinfo=NY)
    close = day.replace(hour=16)
    world = run_afternoon(r, day, close)
    check_afternoon(world, close)


@pytest.mark.slow
def test_afternoon_on_an_early_close_day(r):
    day = datetime(2026, 11, 27, tzinfo=NY)  # the day after Thanksgiving: XNYS closes at 13:00
    close = day.replace(hour=13)
    world = run_afternoon(r, day, close)
    check_afternoon(world, close)
