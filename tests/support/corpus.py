"""The dead-letter corpus: for every consumed stream, good events built with the real
writer code (real payload models + make_event + encode), and malformed or absurd
entries derived from them, each with the field its dead letter must name.

Three families:
* malformed: not an event at all (no `event` field, not JSON, invalid UTF-8, 100k
  nested brackets, wrong top-level type, missing/unknown fields, wrong event type);
* absurd but well formed JSON that the contracts refuse (NaN/Infinity/1e999, bool or
  string for a number, 100.0 for an int, prices <= 0 or above max_price, quantities
  of 10**400 / 1e300 / 100.5, times in 1970/2100 or ahead of the reader's clock,
  100 kB strings, deep free-form dicts);
* absurd but VALID events (pass every contract rule; daemons must handle them without
  an error): stub quotes, crossed quotes, quantities at the limit, negative equity,
  a $0.01 limit price...
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from qe.contracts import (
    L1,
    Account,
    Alert,
    BrokerPnL,
    BrokerState,
    BucketExposure,
    Control,
    Envelope,
    Exposure,
    Feature,
    Fill,
    GrpanWindow,
    DecisionJournal,
    Intent,
    JournalStep,
    PnL,
    PnLTotals,
    SymbolPnL,
    Order,
    Position,
    Print,
    Session,
    SymbolExposure,
    TruthTick,
    encode,
    intent_id_for,
    make_event,
)

S = 1_000_000_000
YEAR_1970_NS = 1
YEAR_2100_NS = 4_102_444_800 * S + 1
BIG_TEXT = "x" * 100_000
NUMBER = "__NUMBER__"  # placeholder replaced by a raw JSON token (NaN, Infinity, 1e999)


@dataclass
class Case:
    stream: str
    kind: str
    fields: dict[str, Any]  # what is XADDed (str or bytes values)
    expect: str  # substring the dead letter's reason must contain (the field named)
    good: bool = False
    valid_absurd: bool = False  # passes the contracts; the daemon must handle it
    key: str = ""
    entry_id: str = ""


@dataclass
class Spec:
    """Where, in a stream's sample event, the corpus finds a field of each kind."""

    price: tuple[str, ...] | None = None
    quantity: tuple[str, ...] | None = None
    quantity_signed: bool = False
    zero_price_valid: bool = False  # a position's avg_cost 0 is valid (a flat or gifted position, SPEC 9)
    timestamp: tuple[str, ...] | None = None
    text: tuple[str, ...] | None = None
    number: tuple[str, ...] | None = None  # a float field
    integer: tuple[str, ...] | None = None
    boolean: tuple[str, ...] | None = None
    required: str = ""  # a required payload field
    extra: list[tuple[str, tuple[str, ...], Any, str]] = field(default_factory=list)  # (kind, path, value, expect)


# --- good events (the real writer code) ------------------------------------------------------


