"""The stream runtime against a real redis-server (SPEC 5): in-process cases."""

from __future__ import annotations

import json
import re
import time

import pytest
import redis

from qe import config, streams
from qe.clock import Clock
from qe.contracts import L1, Alert, make_event, encode

from tests.support import raw_streams

RULES = config.load_rules(config.Settings().rules_file)
L1_COPY = raw_streams.copy("ev.l1", "test_group")  # where test_group reads ev.l1 (qe.topology)


def l1_event(symbol: str, n: int):
    return make_event(
        L1(symbol=symbol, bid=24.0, ask=24.1, bid_size=100, ask_size=100),
        idempotency_key=f"l1:{symbol}:{n}",
        source="test",
        ts_ns=time.time_ns(),
    )


class Recorder:
    """Non-idempotent effects: a double application shows up as count 2."""

    streams = ("ev.l1",)
    tick_interval_s = None

    def __init__(self, fail_times: dict[str, int] | None = None) -> None:
        self.fail_times = dict(fail_times or {})
        self.loads = 0

    def load(self, r) -> None:
        self.loads += 1

    def handle(self, event, effects) -> None:
        key = event.idempotency_key
        if self.fail_times.get(key, 0) > 0:
            self.fail_times[key] -= 1
            raise RuntimeError(f"transient failure for {key}")
        effects.command("HINCRBY", "test:count", key, 1)
        effects.publish(
            "ev.alerts",
            make_event(
                Alert(alert_type="dlq_growth", state="raised", severity="info", message=key),
                idempotency_key=f"echo:{key}",
                source="test",
                ts_ns=time.time_ns(),
            ),
        )

    def tick(self, now_ns, effects) -> None:
        pass


def rules_with(**runtime) -> config.RiskRules:
    return RULES.model_copy(update={"runtime": RULES.runtime.model_copy(update=runtime)})


def make_consumer(r, handler, name="c1", group="test_group", **runtime) -> streams.Consumer:
    fast = {"block_ms": 50, "backoff_base_s": 0.001, "backoff_cap_s": 0.01, "handler_retry_cap_s": 0.01}
    return streams.Consumer(
        r=r, daemon="test", group=group, handler=handler, rules=rules_with(**{**fast, **runtime}),
        clock=Clock(), consumer_name=name,
    )


def publish(r, *events, stream="ev.l1") -> None:
    publisher = streams.Publisher(r, RULES)
    publisher.publish(stream, *events)


def counts(r) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall("test:count").items()}


def dlq(r) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in r.xrange("ev.dlq")]


def run_until(consumer, predicate, limit=200) -> None:
    for _ in range(limit):
        consumer.run_once()
        if predicate():
            return
    raise AssertionError("condition not reached")


def test_batch_effects_and_acks_commit_together(r):
    publish(r, *(l1_event("CIM PRB", n) for n in range(10)))
    consumer = make_consumer(r, Recorder())
    run_until(consumer, lambda: len(counts(r)) == 10)
    assert set(counts(r).values()) == {1}
    assert r.xlen("ev.alerts") == 10
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


def test_a_handler_may_read_bigger_or_smaller_batches_than_the_default(r):
    class BatchCounter(Recorder):
        batch_size = 4

        def __init__(self) -> None:
            super().__init__()
            self.batches: list[int] = []
            self.in_batch = 0

        def handle(self, event, effects) -> None:
            super().handle(event, effects)
            self.in_batch += 1

        def end_batch(self, effects) -> None:
            self.batches.append(self.in_batch)
            self.in_batch = 0

    publish(r, *(l1_event("CIM PRB", n) for n in range(10)))
    handler = BatchCounter()
    consumer = make_consumer(r, handler, batch_size=100)
    assert consumer.config.batch_size == 4 and consumer.config.block_ms == 50
    run_until(consumer, lambda: len(counts(r)) == 10)
    assert [n for n in handler.batches if n] == [4, 4, 2]


