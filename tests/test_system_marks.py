"""Issue 13 with every daemon running (session, market data, prints, exposure, the Brain,
execution) against the IB simulator, the referee: quiet books are de-risked, a position
outside the universe counts at its fallback mark and blocks increases."""

from __future__ import annotations


import pytest
import yaml

from qe import state
from qe.contracts import order_ref_for
from tests.support.processes import REPO, wait_until
from tests.support.system import System, new_york

pytestmark = [pytest.mark.slow, pytest.mark.long]  # make test-long
DAY = "2026-11-20"


def freeze_the_books_quotes(system: System) -> dict[str, dict]:
    """Every held symbol's quote frozen at its current values: no quote change, no print.
    The rest of the universe keeps trading, so the feed as a whole is alive and market
    data keeps vouching for the quiet quotes (docs/market_data.md: a feed with no data at
    all for confirm_interval_s is "quiet" and not vouched for: then nothing is current)."""
    frozen = {}
    for position in system.sim.control.state()["positions"]:
        symbol = position["symbol"]
        quote = system.sim.control.quote(symbol)
        system.sim.control.set_quote(symbol, quote["bid"], quote["ask"], quote["bid_size"], quote["ask_size"], freeze=True)
        frozen[symbol] = quote
    return frozen


def test_the_brain_de_risks_a_book_whose_quotes_never_change(tmp_path):
    """The book's quotes unchanged from 15:32 to the close (more than 10 simulated
    minutes) on a connected, healthy feed that confirms them: HARD_DERISK still trades (never skipped as
    stale_l1), and the orders reach the simulator."""
    system = System(tmp_path, new_york(DAY, "15:30"))
    try:
        # A few minutes of a live market first: prints give every symbol a trusted
        # reference (truth tick, GRPAN), without which no price is sent at all (the collar).
        # From 15:32 no quote of the book changes and no print comes (soft pricing, which
        # needs a fresh truth tick, stops by 15:37): the hard window at 15:58 finds the
        # book above 100 % with quotes 26 minutes quiet.
        system.run_until(new_york(DAY, "15:32"))
        freeze_the_books_quotes(system)
        frozen_at = system.clock.now_ns()
        system.run_until(new_york(DAY, "15:59").replace(second=40))
        hard = [e for e in system.events("ev.intents")
                if e["payload"]["action"] == "NEW" and e["payload"]["intent_type"] == "HARD_DERISK"]
        (tmp_path / "last_trace.json").write_bytes(system.r.hget("state:decision", "last_trace") or b"{}")
        assert hard, f"no hard de-risk intent; the Brain's last trace is in {tmp_path / 'last_trace.json'}"
        assert all(e["payload"]["classification"].endswith("_DEC") for e in hard)
        # The quotes the Brain acted on had not changed for 10+ simulated minutes (our own
        # fills may move a frozen quote, so judge each de-risked symbol by market data's own
        # record of when its quote last changed: quote_ts_ns of the L1 events).
        changes = [e for e in system.events("ev.l1") if e["idempotency_key"].startswith("l1:")]

        def quiet_for_s(intent: dict) -> float:
            created, symbol = intent["payload"]["created_ns"], intent["payload"]["symbol"]
            last = max(e["payload"]["quote_ts_ns"] for e in changes if e["payload"]["symbol"] == symbol and e["ts_ns"] <= created)
            return (created - last) / 1e9

        quiet = [e for e in hard if quiet_for_s(e) >= 10 * 60]
        assert quiet, sorted(quiet_for_s(e) for e in hard)
        assert frozen_at < min(e["payload"]["created_ns"] for e in quiet)
        placed = {q["order_ref"] for q in system.sim.control.requests() if q["event"] == "place"}
        assert {order_ref_for(e["idempotency_key"]) for e in quiet} & placed  # they reached the broker
        # Quiet quotes 10+ minutes old were current: no hard de-risk skip for a stale quote.
        stale = [a for a in system.payloads("ev.alerts")
                 if a["alert_type"] == "decision_symbol_skipped" and a["data"]["slot"] == "HARD_DERISK"
                 and a["data"]["reason"] == "stale_l1"]
        assert stale == []
        # And exposure marks the quiet book at its L1 mids (confirmed, current): its
        # per-symbol state, through the writer's own reader (the last ev.exposure event
        # may be a "changed" one listing only what changed).
        symbols = state.read_exposure_symbols(system.r)
        held = {symbol: line for symbol, line in symbols.values.items() if line.qty}
        assert held and not symbols.problems
        assert all(line.mark_source == "l1_mid" for line in held.values()), {s: l.mark_source for s, l in held.items()}
    finally:
        system.stop()


