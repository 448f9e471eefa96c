"""Strict contracts (SPEC 9): no coercion, no NaN/inf, bounded prices, quantities,
timestamps (against the READER's clock) and text, for readers (decode, JSON mode) and
for producers (construction, Python mode). Pure: no Redis."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any, Iterator

import pytest
from pydantic import ValidationError

from qe import config
from qe.contracts import (
    L1,
    STREAM_TYPES,
    Account,
    Alert,
    BucketExposure,
    DecodeError,
    Intent,
    Limits,
    Position,
    Print,
    decode,
    encode,
    make_event,
)
from tests.support.corpus import GOOD_SYMBOL, good_event
from tests.support.processes import REPO

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
LIMITS = Limits.from_rules(RULES.plausibility)
S = 1_000_000_000
NOW = 1_795_000_000 * S  # the reader's clock (2026-11-19)
SAMPLES = {stream: good_event(stream, 1, NOW, GOOD_SYMBOL) for stream in STREAM_TYPES}
SAMPLES["ev.positions:account"] = good_event("ev.positions", 0 + 1, NOW, GOOD_SYMBOL)  # n odd: an Account
SAMPLES["ev.positions"] = good_event("ev.positions", 2, NOW, GOOD_SYMBOL)  # n even: a Position


def stream_of(name: str) -> str:
    return name.split(":")[0]


def read(stream: str, document: Any, *, now_ns: int = NOW, limits: Limits = LIMITS, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(document).encode()
    return decode(stream, {b"event": data}, limits, now_ns)


def leaves(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, (*path, index))
    else:
        yield path, node


def replaced(document: dict, path: tuple, value: Any) -> dict:
    copy = json.loads(json.dumps(document))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copy


def free_form(path: tuple) -> bool:
    """Alert.data / Intent.trace: any JSON, checked as a whole (named by the dict)."""
    return path[:2] in (("payload", "data"), ("payload", "trace"))


def named(path: tuple) -> str:
    if free_form(path):
        return ".".join(str(p) for p in path[:2])
    return ".".join(str(p) for p in path)


def all_leaves(kind: type) -> list[tuple[str, tuple, dict]]:
    out = []
    for name, event in SAMPLES.items():
        document = json.loads(event.model_dump_json())
        for path, value in leaves(document):
            if type(value) is kind:
                out.append((name, path, document))
    return out


FLOATS = all_leaves(float)
INTS = [(n, p, d) for n, p, d in all_leaves(int) if p != ("schema_version",)]
STRINGS = all_leaves(str)
BOOLS = all_leaves(bool)


def test_the_samples_cover_every_stream_and_every_kind_of_field():
    assert {stream_of(n) for n in SAMPLES} == set(STREAM_TYPES)
    for name, event in SAMPLES.items():
        read(stream_of(name), json.loads(event.model_dump_json()))  # the real writers' events are valid
    assert len(FLOATS) > 30 and len(INTS) > 30 and len(STRINGS) > 40 and len(BOOLS) > 5
    # Nested dicts of floats (exposure buckets and symbols, feature windows) are among them.
    assert any(p[:2] == ("payload", "buckets") for _n, p, _d in FLOATS)
    assert any(p[:2] == ("payload", "windows") for _n, p, _d in FLOATS)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_no_float_anywhere_accepts_nan_or_infinity(token):
    accepted = []
    for name, path, document in FLOATS:
        text = json.dumps(replaced(document, path, "__X__")).replace('"__X__"', token)
        try:
            read(stream_of(name), None, raw=text.encode())
            accepted.append((name, named(path)))
        except DecodeError as exc:
            assert named(path) in exc.reason, (path, exc.reason)
    assert accepted == []


@pytest.mark.parametrize("value", [True, False, "24.90", "1", None, [1.0], {"v": 1.0}])
def test_no_float_field_is_coerced_from_another_type(value):
    accepted = []
    for name, path, document in FLOATS:
        try:
            read(stream_of(name), replaced(document, path, value))
            if not (value is None or free_form(path)):  # null: optional fields; free-form: any JSON
                accepted.append((name, named(path)))
        except DecodeError as exc:
            # (a null limit_price is refused by the whole intent: "a LMT intent needs a limit_price")
            assert named(path) in exc.reason or value is None, (path, exc.reason)
    assert accepted == []


def test_a_float_field_accepts_a_json_integer():
    """JSON has one number type: 24 is a fine price, 1000000 a fine equity."""
    for name, path, document in FLOATS:
        if free_form(path):
            continue
        value = replaced(document, path, 0)  # the sign/limits of 0 aside: the type is accepted
        try:
            read(stream_of(name), value)
        except DecodeError as exc:
            assert "valid number" not in exc.reason, (path, exc.reason)


@pytest.mark.parametrize("value", [100.0, 1e300, 100.5, True, "100", 10**400, -(10**400)])
def test_no_integer_field_accepts_a_float_bool_string_or_unbounded_number(value):
    accepted = []
    for name, path, document in INTS:
        try:
            read(stream_of(name), replaced(document, path, value))
            if not free_form(path):
                accepted.append((name, named(path)))
        except DecodeError as exc:
            assert named(path) in exc.reason, (path, exc.reason)
    assert accepted == []


@pytest.mark.parametrize("value", [1, 0, "true", "false", 1.0])
def test_no_bool_field_accepts_a_number_or_string(value):
    accepted = []
    for name, path, document in BOOLS:
        try:
            read(stream_of(name), replaced(document, path, value))
            if not free_form(path):
                accepted.append((name, named(path)))
        except DecodeError as exc:
            assert named(path) in exc.reason, (path, exc.reason)
    assert accepted == []


def test_every_text_is_bounded_including_dict_keys():
    accepted = []
    big = "A" * 100_000
    for name, path, document in STRINGS:
        try:
            read(stream_of(name), replaced(document, path, big))
            accepted.append((name, named(path)))
        except DecodeError as exc:
            assert named(path) in exc.reason or path[-1] in exc.reason, (path, exc.reason)
    assert accepted == []
    # Keys of per-symbol maps are bounded too.
    exposure = json.loads(SAMPLES["ev.exposure"].model_dump_json())
    exposure["payload"]["symbols"] = {big: exposure["payload"]["symbols"][GOOD_SYMBOL]}
    with pytest.raises(DecodeError, match="payload.symbols"):
        read("ev.exposure", exposure)


def test_lists_and_free_form_dicts_are_bounded():
    prints = json.loads(SAMPLES["ev.prints"].model_dump_json())
    with pytest.raises(DecodeError, match="payload.conditions"):
        read("ev.prints", replaced(prints, ("payload", "conditions"), ["F"] * 1000))
    alert = json.loads(SAMPLES["ev.alerts"].model_dump_json())
    for data in ({"k": [[[[[[[[[[[1]]]]]]]]]]]}, {str(n): n for n in range(5000)}, {"blob": "x" * 20_000}):
        with pytest.raises(DecodeError, match="payload.data: Value error"):
            read("ev.alerts", replaced(alert, ("payload", "data"), data))
    intent = json.loads(SAMPLES["ev.intents"].model_dump_json())
    with pytest.raises(DecodeError, match="payload.causation_ids"):
        read("ev.intents", replaced(intent, ("payload", "causation_ids"), ["c"] * 1000))


@pytest.mark.parametrize(("stream", "path"), [
    ("ev.l1", ("payload", "bid")), ("ev.prints", ("payload", "price")), ("ev.intents", ("payload", "limit_price")),
    ("ev.orders", ("payload", "last_fill", "price")), ("ev.features", ("payload", "truth_tick", "price")),
    ("ev.exposure", ("payload", "symbols", GOOD_SYMBOL, "mark")),
])
def test_prices_are_positive_and_at_most_the_readers_max_price(stream, path):
    document = json.loads(SAMPLES[stream].model_dump_json())
    for bad in (0, -0.01, -24.8, RULES.plausibility.max_price + 0.01, 999_999.0):
        with pytest.raises(DecodeError, match=named(path)):
            read(stream, replaced(document, path, bad))
    read(stream, replaced(document, path, RULES.plausibility.max_price if stream != "ev.intents" else 9999.99))
    # A reader with a smaller max_price refuses what another one accepts.
    small = Limits(max_price=20.0, max_quantity=LIMITS.max_quantity, max_future_skew_ns=LIMITS.max_future_skew_ns)
    with pytest.raises(DecodeError, match=f"{named(path)}: Value error, price above max_price 20"):
        read(stream, document, limits=small)


def test_quantities_are_whole_and_bounded_signed_ones_in_absolute_value():
    position = json.loads(SAMPLES["ev.positions"].model_dump_json())
    top = RULES.plausibility.max_quantity
    for good in (0, top, -top, -100):
        read("ev.positions", replaced(position, ("payload", "qty"), good))
    for bad in (top + 1, -top - 1, 10**400, -(10**400), 1e300, 100.5, 100.0):
        with pytest.raises(DecodeError, match="payload.qty"):
            read("ev.positions", replaced(position, ("payload", "qty"), bad))
    l1 = json.loads(SAMPLES["ev.l1"].model_dump_json())
    for bad in (-1, top + 1):
        with pytest.raises(DecodeError, match="payload.bid_size"):
            read("ev.l1", replaced(l1, ("payload", "bid_size"), bad))


TIMESTAMPS = [("ev.l1", ("ts_ns",)), ("ev.l1", ("payload", "quote_ts_ns")), ("ev.prints", ("payload", "trade_ts_ns")),
              ("ev.features", ("payload", "truth_tick", "ts_ns")), ("ev.session", ("payload", "now_ns")),
              ("ev.intents", ("payload", "created_ns")), ("ev.orders", ("payload", "last_fill", "ts_ns"))]


@pytest.mark.parametrize(("stream", "path"), TIMESTAMPS)
def test_timestamps_are_bounded_by_the_readers_clock(stream, path):
    document = json.loads(SAMPLES[stream].model_dump_json())
    skew = int(RULES.plausibility.max_future_skew_s * S)
    read(stream, replaced(document, path, NOW + skew))  # exactly the allowed skew
    read(stream, replaced(document, path, NOW - 3 * 86_400 * S))  # old is fine (a replay, a slow feed)
    for bad, why in ((NOW + skew + 1, "ahead of the reader's clock"), (946_684_799 * S, "before 2000-01-01"),
                     (0, "before 2000-01-01"), (4_102_444_801 * S, "after 2100-01-01"), (10**400, "after 2100-01-01")):
        with pytest.raises(DecodeError, match=f"{named(path)}: Value error, timestamp.*{why}"):
            read(stream, replaced(document, path, bad))


def test_a_replay_readers_clock_accepts_its_day_and_todays_reader_refuses_it():
    """SPEC 9: the bound is the reading daemon's own clock, so archived and replayed
    events stay valid for a reader on that day's clock."""
    day_2031 = 1_930_000_000 * S
    event = good_event("ev.session", 0, day_2031, GOOD_SYMBOL)
    fields = {k.encode(): v.encode() for k, v in encode(event).items()}
    assert decode("ev.session", fields, LIMITS, day_2031 + S).payload.now_ns == day_2031
    with pytest.raises(DecodeError, match="ts_ns: Value error, timestamp .* s ahead of the reader's clock"):
        decode("ev.session", fields, LIMITS, time.time_ns())