def test_handler_that_raises_is_redelivered_and_applied_exactly_once(r):
    publish(r, *(l1_event("AGNCN", n) for n in range(5)))
    handler = Recorder(fail_times={"l1:AGNCN:2": 2})
    consumer = make_consumer(r, handler)
    run_until(consumer, lambda: len(counts(r)) == 5)
    assert counts(r) == {f"l1:AGNCN:{n}": 1 for n in range(5)}
    # The failing entry was retried from the pending list, not dead-lettered.
    assert dlq(r) == []
    assert handler.loads >= 3  # state reloaded after each failure
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


def test_poison_entry_goes_to_dlq_and_neighbours_are_not_harmed(r):
    publish(r, *(l1_event("PFF", n) for n in range(6)))
    handler = Recorder(fail_times={"l1:PFF:1": 10**6})
    consumer = make_consumer(r, handler, max_deliveries=3)
    run_until(consumer, lambda: len(counts(r)) == 5 and dlq(r))
    dead = dlq(r)
    assert len(dead) == 1
    assert dead[0]["origin_stream"] == "ev.l1"
    assert dead[0]["label"] == "max_deliveries"
    assert "delivered 4 times (limit 3)" in dead[0]["reason"]
    assert "transient failure for l1:PFF:1" in dead[0]["reason"]
    assert json.loads(json.loads(dead[0]["fields"])["event"])["idempotency_key"] == "l1:PFF:1"
    assert counts(r) == {f"l1:PFF:{n}": 1 for n in range(6) if n != 1}
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


def test_malformed_payloads_go_to_dlq_with_reason_and_loop_keeps_going(r):
    good = l1_event("CIM PRA", 1)
    wrong_type = make_event(Alert(alert_type="dlq_growth", state="raised", severity="info", message="m"), idempotency_key="a", source="t", ts_ns=1)
    raw_streams.append(r, "ev.l1", {"event": "{not json"})
    raw_streams.append(r, "ev.l1", {"something": "else"})
    raw_streams.append(r, "ev.l1", encode(wrong_type))
    bad_price = json.loads(good.model_dump_json())
    bad_price["payload"]["bid"] = -3
    raw_streams.append(r, "ev.l1", {"event": json.dumps(bad_price)})
    publish(r, good)
    consumer = make_consumer(r, Recorder())
    run_until(consumer, lambda: counts(r) and len(dlq(r)) == 4)
    reasons = [d["reason"] for d in dlq(r)]
    assert reasons[0].startswith("invalid payload: ") and "JSON" in reasons[0]
    assert reasons[1] == "invalid payload: entry has no 'event' field"
    assert "type: Input should be 'l1'" in reasons[2]
    assert "payload.bid: Input should be greater than 0" in reasons[3]
    assert counts(r) == {"l1:CIM PRA:1": 1}
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


def test_commit_whose_reply_is_lost_is_not_applied_twice(r, monkeypatch):
    publish(r, *(l1_event("NLY PRF", n) for n in range(20)))
    real_commit = streams.commit
    lost = {"left": 1}

    def commit_then_lose_reply(client, effects, group="", consumer=""):
        real_commit(client, effects, group, consumer)
        if effects.acks and lost["left"]:
            lost["left"] -= 1
            raise redis.ConnectionError("reply lost after the commit applied")

    monkeypatch.setattr(streams, "commit", commit_then_lose_reply)
    consumer = make_consumer(r, Recorder(), batch_size=7)
    run_until(consumer, lambda: len(counts(r)) == 20)
    for _ in range(5):
        consumer.run_once()
    assert lost["left"] == 0
    assert set(counts(r).values()) == {1}
    assert r.xlen("ev.alerts") == 20


def test_entries_of_a_dead_consumer_are_claimed(r):
    publish(r, *(l1_event("TWO PRA", n) for n in range(4)))
    r.xgroup_create(L1_COPY, "test_group", id="0", mkstream=True)
    # A peer read them and died before acking.
    r.xreadgroup("test_group", "dead-peer", {L1_COPY: ">"}, count=10)
    assert r.xpending(L1_COPY, "test_group")["consumers"][0]["name"] == b"dead-peer"
    survivor = make_consumer(r, Recorder(), name="survivor", claim_min_idle_s=0.05, claim_interval_s=0.01)
    time.sleep(0.1)
    run_until(survivor, lambda: len(counts(r)) == 4)
    assert set(counts(r).values()) == {1}
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