def good_payload(stream: str, n: int, now_ns: int, symbol: str) -> Any:
    if stream == "ev.l1":
        return L1(symbol=symbol, bid=24.80, ask=24.84, bid_size=300 + n, ask_size=300, last=24.82, last_size=100,
                  venue="NYSE", quote_ts_ns=now_ns)
    if stream == "ev.prints":
        return Print(symbol=symbol, price=24.81, size=100, venue="NYSE", conditions=[], trade_ts_ns=now_ns)
    if stream == "ev.features":
        window = GrpanWindow(grpan_price=24.80, concentration_pct=60.0, print_count=5, deviation=0.01)
        return Feature(symbol=symbol, grpan_price=24.80, concentration_pct=60.0, print_count=5 + n, last_price=24.81,
                       deviation=0.01, windows={"5m": window},
                       truth_tick=TruthTick(price=24.81, size=100, venue="NYSE", ts_ns=now_ns))
    if stream == "ev.alerts":
        return Alert(alert_type="new_daily_high", state="raised", severity="info", symbol=symbol, message=f"corpus good {n}",
                     data={"n": n, "ratio": 0.5, "tags": ["a", "b"]})
    if stream == "ev.positions":
        if n % 2:
            return Account(account="DU123", net_liquidation=1_000_000.0 + n, buying_power=2_000_000.0)
        return Position(account="DU123", symbol=symbol, qty=1000 + n, avg_cost=24.5, bucket="LT")
    if stream == "ev.exposure":
        buckets = {"LT": BucketExposure(current_pct=2.5, potential_pct=2.5, target_pct=80.0, max_pct=90.0),
                   "MM_PURE": BucketExposure(current_pct=0.0, potential_pct=0.0, target_pct=20.0, max_pct=30.0)}
        line = SymbolExposure(qty=1000 + n, bucket="LT", mark=24.82, mark_source="l1_mid", notional=(1000 + n) * 24.82,
                              open_buy_qty=0, open_sell_qty=0, potential_notional=(1000 + n) * 24.82)
        return Exposure(equity=1_000_000.0, long_notional=(1000 + n) * 24.82, short_notional=0.0, gross_pct=2.5,
                        net_pct=2.5, potential_gross_pct=2.5, buckets=buckets, symbols={symbol: line})
    if stream == "ev.session":
        return Session(now_ns=now_ns, now_utc="2026-11-20T20:00:00+00:00", now_ny=f"corpus-{n}",
                       trading_day="2026-11-20", market_open=True, regime="MID", minutes_to_close=120.0,
                       soft_derisk_active=False, hard_derisk_active=False, early_close=False,
                       open_utc="2026-11-20T14:30:00+00:00", close_utc="2026-11-20T21:00:00+00:00")
    if stream == "ev.orders":
        return Order(order_ref=f"qe-corpus-{n}", broker_order_id=1000 + n, perm_id=5000 + n, intent_key=None,
                     symbol=symbol, side="BUY", qty=300, limit_price=24.80, bucket="LT", status="PARTIALLY_FILLED",
                     filled_qty=100, remaining_qty=200, avg_fill_price=24.80,
                     last_fill=Fill(exec_id=f"exec-{n}", qty=100, price=24.80, ts_ns=now_ns, commission=0.5),
                     external=True)
    if stream == "ev.intents":
        key = f"corpus:intent:{n}"
        return Intent(intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol=symbol, side="SELL", qty=100,
                      order_type="LMT", limit_price=24.90, bucket="LT", classification="LT_LONG_DEC", priority=60,
                      ttl_s=600.0, created_ns=now_ns, risk_delta_gross_pct=-0.2, reason=f"corpus good {n}",
                      causation_ids=[], trace={"rule": "corpus", "n": n})
    if stream == "ev.broker":
        return BrokerState(connected=True, orders_allowed=True, account="DU123", mode="paper", data_farm_ok=True,
                           last_code=2104, reason=f"corpus good {n}")
    if stream == "ev.control":
        return Control(command="resume", reason=f"corpus good {n}", operator=f"corpus-op-{n}")
    if stream == "ev.pnl":
        totals = PnLTotals(realized=12.5, unrealized=-3.0, commissions=1.0, total=8.5, fills=1 + n, symbols=1)
        line = SymbolPnL(bucket="LT", start_qty=1000, prev_close=24.80, prev_close_source="close", qty=900 + n,
                         avg_price=24.80, mark=24.82, mark_source="l1_mid", realized=12.5, unrealized=-3.0,
                         commissions=1.0, total=8.5, fills=1 + n, sold_qty=100)
        return PnL(trading_day="2026-11-20", account=totals, buckets={"LT": totals}, symbols={symbol: line})
    if stream == "ev.decision_journal":
        return DecisionJournal(steps=[JournalStep(kind="load", now_ns=now_ns),
                                      JournalStep(kind="handle", now_ns=now_ns, stream="ev.l1", id=f"{1 + n}-0"),
                                      JournalStep(kind="tick", now_ns=now_ns)])
    if stream == "ev.broker_pnl":
        return BrokerPnL(account="DU123", symbol=symbol, position=900 + n, daily=12.5, unrealized=-3.0, realized=None,
                         value=(900 + n) * 24.82)
    raise KeyError(stream)


