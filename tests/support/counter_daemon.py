"""A minimal consuming daemon for runtime tests, run as a real subprocess.

For every `ev.l1` event it makes a NON-idempotent effect (HINCRBY + RPUSH of
the event's key) and publishes one alert. If effects and ack were not atomic,
a crash or redelivery would show up as a double count or a duplicate in the
log list. Knobs (environment): TEST_SLEEP_S per event, TEST_FAIL_SYMBOL
(the handler raises for that symbol).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qe import daemon  # noqa: E402
from qe.contracts import Alert, make_event  # noqa: E402


class CounterHandler:
    streams = ("ev.l1",)
    tick_interval_s = None

    def __init__(self, context: daemon.Context) -> None:
        self.clock = context.clock
        self.sleep_s = float(os.environ.get("TEST_SLEEP_S", "0"))
        self.fail_symbol = os.environ.get("TEST_FAIL_SYMBOL", "")

    def load(self, r) -> None:  # no in-memory state
        pass

    def handle(self, event, effects) -> None:
        symbol = event.payload.symbol
        if symbol == self.fail_symbol:
            raise RuntimeError(f"cannot handle {symbol}")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        effects.command("HINCRBY", "test:count", symbol, 1)
        effects.command("RPUSH", "test:log", event.idempotency_key)
        effects.publish(
            "ev.alerts",
            make_event(
                Alert(alert_type="dlq_growth", state="raised", severity="info", symbol=symbol, message="seen"),
                idempotency_key=f"echo:{event.idempotency_key}",
                source="test-counter",
                ts_ns=self.clock.now_ns(),
                causation_id=str(event.event_id),
            ),
        )

    def tick(self, now_ns, effects) -> None:
        pass


def main() -> int:
    return daemon.run_consumer("test-counter", "test_counter", CounterHandler)


if __name__ == "__main__":
    raise SystemExit(main())
