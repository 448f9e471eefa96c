"""Feed-wide stale episodes in the Brain end even when their resolve is lost (no Redis).

Chaos run 20261126-131915 (seed 14), faulted: at 15:43:02 market data lost the broker
connection and raised `feed_disconnected`; it reconnected 17 s later (simulated), but
Redis was down (a restart), so the resolve waited in its in-memory backlog (103 events)
and the runner's SIGKILL at 15:43:36 took it away; no later market-data process knew the
episode (one only resolves an episode it raised itself; a second one, raised 15:57:23,
was killed before reconnecting). The Brain kept `stale_feeds = {"feed_disconnected": ...}` to the close
and zeroed every one of the 3,506 quotes that came after it (25 symbols): SOFT_DERISK
(15:45-15:58) and HARD_DERISK (15:58-16:00) skipped every held symbol as `stale_l1`,
issued no order at all, and the book closed at 106.13 % gross (control run: 96.58 %).
"""

from __future__ import annotations


import pytest

from daemons.decision import codecs, guards
from daemons.decision.engine import decide
from qe import config
from qe.alert_types import AlertType
from qe.contracts import L1, Alert, make_event
from qe.streams import Effects, StreamPolicy
from tests.support.brain import NS, T0, decision_handler, engine_rules, market, session, view
from tests.support.processes import REPO

DISCONNECTED, SILENT, FARM = AlertType.FEED_DISCONNECTED.value, AlertType.L1_FEED_STALE.value, AlertType.FEED_STALE.value


# --- the rule (pure) --------------------------------------------------------------------------------------


def test_a_quote_vouched_after_the_raise_ends_the_episodes_that_say_no_quote_can_arrive():
    episodes = {DISCONNECTED: T0, SILENT: T0 + 5 * NS, FARM: T0}
    now = T0 + 60 * NS
    assert guards.feed_episodes_standing(episodes, T0 + NS, now) == {SILENT: T0 + 5 * NS, FARM: T0}
    assert guards.feed_episodes_standing(episodes, T0 + 6 * NS, now) == {FARM: T0}  # a broken farm: its resolve only


def test_a_quote_vouched_at_or_before_the_raise_ends_nothing():
    episodes = {DISCONNECTED: T0}
    assert guards.feed_episodes_standing(episodes, T0, T0 + 60 * NS) == episodes  # the same instant proves nothing
    assert guards.feed_episodes_standing(episodes, T0 - NS, T0 + 60 * NS) == episodes  # a late backlog
    assert guards.feed_episodes_standing({}, T0 + NS, T0 + 60 * NS) == {}


def test_a_quote_time_from_the_future_counts_as_now():
    """An episode raised 'in the future' (a clock ahead) is not ended by a quote claiming a
    later time still: the quote's time is bounded by the Brain's clock."""
    episodes = {DISCONNECTED: T0 + 100 * NS}
    assert guards.feed_episodes_standing(episodes, T0 + 200 * NS, T0 + 50 * NS) == episodes
    assert guards.feed_episodes_standing(episodes, T0 + 200 * NS, T0 + 150 * NS) == {}


# --- the handler (imperative shell, no Redis) ---------------------------------------------------------------


@pytest.fixture
def handler(tmp_path):
    return decision_handler(tmp_path, {"CIM PRB": "LT", "AGNCN": "LT"})


def effects() -> Effects:
    return Effects(StreamPolicy(config.load_rules(REPO / "etc" / "risk_rules.yaml").streams))


def at(handler, now_ns: int) -> None:
    handler.clock.now = now_ns


def quote(handler, symbol: str, bid: float, ask: float, vouched_ns: int, done: Effects) -> None:
    """An L1 event market data vouched for at `vouched_ns` (its envelope time)."""
    payload = L1(symbol=symbol, bid=bid, ask=ask, bid_size=500, ask_size=500)
    handler.handle(make_event(payload, idempotency_key=f"l1:{symbol}:{vouched_ns}", source="market-data",
                              ts_ns=vouched_ns), done)


def alert(handler, kind: str, alert_state: str, ts_ns: int, done: Effects) -> None:
    payload = Alert(alert_type=kind, state=alert_state, severity="warning" if alert_state == "raised" else "info",
                    message="m")
    handler.handle(make_event(payload, idempotency_key=f"alert:{kind}:{alert_state}:{ts_ns}", source="market-data",
                              ts_ns=ts_ns), done)


def current(handler, symbol: str) -> bool:
    return handler.view.markets[symbol].quote_fresh(handler.clock.now, handler.rules.derisk.l1_max_age_s)


def stale_feeds_written(done: Effects) -> list[str]:
    return [op[op.index("stale_feeds") + 1] for op in done.ops
            if op[0] == "HSET" and op[1] == codecs.INPUTS and "stale_feeds" in op]