def test_a_position_outside_the_universe_counts_at_its_fallback_mark_and_blocks_increases(tmp_path):
    """The simulator's account holds ZZZ PRA, which is not in the universe the daemons
    use; its only quote is a stub (never a mark) and it has no prints: it is priced by
    its average cost alone. Exposure counts it, alerts it, and nothing risk-increasing is
    decided or reaches the broker while it is unpriced."""
    universe = tmp_path / "sim_universe.csv"
    universe.write_text((REPO / "etc" / "universe.csv").read_text().rstrip("\n") + "\nZZZ PRA,LT,50000,ZZZ,25.00\n")
    account = yaml.safe_load((REPO / "etc" / "sim_account.yaml").read_text())
    # A book with room (about 62 % gross) so that only the unpriced position stops increases.
    account["positions"] = account["positions"][::2] + [{"symbol": "ZZZ PRA", "qty": 2000, "avg_cost": 25.0, "bucket": "LT"}]
    account_file = tmp_path / "sim_account.yaml"
    account_file.write_text(yaml.safe_dump(account))
    system = System(tmp_path, new_york(DAY, "11:00"),
                    sim_args=["--universe", str(universe), "--account-file", str(account_file)])
    try:
        system.sim.control.set_quote("ZZZ PRA", 0.01, 99.0, 100, 100, freeze=True)  # a stub: never a mark
        system.run_until(new_york(DAY, "11:06"))
        unpriced = [e for e in system.payloads("ev.exposure") if "ZZZ PRA" in e["symbols"]]
        assert unpriced
        for exposure in unpriced:
            line = exposure["symbols"]["ZZZ PRA"]
            assert (line["qty"], line["mark"], line["mark_source"]) == (2000, 25.0, "fallback"), line
            assert "average cost" in line["mark_reason"] and "ZZZ PRA" in exposure["marks_stale"]
        last = system.last_exposure()
        assert last["status"] == "ok" and last["gross_pct"] > 5.0  # counted: 2,000 x $25 = 5 % of ~$1M alone
        alerts = [a for a in system.payloads("ev.alerts") if a["alert_type"] == "unpriced_position" and a["symbol"] == "ZZZ PRA" and a["state"] == "raised"]
        assert len(alerts) == 1
        # No risk-increasing intent, and no risk-increasing order at the broker.
        increases = [i for i in system.intents() if i["action"] == "NEW" and i["classification"].endswith("_INC")]
        assert increases == []
        placed = {q["order_ref"] for q in system.sim.control.requests() if q["event"] == "place"}
        decreases = {order_ref_for(e["idempotency_key"]) for e in system.events("ev.intents")
                     if e["payload"]["classification"].endswith("_DEC")}
        assert placed <= decreases, placed - decreases
        brain_trace = system.r.hget("state:decision", "last_trace")
        assert b"unpriced_positions" in brain_trace and b"ZZZ PRA" in brain_trace

        # Once the market prices it, the block lifts (the block was the unpriced position).
        system.sim.control.set_quote("ZZZ PRA", 24.95, 25.05, 500, 500, freeze=False)
        system.sim.control.inject_print("ZZZ PRA", 25.0, 100, "NYSE")
        wait_until(lambda: system.last_exposure()["symbols"].get("ZZZ PRA", {}).get("mark_source") in ("l1_mid", "truth_tick")
                   or "ZZZ PRA" not in system.last_exposure()["marks_stale"], timeout=60, message="ZZZ PRA priced")
        wait_until(lambda: b"ZZZ PRA" not in (system.r.hget("state:decision", "last_trace") or b"ZZZ PRA"), timeout=60,
                   message="the Brain no longer blocks increases for ZZZ PRA")
    finally:
        system.stop()


def test_the_brain_never_takes_the_broker_above_130_percent_whatever_the_snapshots_miss(tmp_path):
    """The demo book (125 %) in a regime whose tolerance is the hard cap itself, so market
    making and band keeping run right up to 130 %: every exposure snapshot lags the
    orders execution acknowledges by up to a publication, and the Brain counts its own
    orders until a snapshot includes their ev.orders entry. The referee (the broker's own
    potential gross, at its own marks, after every order event) never sees more than 130 %
    from an order."""

    def at_the_cap(rules: dict) -> None:
        rules["session"]["regimes"]["EARLY"]["gross_tolerance_pct"] = 130
        rules["arbitration"]["drop_mm_increases_above_gross_pct"] = 130
        # Strategies stop adding at tolerance - margin (no flapping): a thin margin here,
        # so the increases run up to 129.8 % and a missed order would cross 130 %.
        rules["strategies"]["tolerance_margin_pct"] = 0.2
        rules["decision"]["tolerance_exit_band_pct"] = 0.1
        rules["strategies"]["mm"].update(quote_size=800, max_position_shares=5000)  # quotes that hit the cap

    system = System(tmp_path, new_york(DAY, "10:30"), rules_update=at_the_cap)
    try:
        system.run_until(new_york(DAY, "10:40"))
        increases = [i for i in system.intents() if i["action"] == "NEW" and i["classification"].endswith("_INC")]
        assert increases, "nothing was tried near the cap"
        placed = [q for q in system.sim.control.requests() if q["event"] == "place"]
        assert placed
        log = system.sim.control.referee_log(kind="request")["entries"]
        assert log
        worst = system.sim.control.referee()["potential_gross"]["max"]
        # The broker-side maximum: at most the cap when it came from an order of ours; the
        # market alone (a quote move of a held symbol) may move it a little, never an order.
        if worst["event"] in ("place", "modify"):
            assert worst["pct"] <= 130.0 + 1e-6, worst
        else:
            assert worst["pct"] <= 130.5, worst
        traces = [i["trace"].get("brain_potential_pct") or 0 for i in increases]
        assert max(traces) <= 130.0 + 1e-6
        (tmp_path / "near_cap.txt").write_text(f"{worst}\n{sorted(traces)[-5:]}\n")
        assert worst["pct"] >= 128.0, worst  # the book really ran at the cap
    finally:
        system.stop()
