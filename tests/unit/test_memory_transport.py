"""The in-memory transport behaves like the real network where Corolla relies on it: ordered byte streams between
event loops, per-link delay, records that expire, and kill / freeze standing in for SIGKILL / SIGSTOP."""
from __future__ import annotations

import asyncio
import time

import pytest

from corolla.net.loop import LoopThread
from corolla.testing.memory import MemoryNetwork


async def _echo(reader, writer, peer):
    while True:
        data = await reader.read(1024)
        if not data:
            return
        writer.write(data.upper())
        await writer.drain()


@pytest.fixture
def loops():
    a, b = LoopThread("a"), LoopThread("b")
    yield a, b
    a.stop()
    b.stop()


def _pair(network, loops):
    a, b = loops
    server = b.run(network.create_transport("server"))
    client = a.run(network.create_transport("client"))
    b.run(server.serve("/echo", _echo))
    return client, server


def test_streams_cross_event_loops_in_order(loops):
    network = MemoryNetwork()
    client, server = _pair(network, loops)

    async def talk():
        reader, writer = await client.open_stream(server.peer_id, "/echo")
        for i in range(50):
            writer.write(f"m{i};".encode())
        received = b""
        while received.count(b";") < 50:
            received += await reader.read(4096)
        writer.close()
        assert await reader.read() == b""  # the echo handler ends when we close: end of stream
        return received

    assert loops[0].run(talk(), 10) == "".join(f"M{i};" for i in range(50)).encode()


def test_delay_applies_per_direction(loops):
    network = MemoryNetwork()
    client, server = _pair(network, loops)
    network.set_delay(client.peer_id, server.peer_id, 0.05)
    network.set_delay(server.peer_id, client.peer_id, 0.02)

    async def round_trip():
        reader, writer = await client.open_stream(server.peer_id, "/echo")
        started = time.monotonic()
        writer.write(b"x")
        await reader.readexactly(1)
        writer.close()
        return time.monotonic() - started

    assert 0.07 <= loops[0].run(round_trip(), 10) < 0.5


def test_kill_breaks_streams_and_refuses_new_ones(loops):
    network = MemoryNetwork()
    client, server = _pair(network, loops)

    async def scenario():
        reader, writer = await client.open_stream(server.peer_id, "/echo")
        writer.write(b"a")
        assert await reader.readexactly(1) == b"A"
        server.kill()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(reader.readexactly(1), 5)
        with pytest.raises(ConnectionError):
            await client.open_stream(server.peer_id, "/echo")

    loops[0].run(scenario(), 10)


def test_freeze_holds_bytes_until_thaw(loops):
    network = MemoryNetwork()
    client, server = _pair(network, loops)

    async def scenario():
        reader, writer = await client.open_stream(server.peer_id, "/echo")
        server.freeze()
        writer.write(b"b")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.2)
        server.thaw()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"B"

    loops[0].run(scenario(), 10)


def test_records_expire_and_unknown_peers_are_unreachable(loops):
    network = MemoryNetwork()
    client, server = _pair(network, loops)

    async def scenario():
        now = client.now()
        await server.announce_many([("model.0", server.peer_id, {"v": 1}), ("model.1", server.peer_id, {"v": 2})],
                                   now + 0.2)
        await client.announce_many([("model.0", client.peer_id, {"v": 3})], now + 60)
        found = await client.lookup_many(["model.0", "model.1", "model.2"])
        assert found == {"model.0": {server.peer_id: {"v": 1}, client.peer_id: {"v": 3}},
                         "model.1": {server.peer_id: {"v": 2}}, "model.2": {}}
        await asyncio.sleep(0.3)
        assert await client.lookup_many(["model.0", "model.1"]) == {"model.0": {client.peer_id: {"v": 3}},
                                                                    "model.1": {}}
        with pytest.raises(ConnectionError, match="no such peer"):
            await client.open_stream("mem-nobody", "/echo")
        with pytest.raises(ConnectionError, match="does not serve"):
            await client.open_stream(server.peer_id, "/other")

    loops[0].run(scenario(), 10)