def good_event(stream: str, n: int, now_ns: int, symbol: str) -> Envelope:
    payload = good_payload(stream, n, now_ns, symbol)
    key = f"corpus:{stream}:{n}" if stream != "ev.intents" else f"corpus:intent:{n}"
    return make_event(payload, idempotency_key=key, source="corpus", ts_ns=now_ns)


SPECS: dict[str, Spec] = {
    "ev.l1": Spec(price=("bid",), quantity=("bid_size",), timestamp=("quote_ts_ns",), text=("venue",), number=("ask",),
                  integer=("ask_size",), required="symbol",
                  extra=[("symbol_lowercase", ("symbol",), "cim prb", "payload.symbol")]),
    "ev.prints": Spec(price=("price",), quantity=("size",), timestamp=("trade_ts_ns",), text=("venue",),
                      number=("price",), integer=("size",), required="trade_ts_ns",
                      extra=[("conditions_10k", ("conditions",), ["F"] * 10_000, "payload.conditions")]),
    "ev.features": Spec(price=("truth_tick", "price"), quantity=("truth_tick", "size"), timestamp=("truth_tick", "ts_ns"),
                        text=("truth_tick", "venue"), number=("windows", "5m", "concentration_pct"),
                        integer=("print_count",), boolean=("windows", "5m", "stale"), required="concentration_pct",
                        extra=[("concentration_101", ("concentration_pct",), 101.0, "payload.concentration_pct")]),
    "ev.alerts": Spec(text=("message",), required="severity",
                      extra=[("data_NaN", ("data", "ratio"), NUMBER, "payload.data: Value error, NaN or infinity"),
                             ("data_1e999", ("data", "ratio"), 1e999, "payload.data: Value error, NaN or infinity"),
                             ("data_deep", ("data", "deep"), json.loads("[" * 20 + "]" * 20), "payload.data"),
                             ("data_huge", ("data", "blob"), ["y" * 1000] * 40, "payload.data"),
                             ("severity_unknown", ("severity",), "panic", "payload.severity")]),
    "ev.positions": Spec(price=("avg_cost",), quantity=("qty",), quantity_signed=True, zero_price_valid=True, text=("account",),
                         number=("avg_cost",), integer=("qty",), required="bucket",
                         extra=[("avg_cost_negative", ("avg_cost",), -24.5, "payload.avg_cost")]),
    "ev.exposure": Spec(price=("symbols", "CIM PRB", "mark"), quantity=("symbols", "CIM PRB", "qty"), quantity_signed=True,
                        text=("error",), number=("buckets", "LT", "current_pct"),
                        integer=("symbols", "CIM PRB", "open_buy_qty"), required="buckets",
                        extra=[("gross_negative", ("gross_pct",), -5.0, "payload.gross_pct"),
                               ("bucket_unknown", ("buckets", "XX"), {"current_pct": 1.0, "potential_pct": 1.0,
                                                                      "target_pct": 1.0, "max_pct": 1.0}, "payload.buckets")]),
    "ev.session": Spec(timestamp=("now_ns",), text=("now_utc",), number=("minutes_to_close",), boolean=("market_open",),
                       integer=("now_ns",), required="hard_derisk_active",
                       extra=[("regime_unknown", ("regime",), "LUNCH", "payload.regime")]),
    "ev.orders": Spec(price=("limit_price",), quantity=("qty",), timestamp=("last_fill", "ts_ns"), text=("order_ref",),
                      number=("last_fill", "commission"), integer=("filled_qty",), boolean=("external",),
                      required="status", extra=[("status_unknown", ("status",), "DONE", "payload.status"),
                                                ("avg_fill_zero", ("avg_fill_price",), 0.0, "payload.avg_fill_price")]),
    "ev.intents": Spec(price=("limit_price",), quantity=("qty",), timestamp=("created_ns",), text=("reason",),
                       number=("risk_delta_gross_pct",), integer=("priority",), required="classification",
                       extra=[("ttl_nan_as_string", ("ttl_s",), "NaN", "payload.ttl_s"),
                              ("ttl_year", ("ttl_s",), 31_536_000.0, "payload.ttl_s"),
                              ("trace_nan", ("trace", "x"), NUMBER, "payload.trace"),
                              ("off_grid", ("limit_price",), 24.905, "payload"),
                              ("causation_10k", ("causation_ids",), ["c"] * 10_000, "payload.causation_ids")]),
    "ev.broker": Spec(text=("reason",), integer=("last_code",), boolean=("connected",), required="connected",
                      extra=[("mode_unknown", ("mode",), "real", "payload.mode")]),
    "ev.control": Spec(text=("reason",), required="command",
                       extra=[("command_unknown", ("command",), "liquidate", "payload.command"),
                              ("operator_empty", ("operator",), "", "payload.operator")]),
}
GOOD_SYMBOL = "CIM PRB"  # the symbol of every good event (the exposure spec's paths name it)
ABSURD_SYMBOL = "NLY PRF"


