"""Latest state in Redis hashes (`state:*`): one field per top-level attribute,
each value JSON, so `redis-cli HGETALL state:exposure` is readable and a daemon
can rebuild a typed snapshot after a restart."""

from __future__ import annotations

import json
from typing import Any

import redis
from pydantic_core import to_json

from .contracts import Envelope

EXPOSURE = "state:exposure"
EXPOSURE_SYMBOLS = "state:exposure:symbols"  # field per symbol: its SymbolExposure JSON
POSITIONS = "state:positions"
SESSION = "state:session"
ORDERS = "state:orders"
DECISION = "state:decision"
BROKER = "state:broker"


def _compact(value: Any) -> str:
    # pydantic-core's encoder: compact JSON, several times faster than json.dumps.
    return to_json(value).decode()


def snapshot_fields(event: Envelope) -> dict[str, str]:
    """Hash fields for an event's payload, plus where it came from."""
    fields = {name: _compact(value) for name, value in event.payload.model_dump(mode="json").items()}
    fields["_event_id"] = json.dumps(str(event.event_id))
    fields["_ts_ns"] = json.dumps(event.ts_ns)
    fields["_idempotency_key"] = json.dumps(event.idempotency_key)
    return fields


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value, separators=(",", ":"), default=str) for name, value in values.items()}


def decode_fields(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {name.decode(): json.loads(value) for name, value in raw.items()}


def read(r: redis.Redis, key: str) -> dict[str, Any]:
    return decode_fields(r.hgetall(key))
