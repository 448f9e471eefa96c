"""qe-decision: the decision engine ("the Brain").

Consumes ev.control, ev.broker, ev.session, ev.exposure, ev.positions, ev.orders,
ev.alerts, ev.features and ev.l1 (group decision_engine); publishes Intents on
ev.intents, mode changes on ev.alerts and keeps its state in state:decision*.
The handler is `service.DecisionHandler`, the pure core `engine.decide`, the Redis
codecs `codecs` (docs/decision.md).
"""


def main() -> int:
    from .service import run

    return run()
