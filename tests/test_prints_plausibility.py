"""The print gate in qe-prints (issue 12, SPEC 9): prints far from the trusted reference
or of absurd size never reach a truth tick, a GRPAN window or saved state; they are
counted by reason and alerted once per episode per symbol; a real move (several
agreeing prints) is accepted. The daemon runs as a subprocess on a real Redis, fed by
the real writer (`make_event` + `streams.Publisher`)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from daemons.prints.core import make_record
from daemons.prints.service import BUFFER_KEY, SCREEN_KEY, PrintsHandler, _encode_print
from qe import metrics, streams
from qe.clock import Clock
from qe.contracts import Print, make_event
from tests.support.processes import wait_until
from tests.support.raw_streams import copy
from tests.test_prints_daemon import (  # noqa: F401
    CORE_RULES, RULES, processed, publish, rules_path, spawned, start_worker, stored_feature,
)

S = 1_000_000_000
CONFIRM = RULES.plausibility.prints.confirm_prints


class Tape:
    """Prints of one symbol with increasing trade times and keys, made by the real writer."""

    def __init__(self, symbol: str, start_ns: int) -> None:
        self.symbol, self.ts, self.n = symbol, start_ns, 0

    def __call__(self, price: float, size: int = 100, venue: str = "NYSE", ts_ns: int | None = None):
        self.n += 1
        self.ts += S
        return make_event(
            Print(symbol=self.symbol, price=price, size=size, venue=venue, trade_ts_ns=self.ts if ts_ns is None else ts_ns),
            idempotency_key=f"print:{self.symbol}:{self.n}",
            source="market-data",
            ts_ns=time.time_ns(),
        )


def gate_alerts(r, symbol: str) -> list[dict]:
    events = [json.loads(f[b"event"]) for _id, f in r.xrange("ev.alerts")]
    return [e["payload"] for e in events if e["payload"]["alert_type"] == "print_implausible" and e["payload"]["symbol"] == symbol]


def buffer_prices(r, symbol: str) -> list[float]:
    return [json.loads(item)[1] for item in r.lrange(BUFFER_KEY.format(symbol=symbol), 0, -1)]


def test_implausible_prints_are_excluded_alerted_once_and_a_real_move_is_accepted(redis_url, r, tmp_path, rules_path):
    symbol = "CIM PRB"
    tape = Tape(symbol, time.time_ns() - 600 * S)
    worker = start_worker(redis_url, rules_path, tmp_path)
    good = [tape(25.00) for _ in range(5)]
    publish(r, good)
    wait_until(lambda: processed(r) == 5, message="good prints")
    big = RULES.plausibility.prints.max_size + 1
    bad = [tape(0.01), tape(250.00), tape(25.00, size=big), tape(25.00, ts_ns=time.time_ns() + 3600 * S)]
    publish(r, bad)
    wait_until(lambda: processed(r) == 9, message="bad prints handled")
    feature = stored_feature(r, symbol)
    assert feature.truth_tick.price == 25.00 and feature.grpan_price == 25.00
    assert feature.print_count == 5 and feature.windows["10m"].print_count == 5
    assert buffer_prices(r, symbol) == [25.00] * 5  # nothing absurd in saved state
    wait_until(lambda: len(gate_alerts(r, symbol)) == 1, message="one alert for the run")
    firing = gate_alerts(r, symbol)[0]
    assert (firing["severity"], firing["data"]["state"], firing["data"]["problem"]) == ("warning", "firing", "far_from_reference")
    assert firing["data"]["price"] == 0.01 and firing["data"]["reference"] == 25.00

    publish(r, [tape(25.01)])
    wait_until(lambda: len(gate_alerts(r, symbol)) == 2, message="resolved")
    resolved = gate_alerts(r, symbol)[1]
    # Three excluded by the gate; the print an hour in the future never reached it: the
    # contract refuses it on decode (ev.dlq, naming the field).
    assert (resolved["severity"], resolved["data"]["state"], resolved["data"]["excluded"]) == ("info", "resolved", 3)
    dead = [fields for _id, fields in r.xrange("ev.dlq")]
    assert len(dead) == 1 and b"trade_ts_ns" in dead[0][b"reason"]
    assert stored_feature(r, symbol).truth_tick.price == 25.01

    # The market really moves 11 %: the first prints there are excluded, then it counts.
    publish(r, [tape(27.80) for _ in range(CONFIRM + 1)])
    wait_until(lambda: processed(r) == 10 + CONFIRM + 1, message="the move")
    moved = stored_feature(r, symbol)
    assert moved.truth_tick.price == 27.80
    assert buffer_prices(r, symbol) == [25.00] * 5 + [25.01, 27.80]
    wait_until(lambda: len(gate_alerts(r, symbol)) == 4, message="second episode and its end")
    assert [a["data"]["state"] for a in gate_alerts(r, symbol)] == ["firing", "resolved", "firing", "resolved"]
    assert r.hget(SCREEN_KEY, symbol) is not None and json.loads(r.hget(SCREEN_KEY, symbol))["excluded"] == []
    assert r.xlen("ev.dlq") == 1 and r.xpending(copy("ev.prints", "prints"), "prints")["pending"] == 0
    assert worker.terminate() == 0


def test_the_gate_memory_survives_a_restart_and_absurd_saved_prints_are_dropped(redis_url, r, tmp_path, rules_path):
    symbol = "AGNCN"
    tape = Tape(symbol, time.time_ns() - 600 * S)
    worker = start_worker(redis_url, rules_path, tmp_path)
    publish(r, [tape(25.30) for _ in range(3)] + [tape(31.00) for _ in range(CONFIRM)])  # the move, not yet confirmed
    wait_until(lambda: processed(r) == 3 + CONFIRM, message="prints")
    assert stored_feature(r, symbol).truth_tick.price == 25.30
    worker.kill()
    # A print saved before the gates existed (the worker's own encoding) must not come back.
    stale_absurd = make_record("print:AGNCN:old", 9_999_999.0, 100, "NYSE", tape.ts - 30 * S, 0, CORE_RULES)
    r.rpush(BUFFER_KEY.format(symbol=symbol), _encode_print(stale_absurd))
    worker = start_worker(redis_url, rules_path, tmp_path, name="prints-2.log")
    publish(r, [tape(31.00)])  # one more agreeing print: the remembered run confirms the move
    wait_until(lambda: processed(r) == 4 + CONFIRM, message="after restart")
    wait_until(lambda: stored_feature(r, symbol).truth_tick.price == 31.00, message="move accepted after restart")
    feature = stored_feature(r, symbol)
    assert 9_999_999.0 not in [w.grpan_price for w in feature.windows.values()]
    assert feature.windows["10m"].print_count == 4  # 3 x 25.30 + the confirmed 31.00; the absurd one is gone
    assert any(line.get("msg") == "implausible prints in saved state dropped" for line in worker.log_lines())
    assert [a["data"]["state"] for a in gate_alerts(r, symbol)] == ["firing", "resolved"]  # one episode across the restart
    assert worker.terminate() == 0


def test_excluded_prints_are_counted_by_reason(redis_url, r):
    """In process (the metric lives in the handler's process), fed through the real
    Effects the runtime commits."""
    handler = PrintsHandler(SimpleNamespace(clock=Clock(), rules=RULES))
    handler.load(r)
    tape = Tape("NLY PRF", time.time_ns() - 60 * S)
    sample = lambda reason: metrics.registry_for("prints").get_sample_value("qe_prints_excluded_total", {"reason": reason}) or 0.0
    before = {reason: sample(reason) for reason in ("far_from_reference", "absurd_size", "future_time", "too_old")}
    effects = streams.Effects(streams.StreamPolicy(RULES.streams))
    old_ns = time.time_ns() - int(RULES.plausibility.prints.max_age_s * S) - S
    for event in [tape(25.10), tape(0.05), tape(25.10, size=RULES.plausibility.prints.max_size + 1),
                  tape(25.10, ts_ns=time.time_ns() + 3600 * S), tape(25.10, ts_ns=old_ns)]:
        handler.handle(event, effects)
    handler.end_batch(effects)
    after = {reason: sample(reason) for reason in before}
    assert {reason: after[reason] - before[reason] for reason in before} == {
        "far_from_reference": 1, "absurd_size": 1, "future_time": 1, "too_old": 1
    }
    assert handler.symbols["NLY PRF"].truth_tick.price == 25.10 and len(handler.symbols["NLY PRF"]) == 1
    published = [stream for stream in effects.published]
    assert published.count("ev.alerts") == 1 and published.count("ev.features") == 1
