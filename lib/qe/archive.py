"""The day as a record (SPEC 11): every stream's entries of one New York day, written
to compressed Parquet (one file per stream and day), verified against the stream, and
only then marked archived, so the producers' retention may trim it (qe.streams XADDG).

A day is the New York date of the entry id's millisecond time (the Redis server's
clock, which is what MINID/MAXLEN trimming sees). Files:

    <archive.directory>/<YYYY-MM-DD>/<stream>.parquet

Columns: stream, id, id_ms, id_seq, the envelope fields (event_id, ts_ns,
idempotency_key, type, source, schema_version, causation_id), payload (the payload
whole, as JSON text) and extra (JSON of anything else the entry carried, e.g. a dead
letter's fields, or the raw `event` text when it was not a JSON envelope; null
otherwise).

Records (Redis):
    state:archive   day -> JSON {streams: {stream: {rows, first_id, last_id, file, sha256,
                    complete}}, closed, rules_sha256, ...}
    archive:floor   "<ms>-0": the first id of the oldest day not yet archived; producers
                    never trim at or above it while `archive.enabled`.

Idempotent: a closed day already recorded is a no-op; written again (`force`) it gives
the same bytes (the writer is deterministic: fixed page size, row groups and options).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, cast

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from .clock import NEW_YORK
from .contracts import DLQ_STREAM, STREAM_TYPES
from .redis_types import Fields, StreamEntries
from .streams import ARCHIVE_FLOOR

STATE_KEY = "state:archive"
ALL_STREAMS: tuple[str, ...] = (*STREAM_TYPES, DLQ_STREAM)
PAGE = 5_000  # XRANGE page; fixed so that two runs write the same row groups
MAX_SEQ = "18446744073709551615"
SCHEMA = pa.schema([
    ("stream", pa.string()),
    ("id", pa.string()),
    ("id_ms", pa.int64()),
    ("id_seq", pa.int64()),
    ("event_id", pa.string()),
    ("ts_ns", pa.int64()),
    ("idempotency_key", pa.string()),
    ("type", pa.string()),
    ("source", pa.string()),
    ("schema_version", pa.int32()),
    ("causation_id", pa.string()),
    ("payload", pa.string()),
    ("extra", pa.string()),
])
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode


class ArchiveError(Exception):
    pass


# --- days and ids -------------------------------------------------------------------------


def parse_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ArchiveError(f"not a date (YYYY-MM-DD): {text!r}") from None


def day_bounds_ms(day: date) -> tuple[int, int]:
    """[start, end) of a New York calendar day in epoch ms (23 or 25 h across DST)."""
    start = datetime.combine(day, dtime(0), tzinfo=NEW_YORK)
    end = datetime.combine(day + timedelta(days=1), dtime(0), tzinfo=NEW_YORK)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def day_of_ms(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, tz=NEW_YORK).date()


def split_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def server_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def day_entries(r: redis.Redis, stream: str, day: date, page: int = PAGE) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    """The stream's entries of one New York day, oldest first, read in fixed pages."""
    start, end = day_bounds_ms(day)
    low, high = f"{start}-0", f"{end - 1}-{MAX_SEQ}"
    while True:
        rows = cast(StreamEntries, r.xrange(stream, min=low, max=high, count=page))
        for entry_id, fields in rows:
            yield _text(entry_id), fields
        if len(rows) < page:
            return
        low = "(" + _text(rows[-1][0])


# --- rows ---------------------------------------------------------------------------------


