"""qe.archive (SPEC 11): a day's streams to Parquet, verified, idempotent; the retention
guard never trims an unarchived day (qe.streams XADDG); pandas reads the files."""

from __future__ import annotations

import json
import time
from datetime import date, timedelta

import pandas as pd
import pyarrow.parquet as pq
import pytest

from qe import archive, config, streams
from qe.contracts import L1, Intent, make_event, encode, intent_id_for

BASE = config.load_rules(config.Settings().rules_file)


def rules(enabled: bool, **streams_override) -> config.RiskRules:
    doc = BASE.model_dump(mode="json")
    doc["archive"]["enabled"] = enabled
    for name, rule in streams_override.items():
        doc["streams"][name] = rule
    return config.RiskRules.model_validate(doc)


def l1(symbol: str, n: int, ts_ns: int):
    return make_event(L1(symbol=symbol, bid=24.0 + n / 100, ask=24.5, bid_size=100, ask_size=100),
                      idempotency_key=f"l1:{symbol}:{n}", source="test", ts_ns=ts_ns)


def put(r, stream: str, day: date, count: int, hour: int = 10) -> list[str]:
    """Entries with explicit ids inside `day` (New York)."""
    start, _ = archive.day_bounds_ms(day)
    ids = []
    for n in range(count):
        ms = start + hour * 3_600_000 + n * 1000
        event = l1("AAA PRA", n, ms * 1_000_000)
        ids.append(r.xadd(stream, encode(event), id=f"{ms}-0").decode())
    return ids


def today(r) -> date:
    return archive.day_of_ms(archive.server_ms(r))


def test_archive_day_writes_verifies_and_is_idempotent(r, tmp_path):
    day = today(r) - timedelta(days=2)
    ids = put(r, "ev.l1", day, 25)
    put(r, "ev.l1", day + timedelta(days=1), 5)  # the next day stays out
    r.xadd("ev.dlq", {"origin_stream": "ev.l1", "reason": "bad", "fields": "{}"}, id=f"{archive.day_bounds_ms(day)[0] + 5}-0")
    record = archive.archive_day(r, day, tmp_path)
    assert record["status"] == "archived" and record["closed"] and record["complete"]
    l1_file = record["streams"]["ev.l1"]
    assert (l1_file["rows"], l1_file["first_id"], l1_file["last_id"]) == (25, ids[0], ids[-1])
    assert record["streams"]["ev.session"]["rows"] == 0  # one file per stream, empty ones too
    path = tmp_path / day.isoformat() / "ev.l1.parquet"
    # Readable with pandas directly; the payload is whole JSON text.
    frame = pd.read_parquet(path)
    assert list(frame["id"]) == ids
    assert json.loads(frame["payload"][3])["symbol"] == "AAA PRA"
    assert set(frame["type"]) == {"l1"} and frame["extra"].isna().all()
    dlq = pd.read_parquet(tmp_path / day.isoformat() / "ev.dlq.parquet")
    assert json.loads(dlq["extra"][0])["origin_stream"] == "ev.l1" and dlq["payload"].isna().all()
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    # The record, and the floor moved past the archived day (the next day is not archived).
    stored = json.loads(r.hget("state:archive", day.isoformat()))
    assert stored["streams"]["ev.l1"]["sha256"] == l1_file["sha256"]
    assert r.get("archive:floor").decode() == f"{archive.day_bounds_ms(day + timedelta(days=1))[0]}-0"
    # Twice: nothing changes (no-op); forced: the same bytes.
    before = {p.name: p.read_bytes() for p in (tmp_path / day.isoformat()).iterdir()}
    mtime = path.stat().st_mtime_ns
    assert archive.archive_day(r, day, tmp_path)["status"] == "already archived"
    again = archive.archive_day(r, day, tmp_path, force=True)
    assert again["status"] == "unchanged"
    assert {p.name: p.read_bytes() for p in (tmp_path / day.isoformat()).iterdir()} == before
    assert path.stat().st_mtime_ns == mtime
    assert json.loads(r.hget("state:archive", day.isoformat())) == stored


def test_row_round_trip_rebuilds_the_event(r, tmp_path):
    day = today(r) - timedelta(days=1)
    put(r, "ev.l1", day, 3)
    archive.archive_day(r, day, tmp_path)
    rows = archive.read_day(tmp_path, day, ["ev.l1"])
    original = r.xrange("ev.l1")
    for row, (_id, fields) in zip(rows, original):
        assert json.loads(archive.event_text(row)) == json.loads(fields[b"event"])


def test_verification_refuses_a_mismatch(r, tmp_path, monkeypatch):
    day = today(r) - timedelta(days=1)
    put(r, "ev.l1", day, 4)
    real = archive.day_entries
    calls = {"n": 0}

    def one_more(rr, stream, d, page=archive.PAGE):
        calls["n"] += 1
        rows = list(real(rr, stream, d, page))
        if stream == "ev.l1" and calls["n"] > 1 and rows:  # the recount sees an entry the file has not
            rows.append((f"{int(rows[-1][0].split('-')[0]) + 1}-0", rows[-1][1]))
        return iter(rows)

    monkeypatch.setattr(archive, "day_entries", one_more)
    with pytest.raises(archive.ArchiveError, match="not archived"):
        archive.archive_day(r, day, tmp_path, streams=["ev.l1"])
    assert r.hget("state:archive", day.isoformat()) is None
    assert r.get("archive:floor") is None