@pytest.mark.parametrize("kind", [DISCONNECTED, SILENT])
def test_an_episode_whose_resolve_was_lost_ends_with_the_next_quote(handler, kind):
    done = effects()
    quote(handler, "CIM PRB", 24.99, 25.01, T0, done)
    quote(handler, "AGNCN", 24.98, 25.02, T0, done)
    at(handler, T0 + NS)
    alert(handler, kind, "raised", T0 + NS, done)
    assert handler.stale_feeds == {kind: T0 + NS}
    assert not current(handler, "CIM PRB") and not current(handler, "AGNCN")
    # A quote vouched before the raise, delivered late, proves nothing.
    at(handler, T0 + 2 * NS)
    quote(handler, "CIM PRB", 24.99, 25.01, T0 + NS // 2, done)
    assert handler.stale_feeds == {kind: T0 + NS} and not current(handler, "CIM PRB")
    # The feed vouches for a quote after the raise; the resolve never comes.
    at(handler, T0 + 3 * NS)
    quote(handler, "CIM PRB", 24.99, 25.01, T0 + 3 * NS, done)
    assert handler.stale_feeds == {}
    assert current(handler, "CIM PRB")
    assert not current(handler, "AGNCN")  # its last quote predates the raise: current with its next one
    assert stale_feeds_written(done)[-1] == "{}"  # a restart does not bring the episode back
    quote(handler, "AGNCN", 24.98, 25.02, T0 + 3 * NS, done)
    assert current(handler, "AGNCN")


def test_a_broken_farm_still_ends_only_with_its_resolve(handler):
    done = effects()
    at(handler, T0 + NS)
    alert(handler, FARM, "raised", T0 + NS, done)
    at(handler, T0 + 2 * NS)
    quote(handler, "CIM PRB", 24.99, 25.01, T0 + 2 * NS, done)  # arrives while a farm is broken: not current
    assert handler.stale_feeds == {FARM: T0 + NS} and not current(handler, "CIM PRB")
    at(handler, T0 + 3 * NS)
    alert(handler, FARM, "resolved", T0 + 3 * NS, done)
    quote(handler, "CIM PRB", 24.99, 25.01, T0 + 3 * NS, done)
    assert handler.stale_feeds == {} and current(handler, "CIM PRB")


def test_a_disconnect_and_a_broken_farm_together_end_one_at_a_time(handler):
    done = effects()
    at(handler, T0 + NS)
    alert(handler, DISCONNECTED, "raised", T0 + NS, done)
    alert(handler, FARM, "raised", T0 + NS, done)
    at(handler, T0 + 2 * NS)
    quote(handler, "CIM PRB", 24.99, 25.01, T0 + 2 * NS, done)
    assert handler.stale_feeds == {FARM: T0 + NS} and not current(handler, "CIM PRB")


# --- the promise: de-risk goes on after a lost resolve ------------------------------------------------------

EQUITY = 1_000_000.0
BOOK = {"CIM PRB": (22000, "LT", 25.0), "AGNCN": (20400, "LT", 25.0)}  # 106.0 % gross


def test_hard_derisk_acts_after_a_disconnect_whose_resolve_was_lost(handler):
    """The chaos run's close in miniature: HARD_DERISK with every quote flowing again after
    a `feed_disconnected` that was never resolved. Before the rule the Brain skipped both
    symbols as stale_l1 and issued nothing."""
    now = T0 + 120 * NS
    markets = {s: market(24.99, 25.01, truth=25.00, ts_ns=T0) for s in BOOK}
    handler.view = view(BOOK, EQUITY, markets, now_ns=now,
                        sess=session(now, regime="CLOSE", soft=True, hard=True, minutes_to_close=1.9))
    done = effects()
    at(handler, T0 + 10 * NS)
    alert(handler, DISCONNECTED, "raised", T0 + 10 * NS, done)
    for step in range(5):  # market data (a new process) confirms every quote, never resolving
        vouched = T0 + (20 + 20 * step) * NS
        at(handler, vouched)
        for symbol in BOOK:
            quote(handler, symbol, 24.99, 25.01, vouched, done)
    at(handler, now)
    d = decide(handler.view, engine_rules(), now)
    assert d.state.mode == "HARD_DERISK"
    assert "stale_l1" not in {s.reason for s in d.skips}
    hard = [i.intent for i in d.intents if i.intent.intent_type == "HARD_DERISK" and i.intent.action == "NEW"]
    assert hard and all(i.side == "SELL" and i.limit_price == 24.99 for i in hard)  # hits the bid
    assert d.state.hard_steps == 1
