"""The market maker pulls its quotes on the quote event that makes the market
implausible, not at the next full evaluation (no Redis).

Found by bench/pipeline.py: after a wide quote (spread $3) the CANCEL intents came with
the Brain's periodic full evaluation, up to `decision.strategy_refresh_interval_s`
(15 s) later: the per-symbol path's cheap pre-check only asked whether GRPAN had moved
a live quote, and a wide quote moves no GRPAN. Two live quotes stayed at the broker,
priced off a market that no longer stood, for seconds."""

from __future__ import annotations

import json

import pytest

from qe.contracts import L1, make_event
from qe.streams import Effects, StreamPolicy
from tests.support.brain import NS, T0, decision_handler, market, outstanding, view

SYMBOL = "CIM PRB"


@pytest.fixture
def quoting(tmp_path):
    """A Brain quoting SYMBOL (an MM_PURE symbol) two-sided around GRPAN 25.00, both quotes live."""
    now = T0 + 10 * NS
    handler = decision_handler(tmp_path, {SYMBOL: "MM_PURE"}, now)
    rules = handler.rules
    handler.view = view({}, 1_000_000.0, {SYMBOL: market(24.95, 25.05, truth=25.00, grpan=25.00, ts_ns=T0)},
                        now_ns=now, universe={SYMBOL: "MM_PURE"})
    edge = rules.strategies.mm.edge
    handler.view.put_record(outstanding("mm-bid", "MM_BID", SYMBOL, "BUY", 200, round(25.00 - edge, 2), bucket="MM_PURE",
                                        classification="MM_LONG_INC", status="Submitted"))
    handler.view.put_record(outstanding("mm-ask", "MM_ASK", SYMBOL, "SELL", 200, round(25.00 + edge, 2), bucket="MM_PURE",
                                        classification="MM_SHORT_INC", status="Submitted"))
    handler.quick_allowed = True
    return handler


def deliver_quote(handler, bid: float, ask: float) -> Effects:
    done = Effects(StreamPolicy(handler.rules.streams))
    now = handler.clock.now
    handler.handle(make_event(L1(symbol=SYMBOL, bid=bid, ask=ask, bid_size=500, ask_size=500),
                              idempotency_key=f"l1:{SYMBOL}:{now}", source="market-data", ts_ns=now), done)
    return done


def intents(done: Effects) -> list[dict]:
    out = []
    for op, stream in zip((op for op in done.ops if op[0] in ("XADD?", "XADDG")), done.published):
        if stream == "ev.intents":
            out.append(json.loads(op[op.index("event") + 1])["payload"])
    return out


def test_a_wide_quote_pulls_both_live_quotes_on_that_event(quoting):
    done = deliver_quote(quoting, 23.50, 26.50)  # a $3 spread: implausible (wide_spread)
    cancels = [i for i in intents(done) if i["action"] == "CANCEL"]
    assert {(i["symbol"], i["target_intent_key"]) for i in cancels} == {(SYMBOL, "mm-bid"), (SYMBOL, "mm-ask")}, intents(done)
    assert not [i for i in intents(done) if i["action"] == "NEW"]


def test_an_ordinary_quote_that_moves_nothing_evaluates_nothing(quoting):
    done = deliver_quote(quoting, 24.96, 25.04)  # plausible, GRPAN unchanged: the live quotes stand
    assert intents(done) == []
