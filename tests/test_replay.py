"""qe.replay's pure parts (divergence, what-if diff, mode timeline, gross path from fills) and
the decision journal followed by a replay."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import daemons.decision.service as brain
from qe import archive, config, replay
from qe.clock import Clock
from qe.contracts import L1, Account, Limits, Session, decode, encode, make_event
from qe.daemon import Context
from qe.streams import Effects, Entry, StreamPolicy
from tests.support.processes import REPO


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


# --- the decision journal: a live-like run, then the replay that follows it --------------------


NS = 1_000_000_000
T0 = 1_795_205_000 * NS


class SteppingClock(Clock):
    """A clock that moves on every reading, like the live one (irregular small steps)."""

    def __init__(self, now_ns: int) -> None:
        self.now = now_ns
        self.readings = 0

    def now_ns(self) -> int:  # type: ignore[override]
        self.readings += 1
        self.now += (self.readings * 7919) % 97_000_000  # 0-97 ms per reading
        return self.now


def universe(tmp_path):
    path = tmp_path / "universe.csv"
    path.write_text("symbol,bucket_hint,adv,group,ref_price\nCIM PRB,LT,50000,G,25.00\nCIM PRC,MM_PURE,50000,G,25.00\n")
    return path


def session_event(ts):
    iso = datetime.fromtimestamp(ts / 1e9, tz=timezone.utc).isoformat()
    return make_event(Session(now_ns=ts, now_utc=iso, now_ny=iso, trading_day="2026-11-20", market_open=True,
                              regime="MID", minutes_to_close=60.0, soft_derisk_active=False, hard_derisk_active=False,
                              early_close=False), idempotency_key=f"s{ts}", source="session", ts_ns=ts)


def inputs():
    """(stream, id, event): a session, the account, then quotes, ids in id order."""
    out = [("ev.session", "1795205000000-0", session_event(T0)),
           ("ev.positions", "1795205000001-0",
            make_event(Account(account="DU1", net_liquidation=1_000_000.0), idempotency_key="a", source="execution", ts_ns=T0))]
    for n in range(40):
        ts = T0 + (n + 1) * 10_000_000  # behind the live clock: never "in the future" for the reader
        symbol = "CIM PRB" if n % 2 else "CIM PRC"
        l1 = L1(symbol=symbol, bid=24.90 + n * 0.01, ask=25.00 + n * 0.01, bid_size=100, ask_size=100, quote_ts_ns=ts)
        out.append(("ev.l1", f"{1795205000002 + n}-0", make_event(l1, idempotency_key=f"q{n}", source="market_data", ts_ns=ts)))
    return out


def test_replay_follows_the_journal_exactly(tmp_path):
    """Batches handled out of id order (grouped by stream), a clock that moves on every
    reading, ticks at irregular moments and a load() in the middle (as after a failed
    commit): replaying the journal gives the same state writes and the same publications."""
    rules = config.load_rules(REPO / "etc" / "risk_rules.yaml")
    settings = config.Settings(universe_path=universe(tmp_path))
    clock = SteppingClock(T0)
    limits = Limits.from_rules(rules.plausibility)
    store = replay.ReplayState()  # the live Brain's Redis
    live = brain.DecisionHandler(Context("decision", settings, rules, clock, store, logging.getLogger("t")))  # type: ignore[arg-type]
    live.load(store)
    events = inputs()
    batches = [events[0:1], events[1:9], events[9:20], events[20:35], events[35:]]
    published, journal = [], []
    for index, batch in enumerate(batches):
        effects = Effects(StreamPolicy(rules.streams))
        # XREADGROUP hands a batch grouped by stream: l1 first here, whatever the ids say.
        for stream, entry_id, event in sorted(batch, key=lambda item: item[0] != "ev.l1"):
            effects.entry = Entry(stream, entry_id, encode_fields(event), 1)
            # Decoded like the runtime does: the reader's limits and a clock reading of its own.
            live.handle(decode(stream, encode_fields(event), limits, clock.now_ns()), effects)
        effects.entry = None
        if index % 2 == 0:
            live.tick(clock.now_ns(), effects)
        live.before_commit(effects)
        store.apply([op for op in effects.ops if not op[0].startswith("XADD")])
        for op in effects.ops:
            if op[0].startswith("XADD"):
                stream, fields = op[3], dict(zip(op[8::2], op[9::2]))
                (journal if stream == "ev.decision_journal" else published).append((stream, fields["event"]))
        if index == 2:
            live.load(store)  # a failed commit's reload, at a moment only the journal knows
    steps = [step for _s, text in journal for step in json.loads(text)["payload"]["steps"]]
    assert [s["kind"] for s in steps].count("load") == 2 and "tick" in {s["kind"] for s in steps}
    handled = [s["id"] for s in steps if s["kind"] == "handle"]
    assert len(handled) == 42 and handled != sorted(handled)  # the handling order, not the id order

    rows = [archive.row_of(stream, entry_id, {k.encode(): v.encode() for k, v in encode(event).items()})
            for stream, entry_id, event in events]
    journal_rows = [{"payload": json.dumps(json.loads(text)["payload"]), "source": "decision"} for _s, text in journal]
    result = replay.run_journal(rows, journal_rows, rules, settings.universe_path)
    assert result.followed == "journal" and result.loads == 2 and result.missing == 0 and result.events == len(events)
    # Every state hash the live Brain wrote, written the same by the replay.
    replayed = replay.ReplayState()
    replay.run_journal(rows, journal_rows, rules, settings.universe_path, state=replayed)
    assert replayed.hashes == store.hashes and any(k.startswith("state:decision") for k in store.hashes)


def encode_fields(event):
    return {k.encode(): v.encode() for k, v in encode(event).items()}
