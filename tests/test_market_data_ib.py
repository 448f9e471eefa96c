"""qe-market-data (IB source) as a real subprocess with the real ib_async client
against the IB gateway simulator (sim/, in a thread of the test process), and a
real Redis. The simulator is the referee: it reports the subscriptions it holds."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from daemons.market_data.service import FEED_EPISODES_KEY
from qe import state
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until, write_rules
from tests.support.raw_streams import copy

try:
    from conftest_sim import sim, sim_control  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.conftest_sim import sim, sim_control  # noqa: F401

UNIVERSE = [line.split(",")[0] for line in (REPO / "etc" / "universe.csv").read_text().splitlines()
            if line and not line.startswith(("#", "symbol"))]
SPAWNED: list[DaemonProcess] = []


@pytest.fixture(autouse=True)
def spawned():
    """Every daemon a test starts is killed at teardown, even when the test fails."""
    yield SPAWNED
    while SPAWNED:
        SPAWNED.pop().kill()


def start(command: str, redis_url: str, tmp_path: Path, sim, name: str, env: dict | None = None, **market_data) -> DaemonProcess:
    section = {
        "source": "ibkr",
        "reconnect_base_s": 0.2,
        "reconnect_cap_s": 1.0,
        "ibkr": {"max_tick_by_tick": 3, "tick_by_tick_rotation_s": 600, "connect_timeout_s": 5},
        **market_data,
    }
    rules = write_rules(tmp_path, market_data=section, runtime={"block_ms": 200})
    env = daemon_env(redis_url, QE_CONFIG=rules, QE_IB_PORT=sim.port, QE_IB_CLIENT_ID_MARKET_DATA=12, **(env or {}))
    process = DaemonProcess(console_script(command), env, tmp_path / f"{name}.log").start()
    SPAWNED.append(process)
    return process


def start_subscribed(redis_url: str, tmp_path: Path, sim, **market_data) -> DaemonProcess:
    """qe-market-data started and subscribed to every symbol (3 tick-by-tick slots)."""
    md = start("qe-market-data", redis_url, tmp_path, sim, "market-data", **market_data)
    wait_until(lambda: subscriptions(sim) == (len(UNIVERSE), 3), timeout=30, message="subscribed")
    return md


def stream_events(r: redis.Redis, stream: str) -> list[dict]:
    return [json.loads(fields[b"event"]) for _id, fields in r.xrange(stream)]


def alerts(r: redis.Redis) -> list[str]:
    """Alert types as published; a resolved one as "<type>:resolved" (the contract's state)."""
    return [e["payload"]["alert_type"] + (":resolved" if e["payload"]["state"] == "resolved" else "")
            for e in stream_events(r, "ev.alerts")]


def our_client(sim) -> dict | None:
    return next((c for c in sim.control.state()["clients"] if c["client_id"] == 12), None)


def subscriptions(sim) -> tuple[int, int] | None:
    client = our_client(sim)
    return None if client is None else (client["mkt_subscriptions"], client["tbt_subscriptions"])


def injected(r: redis.Redis, size: int) -> list[dict]:
    return [e for e in stream_events(r, "ev.prints") if e["payload"]["size"] == size]


def assert_no_duplicate_prints(r: redis.Redis) -> None:
    keys = Counter(fields[b"idk"] for _id, fields in r.xrange("ev.prints"))
    assert [key for key, n in keys.items() if n > 1] == []


def test_quotes_and_prints_flow_into_redis(redis_url, r, tmp_path, sim):
    md = start_subscribed(redis_url, tmp_path, sim)
    wait_until(lambda: r.xlen("ev.l1") >= 50 and r.xlen("ev.prints") >= 5, timeout=20, message="quotes and prints")
    quotes = stream_events(r, "ev.l1")
    assert len({q["payload"]["symbol"] for q in quotes}) >= 10
    sample = quotes[-1]["payload"]
    assert sample["bid"] is not None and sample["ask"] is not None and sample["bid"] < sample["ask"]
    # Prints come from the 3 tick-by-tick slots: the first 3 symbols of the universe.
    tbt = set(UNIVERSE[:3])
    assert {p["payload"]["symbol"] for p in stream_events(r, "ev.prints")} <= tbt
    sim.control.inject_print("CIM PRB", 24.77, 777, "IEX", "F")
    wait_until(lambda: injected(r, 777), message="injected print")
    time.sleep(0.3)
    [event] = injected(r, 777)
    assert event["payload"]["venue"] == "IEX" and event["payload"]["conditions"] == ["F"]
    assert event["payload"]["price"] == 24.77 and event["payload"]["symbol"] == "CIM PRB"
    assert event["idempotency_key"].startswith("print:CIM PRB:")
    assert_no_duplicate_prints(r)
    assert md.terminate() == 0


def test_forced_disconnect_reconnects_resubscribes_and_duplicates_nothing_downstream(redis_url, r, tmp_path, sim):
    md = start("qe-market-data", redis_url, tmp_path, sim, "market-data")
    worker = start("qe-prints", redis_url, tmp_path, sim, "prints")
    wait_until(lambda: subscriptions(sim) == (len(UNIVERSE), 3), timeout=30, message="subscribed")
    wait_until(lambda: r.xlen("ev.prints") >= 5, timeout=20, message="prints before")
    first_peer = our_client(sim)["peer"]

    sim.control.restart(1.5)  # drop every client and refuse connections for 1.5 s
    wait_until(lambda: our_client(sim) is None, timeout=10, message="dropped")
    wait_until(lambda: our_client(sim) is not None and our_client(sim)["peer"] != first_peer,
               timeout=30, message="reconnected")
    wait_until(lambda: subscriptions(sim) == (len(UNIVERSE), 3), timeout=30, message="re-subscribed")
    sim.control.inject_print("CIM PRA", 24.09, 555, "ARCA")
    wait_until(lambda: injected(r, 555), timeout=10, message="print after reconnect")
    wait_until(lambda: {"feed_disconnected", "feed_disconnected:resolved"} <= set(alerts(r)), message="alerts")
    time.sleep(1.0)
    assert len(injected(r, 555)) == 1
    assert_no_duplicate_prints(r)
    logs = md.log_lines()
    assert any(line.get("msg") == "feed connection failed; retrying" for line in logs), "refused while down: retried"

    # Downstream: the prints worker holds every print exactly once.
    total = Counter(e["payload"]["symbol"] for e in stream_events(r, "ev.prints"))
    wait_until(
        lambda: all(r.llen(f"state:prints:buffer:{symbol}") >= n for symbol, n in total.items()),
        timeout=20, message="worker caught up",
    )
    assert md.terminate() == 0
    time.sleep(0.5)
    total = Counter(e["payload"]["symbol"] for e in stream_events(r, "ev.prints"))
    wait_until(lambda: r.xpending(copy("ev.prints", "prints"), "prints")["pending"] == 0 and
               r.xinfo_groups(copy("ev.prints", "prints"))[0]["lag"] == 0, message="worker drained")
    assert {symbol: r.llen(f"state:prints:buffer:{symbol}") for symbol in total} == dict(total)
    assert worker.terminate() == 0


def test_1101_and_1102_resubscribe_without_doubling(redis_url, r, tmp_path, sim):
    md = start_subscribed(redis_url, tmp_path, sim)
    sim.control.send_code(1101)  # restored, data lost: the simulator forgot every subscription
    wait_until(lambda: subscriptions(sim) == (len(UNIVERSE), 3), timeout=15, message="re-subscribed after 1101")
    sim.control.inject_print("CIM PRC", 23.41, 333, "NYSE")
    wait_until(lambda: injected(r, 333), timeout=10, message="print after 1101")
    sim.control.send_code(1102)  # restored, data kept: cancel + request, not doubled
    wait_until(lambda: any(line.get("why", "").startswith("IB 1102") for line in md.log_lines()), message="1102 handled")
    # Cancel + request is paced by ib_async (45 requests/s): watch it settle, never doubled.
    seen = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        seen.append(subscriptions(sim))
        time.sleep(0.05)
    assert max(mkt for mkt, _ in seen) == len(UNIVERSE) and max(tbt for _, tbt in seen) == 3
    assert seen[-1] == (len(UNIVERSE), 3)
    sim.control.inject_print("CIM PRC", 23.42, 444, "NYSE")
    wait_until(lambda: injected(r, 444), timeout=10, message="print after 1102")
    time.sleep(0.5)
    assert len(injected(r, 333)) == 1 and len(injected(r, 444)) == 1
    assert_no_duplicate_prints(r)
    assert md.terminate() == 0


def test_data_farm_broken_publishes_a_stale_feed_alert(redis_url, r, tmp_path, sim):
    md = start_subscribed(redis_url, tmp_path, sim)
    wait_until(lambda: r.xlen("ev.l1") > 0, message="quotes")
    sim.control.send_code(2103)
    wait_until(lambda: "feed_stale" in alerts(r), timeout=10, message="stale alert")
    stale = [e for e in stream_events(r, "ev.alerts") if e["payload"]["alert_type"] == "feed_stale"][0]["payload"]
    assert stale["severity"] == "warning" and "2103" in stale["message"] and "usfarm" in stale["message"]
    wait_until(lambda: r.hget("state:daemon:market-data", "feed_stale") == b"1", timeout=10, message="heartbeat")
    sim.control.send_code(2104)
    wait_until(lambda: "feed_stale:resolved" in alerts(r), timeout=10, message="recovered")
    assert md.terminate() == 0


def test_tick_by_tick_slots_go_to_positions_first_and_rotate_the_rest(redis_url, r, tmp_path, sim):
    # As execution writes them (qe.state's writer).
    r.hset(state.POSITIONS, "NLY PRF", state.position_value(state.PositionState(qty=1500, avg_cost=24.0, bucket="LT", account="DU1")))
    r.hset(state.POSITIONS, "PFF", state.position_value(state.PositionState(qty=0, avg_cost=0.0, bucket="LT", account="DU1")))  # flat: no priority
    md = start("qe-market-data", redis_url, tmp_path, sim, "market-data",
               ibkr={"max_tick_by_tick": 2, "tick_by_tick_rotation_s": 1.0})
    wait_until(lambda: subscriptions(sim) == (len(UNIVERSE), 2), timeout=30, message="subscribed")
    seen_tbt_counts = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        seen_tbt_counts.add(subscriptions(sim)[1])
        time.sleep(0.1)
    assert seen_tbt_counts <= {1, 2}  # never above the cap (1 for an instant while a slot moves)
    symbols = Counter(e["payload"]["symbol"] for e in stream_events(r, "ev.prints"))
    assert symbols["NLY PRF"] >= 3, symbols  # the position keeps its slot
    assert len(set(symbols) - {"NLY PRF"}) >= 3, symbols  # the other slot rotated
    assert md.terminate() == 0


def test_a_stub_quote_from_ib_is_published_flagged_with_one_alert_and_a_resolution(redis_url, r, tmp_path, sim):
    symbol = UNIVERSE[5]  # no tick-by-tick slot: quotes only
    md = start_subscribed(redis_url, tmp_path, sim)
    of_symbol = lambda: [e["payload"] for e in stream_events(r, "ev.l1") if e["payload"]["symbol"] == symbol]
    wait_until(lambda: of_symbol(), timeout=20, message="a first quote")
    normal = sim.control.quote(symbol)
    sim.control.set_quote(symbol, 0.01, 999_999.0, freeze=True)
    # The $999,999 ask is above max_price: published without it, flagged.
    wait_until(lambda: any(q["bid"] == 0.01 and q["ask"] is None for q in of_symbol()), message="the stub quote")
    stub = [q for q in of_symbol() if q["bid"] == 0.01]
    assert stub and all(q["implausible"] == "absurd_price" for q in stub)
    sim.control.set_quote(symbol, normal["bid"], normal["ask"], freeze=True)
    wait_until(lambda: of_symbol()[-1]["bid"] == normal["bid"] and of_symbol()[-1]["ask"] == normal["ask"], message="back")
    assert of_symbol()[-1]["implausible"] is None
    symbol_alerts = lambda: [
        e["payload"] for e in stream_events(r, "ev.alerts")
        if e["payload"]["alert_type"] == "l1_implausible" and e["payload"]["symbol"] == symbol
    ]
    wait_until(lambda: len(symbol_alerts()) == 2, message="start and end")
    assert [(a["severity"], a["data"]["state"]) for a in symbol_alerts()] == [("warning", "firing"), ("info", "resolved")]
    assert symbol_alerts()[0]["data"]["problem"] == "absurd_price"
    assert md.terminate() == 0


# --- issue 13: confirming unchanged quotes; no unpriced risk ----------------------------------------------

CONFIRM_S = 1.0


def quotes_of(r: redis.Redis, symbol: str) -> list[dict]:
    return [e for e in stream_events(r, "ev.l1") if e["payload"]["symbol"] == symbol]


def confirmations(r: redis.Redis, symbol: str | None = None) -> list[dict]:
    return [e for e in stream_events(r, "ev.l1")
            if e["idempotency_key"].startswith("l1confirm:") and (symbol is None or e["payload"]["symbol"] == symbol)]


def frozen_quote(r: redis.Redis, sim, symbol: str) -> tuple[float, float]:
    """Freeze the simulator's quote of `symbol`; wait until market data published it."""
    wait_until(lambda: quotes_of(r, symbol), timeout=20, message="a first quote")
    normal = sim.control.quote(symbol)
    bid, ask = round(normal["bid"] - 0.01, 2), round(normal["ask"] + 0.01, 2)
    sim.control.set_quote(symbol, bid, ask, freeze=True)
    wait_until(lambda: any(q["payload"]["bid"] == bid and q["payload"]["ask"] == ask for q in quotes_of(r, symbol)),
               message="the frozen quote")
    return bid, ask


def assert_confirmed_unchanged(events: list[dict], bid: float, ask: float, at_least: int) -> None:
    """Same quote (bid, ask and quote_ts_ns: when it last changed), vouched for at least every
    interval (envelope ts_ns), each with its own key."""
    assert len(events) >= at_least, len(events)
    assert {(e["payload"]["bid"], e["payload"]["ask"]) for e in events} == {(bid, ask)}
    assert len({e["payload"]["quote_ts_ns"] for e in events}) == 1
    vouched = [e["ts_ns"] for e in events]
    assert vouched == sorted(vouched) and len(set(vouched)) == len(vouched)
    assert max(b - a for a, b in zip(vouched, vouched[1:])) <= (CONFIRM_S + 0.3) * 1e9
    assert len({e["idempotency_key"] for e in events}) == len(events)


def test_an_unchanged_quote_is_confirmed_and_not_while_the_data_farm_is_broken(redis_url, r, tmp_path, sim):
    symbol = UNIVERSE[5]
    md = start_subscribed(redis_url, tmp_path, sim, confirm_interval_s=CONFIRM_S)
    bid, ask = frozen_quote(r, sim, symbol)
    time.sleep(4 * CONFIRM_S)
    unchanged = [q for q in quotes_of(r, symbol) if (q["payload"]["bid"], q["payload"]["ask"]) == (bid, ask)]
    assert_confirmed_unchanged(unchanged, bid, ask, at_least=4)
    assert unchanged[0]["idempotency_key"].startswith("l1:")  # the change itself, then confirmations
    assert all(e["idempotency_key"].startswith("l1confirm:") for e in unchanged[1:])

    broken_at = time.time_ns()
    sim.control.send_code(2103)  # market data farm broken (the simulator keeps quoting)
    wait_until(lambda: "feed_stale" in alerts(r), timeout=10, message="stale alert")
    time.sleep(3 * CONFIRM_S)
    assert [e["ts_ns"] for e in confirmations(r) if e["ts_ns"] > broken_at + CONFIRM_S * 1e9] == []
    # The simulator also stops quoting while its farm is broken: the daemon says which rule held.
    paused = [line.get("blocked") for line in md.log_lines() if line.get("msg") == "quote confirmations paused"]
    assert paused and paused[-1] == "data farm broken", paused
    ok_at = time.time_ns()
    sim.control.send_code(2104)  # farm OK: confirmations resume (spread over one interval)
    wait_until(lambda: len([e for e in confirmations(r, symbol) if e["ts_ns"] > ok_at]) >= 2, timeout=10,
               message="confirmations resumed")
    assert md.terminate() == 0


def test_confirmations_stop_when_the_feed_drops_and_resume_after_the_reconnect(redis_url, r, tmp_path, sim):
    symbol = UNIVERSE[6]
    md = start_subscribed(redis_url, tmp_path, sim, confirm_interval_s=CONFIRM_S)
    bid, ask = frozen_quote(r, sim, symbol)
    wait_until(lambda: len(confirmations(r, symbol)) >= 2, timeout=10, message="confirmed")
    down_at = time.time_ns()
    sim.control.restart(4.0)  # drop every client, refuse connections for 4 s
    wait_until(lambda: our_client(sim) is None, timeout=10, message="dropped")
    wait_until(lambda: our_client(sim) is not None, timeout=30, message="reconnected")
    # Nothing vouched for between one interval after the drop and the reconnect (>= 4 s later).
    assert [e["ts_ns"] for e in confirmations(r) if down_at + CONFIRM_S * 1e9 < e["ts_ns"] < down_at + 4e9] == []
    back_at = time.time_ns()
    wait_until(lambda: len([e for e in confirmations(r, symbol) if e["ts_ns"] > back_at]) >= 3, timeout=20,
               message="confirmations after the reconnect")
    after = [q for q in quotes_of(r, symbol) if q["ts_ns"] > back_at]
    assert_confirmed_unchanged([q for q in after if q["idempotency_key"].startswith("l1confirm:")], bid, ask, at_least=3)
    assert md.terminate() == 0


def write_universe(tmp_path: Path, symbols: list[str]) -> Path:
    rows = [line for line in (REPO / "etc" / "universe.csv").read_text().splitlines()
            if line.startswith(("#", "symbol")) or line.split(",")[0] in symbols]
    path = tmp_path / "universe-reduced.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_positions_outside_the_universe_file_are_subscribed_priced_and_alerted_once(redis_url, r, tmp_path, sim):
    """The simulator's demo account holds 19 symbols; market data gets a universe file of 4
    symbols and learns the rest from what the real execution daemon writes."""
    reduced = ["CIM PRA", "AGNCN", "ARR PRC", "NLY PRG"]  # 3 held, 1 not
    md = start("qe-market-data", redis_url, tmp_path, sim, "market-data",
               env={"QE_UNIVERSE": write_universe(tmp_path, reduced)}, confirm_interval_s=CONFIRM_S)
    wait_until(lambda: subscriptions(sim) is not None and subscriptions(sim)[0] == len(reduced), timeout=30,
               message="the reduced universe subscribed")
    # The writer: the real execution daemon reconciles with the simulator's account.
    execution = DaemonProcess(
        console_script("qe-execution"),
        daemon_env(redis_url, QE_CONFIG=md.env["QE_CONFIG"], QE_IB_PORT=sim.port, QE_CONSUMER_NAME="execution-1"),
        tmp_path / "execution.log",
    ).start()
    SPAWNED.append(execution)
    wait_until(lambda: r.hlen("state:positions") >= 19, timeout=30, message="execution wrote the positions")
    held = {name.decode() for name in r.hkeys("state:positions")}
    outside = held - set(reduced)
    assert {"PFF", "CIM PRD", "TWO PRC"} <= outside
    wait_until(lambda: subscriptions(sim)[0] == len(reduced) + len(outside), timeout=30, message="held symbols subscribed")
    wait_until(lambda: all(quotes_of(r, symbol) for symbol in outside), timeout=20, message="their quotes published")
    pff = quotes_of(r, "PFF")[-1]["payload"]
    assert pff["bid"] is not None and pff["ask"] is not None and pff["bid"] < pff["ask"]
    time.sleep(6)  # more than one holdings re-check: nothing is added or alerted twice
    added = [e["payload"] for e in stream_events(r, "ev.alerts") if e["payload"]["alert_type"] == "unpriced_symbol_subscribed"]
    assert sorted(a["symbol"] for a in added) == sorted(outside)
    assert all(a["severity"] == "warning" and a["data"]["subscribed"] for a in added)
    logged = [line["symbol"] for line in md.log_lines() if line.get("msg") == "subscribed a symbol missing from the universe file"]
    assert sorted(logged) == sorted(outside)
    assert subscriptions(sim)[0] == len(reduced) + len(outside)
    assert md.terminate() == 0
    assert execution.terminate() == 0


def feed_episodes(r: redis.Redis) -> dict[str, int]:
    """Market data's open feed-wide episodes (its own state, committed with the alerts)."""
    key = FEED_EPISODES_KEY.format(source="ibkr")
    return {name.decode(): int(value) for name, value in r.hgetall(key).items()}


def alert_events(r: redis.Redis, alert_type: str) -> list[dict]:
    return [e for e in stream_events(r, "ev.alerts") if e["payload"]["alert_type"] == alert_type]


def test_a_disconnect_whose_process_was_killed_is_resolved_by_the_next_process(redis_url, r, tmp_path, sim):
    """Killed while disconnected (its resolve never sent): the next process resolves the
    episode once it connects, under the raise's episode, and the open episodes empty."""
    md = start_subscribed(redis_url, tmp_path, sim)
    assert feed_episodes(r) == {}
    sim.control.restart(6.0)  # drop every client, refuse connections for 6 s
    wait_until(lambda: "feed_disconnected" in alerts(r), timeout=10, message="disconnect raised")
    wait_until(lambda: "feed_disconnected" in feed_episodes(r), timeout=10, message="episode recorded")
    md.kill()  # before it could reconnect: no resolve from this process
    assert "feed_disconnected:resolved" not in alerts(r)
    episode = feed_episodes(r)["feed_disconnected"]

    start("qe-market-data", redis_url, tmp_path, sim, "market-data-2")
    wait_until(lambda: "feed_disconnected:resolved" in alerts(r), timeout=30, message="resolved by the new process")
    raised, resolved = alert_events(r, "feed_disconnected")
    assert resolved["payload"]["state"] == "resolved"
    # Same episode: the key names its start (ms), so raise and resolve pair up downstream.
    assert raised["idempotency_key"].split(":")[-2] == resolved["idempotency_key"].split(":")[-2] == str(episode // 1_000_000)
    wait_until(lambda: feed_episodes(r) == {}, timeout=10, message="no open episode")


def test_a_broken_farm_whose_process_was_killed_is_resolved_once_the_next_process_receives_data(redis_url, r, tmp_path, sim):
    md = start_subscribed(redis_url, tmp_path, sim)
    wait_until(lambda: r.xlen("ev.l1") > 0, message="quotes")
    sim.control.send_code(2103)
    wait_until(lambda: "feed_stale" in feed_episodes(r), timeout=10, message="stale episode recorded")
    md.kill()
    sim.control.send_code(2104)  # the farm recovers while nobody listens
    start("qe-market-data", redis_url, tmp_path, sim, "market-data-2")
    wait_until(lambda: "feed_stale:resolved" in alerts(r), timeout=30, message="resolved by the new process")
    assert [e["payload"]["state"] for e in alert_events(r, "feed_stale")] == ["raised", "resolved"]
    wait_until(lambda: feed_episodes(r) == {}, timeout=10, message="no open episode")
