"""qe.replay's pure parts: divergence, what-if diff, mode timeline, gross path from fills."""

from __future__ import annotations

import json

from qe import replay


def intent(key, qty=100, price=24.0, side="SELL", action="NEW", ts=1):
    return replay.IntentRow(key=key, action=action, symbol="AAA PRA", side=side, qty=qty, limit_price=price,
                            order_type="LMT", intent_type="SOFT_DERISK", target=None, ts_ns=ts, trace={"why": key})


def test_first_divergence_names_fields_and_both_traces():
    a = [intent("k0"), intent("k1", qty=200)]
    b = [intent("k0"), intent("k1", qty=300)]
    d = replay.first_divergence(a, b)
    assert d["index"] == 1 and d["fields"] == ["qty"]
    assert d["recorded"]["trace"] == {"why": "k1"} and d["replayed"]["qty"] == 300
    assert replay.first_divergence(a, a) is None
    assert replay.first_divergence(a, a[:1])["replayed"] is None


def test_diff_added_removed_changed():
    base = [intent("k0"), intent("k1"), intent("k2")]
    other = [intent("k0"), intent("k2", price=24.5), intent("k3")]
    diff = replay.diff_intents(base, other)
    assert [x["key"] for x in diff["added"]] == ["k3"]
    assert [x["key"] for x in diff["removed"]] == ["k1"]
    assert diff["changed"][0]["key"] == "k2" and diff["changed"][0]["fields"] == ["limit_price"]


def test_mode_timeline_side_by_side():
    rows = replay.mode_timeline([replay.ModeChange(10, "THROTTLE", "SOFT_DERISK", "r", "")],
                                [replay.ModeChange(5, "THROTTLE", "NORMAL", "n", ""),
                                 replay.ModeChange(20, "NORMAL", "SOFT_DERISK", "r", "")])
    assert [(r["base_mode"], r["other_mode"]) for r in rows] == [
        ("THROTTLE", "NORMAL"), ("SOFT_DERISK", "NORMAL"), ("SOFT_DERISK", "SOFT_DERISK")]


def row(stream, ts, payload):
    return {"stream": stream, "ts_ns": ts, "payload": json.dumps(payload), "source": "x"}


def test_gross_path_takes_out_fills_of_intents_the_other_run_did_not_send():
    snap = lambda ts, qty, detail="full": row("ev.exposure", ts, {
        "status": "ok", "equity": 10_000.0, "gross_pct": qty * 10.0 / 100, "detail": detail,
        "symbols": {"AAA PRA": {"qty": qty, "mark": 10.0}}})
    rows = [
        snap(1, 1000),
        row("ev.orders", 2, {"intent_key": "k1", "symbol": "AAA PRA", "side": "SELL", "filled_qty": 100}),
        row("ev.orders", 3, {"intent_key": "k1", "symbol": "AAA PRA", "side": "SELL", "filled_qty": 300}),
        snap(4, 700, "changed"),
    ]
    base = [intent("k1", qty=300)]
    same = replay.gross_paths(rows, base, base)
    assert [g["other_gross_pct"] for g in same] == [100.0, 70.0]
    none = replay.gross_paths(rows, base, [])  # the other rules never sold: the 300 shares stay
    assert [g["other_gross_pct"] for g in none] == [100.0, 100.0]
    part = replay.gross_paths(rows, base, [intent("k1", qty=100)])  # sold 100 of the 300 filled
    assert part[-1]["other_gross_pct"] == 90.0