def test_limits_come_from_the_plausibility_config():
    assert LIMITS.max_price == RULES.plausibility.max_price
    assert LIMITS.max_quantity == RULES.plausibility.max_quantity
    assert LIMITS.max_future_skew_ns == int(RULES.plausibility.max_future_skew_s * S)


def test_envelope_is_strict_too():
    document = json.loads(SAMPLES["ev.l1"].model_dump_json())
    for field_name, value in (("schema_version", True), ("schema_version", 1.0), ("schema_version", 2),
                              ("event_id", "nope"), ("source", ""), ("idempotency_key", "k" * 300),
                              ("causation_id", "c" * 300), ("type", "print")):
        with pytest.raises(DecodeError, match=field_name):
            read("ev.l1", {**document, field_name: value})
    with pytest.raises(DecodeError, match="type: entry field says"):
        decode("ev.l1", {b"event": json.dumps(document).encode(), b"type": b"print"}, LIMITS, NOW)


def test_decode_raises_only_decode_errors_naming_the_event_field_for_garbage():
    rng = random.Random(12)
    garbage = [b"", b"\xff\xfe", b"[" * 100_000, b"{" * 5000, b"1e999", b"NaN", b'"x"', b"null", b"[]", b"{}",
               b'{"payload": ' * 300, b"9" * 5000]
    garbage += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
    for raw in garbage:
        for stream in STREAM_TYPES:
            with pytest.raises(DecodeError) as raised:
                decode(stream, {b"event": raw}, LIMITS, NOW)
            assert raised.value.reason and len(raised.value.reason) < 2000
    with pytest.raises(DecodeError, match="entry has no 'event' field"):
        decode("ev.l1", {b"type": b"l1"}, LIMITS, NOW)
    with pytest.raises(DecodeError, match="event: .* bytes, above the limit"):
        decode("ev.l1", {b"event": b" " * (9 * 1024 * 1024)}, LIMITS, NOW)


