"""Named crash points for fault tests: `hit("execution.after_send")` kills the
process with SIGKILL when QE_FAILPOINT names that point. Inert (one dict lookup)
unless a test sets the variable; never set in production."""

from __future__ import annotations

import os
import signal

_ARMED = os.environ.get("QE_FAILPOINT", "")


def hit(name: str) -> None:
    if _ARMED and _ARMED == name:
        os.kill(os.getpid(), signal.SIGKILL)
