"""qe-market-data never publishes bad data as good (issue 12, SPEC 9): the real daemon
as a subprocess against the fake Hammer Pro server and a real Redis.

* every L1 goes through the quote gate: implausible quotes are published FLAGGED
  (`implausible`), with one `l1_implausible` alert per episode per symbol and one
  resolved alert when a plausible quote returns;
* hostile feed content (100k nested `[`, invalid JSON, sizes of 1e300, NaN, trade times
  in 1970 and 2100) is logged and skipped: the daemon stays up, publishes nothing bad
  and keeps publishing good updates after it."""

from __future__ import annotations

import json

import redis

from qe import config
from qe.contracts import EVENT_TYPES
from tests.support.processes import REPO, wait_until
from tests.test_market_data_hammer import T0_MS, hammer, spawned, start_market_data, stream_events  # noqa: F401

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
CONFIRM_PRINTS = RULES.plausibility.prints.confirm_prints


def quotes_of(r: redis.Redis, symbol: str) -> list[dict]:
    return [e["payload"] for e in stream_events(r, "ev.l1") if e["payload"]["symbol"] == symbol]


def prints_of(r: redis.Redis, symbol: str) -> list[dict]:
    return [e["payload"] for e in stream_events(r, "ev.prints") if e["payload"]["symbol"] == symbol]


def quote_alerts(r: redis.Redis, symbol: str) -> list[dict]:
    return [
        e for e in stream_events(r, "ev.alerts")
        if e["payload"]["alert_type"] == "l1_implausible" and e["payload"]["symbol"] == symbol
    ]


def subscribed(hammer) -> bool:
    clients = hammer.authenticated_clients()
    return bool(clients) and sum(clients[0].subscribe_batches) == 120


def push_and_wait(r, hammer, symbol_hammer: str, symbol: str, **fields) -> dict:
    """Push one L1Update and return the L1 market data published for it."""
    before = len(quotes_of(r, symbol))
    hammer.push_l1(symbol_hammer, **fields)
    wait_until(lambda: len(quotes_of(r, symbol)) == before + 1, message=f"quote {fields}")
    return quotes_of(r, symbol)[-1]


def test_stub_quote_is_published_flagged_with_one_alert_per_episode_and_a_resolved_alert(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: subscribed(hammer), timeout=20, message="subscribed")

    good = push_and_wait(r, hammer, "CIM-B", "CIM PRB", bid=24.84, ask=24.88, volume=100)
    assert good["implausible"] is None
    stubs = [push_and_wait(r, hammer, "CIM-B", "CIM PRB", bid=0.01, ask=999_999.0, volume=100) for _ in range(3)]
    assert [(q["bid"], q["ask"], q["implausible"]) for q in stubs] == [(0.01, None, "absurd_price")] * 3
    back = push_and_wait(r, hammer, "CIM-B", "CIM PRB", bid=24.85, ask=24.88, volume=100)
    assert back["implausible"] is None

    wait_until(lambda: len(quote_alerts(r, "CIM PRB")) == 2, message="start and end alerts")
    start, end = [e["payload"] for e in quote_alerts(r, "CIM PRB")]
    assert (start["severity"], start["data"]["state"], start["data"]["problem"]) == ("warning", "firing", "absurd_price")
    assert "CIM PRB" in start["message"] and "absurd_price" in start["message"]
    assert (end["severity"], end["data"]["state"]) == ("info", "resolved")
    assert end["data"]["since_ns"] == start["data"]["since_ns"]
    # Every published L1 and alert is a valid event (the consumers' decoder accepts it).
    for _id, fields in r.xrange("ev.l1"):
        EVENT_TYPES["l1"].model_validate_json(fields[b"event"])
    # A second episode on the same symbol is a new alert.
    assert push_and_wait(r, hammer, "CIM-B", "CIM PRB", bid=0.01, ask=999_999.0)["implausible"] == "absurd_price"
    wait_until(lambda: len(quote_alerts(r, "CIM PRB")) == 3, message="second episode")
    assert len({e["idempotency_key"] for e in quote_alerts(r, "CIM PRB")}) == 3
    assert any(line.get("msg") == "implausible quote" and line.get("symbol") == "CIM PRB" for line in md.log_lines())
    assert md.terminate() == 0


