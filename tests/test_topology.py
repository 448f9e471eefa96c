"""Delivery copies (qe.topology, docs/security.md): every consumed stream is fanned out
by the producers' commit into one copy per consuming group, with the same id and
fields; each group reads, and trims, only its own copy. Against a real redis-server
with the real writer (qe.streams) and the loaded function library."""

from __future__ import annotations

import time

import pytest
import redis

from daemons.alerts.service import AlertsHandler
from daemons.decision.service import DecisionHandler
from daemons.execution.service import ExecutionService
from daemons.exposure.service import ExposureHandler
from daemons.pnl.service import PnlHandler
from daemons.prints.service import PrintsHandler
from qe import acl, config, streams, topology
from qe.clock import Clock
from qe.contracts import L1, Alert, make_event
from tests.support.processes import REPO
from tests.support.raw_streams import append, copy

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")
HANDLERS = {
    "alerts": AlertsHandler, "decision": DecisionHandler, "execution": ExecutionService,
    "exposure": ExposureHandler, "pnl": PnlHandler, "prints": PrintsHandler,
}


def quote(n: int):
    return make_event(L1(symbol="CIM PRB", bid=24.8, ask=24.9 + n / 100), idempotency_key=f"l1:{n}", source="t",
                      ts_ns=time.time_ns())


def entries(r: redis.Redis, key: str) -> list[tuple[bytes, dict]]:
    return r.xrange(key)


# --- the table (pure) ------------------------------------------------------------------------


def test_every_daemon_consumes_exactly_what_the_table_feeds_its_group():
    """A handler reading a stream its group has no copy of would be refused at group
    creation; one the table feeds and nobody reads would fill a copy forever."""
    for daemon, handler in HANDLERS.items():
        group = acl.ACCESS[daemon].group
        assert group is not None
        assert set(handler.streams) == set(topology.CONSUMES[group]), daemon
    assert set(topology.CONSUMES) == {acl.ACCESS[d].group for d in HANDLERS}


def test_copy_names_map_back_to_their_stream():
    key = topology.delivery_stream("ev.l1", "decision_engine")
    assert key == "ev.l1@decision_engine"
    assert topology.origin_stream(key) == "ev.l1" and topology.origin_stream("ev.l1") == "ev.l1"
    assert topology.fanout()["ev.intents"] == ("execution_service",)
    assert "ev.dlq" not in topology.fanout() and "ev.decision_journal" not in topology.fanout()
    assert set(topology.consumers_of("ev.l1")) == {"alerts", "decision_engine", "execution_service", "exposure", "pnl"}


@pytest.mark.parametrize("position, oldest_pending, observed, floor", [
    ("5-0", None, "5-0", "5-0"),
    ("5-0", "3-1", "5-0", "3-1"),
    ("5-0", "5-0", "5-0", "5-0"),
    ("10-0", "9-9", "10-0", "9-9"),
    ("10-0", None, "7-0", "7-0"),  # the trim-loss base is older: keep it (no false loss)
    ("10-0", "2-0", "7-0", "2-0"),
    ("0-0", None, "0-0", "0-0"),
])
def test_a_group_keeps_its_position_its_oldest_pending_entry_and_its_loss_base(position, oldest_pending, observed, floor):
    assert streams.trim_floor(position, oldest_pending, observed) == floor


# --- the fan-out in Redis --------------------------------------------------------------------------


def test_a_producers_append_reaches_every_consuming_group_with_the_same_id(r):
    streams.Publisher(r, RULES).publish("ev.l1", quote(1), quote(2))
    stream = entries(r, "ev.l1")
    assert len(stream) == 2
    for group in topology.consumers_of("ev.l1"):
        assert entries(r, copy("ev.l1", group)) == stream, group
    assert r.xinfo_groups("ev.l1") == []  # no group on the stream itself


def test_a_deduplicated_append_is_not_fanned_out_twice(r):
    alert = make_event(Alert(alert_type="dlq_growth", state="raised", severity="info", message="m"),
                       idempotency_key="alert:1", source="t", ts_ns=time.time_ns())
    publisher = streams.Publisher(r, RULES)
    publisher.publish("ev.alerts", alert)
    publisher.publish("ev.alerts", alert)  # a producer's retry
    assert r.xlen("ev.alerts") == 1 and r.xlen(copy("ev.alerts", "decision_engine")) == 1


def test_the_archive_guarded_append_fans_out_too(r):
    guarded = RULES.model_copy(update={"archive": RULES.archive.model_copy(update={"enabled": True})})
    streams.Publisher(r, guarded).publish("ev.l1", quote(1))
    assert entries(r, copy("ev.l1", "exposure")) == entries(r, "ev.l1")


def test_a_requeue_reaches_only_the_named_group(r):
    new_id = append(r, "ev.orders", {"event": "{}"}, group="pnl")
    assert [e[0].decode() for e in entries(r, copy("ev.orders", "pnl"))] == [new_id]
    assert r.xlen("ev.orders") == 1
    for group in set(topology.consumers_of("ev.orders")) - {"pnl"}:
        assert r.exists(copy("ev.orders", group)) == 0, group
    with pytest.raises(redis.ResponseError, match="does not consume"):
        append(r, "ev.orders", {"event": "{}"}, group="alerts")