def test_claimed_entry_cannot_be_committed_by_its_former_owner(r):
    publish(r, l1_event("MFA PRB", 1))
    slow = make_consumer(r, Recorder(), name="slow")
    slow._ensure_ready()
    entries = slow._fetch()
    assert len(entries) == 1
    # While "slow" is still handling, another consumer claims the entry.
    r.xclaim(L1_COPY, "test_group", "fast", 0, [entries[0].entry_id])
    with pytest.raises(streams.CommitAborted):
        effects = streams.Effects(slow.policy)
        effects.command("HINCRBY", "test:count", "x", 1)
        effects.ack(entries[0])
        streams.commit(r, effects, slow.group, slow.consumer)
    assert counts(r) == {}  # nothing applied


def test_pending_entry_whose_payload_was_trimmed_is_reported_and_acked(r):
    publish(r, *(l1_event("ARR PRC", n) for n in range(3)))
    r.xgroup_create(L1_COPY, "test_group", id="0", mkstream=True)
    r.xreadgroup("test_group", "c1", {L1_COPY: ">"}, count=10)  # our own, then we "crashed"
    r.xtrim(L1_COPY, maxlen=0, approximate=False)
    consumer = make_consumer(r, Recorder())
    run_until(consumer, lambda: len(dlq(r)) == 3)
    assert {d["label"] for d in dlq(r)} == {"trimmed"}
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


def test_entries_trimmed_before_the_group_read_them_are_reported(r):
    consumer = make_consumer(r, Recorder(), housekeeping_interval_s=0.0)
    publish(r, l1_event("DX PRC", 0))
    run_until(consumer, lambda: counts(r))
    # The producer races ahead and retention trims entries this group never read.
    for n in range(1, 6):
        publish(r, l1_event("DX PRC", n))
    r.xtrim(L1_COPY, maxlen=2, approximate=False)
    consumer.run_once()
    report = [d for d in dlq(r) if d["label"] == "trimmed_unread"]
    assert len(report) == 1
    assert report[0]["reason"].startswith("3 entries of ev.l1 were trimmed before group test_group read them")
    run_until(consumer, lambda: len(counts(r)) == 3)
    consumer.run_once()
    assert len([d for d in dlq(r) if d["label"] == "trimmed_unread"]) == 1  # reported once


def test_group_deleted_under_a_running_consumer_is_recreated(r):
    consumer = make_consumer(r, Recorder())
    publish(r, l1_event("PMT PRA", 1))
    run_until(consumer, lambda: counts(r))
    r.xgroup_destroy(L1_COPY, "test_group")
    publish(r, l1_event("PMT PRA", 2))
    run_until(consumer, lambda: counts(r).get("l1:PMT PRA:2"))
    assert r.xinfo_groups(L1_COPY)[0]["name"] == b"test_group"


def test_publisher_dedupes_on_idempotency_key_where_configured(r):
    alert = make_event(Alert(alert_type="dlq_growth", state="raised", severity="info", message="m"), idempotency_key="alert:1", source="t", ts_ns=1)
    publish(r, alert, stream="ev.alerts")
    publish(r, alert, stream="ev.alerts")  # a producer's retry
    assert r.xlen("ev.alerts") == 1
    assert r.ttl("dedupe:default:ev.alerts:alert:1") > 0  # the producer's own prefix (no ACL user here)
    # ev.l1 has no producer-side dedupe (consumers dedupe where it matters).
    publish(r, l1_event("CIM PRB", 1), l1_event("CIM PRB", 1))
    assert r.xlen("ev.l1") == 2


def test_publisher_applies_retention(r):
    small = RULES.model_copy(update={"streams": {**RULES.streams, "ev.l1": config.Retention(maxlen=50)}})
    publisher = streams.Publisher(r, small)
    for n in range(0, 1000, 100):
        publisher.publish("ev.l1", *(l1_event("RITM PRA", n + i) for i in range(100)))
    # Approximate trimming removes whole nodes (100 entries by default).
    assert r.xlen("ev.l1") <= 50 + 100


