"""The operator kill switch's acknowledgement contract (`qe halt` / `qe resume`).

`qe` publishes one Control event on `ev.control`. The Brain and execution each
consume it and, in the SAME atomic commit that applies it, write an `OperatorAck`
into their own record `state:daemon:<daemon>`, field `operator_ack`: which control
event they applied and what they now enforce (`halted`). `qe` waits until every
required daemon has acknowledged that event id with the wanted state, or the
timeout passes, and says who did not.

An acknowledgement is therefore never a guess from another field (e.g. the Brain's
`mode`, which another reader decodes): it names the event it answers. A daemon's
record is the one key every daemon may write under the ACLs (docs/security.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from .liveness import DAEMON_KEY

FIELD = "operator_ack"
# Who must acknowledge a halt/resume: the Brain (issues nothing but cancels) and
# execution (sends nothing but cancels).
REQUIRED = ("decision", "execution")


class OperatorAck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    daemon: str
    control_event_id: str
    command: Literal["halt", "resume"]
    halted: bool  # what the daemon enforces from this commit on
    mode: str | None = None  # the Brain's resulting mode, where it has one
    ts_ns: int  # wall clock when the daemon applied it


class _Effects(Protocol):
    def hset(self, key: str, mapping: dict[str, Any]) -> None: ...


def acknowledge(effects: _Effects, daemon: str, control_event: Any, *, halted: bool, mode: str | None = None) -> OperatorAck:
    """Record on the batch's effects (committed atomically with the control event's
    effects and its XACK) that `daemon` applied `control_event`."""
    ack = OperatorAck(
        daemon=daemon,
        control_event_id=str(control_event.event_id),
        command=control_event.payload.command,
        halted=halted,
        mode=mode,
        ts_ns=time.time_ns(),
    )
    effects.hset(DAEMON_KEY.format(daemon=daemon), {FIELD: ack.model_dump_json()})
    return ack


def read(r: redis.Redis, daemon: str) -> OperatorAck | str | None:
    """The daemon's last acknowledgement; None if it never wrote one; a string saying
    why when the stored value is not a valid acknowledgement."""
    raw = r.hget(DAEMON_KEY.format(daemon=daemon), FIELD)
    if raw is None:
        return None
    try:
        return OperatorAck.model_validate_json(raw)
    except ValidationError as exc:
        return f"unreadable acknowledgement ({exc.error_count()} errors)"


@dataclass(frozen=True)
class Outcome:
    acknowledged: dict[str, OperatorAck] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # daemon -> why not

    @property
    def complete(self) -> bool:
        return not self.missing


def judge(acks: dict[str, OperatorAck | str | None], event_id: str, command: str) -> Outcome:
    """Pure: which daemons acknowledged `event_id` with the state `command` asks for."""
    wanted_halted = command == "halt"
    acknowledged: dict[str, OperatorAck] = {}
    missing: dict[str, str] = {}
    for daemon, ack in acks.items():
        if ack is None:
            missing[daemon] = "no acknowledgement"
        elif isinstance(ack, str):
            missing[daemon] = ack
        elif ack.control_event_id != event_id:
            missing[daemon] = f"no acknowledgement (its last was for another control event, {ack.command})"
        elif ack.halted != wanted_halted:
            missing[daemon] = f"applied it but reports halted={ack.halted}"
        else:
            acknowledged[daemon] = ack
    return Outcome(acknowledged, missing)


def wait_for(
    r: redis.Redis,
    event_id: str,
    command: str,
    daemons: tuple[str, ...] = REQUIRED,
    timeout_s: float = 10.0,
    poll_s: float = 0.1,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Poll the daemons' acknowledgements until all are in or `timeout_s` passed."""
    deadline = monotonic() + timeout_s
    while True:
        outcome = judge({daemon: read(r, daemon) for daemon in daemons}, event_id, command)
        if outcome.complete or monotonic() >= deadline:
            return outcome
        sleep(min(poll_s, max(deadline - monotonic(), 0.0)))
