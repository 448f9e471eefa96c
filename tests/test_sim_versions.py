"""Version negotiation (issue 16 pt 6): a client must accept v176, the only layouts the
simulator encodes; others are refused, never sent a layout they did not agree to."""

from __future__ import annotations

import socket
import struct

import pytest
from ib_async import IB

from sim import protocol as P

try:
    from conftest_sim import sim  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.conftest_sim import sim  # noqa: F401


def handshake(port: int, versions: bytes) -> bytes:
    """Everything the server sends after ``API\\0`` + versions, until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"API\0" + struct.pack(">I", len(versions)) + versions)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data


@pytest.mark.parametrize("low,high", [(100, 150), (157, 163), (100, 175)])
def test_old_clients_are_refused_before_any_reply(sim, low, high):
    assert handshake(sim.port, f"v{low}..{high}".encode()) == b""


def test_client_needing_a_newer_server_is_told_176_and_dropped(sim):
    data = handshake(sim.port, b"v177..190")
    (size,) = struct.unpack(">I", data[:4])
    fields = data[4 : 4 + size].split(b"\0")
    assert fields[0] == b"176" and len(data) == 4 + size  # the handshake reply, then the close


def test_negotiate_is_pure():
    ok = P.Handshake(157, 178, "")
    assert P.negotiate(ok) == (176, "")
    assert P.negotiate(P.Handshake(176, 176, ""))[0] == 176
    assert P.negotiate(P.Handshake(100, 163, ""))[0] is None
    assert P.negotiate(P.Handshake(177, 178, ""))[0] is None


def test_ib_async_with_a_range_excluding_176_cannot_connect(sim):
    for low, high in ((177, 178), (157, 163)):
        ib = IB()
        ib.client.MinClientVersion, ib.client.MaxClientVersion = low, high
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            ib.connect("127.0.0.1", sim.port, clientId=1, timeout=3)
        assert not ib.isConnected()
        ib.disconnect()
    ib = IB()  # the stock client (157..178) agrees on 176
    ib.connect("127.0.0.1", sim.port, clientId=1, timeout=3)
    assert ib.client.serverVersion() == 176
    ib.disconnect()