def test_event_on_the_wrong_stream_is_refused_at_publish(r):
    with pytest.raises(ValueError, match="does not belong on stream 'ev.alerts'"):
        publish(r, l1_event("CIM PRB", 1), stream="ev.alerts")


def test_a_huge_hset_is_committed_in_slices(r):
    """Lua's unpack() cannot take ~8000+ values: a 5,000-field HSET must still commit."""
    from qe import config, streams
    from tests.support.processes import REPO

    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    effects = streams.Effects(streams.StreamPolicy(rules.streams))
    effects.hset("test:big", {f"f{n}": n for n in range(5000)})
    effects.hdel("test:big", *[f"f{n}" for n in range(4000, 5000)])
    streams.commit(r, effects)
    assert r.hlen("test:big") == 4000 and r.hget("test:big", "f3999") == b"3999"


# --- a handler error is contained to its own entry -----------------------------------


class TwoStreams(Recorder):
    streams = ("ev.l1", "ev.control")


def control_event(n: int):
    from qe.contracts import Control

    return make_event(Control(command="halt", reason=f"r{n}", operator="op"), idempotency_key=f"control:{n}",
                      source="test", ts_ns=time.time_ns())


def test_a_poison_entry_never_dead_letters_good_entries_of_its_batch(r):
    """One entry whose handler always raises, in the same batch as good entries of its
    own stream (after it) and of another stream: only the poison reaches ev.dlq, every
    good entry is applied once, and its stream's later entries are applied after it."""
    publish(r, l1_event("PFF", 0), l1_event("PFF", 1), l1_event("PFF", 2))
    publish(r, *(control_event(n) for n in range(3)), stream="ev.control")
    handler = TwoStreams(fail_times={"l1:PFF:1": 10**6})
    consumer = make_consumer(r, handler, max_deliveries=3)
    run_until(consumer, lambda: len(counts(r)) == 5 and dlq(r))
    for _ in range(5):
        consumer.run_once()
    dead = dlq(r)
    assert [json.loads(json.loads(d["fields"])["event"])["idempotency_key"] for d in dead] == ["l1:PFF:1"]
    assert dead[0]["label"] == "max_deliveries"
    assert counts(r) == {"l1:PFF:0": 1, "l1:PFF:2": 1, **{f"control:{n}": 1 for n in range(3)}}
    for stream in ("ev.l1", "ev.control"):
        assert r.xpending(raw_streams.copy(stream, "test_group"), "test_group")["pending"] == 0
    # The good neighbours were each delivered once or twice, never up to the limit.
    assert consumer._handler_failures == {}


def test_other_streams_keep_flowing_while_a_failed_entry_waits_for_its_retry(r):
    publish(r, l1_event("NLY PRF", 0))
    handler = TwoStreams(fail_times={"l1:NLY PRF:0": 1})
    consumer = make_consumer(r, handler, backoff_base_s=3.0, handler_retry_cap_s=3.0)
    run_until(consumer, lambda: consumer._handler_failures)
    # The ev.l1 entry waits 3 s for its retry; ev.control is read and applied meanwhile.
    publish(r, control_event(7), stream="ev.control")
    publish(r, l1_event("NLY PRF", 1))  # behind the failed one on its stream
    started = time.monotonic()
    run_until(consumer, lambda: counts(r).get("control:7"))
    assert time.monotonic() - started < 2.0
    assert "l1:NLY PRF:1" not in counts(r)  # order per stream: it waits behind entry 0
    run_until(consumer, lambda: len(counts(r)) == 3, limit=400)
    assert counts(r) == {"control:7": 1, "l1:NLY PRF:0": 1, "l1:NLY PRF:1": 1}
    assert dlq(r) == []