# --- producers: constructing a payload in Python is strict as well ------------------------------------


@pytest.mark.parametrize("build", [
    lambda: L1(symbol=GOOD_SYMBOL, bid=math.nan, ask=24.8),
    lambda: L1(symbol=GOOD_SYMBOL, bid=math.inf, ask=24.8),
    lambda: L1(symbol=GOOD_SYMBOL, bid=True, ask=24.8),
    lambda: L1(symbol=GOOD_SYMBOL, bid="24.90", ask=24.8),
    lambda: L1(symbol=GOOD_SYMBOL, bid=24.8, ask=24.9, bid_size=100.0),
    lambda: L1(symbol=GOOD_SYMBOL, bid=24.8, ask=24.9, bid_size=10**13),
    lambda: L1(symbol=GOOD_SYMBOL, bid=2_000_000.0, ask=24.9),
    lambda: L1(symbol=GOOD_SYMBOL, bid=24.8, ask=24.9, quote_ts_ns=4_102_444_801 * S),
    lambda: Print(symbol=GOOD_SYMBOL, price=24.8, size=10**400, venue="NYSE", trade_ts_ns=NOW),
    lambda: Print(symbol=GOOD_SYMBOL, price=24.8, size=100, venue="N" * 100, trade_ts_ns=NOW),
    lambda: Position(account="DU1", symbol=GOOD_SYMBOL, qty=10**400, avg_cost=24.5, bucket="LT"),
    lambda: Position(account="DU1", symbol=GOOD_SYMBOL, qty=100, avg_cost=math.nan, bucket="LT"),
    lambda: Account(account="DU1", net_liquidation=math.nan),
    lambda: Account(account="DU1", net_liquidation=1e300),
    lambda: BucketExposure(current_pct=math.nan, potential_pct=1.0, target_pct=1.0, max_pct=1.0),
    lambda: BucketExposure(current_pct=-1.0, potential_pct=1.0, target_pct=1.0, max_pct=1.0),
    lambda: Alert(alert_type="dlq_growth", state="raised", severity="info", message="m", data={"v": math.inf}),
    lambda: Alert(alert_type="dlq_growth", state="raised", severity="info", message="m" * 5000),
    lambda: Alert(alert_type="dlq_growth", state="raised", severity="info", message="m", data={"when": object()}),
    lambda: Intent(**{**SAMPLES["ev.intents"].payload.model_dump(), "ttl_s": math.inf}),
    lambda: Intent(**{**SAMPLES["ev.intents"].payload.model_dump(), "trace": {"x": math.nan}}),
    lambda: Intent(**{**SAMPLES["ev.intents"].payload.model_dump(), "risk_delta_gross_pct": math.nan}),
])
def test_producers_cannot_build_nan_coerced_or_absurd_values(build):
    with pytest.raises(ValidationError):
        build()


def test_producers_may_build_valid_edge_values():
    """A flat position (0 @ 0), a one-sided quote, an int for a float, a 1970 relative time
    at construction (readers bound it against their clock)."""
    Position(account="DU1", symbol=GOOD_SYMBOL, qty=0, avg_cost=0, bucket="LT")
    L1(symbol=GOOD_SYMBOL, bid=None, ask=25)
    Account(account="DU1", net_liquidation=-5.0)  # the exposure worker turns this into "unknown"
    event = make_event(L1(symbol=GOOD_SYMBOL, bid=24.8, ask=24.9), idempotency_key="k", source="t", ts_ns=1)
    with pytest.raises(DecodeError, match="ts_ns: Value error, timestamp before 2000-01-01"):
        decode("ev.l1", {k.encode(): v.encode() for k, v in encode(event).items()}, LIMITS, NOW)