def _set(doc: dict, path: tuple[str, ...], value: Any) -> dict:
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


def _raw(doc: dict, token: str | None = None) -> bytes:
    text = json.dumps(doc)
    if token is not None:
        text = text.replace(json.dumps(NUMBER), token)
    return text.encode()


def _loc(path: tuple[str, ...]) -> str:
    return "payload." + ".".join(path)


def malformed_cases(stream: str, good: Envelope, now_ns: int, other: Envelope) -> list[Case]:
    """Every kind of entry the contracts must refuse, each with the field it must be named by."""
    spec = SPECS[stream]
    base = json.loads(good.model_dump_json())
    type_name = good.type
    cases: list[Case] = []

    def doc() -> dict:
        return json.loads(json.dumps(base))

    def add(kind: str, event: Any, expect: str, **entry: Any) -> None:
        fields = {"type": type_name, "idk": f"bad:{kind}", **entry}
        if event is not None:
            fields["event"] = event
        cases.append(Case(stream, kind, fields, expect))

    def envelope(kind: str, name: str, value: Any, expect: str | None = None) -> None:
        add(kind, _raw({**doc(), name: value}), expect or name)

    def payload(kind: str, path: tuple[str, ...], value: Any, expect: str | None = None, token: str | None = None) -> None:
        add(kind, _raw(_set(doc(), ("payload", *path), value), token), expect or _loc(path))

    # -- malformed -------------------------------------------------------------------------
    add("no_event_field", None, "entry has no 'event' field", something="else")
    add("not_json", "{not json", "event: Invalid JSON")
    add("invalid_utf8", _raw(doc()).replace(b'"corpus"', b'"\xff\xfe\xfd"'), "event: Invalid JSON")
    add("nested_100k", b"[" * 100_000 + b"]" * 100_000, "event: Invalid JSON")
    add("json_array", b"[1, 2, 3]", "event:")
    add("json_null", b"null", "event:")
    add("empty_event", b"", "event: Invalid JSON")
    missing = doc()
    del missing["ts_ns"]
    add("missing_ts_ns", _raw(missing), "ts_ns: Field required")
    missing = doc()
    del missing["payload"][spec.required]
    add("missing_payload_field", _raw(missing), f"payload.{spec.required}: Field required")
    envelope("unknown_envelope_field", "surprise", 1, "surprise: Extra inputs are not permitted")
    payload("unknown_payload_field", ("surprise",), 1, "payload.surprise: Extra inputs are not permitted")
    add("wrong_event_type", other.model_dump_json(), "type", type=other.type)
    add("type_copy_disagrees", _raw(doc()), "type: entry field says", type=other.type)
    # -- envelope values -----------------------------------------------------------------------
    envelope("ts_1970", "ts_ns", YEAR_1970_NS, "ts_ns: Value error, timestamp before 2000-01-01")
    envelope("ts_2100", "ts_ns", YEAR_2100_NS, "ts_ns: Value error, timestamp")
    envelope("ts_60s_ahead", "ts_ns", now_ns + 60 * S, "ts_ns: Value error, timestamp")
    envelope("ts_string", "ts_ns", str(now_ns), "ts_ns: Input should be a valid integer")
    envelope("ts_float", "ts_ns", float(now_ns), "ts_ns: Input should be a valid integer")
    envelope("ts_bool", "ts_ns", True, "ts_ns: Input should be a valid integer")
    envelope("ts_10e400", "ts_ns", 10**400, "ts_ns")
    envelope("event_id_not_uuid", "event_id", "not-a-uuid", "event_id")
    envelope("schema_version_true", "schema_version", True, "schema_version")
    envelope("schema_version_2", "schema_version", 2, "schema_version")
    envelope("idempotency_key_100kB", "idempotency_key", BIG_TEXT, "idempotency_key: String should have at most")
    envelope("source_empty", "source", "", "source")
    envelope("causation_id_100kB", "causation_id", BIG_TEXT, "causation_id: String should have at most")
    envelope("payload_null", "payload", None, "payload")
    envelope("payload_string", "payload", "{}", "payload")
    # -- payload values --------------------------------------------------------------------------
    if spec.text:
        payload("text_100kB", spec.text, BIG_TEXT, _loc(spec.text) + ": String should have at most")
        payload("text_number", spec.text, 42)
    if spec.number:
        payload("number_NaN", spec.number, NUMBER, token="NaN")
        payload("number_Infinity", spec.number, NUMBER, token="-Infinity")
        payload("number_1e999", spec.number, NUMBER, token="1e999")
        payload("number_bool", spec.number, True)
        payload("number_string", spec.number, "24.90")
    if spec.integer:
        payload("int_as_float", spec.integer, 100.0, _loc(spec.integer) + ": Input should be a valid integer")
        payload("int_as_string", spec.integer, "100")
    if spec.boolean:
        payload("bool_as_int", spec.boolean, 1, _loc(spec.boolean) + ": Input should be a valid boolean")
        payload("bool_as_string", spec.boolean, "true")
    if spec.price:
        if not spec.zero_price_valid:
            payload("price_zero", spec.price, 0.0)
        payload("price_negative", spec.price, -24.8)
        payload("price_999999", spec.price, 999_999.0, _loc(spec.price) + ": Value error, price above max_price")
        payload("price_1e300", spec.price, 1e300)
        payload("price_true", spec.price, True)
    if spec.quantity:
        payload("qty_10e400", spec.quantity, 10**400, _loc(spec.quantity) + ": Value error, quantity beyond max_quantity")
        payload("qty_1e300", spec.quantity, 1e300)
        payload("qty_fraction", spec.quantity, 100.5)
        if spec.quantity_signed:
            payload("qty_minus_1e9", spec.quantity, -(10**9), _loc(spec.quantity) + ": Value error, quantity beyond")
        else:
            payload("qty_negative", spec.quantity, -100)
    if spec.timestamp:
        payload("payload_ts_1970", spec.timestamp, YEAR_1970_NS, _loc(spec.timestamp) + ": Value error, timestamp before")
        payload("payload_ts_2100", spec.timestamp, YEAR_2100_NS, _loc(spec.timestamp) + ": Value error, timestamp")
    for kind, path, value, expect in spec.extra:
        payload(kind, path, value, expect, token="NaN" if value == NUMBER else None)
    return cases


