"""A recorded afternoon of the pure core: every `decide` output, compared to a golden file.

The Brain's evaluation is pure and deterministic, so an afternoon of inputs (quoting in
NORMAL, a re-quote, the tolerance rule, the soft and hard windows, CAP_RECOVERY, an
implausible quote, unknown exposure, a halt, the next morning's MM overnight leftover)
yields the same intents, traces, records and state every time. The golden file was
recorded before engine.decide was split into steps (issue 13) and guards that pure
refactor and every later one: a change of behaviour must change it on purpose
(`QE_REGENERATE_GOLDEN=1 pytest tests/test_decision_golden.py`, and say why).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemons.decision import guards
from daemons.decision.engine import decide
from tests.support.brain import NS, T0, engine_rules, exposure, market, replace, session, view

GOLDEN = Path(__file__).parent / "data" / "decision_golden.json"
EQUITY = 1_000_000.0
UNIVERSE = {"CIM PRB": "LT", "AGNCN": "LT", "NYCB PRU": "LT", "CIM PRC": "MM_PURE", "NLY PRG": "MM_PURE", "NLY PRF": "MM_PURE"}
BOOK = {"CIM PRB": 14000, "AGNCN": 12000, "NYCB PRU": -4000, "CIM PRC": 600, "NLY PRG": -400, "NLY PRF": 0}


def _markets(at: int, grpan: dict[str, float] | None = None):
    grpan = grpan or {}
    return {s: market(24.95, 25.05, truth=25.00, grpan=grpan.get(s, 25.00), ts_ns=at) for s in UNIVERSE}


def _positions(book: dict[str, int]):
    return {s: (q, UNIVERSE[s], 25.0) for s, q in book.items()}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else repr(o)))


def _record(label: str, d) -> dict[str, Any]:
    return _plain({
        "label": label,
        "state": asdict(d.state),
        "transition": None if d.transition is None else asdict(d.transition),
        "intents": [{"key": i.key, "slot": i.slot, "intent": i.intent.model_dump(mode="json")} for i in d.intents],
        "records": {k: r.to_record() for k, r in d.records.items()},
        "removed": d.removed,
        "generations": d.generations,
        "suppressed": [[s.candidate.symbol, s.candidate.slot, s.candidate.side, s.candidate.qty, s.reason] for s in d.suppressed],
        "skips": [asdict(s) for s in d.skips],
        "trace": d.trace,
        "book_potential_pct": None if d.book is None else d.book.potential_pct,
        "symbol_errors": d.symbol_errors,
    })


def afternoon() -> list[dict[str, Any]]:
    er = engine_rules()
    v = view(_positions(BOOK), EQUITY, _markets(T0), universe=UNIVERSE)
    out = []

    def step(label: str, at: int, book: dict[str, int], *, regime="MID", soft=False, hard=False, markets=None,
             exposure_problem: str | None = None, day: str | None = None, **kwargs) -> None:
        nonlocal v
        v.session = session(at, regime=regime, soft=soft, hard=hard, **({"day": day} if day else {}))
        snap = exposure(_positions(book), EQUITY, ts_ns=at)
        if exposure_problem is None:
            v.exposure = v.good_exposure = snap
        else:
            v.exposure = guards.unknown_exposure(snap, exposure_problem)
        v.positions = {s: replace(p, qty=book[s]) for s, p in v.positions.items()}
        v.markets = markets if markets is not None else _markets(at)
        v.refresh_unseen(at, er.rules.decision.unacked_grace_s)
        d = decide(v, er, at, **kwargs)
        # What the handler keeps of a decision (DecisionHandler._run).
        for key in d.removed:
            v.drop_record(key)
        for record in d.records.values():
            v.put_record(record)
        v.generations.update(d.generations)
        v.reported_skips.update(f"{d.state.trading_day}|{s.symbol}|{s.slot}|{s.reason}" for s in d.skips)
        v.state = d.state
        if d.book is not None:
            v.pending_book = d.book.merge_into_parent()
        out.append(_record(label, d))

    s = NS
    step("normal: quotes and the LT band", T0, BOOK)
    step("market move: per-symbol re-quote", T0 + 20 * s, BOOK, full=False, symbols=("CIM PRC",),
         markets=_markets(T0 + 20 * s, {"CIM PRC": 25.10}))
    big = {**BOOK, "AGNCN": 22000, "CIM PRB": 24000}  # 127.5 %: above MID's 120 % tolerance
    step("potential above the tolerance", T0 + 40 * s, big)
    step("soft window", T0 + 60 * s, {**BOOK, "AGNCN": 24000}, regime="LATE", soft=True)
    for n in range(3):
        step(f"hard window step {n + 1}", T0 + (80 + 15 * n) * s, {**BOOK, "AGNCN": 24000}, regime="CLOSE", soft=True, hard=True)
    step("cap recovery", T0 + 140 * s, {**big, "CIM PRB": 30000}, regime="CLOSE")
    bad = _markets(T0 + 160 * s)
    bad["AGNCN"] = market(0.01, 25.05, truth=25.00, grpan=25.00, ts_ns=T0 + 160 * s)
    step("implausible quote", T0 + 160 * s, {**big, "CIM PRB": 30000}, regime="CLOSE", markets=bad)
    step("exposure unknown", T0 + 180 * s, {**big, "CIM PRB": 30000}, regime="CLOSE", exposure_problem="gross_pct missing")
    v.state = replace(v.state, halted=True, halt_reason="test", halt_operator="golden")
    step("halted", T0 + 200 * s, BOOK)
    v.state = replace(v.state, halted=False, halt_reason="resumed", halt_operator="golden")
    morning = T0 + 86_400 * s
    mm_heavy = {**BOOK, "CIM PRC": 9000, "NLY PRG": -9000}
    step("next morning: MM overnight leftover", morning, mm_heavy, regime="OPEN", day="2026-11-23")
    step("next morning, later", morning + 30 * s, mm_heavy, regime="OPEN", day="2026-11-23")
    return out


def test_the_pure_core_decides_the_recorded_afternoon():
    got = afternoon()
    if os.environ.get("QE_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for mine, recorded in zip(got, expected):
        assert mine == recorded, mine["label"]
    # The afternoon exercises what it claims to (a golden file of nothing proves nothing).
    modes = [r["state"]["mode"] for r in got]
    assert {"NORMAL", "SOFT_DERISK", "HARD_DERISK", "CAP_RECOVERY", "HALTED"} <= set(modes), modes
    actions = {(i["intent"]["action"], i["intent"]["intent_type"]) for r in got for i in r["intents"]}
    assert {("NEW", "MM_QUOTE"), ("MODIFY", "MM_QUOTE"), ("CANCEL", "MM_QUOTE"), ("NEW", "HARD_DERISK"),
            ("NEW", "CAP_RECOVERY"), ("NEW", "MM_OVERNIGHT")} <= actions, sorted(actions)
    assert any("implausible_quote" in r["trace"]["skips"] for r in got)
    assert any("exposure_unknown" in r["trace"]["increases_blocked"] for r in got)
