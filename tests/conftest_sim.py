"""Pytest fixtures for the IB gateway simulator (import them into a test module).

    from conftest_sim import sim, sim_control, ib_connect  # noqa: F401

* ``sim``         an in-process simulator on free ports (fresh for every test),
                  with the repo's universe and demo account; ``sim.port``,
                  ``sim.control`` (SimControl), ``sim.server`` (the SimServer).
* ``sim_control`` shortcut for ``sim.control``.
* ``ib_connect``  factory: ``ib_connect(client_id=1, **kw)`` returns a connected
                  ib_async.IB; every client is disconnected at teardown.
* ``sim_process`` factory: ``sim_process(args)`` starts ``python -m sim`` (stopped at teardown).

The plain helpers behind them live in ``sim.testing`` (usable without pytest).
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from sim.testing import RunningSim, start_in_thread, start_process, wait_until  # noqa: F401


@pytest.fixture
def sim() -> Iterator[RunningSim]:
    running = start_in_thread()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sim_control(sim: RunningSim):
    return sim.control


@pytest.fixture
def ib_connect(sim: RunningSim) -> Iterator[Any]:
    from ib_async import IB

    clients: list[IB] = []

    def connect(client_id: int = 1, port: int | None = None, timeout: float = 5, **kwargs: Any) -> IB:
        ib = IB()
        ib.connect("127.0.0.1", port or sim.port, clientId=client_id, timeout=timeout, **kwargs)
        clients.append(ib)
        return ib

    connect.clients = clients  # type: ignore[attr-defined]
    yield connect
    for ib in clients:
        ib.disconnect()


@pytest.fixture
def sim_process() -> Iterator[Any]:
    started: list[RunningSim] = []

    def start(args: list[str] | None = None, env: dict[str, str] | None = None) -> RunningSim:
        running = start_process(args, env)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