# --- absurd but valid: the contracts let them through, the daemons must cope ---------------------


def valid_absurd_payloads(stream: str, now_ns: int, symbol: str) -> list[tuple[str, Any]]:
    """(kind, payload) pairs that pass every contract rule but no sane market sends. They
    use another symbol than the good events (so the good events' effects can be checked
    exactly), except intents, which act on the symbol the simulated account holds."""
    held = symbol
    symbol = ABSURD_SYMBOL
    max_qty = 100_000_000  # plausibility.max_quantity in etc/risk_rules.yaml
    if stream == "ev.l1":
        return [("stub_quote", L1(symbol=symbol, bid=0.01, ask=9999.99, bid_size=1, ask_size=1, quote_ts_ns=now_ns)),
                ("crossed_quote", L1(symbol=symbol, bid=26.0, ask=24.0, bid_size=100, ask_size=100, quote_ts_ns=now_ns)),
                ("max_sizes", L1(symbol=symbol, bid=24.80, ask=24.84, bid_size=max_qty, ask_size=max_qty, quote_ts_ns=now_ns)),
                ("one_sided", L1(symbol=symbol, bid=None, ask=24.84, bid_size=0, ask_size=100, quote_ts_ns=now_ns))]
    if stream == "ev.prints":
        return [("print_far_away", Print(symbol=symbol, price=9999.0, size=100, venue="NYSE", trade_ts_ns=now_ns)),
                ("print_max_size", Print(symbol=symbol, price=24.81, size=max_qty, venue="NYSE", trade_ts_ns=now_ns)),
                ("print_a_year_old", Print(symbol=symbol, price=24.81, size=100, venue="NYSE",
                                           trade_ts_ns=now_ns - 365 * 86_400 * S))]
    if stream == "ev.features":
        return [("feature_penny", Feature(symbol=symbol, grpan_price=0.01, concentration_pct=100.0, print_count=1,
                                          deviation=-9999.0, truth_tick=TruthTick(price=0.01, size=max_qty, venue="X",
                                                                                  ts_ns=now_ns)))]
    if stream == "ev.alerts":
        return [("alert_stale_all", Alert(alert_type="l1_stale", state="raised", severity="critical", symbol=None, message="",
                                          data={"deep": [[[[[[1]]]]]]}))]
    if stream == "ev.positions":
        return [("position_max_qty", Position(account="DU123", symbol=symbol, qty=max_qty, avg_cost=9999.99, bucket="LT")),
                ("position_min_qty", Position(account="DU123", symbol="AGNCM", qty=-max_qty, avg_cost=0.01, bucket="MM_PURE")),
                ("position_flat", Position(account="DU123", symbol="CIM PRA", qty=0, avg_cost=0.0, bucket="LT")),
                ("equity_negative", Account(account="DU123", net_liquidation=-5.0)),
                ("equity_zero", Account(account="DU123", net_liquidation=0.0)),
                ("equity_back", Account(account="DU123", net_liquidation=1_000_000.0))]
    if stream == "ev.exposure":
        buckets = {"LT": BucketExposure(current_pct=45_003.0, potential_pct=45_003.0, target_pct=80.0, max_pct=90.0)}
        return [("gross_45003_pct", Exposure(equity=1.0, long_notional=450.03, short_notional=0.0, gross_pct=45_003.0,
                                             net_pct=45_003.0, potential_gross_pct=45_003.0, buckets=buckets)),
                ("exposure_error", Exposure(status="error", error="equity <= 0", equity=-5.0, long_notional=0.0,
                                            short_notional=0.0, gross_pct=None, net_pct=None, potential_gross_pct=None,
                                            buckets={}))]
    if stream == "ev.session":
        return [("session_week_past_close", Session(now_ns=now_ns, now_utc="", now_ny="", trading_day=None, market_open=True,
                                                    regime="CLOSED", minutes_to_close=-10_080.0, soft_derisk_active=True,
                                                    hard_derisk_active=True, early_close=True))]
    if stream == "ev.orders":
        return [("order_max_qty", Order(order_ref="qe-absurd", symbol=symbol, side="SELL", qty=max_qty, limit_price=0.01,
                                        bucket="LT", status="SUBMITTED", filled_qty=0, remaining_qty=max_qty, external=True)),
                ("order_overfilled", Order(order_ref="qe-absurd-2", symbol=symbol, side="BUY", qty=100, bucket="LT",
                                           status="FILLED", filled_qty=max_qty, remaining_qty=0, external=True))]
    if stream == "ev.intents":
        def intent(key: str, **changes: Any) -> Intent:
            fields = dict(intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol=symbol, side="SELL", qty=100,
                          order_type="LMT", limit_price=0.01, bucket="LT", classification="LT_LONG_DEC", priority=60,
                          ttl_s=600.0, created_ns=now_ns, risk_delta_gross_pct=-0.2, reason="absurd")
            fields.update(changes)
            return Intent(**fields)

        symbol = held
        return [("intent_sell_at_a_penny", intent("absurd:intent:penny")),
                ("intent_buy_at_2400", intent("absurd:intent:2400", side="BUY", classification="LT_LONG_INC",
                                              limit_price=2400.0, risk_delta_gross_pct=0.2)),
                ("intent_max_qty", intent("absurd:intent:maxqty", qty=max_qty, limit_price=24.90)),
                ("intent_modify_to_9999", intent("absurd:intent:modify", action="MODIFY",
                                                 target_intent_key="corpus:intent:0", limit_price=9999.99))]
    if stream == "ev.broker":
        return [("broker_code_huge", BrokerState(connected=False, orders_allowed=False, last_code=999_999, reason="")),
                ("broker_back", BrokerState(connected=True, account="DU123", mode="paper", last_code=2104, reason="ok"))]
    if stream == "ev.control":
        return [("control_resume_unknown_operator", Control(command="resume", reason="r" * 1000, operator="o" * 64))]
    raise KeyError(stream)