def test_crossed_one_sided_and_a_jump_without_then_with_confirming_prints(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: subscribed(hammer), timeout=20, message="subscribed")

    assert push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=25.30, ask=25.35, volume=1)["implausible"] is None
    assert push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=25.40, ask=25.30, volume=1)["implausible"] == "crossed"
    one_sided = push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=25.31, volume=1)  # no ask at all: absent, valid
    assert (one_sided["bid"], one_sided["ask"], one_sided["implausible"]) == (25.31, None, None)
    zero_ask = push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=25.31, ask=0, volume=1)  # Hammer's 0: absent too
    assert (zero_ask["ask"], zero_ask["implausible"]) == (None, None)

    # The market "moves" 10.7 % on the quote alone: a jump, flagged.
    assert push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=28.00, ask=28.05, volume=1)["implausible"] == "jump"
    # One print there does not confirm it (it is far from the trusted reference itself) ...
    hammer.add_trade("AGNCN", T0_MS, 28.02, 100, "NYSE")
    wait_until(lambda: len(prints_of(r, "AGNCN")) == 1, message="first print at the new level")
    assert push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=28.00, ask=28.05, volume=1)["implausible"] == "jump"
    # ... but confirm_prints more prints agreeing with it do: the market really moved.
    for n in range(1, CONFIRM_PRINTS + 1):
        hammer.add_trade("AGNCN", T0_MS + n * 1000, 28.02, 100, "NYSE")
    wait_until(lambda: len(prints_of(r, "AGNCN")) == 1 + CONFIRM_PRINTS, message="agreeing prints")
    assert push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=28.00, ask=28.05, volume=1)["implausible"] is None
    # Now a quote 10.7 % below the new level is the jump.
    assert push_and_wait(r, hammer, "AGNCN", "AGNCN", bid=25.00, ask=25.05, volume=1)["implausible"] == "jump"

    wait_until(lambda: len(quote_alerts(r, "AGNCN")) == 5, message="alerts")
    seen = [(e["payload"]["data"]["state"], e["payload"]["data"].get("problem")) for e in quote_alerts(r, "AGNCN")]
    assert seen == [("firing", "crossed"), ("resolved", None), ("firing", "jump"), ("resolved", None), ("firing", "jump")]
    assert md.terminate() == 0


def test_hostile_hammer_content_is_logged_and_skipped_and_good_updates_keep_flowing(redis_url, r, tmp_path, hammer):
    md = start_market_data(redis_url, tmp_path, hammer)
    wait_until(lambda: subscribed(hammer), timeout=20, message="subscribed")
    hammer.add_trade("NYCB-U", T0_MS, 18.45, 100, "NYSE")
    wait_until(lambda: len(prints_of(r, "NYCB PRU")) == 1, message="a good print first")
    assert push_and_wait(r, hammer, "NYCB-U", "NYCB PRU", bid=18.40, ask=18.47, volume=1)["implausible"] is None

    hammer.send_raw("[" * 100_000)
    hammer.send_raw("{this is not json")
    hammer.send_raw('{"cmd": "L1Update", "result": {"sym": "NYCB-U", "bid": NaN, "ask": 18.47}}')
    hammer.send_raw('{"cmd": "L1Update", "result": {"sym": "NYCB-U", "bid": 18.40, "ask": 18.47, "bidSize": 1e300}}')
    hammer.send_raw('{"cmd": "L1Update", "result": {"sym": "NYCB-U", "bid": 18.40, "ask": 18.47, "volume": 1' + "0" * 400 + "}}")
    hammer.send_raw('{"cmd": "L1Update", "result": {"sym": "NYCB-U", "bid": 18.40, "ask": 18.47, "last": 5e5}}')
    hammer.send_raw(json.dumps({"cmd": "L1Update", "result": {"sym": "NYCB-U", "bid": {"a": [1, 2]}, "ask": True}}))
    hammer.add_trade("NYCB-U", T0_MS + 1000, 18.46, 1e300, "NYSE")  # absurd size
    hammer.add_trade("NYCB-U", 86_400_000, 18.46, 100, "NYSE")  # 2 January 1970
    hammer.add_trade("NYCB-U", 4_102_444_800_000, 18.46, 100, "NYSE")  # 1 January 2100
    hammer.add_trade("NYCB-U", "2100-01-01T09:30:00", 18.46, 100, "NYSE")  # 2100 as text
    hammer.add_trade("NYCB-U", T0_MS + 2000, float("nan"), 100, "NYSE")
    hammer.add_trade("NYCB-U", T0_MS + 3000, 18.47, 200, "ARCA")  # good, after all of it
    hammer.push_l1("NYCB-U", bid=18.41, ask=18.47, volume=2)  # good, after all of it

    wait_until(lambda: len(prints_of(r, "NYCB PRU")) == 2, message="the good print after the junk")
    wait_until(lambda: any(q["bid"] == 18.41 for q in quotes_of(r, "NYCB PRU")), message="the good quote after the junk")
    assert md.alive()
    # Nothing bad was published as good: only the good prints; the quote with a last of
    # $500,000 is published flagged, the absurd last removed (never dropped: the feed's
    # latest word must not leave an older good quote vouched for).
    assert [(p["price"], p["size"]) for p in prints_of(r, "NYCB PRU")] == [(18.45, 100), (18.47, 200)]
    assert [(q["bid"], q["ask"], q["last"], q["implausible"]) for q in quotes_of(r, "NYCB PRU")] == [
        (18.40, 18.47, None, None), (18.40, 18.47, None, "absurd_price"), (18.41, 18.47, None, None)
    ]
    skipped = [line for line in md.log_lines() if line.get("msg") == "malformed feed message skipped"]
    reasons = {line["reason"] for line in skipped}
    assert {"too_deep", "bad_json", "bad_bid", "bad_volume", "print_size", "print_too_old", "print_future_time"} <= reasons
    assert reasons & {"quote_size_above_max", "bad_l1"}, reasons  # the 1e300 bid size
    assert "bad_tick" in reasons  # the NaN price
    # Log lines stay bounded, whatever the feed sent.
    assert max(len(json.dumps(line)) for line in md.log_lines()) < 2000
    # ... and the daemon keeps working afterwards.
    assert push_and_wait(r, hammer, "NYCB-U", "NYCB PRU", bid=18.42, ask=18.47, volume=3)["implausible"] is None
    assert r.xlen("ev.dlq") == 0
    assert md.alive()
    assert md.terminate() == 0
