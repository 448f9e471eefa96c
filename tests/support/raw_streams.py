"""Raw appends, as a hostile or broken writer with a producer's rights would make them
(junk for the dead-letter path, entries the runtime's tests feed by hand).

Every consumer reads its own delivery copy of a stream (qe.topology), fed by the
producers' commit; `append` goes through the same fan-out (the library's
`qe_append`), so what a test writes reaches every consuming group as a producer's
append would, with the same entry id. `copy` names the key a group reads."""

from __future__ import annotations

from typing import Mapping

import redis

from qe.topology import delivery_stream


Fields = Mapping[str | bytes, str | bytes | int | float]


def append(r: redis.Redis, stream: str, fields: Fields, group: str = "") -> str:
    """XADD `fields` to `stream` and to its delivery copies (only `group`'s if given); the new id."""
    new_id = r.fcall("qe_append", 0, *append_args(stream, fields, group))
    return new_id.decode() if isinstance(new_id, bytes) else new_id


def append_args(stream: str, fields: Fields, group: str = "") -> list[str | bytes | int | float]:
    """The arguments of `qe_append` (for a pipeline: `pipe.fcall("qe_append", 0, *append_args(...))`)."""
    return [stream, group, *(item for pair in fields.items() for item in pair)]


def copy(stream: str, group: str) -> str:
    """The key `group` reads `stream` from (for XPENDING, XINFO GROUPS ...)."""
    return delivery_stream(stream, group)


def create_group(r: redis.Redis, stream: str, group: str) -> None:
    """A daemon's group on its own copy of `stream`, created as the runtime creates it
    (the library's `qe_group_create`, start id 0), for tests where no daemon reads."""
    r.fcall("qe_group_create", 0, stream, group, "0", "")