def stream_corpus(stream: str, now_ns: int, symbol: str, goods: int = 8) -> list[Case]:
    """Good events interleaved with every malformed and absurd case of one stream."""
    other_stream = "ev.control" if stream != "ev.control" else "ev.l1"
    other = good_event(other_stream, 0, now_ns, symbol)
    good = [good_event(stream, n, now_ns, symbol) for n in range(goods)]
    bad = malformed_cases(stream, good[0], now_ns, other)
    absurd = [
        Case(stream, kind, encode(make_event(payload, idempotency_key=f"absurd:{stream}:{kind}", source="corpus",
                                             ts_ns=now_ns)), "", valid_absurd=True, key=f"absurd:{stream}:{kind}")
        for kind, payload in valid_absurd_payloads(stream, now_ns, symbol)
    ]
    # The absurd-but-valid ones first: the last good event is then the last valid event
    # of its stream, so the daemons' final state shows it.
    rest = absurd + bad
    every = max(1, len(rest) // goods)
    cases: list[Case] = []
    for n, event in enumerate(good):
        cases.append(Case(stream, f"good_{n}", encode(event), "", good=True, key=event.idempotency_key))
        cases.extend(rest[n * every:(n + 1) * every])
    cases.extend(rest[len(good) * every:])
    # A MODIFY must come after the order it modifies (the first good intent) exists.
    late = [c for c in cases if c.kind in LATE_KINDS]
    return [c for c in cases if c.kind not in LATE_KINDS] + late


LATE_KINDS = frozenset({"intent_modify_to_9999"})


def now_ns() -> int:
    return time.time_ns()


def new_uuid() -> str:
    return str(uuid.uuid4())


Factory = Callable[[str, int, int, str], Any]
