"""Shared fixtures: a private redis-server for the whole session (never the
machine's 6379), flushed before each test; helpers for daemon subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), fsync="everysec").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis(port=redis_server.port).flushall()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server this test may kill -9 and restart (AOF fsync always)."""
    server = RedisServer(tmp_path / "own-redis", fsync="always").start()
    yield server
    server.stop()