def row_of(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One archive row: the envelope's fields as columns, the payload whole as JSON text."""
    ms, seq = split_id(entry_id)
    row: dict[str, Any] = {name: None for name in SCHEMA.names}
    row.update(stream=stream, id=entry_id, id_ms=ms, id_seq=seq)
    others = {}
    raw = fields.get(b"event")
    envelope = None
    if raw is not None:
        try:
            envelope = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            envelope = None
    if isinstance(envelope, dict):
        for name in ("event_id", "idempotency_key", "type", "source", "causation_id"):
            value = envelope.get(name)
            row[name] = value if isinstance(value, str) or value is None else _dumps(value)
        for name in ("ts_ns", "schema_version"):
            value = envelope.get(name)
            row[name] = value if type(value) is int and -(2**63) <= value < 2**63 else None
            if value is not None and row[name] is None:
                others[f"envelope.{name}"] = value
        if "payload" in envelope:
            row["payload"] = _dumps(envelope["payload"])
        unknown = {k: v for k, v in envelope.items() if k not in
                   ("event_id", "ts_ns", "idempotency_key", "type", "source", "schema_version", "causation_id", "payload")}
        if unknown:
            others["envelope"] = unknown
    elif raw is not None:
        others["event"] = raw.decode(errors="replace")
    for field_name, value in fields.items():
        key = field_name.decode(errors="replace")
        if key == "event" or (key in ("type", "idk") and envelope is not None):
            continue  # `type` and `idk` are copies of envelope fields
        others[key] = value.decode(errors="replace")
    row["extra"] = _dumps(others) if others else None
    return row


def event_text(row: dict[str, Any]) -> bytes:
    """The stream entry's `event` field rebuilt from an archive row (for replay)."""
    envelope = {name: row[name] for name in ("event_id", "ts_ns", "idempotency_key", "type", "source",
                                            "schema_version", "causation_id")}
    envelope["payload"] = json.loads(row["payload"]) if row["payload"] is not None else None
    return _dumps(envelope).encode()


# --- writing ------------------------------------------------------------------------------


@dataclass
class StreamFile:
    stream: str
    rows: int
    first_id: str | None
    last_id: str | None
    file: str
    sha256: str
    complete: bool  # False: the stream had already trimmed part of the day before it was archived

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_stream_day(r: redis.Redis, stream: str, day: date, path: Path, compression: str = "zstd",
                     row_group_rows: int = 100_000) -> tuple[int, str | None, str | None]:
    """Write one stream's day to `path` (atomically: a temporary file renamed). Returns
    (rows, first id, last id) as written."""
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    first = last = None
    codec = None if compression == "none" else compression
    # Fixed options and no timestamps in the file: the same entries give the same bytes.
    with pq.ParquetWriter(tmp, SCHEMA, compression=codec, write_statistics=True, use_dictionary=True) as writer:
        buffer: list[dict[str, Any]] = []
        for entry_id, fields in day_entries(r, stream, day):
            buffer.append(row_of(stream, entry_id, fields))
            first = first or entry_id
            last = entry_id
            if len(buffer) >= row_group_rows:
                writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA), row_group_size=row_group_rows)
                rows += len(buffer)
                buffer = []
        if buffer or rows == 0:
            writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA), row_group_size=row_group_rows)
            rows += len(buffer)
    os.replace(tmp, path)
    return rows, first, last


def verify_file(r: redis.Redis, stream: str, day: date, path: Path) -> tuple[int, str | None, str | None]:
    """Read the file back and recount the stream: rows and first/last ids must agree."""
    table = pq.read_table(path, columns=["id"])
    ids = table.column("id").to_pylist()
    count = 0
    first = last = None
    for entry_id, _fields in day_entries(r, stream, day):
        count += 1
        first = first or entry_id
        last = entry_id
    file_first, file_last = (ids[0], ids[-1]) if ids else (None, None)
    if (len(ids), file_first, file_last) != (count, first, last):
        raise ArchiveError(
            f"{stream} {day}: file has {len(ids)} rows {file_first}..{file_last}, "
            f"the stream {count} rows {first}..{last}: not archived"
        )
    return count, first, last


def _trimmed_into(r: redis.Redis, stream: str, start_ms: int) -> bool:
    """Did the stream already lose entries at or after the day's start (before archiving)?"""
    try:
        info = r.xinfo_stream(stream)
    except redis.ResponseError:
        return False  # no such stream
    deleted = _text(info.get("max-deleted-entry-id", b"0-0") or "0-0")
    return split_id(deleted)[0] >= start_ms


def archive_record(r: redis.Redis, day: date) -> dict[str, Any] | None:
    raw = r.hget(STATE_KEY, day.isoformat())
    return json.loads(raw) if raw else None


def archive_day(r: redis.Redis, day: date, directory: Path, *, compression: str = "zstd", row_group_rows: int = 100_000,
                streams: Iterable[str] = ALL_STREAMS, force: bool = False, rules_file: Path | None = None,
                universe_file: Path | None = None) -> dict[str, Any]:
    """Archive one New York day. A closed day already archived is a no-op (`force`:
    write again and keep the files when their bytes are the same). A day not yet over is
    written as far as it goes (`closed: false`) and does not move the retention floor;
    archiving it again later replaces it."""
    existing = archive_record(r, day)
    start_ms, end_ms = day_bounds_ms(day)
    closed = end_ms <= server_ms(r)
    if existing is not None and existing.get("closed") and not force:
        return {**existing, "status": "already archived"}
    target = Path(directory) / day.isoformat()
    target.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    changed = []
    for stream in streams:
        path = target / f"{stream}.parquet"
        scratch = target / f".{stream}.parquet.new"
        rows, first, last = write_stream_day(r, stream, day, scratch, compression, row_group_rows)
        verified = verify_file(r, stream, day, scratch)
        if verified != (rows, first, last):
            raise ArchiveError(f"{stream} {day}: written {rows} {first}..{last}, verified {verified}")
        digest = _sha256(scratch)
        if path.exists() and _sha256(path) == digest:
            scratch.unlink()  # the same bytes: nothing changes
        else:
            os.replace(scratch, path)
            changed.append(stream)
        files[stream] = StreamFile(stream, rows, first, last, path.name, digest,
                                   complete=not _trimmed_into(r, stream, start_ms)).record()
    # The configuration in force, kept beside the day for `qe replay` (the day's own rules).
    config_files = {}
    for name, source in (("risk_rules.yaml", rules_file), ("universe.csv", universe_file)):
        if source is not None and Path(source).exists():
            dest = target / name
            if not dest.exists() or dest.read_bytes() != Path(source).read_bytes():
                if not (existing and existing.get("closed")) or force:
                    shutil.copyfile(source, dest)
            config_files[name] = _sha256(dest)
    record = {
        "day": day.isoformat(),
        "closed": closed,
        "directory": str(target),
        "streams": files,
        "rows": sum(f["rows"] for f in files.values()),
        "complete": all(f["complete"] for f in files.values()),
        "config": config_files,
    }
    same = existing is not None and {k: existing.get(k) for k in record} == record
    if not same:
        r.hset(STATE_KEY, day.isoformat(), _dumps(record))
    if closed:
        update_floor(r)
    return {**record, "status": "unchanged" if same and not changed else "archived"}