def test_end_batch_failure_is_retried_entry_by_entry_and_only_the_culprit_is_dead_lettered(r):
    class Coalescing(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.in_batch: list[str] = []

        def handle(self, event, effects) -> None:
            super().handle(event, effects)
            self.in_batch.append(event.idempotency_key)

        def end_batch(self, effects) -> None:
            keys, self.in_batch = self.in_batch, []
            if "l1:MFA PRB:2" in keys:
                raise RuntimeError("cannot coalesce entry 2")

        def load(self, r) -> None:
            super().load(r)
            self.in_batch = []

    publish(r, *(l1_event("MFA PRB", n) for n in range(5)))
    consumer = make_consumer(r, Coalescing(), max_deliveries=3)
    run_until(consumer, lambda: len(counts(r)) == 4 and dlq(r), limit=400)
    dead = dlq(r)
    assert [json.loads(json.loads(d["fields"])["event"])["idempotency_key"] for d in dead] == ["l1:MFA PRB:2"]
    assert counts(r) == {f"l1:MFA PRB:{n}": 1 for n in (0, 1, 3, 4)}
    assert r.xpending(L1_COPY, "test_group")["pending"] == 0


# --- decoding against the reader's own clock and limits ------------------------------


def sim_clock_at(iso: str):
    from qe.clock import SimClock, parse_iso, to_ns

    return SimClock(start_ns=to_ns(parse_iso(iso)), anchor_wall_ns=time.time_ns())


def test_timestamps_are_bounded_by_the_readers_clock_not_the_wall_clock(r):
    """A reader on a simulated clock in 2031 (a replay of that day) accepts that day's
    events although they are years ahead of the wall clock, and refuses an event
    stamped 10 s ahead of ITS clock (max_future_skew_s is 5 in etc/risk_rules.yaml)."""
    clock = sim_clock_at("2031-03-03T15:00:00+00:00")

    def stamped(n: int, ahead_s: float):
        return make_event(L1(symbol="RITM PRA", bid=24.0, ask=24.1, quote_ts_ns=clock.now_ns()),
                          idempotency_key=f"l1:RITM PRA:{n}", source="test", ts_ns=clock.now_ns() + int(ahead_s * 1e9))

    publish(r, stamped(0, 0), stamped(1, 10), stamped(2, 1))
    consumer = streams.Consumer(r=r, daemon="test", group="test_group", handler=Recorder(),
                                rules=rules_with(block_ms=50), clock=clock, consumer_name="c1")
    run_until(consumer, lambda: len(counts(r)) == 2 and dlq(r))
    assert counts(r) == {"l1:RITM PRA:0": 1, "l1:RITM PRA:2": 1}
    (dead,) = dlq(r)
    assert dead["label"] == "invalid"
    assert re.search(r"ts_ns: Value error, timestamp (9\.9\d*|10) s ahead of the reader's clock \(max_future_skew_s 5\)", dead["reason"])
    # The wall-clock reader of today refuses the same 2031 events: the bound is the reader's.
    r.delete("test:count", "ev.dlq")
    publish(r, stamped(3, 0))
    wall = make_consumer(r, Recorder(), name="c2", group="wall_group")
    r.xgroup_create(raw_streams.copy("ev.l1", "wall_group"), "wall_group", id="$")
    publish(r, stamped(4, 0))
    run_until(wall, lambda: dlq(r))
    assert "ahead of the reader's clock" in dlq(r)[0]["reason"] and counts(r) == {}


def test_price_and_quantity_limits_come_from_the_plausibility_config(r):
    tight = rules_with(block_ms=50)
    tight = tight.model_copy(update={"plausibility": tight.plausibility.model_copy(update={"max_price": 100.0, "max_quantity": 1000})})
    publish(r, make_event(L1(symbol="AGNCN", bid=24.0, ask=240.0), idempotency_key="l1:AGNCN:0", source="t", ts_ns=time.time_ns()),
           make_event(L1(symbol="AGNCN", bid=24.0, ask=24.1, bid_size=5000), idempotency_key="l1:AGNCN:1", source="t", ts_ns=time.time_ns()),
           l1_event("AGNCN", 2))
    consumer = streams.Consumer(r=r, daemon="test", group="test_group", handler=Recorder(), rules=tight,
                                clock=Clock(), consumer_name="c1")
    run_until(consumer, lambda: counts(r) and len(dlq(r)) == 2)
    reasons = [d["reason"] for d in dlq(r)]
    assert "payload.ask: Value error, price above max_price 100" in reasons[0]
    assert "payload.bid_size: Value error, quantity beyond max_quantity 1000" in reasons[1]
    assert counts(r) == {"l1:AGNCN:2": 1}