def test_a_copy_pushed_ahead_by_a_direct_append_still_gets_every_entry(r):
    """Only a producer's user appending to a copy directly can put it ahead of the stream:
    the fan-out then appends under a new id instead of failing half-way."""
    r.xadd(copy("ev.l1", "alerts"), {"event": "{}"}, id="99999999999999-0")
    streams.Publisher(r, RULES).publish("ev.l1", quote(1))
    alerts_copy = entries(r, copy("ev.l1", "alerts"))
    assert len(alerts_copy) == 2 and alerts_copy[1][1] == entries(r, "ev.l1")[0][1]
    assert entries(r, copy("ev.l1", "exposure")) == entries(r, "ev.l1")  # the others unchanged


def test_a_copy_that_can_take_no_entry_costs_only_that_copy_and_is_reported(r, caplog):
    """The highest possible id appended to a copy directly (a producer's user may): the
    commit still applies whole (nothing raises after its first write), the others get
    the entry, and the miss is logged as an error naming the copy."""
    r.xadd(copy("ev.l1", "alerts"), {"event": "{}"}, id="18446744073709551615-18446744073709551615")
    effects = streams.Effects(streams.StreamPolicy(RULES.streams))
    effects.hset("test:applied", {"yes": "1"})
    effects.publish("ev.l1", quote(1))
    with caplog.at_level("ERROR", logger="qe.streams"):
        streams.commit(r, effects)
    assert r.hget("test:applied", "yes") == b"1" and r.xlen("ev.l1") == 1
    assert entries(r, copy("ev.l1", "exposure")) == entries(r, "ev.l1")
    (record,) = [rec for rec in caplog.records if rec.message == "appended but not copied to every consuming group"]
    assert record.copies == [copy("ev.l1", "alerts")]


def test_a_malformed_append_op_applies_nothing(r):
    effects = streams.Effects(streams.StreamPolicy(RULES.streams))
    effects.hset("test:applied", {"yes": "1"})
    effects.ops.append(["XADDG", "", "0", "ev.l1", "MAXLEN", "abc", "event", "{}"])
    with pytest.raises(redis.ResponseError, match="malformed append op for ev.l1"):
        streams.commit(r, effects)
    assert r.exists("test:applied", "ev.l1", copy("ev.l1", "exposure")) == 0


def test_copies_keep_the_archive_guard_of_their_stream(r):
    """With archive.enabled nothing of a day not yet archived is trimmed, from the stream
    or from a copy; once the floor is set, both trim only below it."""
    small = {**RULES.streams, "ev.l1": config.Retention(maxlen=5)}
    guarded = RULES.model_copy(update={"streams": small,
                                       "archive": RULES.archive.model_copy(update={"enabled": True})})
    publisher = streams.Publisher(r, guarded)
    for n in range(300):
        publisher.publish("ev.l1", quote(n))
    exposure_copy = copy("ev.l1", "exposure")
    assert r.xlen("ev.l1") == 300 and r.xlen(exposure_copy) == 300  # no floor: nothing archived, no trim
    floor = entries(r, "ev.l1")[250][0].decode()
    r.set("archive:floor", floor)
    publisher.publish("ev.l1", quote(300))
    for key in ("ev.l1", exposure_copy):
        first = entries(r, key)[0][0].decode()
        assert r.xlen(key) < 300 and streams._id_tuple(first) <= streams._id_tuple(floor), key


def test_a_group_the_table_does_not_feed_is_refused_at_creation(r):
    with pytest.raises(redis.ResponseError, match="no delivery copy of ev.intents for group alerts"):
        r.fcall("qe_group_create", 0, "ev.intents", "alerts", "0", "")
    assert r.exists(copy("ev.intents", "alerts")) == 0


class Quotes:
    streams = ("ev.l1",)
    tick_interval_s = None

    def __init__(self) -> None:
        self.seen: list[str] = []

    def load(self, r) -> None:
        pass

    def handle(self, event, effects) -> None:
        self.seen.append(event.idempotency_key)

    def tick(self, now_ns, effects) -> None:
        pass


def test_a_group_trims_what_it_acknowledged_from_its_own_copy_only(r):
    fast = RULES.runtime.model_copy(update={"block_ms": 20, "housekeeping_interval_s": 0.0})
    consumer = streams.Consumer(r=r, daemon="test", group="test_group", handler=Quotes(),
                                rules=RULES.model_copy(update={"runtime": fast}), clock=Clock(), consumer_name="c1")
    streams.Publisher(r, RULES).publish("ev.l1", *(quote(n) for n in range(300)))
    while len(consumer.handler.seen) < 300:
        consumer.run_once()
    consumer.run_once()  # housekeeping after the last commit
    own = copy("ev.l1", "test_group")
    last_id = entries(r, "ev.l1")[-1][0]
    assert r.xlen(own) < 300 and r.xrange(own, min=last_id, max=last_id)  # the entry at its position stays
    assert r.xlen("ev.l1") == 300 and r.xlen(copy("ev.l1", "exposure")) == 300  # nobody else's
    # No false trim-loss report and nothing lost: the group goes on reading.
    streams.Publisher(r, RULES).publish("ev.l1", quote(300))
    for _ in range(5):
        consumer.run_once()
    assert consumer.handler.seen[-1] == "l1:300" and len(consumer.handler.seen) == 301
    assert [d for d in r.xrange("ev.dlq")] == []


def test_a_plain_xadd_op_cannot_skip_the_fan_out(r):
    effects = streams.Effects(streams.StreamPolicy(RULES.streams))
    effects.command("XADD", "ev.l1", "*", "event", "{}")
    with pytest.raises(redis.ResponseError, match="XADD is not allowed as a commit op"):
        streams.commit(r, effects)
    assert r.exists("ev.l1") == 0
