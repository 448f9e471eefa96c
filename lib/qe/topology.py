"""Who consumes which stream, and where each consumer reads it (docs/security.md,
docs/runtime.md rule 0).

Redis ACLs restrict commands and *keys*; a consumer group is only an argument of
XREADGROUP/XACK/XCLAIM. So that no daemon can read, acknowledge or claim as another
daemon's group, no two groups share a key: every consumed stream `ev.x` is fanned
out, inside the producer's atomic commit (`qe_commit`, qe.functions), into one
*delivery copy* per consuming group, `ev.x@<group>`, with the same entry id and
fields. A group exists only on its own copy, and only its owner's ACL user may touch
that key. The stream itself (`ev.x`) has no group: it is what the archive, replay,
`qe` and the readers without a group read.

This module is the one table of consumption: the ACL (qe.acl), the function library
(the fan-out, qe.functions) and the runtime (qe.streams) all read it.
"""

from __future__ import annotations

from typing import Iterable

COPY_SEPARATOR = "@"

# Consumer group -> the streams it consumes (the group's owner is in qe.acl.ACCESS).
CONSUMES: dict[str, tuple[str, ...]] = {
    "prints": ("ev.prints",),
    "exposure": ("ev.positions", "ev.orders", "ev.l1", "ev.features"),
    "alerts": ("ev.l1", "ev.prints", "ev.exposure", "ev.broker", "ev.session"),
    "decision_engine": (
        "ev.session", "ev.exposure", "ev.l1", "ev.features", "ev.positions",
        "ev.orders", "ev.alerts", "ev.broker", "ev.control",
    ),
    "execution_service": ("ev.intents", "ev.l1", "ev.features", "ev.control", "ev.session"),
    "pnl": ("ev.orders", "ev.positions", "ev.l1", "ev.features", "ev.session", "ev.broker_pnl"),
}

# The ACL marker of group ownership (a key never created): only a group's owner may
# STRLEN it, and the functions ask Redis whether the caller may (`acl_check_cmd`).
GROUP_KEY = "qe:group:{group}"
GROUP_CHECK_COMMAND = "strlen"


def delivery_stream(stream: str, group: str) -> str:
    """The key a group reads `stream` from: its own copy."""
    return f"{stream}{COPY_SEPARATOR}{group}"


def origin_stream(key: str) -> str:
    """The stream a delivery copy (or the stream itself) carries."""
    return key.split(COPY_SEPARATOR, 1)[0]


def fanout(consumes: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """Stream -> the groups it is copied to, in a stable order."""
    table: dict[str, list[str]] = {}
    for group, streams in sorted((consumes if consumes is not None else CONSUMES).items()):
        for stream in streams:
            table.setdefault(stream, []).append(group)
    return {stream: tuple(groups) for stream, groups in sorted(table.items())}


def consumers_of(stream: str) -> tuple[str, ...]:
    """The groups that consume `stream` (none for a stream nobody consumes)."""
    return fanout().get(stream, ())


def delivery_copies(streams: Iterable[str]) -> list[str]:
    """The delivery copies of `streams`: where an append to them is fanned out."""
    table = fanout()
    return [delivery_stream(stream, group) for stream in streams for group in table.get(stream, ())]