def test_open_day_does_not_move_the_floor(r, tmp_path):
    put(r, "ev.l1", today(r), 2, hour=0)
    record = archive.archive_day(r, today(r), tmp_path, streams=["ev.l1"])
    assert record["closed"] is False
    assert r.get("archive:floor") is None


@pytest.fixture
def small_nodes(r):
    r.config_set("stream-node-max-entries", 10)
    yield
    r.config_set("stream-node-max-entries", 100)


def test_guard_never_trims_an_unarchived_day_maxlen(r, tmp_path, small_nodes):
    old = today(r) - timedelta(days=2)
    put(r, "ev.l1", old, 50)
    publisher = streams.Publisher(r, rules(True, **{"ev.l1": {"maxlen": 20}}))
    now_ns = time.time_ns()
    for n in range(40):
        publisher.publish("ev.l1", l1("BBB PRB", n, now_ns))
    # No floor yet (nothing archived): nothing trimmed at all.
    assert r.xlen("ev.l1") == 90
    archive.archive_day(r, old, tmp_path)
    assert r.get("archive:floor") is not None
    for n in range(40, 60):
        publisher.publish("ev.l1", l1("BBB PRB", n, now_ns))
    remaining = [i.decode() for i, _ in r.xrange("ev.l1")]
    # The archived day was trimmed; every entry of the unarchived day (today) is there.
    floor_ms = int(r.get("archive:floor").decode().split("-")[0])
    assert sum(1 for i in remaining if int(i.split("-")[0]) >= floor_ms) == 60
    assert sum(1 for i in remaining if int(i.split("-")[0]) < floor_ms) < 50
    # Without the guard the same rule trims today's entries too.
    unguarded = streams.Publisher(r, rules(False, **{"ev.l1": {"maxlen": 20}}))
    unguarded.publish("ev.l1", l1("BBB PRB", 99, now_ns))
    assert r.xlen("ev.l1") < 40


def test_guard_minid_takes_the_lower_threshold(r, tmp_path, small_nodes):
    old = today(r) - timedelta(days=3)
    put(r, "ev.intents", old, 30)
    publisher = streams.Publisher(r, rules(True, **{"ev.intents": {"minid_age_s": 86400, "dedupe_ttl_s": 60}}))

    def intent(n):
        key = f"intent:test:{n}"
        return make_event(
            Intent(intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol="AAA PRA", side="SELL", qty=100,
                   order_type="LMT", limit_price=24.0, bucket="LT", classification="LT_LONG_DEC", priority=60, ttl_s=90,
                   created_ns=time.time_ns(), risk_delta_gross_pct=-0.1, reason="test"),
            idempotency_key=key, source="decision", ts_ns=time.time_ns())

    publisher.publish("ev.intents", intent(0))
    assert r.xlen("ev.intents") == 31  # rule threshold (1 day ago) is above the old day, but no floor: kept
    r.set("archive:floor", f"{archive.day_bounds_ms(old)[0]}-0")  # the old day not archived yet
    publisher.publish("ev.intents", intent(1))
    assert r.xlen("ev.intents") == 32
    archive.archive_day(r, old, tmp_path)
    publisher.publish("ev.intents", intent(2))
    assert r.xlen("ev.intents") == 3  # archived: the rule applies again


def test_pending_days_and_floor_skip_empty_days(r, tmp_path):
    d4, d2 = today(r) - timedelta(days=4), today(r) - timedelta(days=2)
    put(r, "ev.session", d4, 3)
    put(r, "ev.session", d2, 3)
    assert archive.pending_days(r) == [d4, d2]
    results = archive.archive_pending(r, tmp_path, include_today=False)
    assert [x["day"] for x in results] == [d4.isoformat(), d2.isoformat()]
    assert archive.pending_days(r) == []
    assert r.get("archive:floor").decode() == f"{archive.day_bounds_ms(today(r))[0]}-0"


def test_qe_archive_command(redis_url, r, tmp_path):
    from tests.test_cli import qe

    day = today(r) - timedelta(days=1)
    put(r, "ev.l1", day, 7)
    first = qe(redis_url, "archive", day.isoformat(), "--directory", str(tmp_path), "--json")
    assert first.returncode == 0, first.stderr
    document = json.loads(first.stdout)
    assert document["days"][0]["streams"]["ev.l1"]["rows"] == 7 and document["days"][0]["status"] == "archived"
    assert (tmp_path / day.isoformat() / "risk_rules.yaml").exists()  # the day's rules, for qe replay
    second = qe(redis_url, "archive", day.isoformat(), "--directory", str(tmp_path))
    assert second.returncode == 0 and "already archived" in second.stdout
    pending = qe(redis_url, "archive", "--pending", "--closed-only", "--directory", str(tmp_path), "--json")
    assert pending.returncode == 0 and json.loads(pending.stdout)["days"] == []