# --- the retention floor ------------------------------------------------------------------


def oldest_entry_ms(r: redis.Redis, streams: Iterable[str] = ALL_STREAMS) -> int | None:
    oldest = None
    for stream in streams:
        rows = r.xrange(stream, count=1)
        if rows:
            ms = split_id(_text(rows[0][0]))[0]
            oldest = ms if oldest is None else min(oldest, ms)
    return oldest


def _has_entries(r: redis.Redis, day: date, streams: Iterable[str]) -> bool:
    start, end = day_bounds_ms(day)
    return any(r.xrange(s, min=f"{start}-0", max=f"{end - 1}-{MAX_SEQ}", count=1) for s in streams)


def floor_day(r: redis.Redis, streams: Iterable[str] = ALL_STREAMS) -> date | None:
    """The oldest day not yet archived: from the oldest retained entry's day, skip days
    archived (closed) or without entries, up to today (server clock)."""
    streams = tuple(streams)
    oldest = oldest_entry_ms(r, streams)
    if oldest is None:
        return None
    today = day_of_ms(server_ms(r))
    day = day_of_ms(oldest)
    archived = {k.decode() for k, v in cast(Fields, r.hgetall(STATE_KEY)).items() if json.loads(v).get("closed")}
    while day < today and (day.isoformat() in archived or not _has_entries(r, day, streams)):
        day += timedelta(days=1)
    return day


def update_floor(r: redis.Redis, streams: Iterable[str] = ALL_STREAMS) -> str | None:
    """Move archive:floor up to the first id of the oldest unarchived day (never down)."""
    day = floor_day(r, streams)
    if day is None:
        return _text(r.get(ARCHIVE_FLOOR)) if r.exists(ARCHIVE_FLOOR) else None
    floor = f"{day_bounds_ms(day)[0]}-0"
    current = r.get(ARCHIVE_FLOOR)
    if current is None or split_id(_text(current)) < split_id(floor):
        r.set(ARCHIVE_FLOOR, floor)
        return floor
    return _text(current)


def pending_days(r: redis.Redis, streams: Iterable[str] = ALL_STREAMS) -> list[date]:
    """Closed days with entries not yet archived, oldest first (the after-close hook)."""
    streams = tuple(streams)
    oldest = oldest_entry_ms(r, streams)
    if oldest is None:
        return []
    today = day_of_ms(server_ms(r))
    archived = {k.decode() for k, v in cast(Fields, r.hgetall(STATE_KEY)).items() if json.loads(v).get("closed")}
    days = []
    day = day_of_ms(oldest)
    while day < today:
        if day.isoformat() not in archived and _has_entries(r, day, streams):
            days.append(day)
        day += timedelta(days=1)
    return days


def archive_pending(r: redis.Redis, directory: Path, *, include_today: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """The hook after each close: every closed day not yet archived, then (by default)
    today so far (`closed: false`, replaced by the next run; it does not move the floor)."""
    results = [archive_day(r, day, directory, **kwargs) for day in pending_days(r)]
    if include_today:
        results.append(archive_day(r, day_of_ms(server_ms(r)), directory, **kwargs))
    return results


# --- reading ------------------------------------------------------------------------------


def day_directory(directory: Path, day: date) -> Path:
    return Path(directory) / day.isoformat()


def read_day(directory: Path, day: date, streams: Iterable[str]) -> list[dict[str, Any]]:
    """Archived rows of the given streams, in recorded order: by stream id time, ties
    in the order of `streams` then id sequence (stable)."""
    folder = day_directory(directory, day)
    rows: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
    for rank, stream in enumerate(streams):
        path = folder / f"{stream}.parquet"
        if not path.exists():
            continue
        for row in pq.read_table(path).to_pylist():
            rows.append(((row["id_ms"], rank, row["id_seq"]), row))
    rows.sort(key=lambda item: item[0])
    return [row for _key, row in rows]
