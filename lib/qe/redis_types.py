"""What redis-py's replies hold for the clients this project builds (type aliases only).

Every client here is built without `decode_responses`, so keys, fields and values come
back as bytes, never str; redis-py's own annotations cover both modes (`bytes | str`).
Call sites narrow a reply with `cast(Fields, r.hgetall(key))` and the like: a cast says
what the reply already is, it converts nothing."""

from __future__ import annotations

from redis.typing import EncodableT

# HGETALL; one stream entry's fields.
Fields = dict[bytes, bytes]
# XRANGE / XREVRANGE: (entry id, fields).
StreamEntries = list[tuple[bytes, Fields]]
# Entries read back from a pending list (XREADGROUP id 0, XAUTOCLAIM): an entry deleted or
# trimmed while pending comes back without fields (redis-py: None, or an id of None).
PendingEntries = list[tuple[bytes | None, Fields | None]]
# XREADGROUP (RESP2): [stream name, entries] per stream (lists at run time; unpacked as pairs).
ReadReply = list[tuple[bytes, StreamEntries]]
PendingReadReply = list[tuple[bytes, PendingEntries]]
# HSET mapping=: redis-py types the mapping's keys invariantly, so a dict[str, ...] does not
# match; a mapping built for HSET is typed as this.
HashMapping = dict[EncodableT, EncodableT]
