"""Bounded servers: streams that stall or never speak, oversized headers, one peer's share of the cache, sessions per
peer, LoRA weights and kept activations counted, idle sessions closed whatever garbage keeps them busy."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from corolla.client.rpc import SessionStream, call
from corolla.core.blocks import BlockRange
from corolla.core.errors import RemoteError
from corolla.testing.inprocess import InProcessSwarm
from corolla.wire.codec import MAGIC, PREFIX
from corolla.wire.framing import encode_message, read_message
from corolla.wire.messages import RPC_PROTOCOL, ErrorReply, ForwardRequest, InfoRequest, OpenSession, SessionStep

SPAN = BlockRange(0, 4)
HIDDEN = 64


@pytest.fixture
def swarm(tiny_llama_dir):
    with InProcessSwarm(str(tiny_llama_dir), [SPAN], dht_prefix="limits", first_frame_timeout_s=0.5,
                        frame_timeout_s=0.5, max_streams_per_peer=20, max_sessions_per_peer=2, cache_tokens=256,
                        max_cache_share=0.5, cache_wait_s=0.3, session_idle_timeout_s=1.0,
                        activation_ttl_s=1.0) as swarm:
        yield swarm


def _clients(swarm, count):
    """``count`` clients (peers of their own) and the one server's record."""
    models = [swarm.client() for _ in range(count)]
    record = models[0].swarm.run(models[0].swarm.refresh())[0]
    return models, record


def _still_serves(client, record):
    reply = client.run(call(client.transport, record, ForwardRequest(SPAN, torch.randn(1, 2, HIDDEN)), 10))
    assert reply.hidden_states.shape == (1, 2, HIDDEN)


async def _until(predicate, timeout_s=5.0):
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "the server did not get there in time"
        await asyncio.sleep(0.01)


def test_silent_stalled_and_oversized_streams_are_cut_off(swarm):
    (model,), record = _clients(swarm, 1)
    client = model.swarm
    server = swarm.servers[0]
    try:
        async def scenario():
            transport = client.transport
            silent = [await transport.open_stream(record.peer_id, RPC_PROTOCOL) for _ in range(25)]
            # past the per-peer limit, a stream is told so at once
            reader, writer = silent[-1]
            busy = await asyncio.wait_for(read_message(reader), 5)
            assert isinstance(busy, ErrorReply) and "streams open here already" in busy.message
            # the others said nothing: each is closed after the first-frame timeout
            reader, writer = silent[0]
            closed = await asyncio.wait_for(read_message(reader), 5)
            assert isinstance(closed, ErrorReply) and "no request arrived within" in closed.message
            await asyncio.sleep(0.3)
            assert server.dispatcher.streams_by_peer.get(transport.peer_id, 0) == 0
            # a frame begun and never finished: cut off after the frame timeout, nothing held
            reader, writer = await transport.open_stream(record.peer_id, RPC_PROTOCOL)
            frame = encode_message(ForwardRequest(SPAN, torch.randn(1, 2, HIDDEN)))
            writer.write(frame[: len(frame) // 2])
            stalled = await asyncio.wait_for(read_message(reader), 5)
            assert isinstance(stalled, ErrorReply) and "did not arrive whole" in stalled.message
            # a 64 MiB header is refused without being parsed (read and dropped in chunks)
            reader, writer = await transport.open_stream(record.peer_id, RPC_PROTOCOL)
            writer.write(PREFIX.pack(MAGIC, 64 * 2**20, 0))
            for _ in range(64):
                writer.write(b" " * 2**20)
            started = time.monotonic()
            refused = await asyncio.wait_for(read_message(reader), 10)
            assert isinstance(refused, ErrorReply) and "header of 67108864 bytes exceeds" in refused.message
            assert time.monotonic() - started < 5

        client.run(scenario(), 60)
        _still_serves(client, record)
    finally:
        model.close()


def test_an_answered_stream_stays_open_until_its_requester_closes_it(swarm):
    """The requester ends an exchange: a server that closed its end right after replying lost about one reply in
    5,000 inside hivemind's daemons (see ``requester_closed``). The server waits for the client, a bounded time; a
    session it ends itself is closed at once."""
    (model,), record = _clients(swarm, 1)
    client = model.swarm
    dispatcher = swarm.servers[0].dispatcher
    dispatcher.close_wait_s = 1.0
    try:
        async def exchange(request):
            reader, writer = await client.transport.open_stream(record.peer_id, RPC_PROTOCOL)
            writer.write(encode_message(request))
            return reader, writer, await asyncio.wait_for(read_message(reader), 5)

        async def scenario():
            peer = client.transport.peer_id
            # a reply, then the stream stays open (and counted) until the client closes it
            reader, writer, reply = await exchange(ForwardRequest(SPAN, torch.randn(1, 2, HIDDEN)))
            assert reply.hidden_states.shape == (1, 2, HIDDEN)
            await asyncio.sleep(0.2)
            assert dispatcher.streams_by_peer.get(peer) == 1 and not reader.at_eof()
            writer.write(b"anything after the reply is read and dropped")
            writer.close()
            await asyncio.sleep(0.2)
            assert dispatcher.streams_by_peer.get(peer, 0) == 0
            assert await reader.read() == b""  # the server closed its end too, having sent nothing more
            # an error answered to a whole request waits the same way
            reader, writer, error = await exchange(ForwardRequest(BlockRange(0, 9), torch.randn(1, 2, HIDDEN)))
            assert isinstance(error, ErrorReply)
            await asyncio.sleep(0.2)
            assert dispatcher.streams_by_peer.get(peer) == 1
            # a requester that never closes is cut off after close_wait_s
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.5 < time.monotonic() - started < 2.0
            await asyncio.sleep(0.1)
            assert dispatcher.streams_by_peer.get(peer, 0) == 0
            # a session that opened and that the server evicts for idling ends with an error its client must read:
            # that stream waits for the client as well (which reads the error whenever it comes back)
            dispatcher.close_wait_s = 10.0
            reader, writer = await client.transport.open_stream(record.peer_id, RPC_PROTOCOL)
            writer.write(encode_message(OpenSession("evicted", SPAN, 16, 1)))
            assert not isinstance(await asyncio.wait_for(read_message(reader), 5), ErrorReply)
            evicted = await asyncio.wait_for(read_message(reader), 5)  # after the 1 s idle limit
            assert isinstance(evicted, ErrorReply) and evicted.kind == "SessionEvictedError"
            await asyncio.sleep(0.3)
            assert dispatcher.streams_by_peer.get(peer) == 1 and not reader.at_eof()
            writer.write(encode_message(SessionStep("evicted", torch.randn(1, 1, HIDDEN))))  # read and dropped
            writer.close()
            assert await asyncio.wait_for(reader.read(), 2) == b""
            await asyncio.sleep(0.1)
            assert dispatcher.streams_by_peer.get(peer, 0) == 0
            # but a session that opened and that the server ends otherwise (out of step here: a frame stalled
            # midway) is closed at once: the end is the news
            reader, writer = await client.transport.open_stream(record.peer_id, RPC_PROTOCOL)
            writer.write(encode_message(OpenSession("ended", SPAN, 16, 1)))
            assert not isinstance(await asyncio.wait_for(read_message(reader), 5), ErrorReply)
            writer.write(encode_message(SessionStep("ended", torch.randn(1, 1, HIDDEN)))[:20])
            ended = await asyncio.wait_for(read_message(reader), 5)  # after the frame timeout
            assert isinstance(ended, ErrorReply)
            assert await asyncio.wait_for(reader.read(), 1) == b""
            await asyncio.sleep(0.1)
            assert dispatcher.streams_by_peer.get(peer, 0) == 0
            writer.close()

        client.run(scenario(), 30)
        _still_serves(client, record)
    finally:
        model.close()


def test_one_peer_keeps_to_its_share_while_others_wait(swarm):
    (first, second), record = _clients(swarm, 2)
    a, b = first.swarm, second.swarm
    try:
        async def on(client, coro):  # run on that client's own event loop (its transport lives there)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, client.loop.loop))

        async def open_session(client, name, max_length=512):
            return await on(client, SessionStream.open(client.transport, record, OpenSession(name, SPAN, max_length, 1),
                                                       10))

        async def scenario():
            # sessions per peer: the third is refused
            few = [await open_session(a, f"a{i}", 64) for i in (1, 2)]
            with pytest.raises(RemoteError, match="2 sessions open here already"):
                await open_session(a, "a3", 64)
            for stream in few:
                stream.close()
            await asyncio.sleep(0.2)
            alone = await open_session(a, "big", 256)
            await alone.step(SessionStep("big", torch.randn(1, 150, HIDDEN)), 10)  # 3 pages: over half, fine alone
            other = await open_session(b, "b1", 64)  # another peer arrives: it gets the last page
            with pytest.raises(RemoteError, match=r"one peer may hold at most 50%"):
                await alone.step(SessionStep("big", torch.randn(1, 60, HIDDEN)), 10)  # a 4th page: refused now
            assert (await on(b, other.step(SessionStep("b1", torch.randn(1, 40, HIDDEN)), 10))).position == 40
            assert (await alone.step(SessionStep("big", torch.randn(1, 20, HIDDEN)), 10)).position == 170  # kept
            alone.close()
            b.loop.loop.call_soon_threadsafe(other.close)

        a.run(scenario(), 60)
        _still_serves(a, record)
    finally:
        first.close()
        second.close()


def test_a_session_opens_within_its_peers_share_of_the_cache_even_alone(swarm):
    """Opening costs no compute but reserves a page for every row: a session's batch is bounded by the share
    (here 2 rows: 128 of 256 tokens), and a peer opens sessions only while they hold at most its share, alone on
    the server too, so what is left stays free for others; growing by the tokens of its steps is not bounded so."""
    (first, second), record = _clients(swarm, 2)
    a, b = first.swarm, second.swarm
    try:
        async def open_session(client, name, batch, max_length=64):
            coro = SessionStream.open(client.transport, record, OpenSession(name, SPAN, max_length, batch), 10)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, client.loop.loop))

        async def scenario():
            with pytest.raises(RemoteError, match=r"batch 3 would hold 192 cache tokens at its opening .* sessions of "
                                                  r"batch 2 at most \(their first page within 128 of its 256 tokens"):
                await open_session(a, "wide", 3)  # at once: no wait could make it fit
            held = await open_session(a, "rows", 2, 128)  # its first page: 128 tokens, the share
            with pytest.raises(RemoteError, match=r"your sessions hold 128 of 256 cache tokens here, 64 more with a "
                                                  r"new session's first page: past 128"):
                await open_session(a, "more", 1)  # alone on the server: refused all the same
            assert swarm.servers[0].budget.held_tokens == 128
            honest = await open_session(b, "honest", 2)  # another peer finds the rest free
            assert (await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                honest.step(SessionStep("honest", torch.randn(2, 5, HIDDEN)), 10), b.loop.loop))).position == 5
            b.loop.loop.call_soon_threadsafe(honest.close)
            await _until(lambda: swarm.servers[0].budget.held_tokens == 128)  # its page released
            grown = await held.step(SessionStep("rows", torch.randn(2, 64 + 1, HIDDEN)), 10)  # alone: 2 pages a row
            assert grown.position == 65 and swarm.servers[0].budget.held_tokens == 256
            held.close()

        a.run(scenario(), 60)
        _still_serves(a, record)
    finally:
        first.close()
        second.close()


def test_lora_weights_and_kept_activations_are_counted_and_expire(swarm):
    (model,), record = _clients(swarm, 1)
    client = model.swarm
    server = swarm.servers[0]
    try:
        async def scenario():
            lora = {"0.self_attn.q_proj.lora_A": torch.randn(64, HIDDEN), "0.self_attn.q_proj.lora_B": torch.randn(HIDDEN, 64)}
            stream = await SessionStream.open(client.transport, record,
                                              OpenSession("l", SPAN, 64, 1, lora=lora, lora_scaling=1.0), 10)
            held = server.budget.held_tokens
            lora_bytes = sum(t.numel() * 4 for t in lora.values())
            assert held == 64 + -(-lora_bytes // server.budget.bytes_per_token)  # its page and its weights
            stream.close()
            reply = await call(client.transport, record, ForwardRequest(SPAN, torch.randn(2, 8, HIDDEN),
                                                                        keep_activations=True), 10)
            assert reply.activation_id is not None
            info = await call(client.transport, record, InfoRequest(), 10)
            assert info.activations_kept == 1
            assert server.handler.compute.activations.bytes_held > 2 * 8 * HIDDEN * 4 * 4  # measured, per block
            await asyncio.sleep(1.6)  # past the 1 s limit: dropped by the server on its own
            assert server.handler.compute.activations.bytes_held == 0

        client.run(scenario(), 30)
    finally:
        model.close()


def test_garbage_does_not_keep_an_idle_session_alive(swarm):
    (model,), record = _clients(swarm, 1)
    client = model.swarm
    try:
        async def scenario():
            stream = await SessionStream.open(client.transport, record, OpenSession("idle", SPAN, 64, 1), 10)
            started = time.monotonic()
            while time.monotonic() - started < 5:
                try:  # a wrong step every 0.2 s: answered with an error, but it is no sign of life
                    await stream.step(SessionStep("idle", torch.randn(1, 1, HIDDEN + 1)), 5)
                except RemoteError as exc:
                    if "hidden size" in str(exc):
                        await asyncio.sleep(0.2)
                        continue
                    assert "SessionEvictedError" in str(exc) and "idle" in str(exc)
                    break
            assert 0.9 < time.monotonic() - started < 3  # closed at its 1 s idle limit all the same

        async def loop():
            await scenario()

        client.run(loop(), 30)
        _still_serves(client, record)
    finally:
        model.close()


def test_steps_of_no_tokens_do_not_keep_a_session_alive(swarm):
    """A step of zero tokens is valid and answered, but costs its sender nothing: it is no sign of use, and a
    session fed only such steps is closed at its idle limit (they kept one, and its cache, alive for ever)."""
    (model,), record = _clients(swarm, 1)
    client = model.swarm
    server = swarm.servers[0]
    try:
        async def scenario():
            stream = await SessionStream.open(client.transport, record, OpenSession("empty", SPAN, 64, 2), 10)
            assert (await stream.step(SessionStep("empty", torch.randn(2, 2, HIDDEN)), 5)).position == 2
            started = time.monotonic()
            answered = 0
            while time.monotonic() - started < 5:
                try:
                    reply = await stream.step(SessionStep("empty", torch.zeros(2, 0, HIDDEN)), 5)
                except RemoteError as exc:
                    assert "SessionEvictedError" in str(exc) and "idle" in str(exc)
                    break
                assert reply.position == 2
                answered += 1
                await asyncio.sleep(0.2)
            assert answered >= 3  # answered while the session lived
            assert 0.9 < time.monotonic() - started < 3  # closed at its 1 s idle limit all the same
            await _until(lambda: server.budget.held_tokens == 0 and len(server.handler.sessions) == 0)

        client.run(scenario(), 30)
        _still_serves(client, record)
    finally:
        model.close()


def test_request_frames_held_at_once_are_bounded_and_shared(tiny_llama_dir):
    """Frames in flight count against one budget for all streams, by the bytes that arrived (a part at a time): one
    peer alone may use all of it, but not more than its share while another peer's frames are held; past the budget
    a frame is dropped, part-way, with a named error; half-sent frames are released when cut off; the server keeps
    serving."""
    def frame(tokens):
        return encode_message(ForwardRequest(SPAN, torch.randn(1, tokens, HIDDEN)))

    big, small, medium = frame(1200), frame(400), frame(800)  # ~300 KB, ~100 KB, ~200 KB
    unsent = 1000  # the stalled frames stop this short of their end
    with InProcessSwarm(str(tiny_llama_dir), [SPAN], dht_prefix="frames", frame_timeout_s=2.0,
                        frame_budget_bytes=2**20) as swarm:
        (a, b, c), record = _clients(swarm, 3)
        server = swarm.servers[0]
        try:
            async def _stall(client, data):
                reader, writer = await client.swarm.transport.open_stream(record.peer_id, RPC_PROTOCOL)
                writer.write(data[:-unsent])
                await writer.drain()
                return reader

            async def _send(client, data):
                reader, writer = await client.swarm.transport.open_stream(record.peer_id, RPC_PROTOCOL)
                writer.write(data)
                await writer.drain()
                return await asyncio.wait_for(read_message(reader), 10)

            def stall(client, data):  # each client's streams live on its own event loop
                return client, client.swarm.run(_stall(client, data), 10)

            def send(client, data):
                return client.swarm.run(_send(client, data), 20)

            def until(predicate):
                for _ in range(300):
                    if predicate():
                        return
                    time.sleep(0.01)
                raise AssertionError(f"frames held: {server.dispatcher.frames.by_peer}")

            def holds(streams):  # what stalled frames hold: what arrived, and the part being read (at most 1000 B)
                return lambda: frames.used == streams * len(big)

            frames = server.dispatcher.frames
            stalled = [stall(a, big), stall(a, big)]
            until(holds(2))  # 600 KB: over half the budget
            alone = send(a, big)  # alone here, a may use the whole budget
            assert not isinstance(alone, ErrorReply) and alone.hidden_states.shape == (1, 1200, HIDDEN)
            stalled.append(stall(b, big))
            until(holds(3))
            over_share = send(a, small)  # b's frame is held: a may hold half the budget at most
            assert isinstance(over_share, ErrorReply) and "more than your share" in over_share.message
            full = send(c, medium)  # refused part-way: ~100 KB of it fit
            assert isinstance(full, ErrorReply) and "server busy" in full.message and "limit of 1048576" in full.message
            assert frames.used == 3 * len(big) and c.swarm.transport.peer_id not in frames.by_peer  # nothing kept
            for client, reader in stalled:  # the stalled frames are cut off and release their bytes
                cut = client.swarm.run(asyncio.wait_for(read_message(reader), 10), 20)
                assert isinstance(cut, ErrorReply) and "did not arrive whole" in cut.message
            until(lambda: frames.used == 0 and not frames.by_peer)
            _still_serves(c.swarm, record)
        finally:
            for model in (a, b, c):
                model.close()


def test_frames_declared_but_not_sent_hold_no_budget(tiny_llama_dir):
    """A slowloris of frames: a peer's streams each send a prefix declaring a frame as large as the budget, and
    nothing more. They hold a part each (what is read next), not what they declare, so another peer's session
    steps and requests go through; each is cut off at the frame timeout."""
    with InProcessSwarm(str(tiny_llama_dir), [SPAN], dht_prefix="slowloris", frame_timeout_s=3.0,
                        frame_budget_bytes=2**20, max_message_bytes=2**20) as swarm:
        (honest, attacker), record = _clients(swarm, 2)
        frames = swarm.servers[0].dispatcher.frames
        try:
            session = honest.swarm.run(SessionStream.open(honest.swarm.transport, record,
                                                          OpenSession("honest", SPAN, 64, 1), 10), 20)

            async def declare(count):
                streams = []
                for _ in range(count):
                    reader, writer = await attacker.swarm.transport.open_stream(record.peer_id, RPC_PROTOCOL)
                    writer.write(PREFIX.pack(MAGIC, 100, 2**20 - 100 - PREFIX.size))  # the whole budget, declared
                    await writer.drain()
                    streams.append(reader)
                return streams

            streams = attacker.swarm.run(declare(8), 10)
            for _ in range(100):
                if frames.used == 8 * (PREFIX.size + 100):  # each: its prefix and the header it waits for
                    break
                time.sleep(0.01)
            step = honest.swarm.run(session.step(SessionStep("honest", torch.randn(1, 3, HIDDEN)), 10), 20)
            assert step.position == 3
            _still_serves(honest.swarm, record)
            assert frames.used == 8 * (PREFIX.size + 100), frames.by_peer
            for reader in streams:
                cut = attacker.swarm.run(asyncio.wait_for(read_message(reader), 10), 20)
                assert isinstance(cut, ErrorReply) and "did not arrive whole" in cut.message
            honest.swarm.loop.loop.call_soon_threadsafe(session.close)
        finally:
            honest.close()
            attacker.close()


def test_more_blocks_than_the_model_has_are_all_of_them_with_a_warning(tiny_llama_dir, caplog):
    """``--num-blocks 40`` of a 4-block model: the server takes the model's 4 blocks and says so."""
    with InProcessSwarm(str(tiny_llama_dir), dht_prefix="too-many") as swarm:
        with caplog.at_level("WARNING", logger="corolla.server.server"):
            server = swarm.start_server(num_blocks=40)
        assert server.blocks == BlockRange(0, 4)
        assert "--num-blocks 40: the model has 4 blocks; this server takes all of them" in caplog.text


def test_a_server_lowers_its_compute_priority_once_loaded_and_measured(tiny_llama_dir):
    """Loading and measuring run at the process's priority (under SCHED_IDLE a busy machine starved the measurement:
    a server announced 8 tokens/s one start and 221 the next); serving runs below it."""
    import os
    import sys
    import threading

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread scheduling policies are Linux's")
    from corolla.server.scheduler import Priority

    with InProcessSwarm(str(tiny_llama_dir), dht_prefix="priority", throughput=None) as swarm:
        server = swarm.start_server(SPAN)
        policy = swarm.loop.run(server.scheduler.run(Priority.INFERENCE,
                                                     lambda: os.sched_getscheduler(threading.get_native_id())))
        assert policy == os.SCHED_IDLE and server.throughput > 0


def test_the_operator_is_warned_of_refusals_that_last_not_of_one(tiny_llama_dir, caplog):
    """hivemind's store reports the answer of whichever DHT node answered last, so on a healthy swarm one node's
    refusal now and then looked like the key refusing the record (the warning flapped on and off). The operator is
    warned at the third refusal in a row, and told once it is kept again. (The in-memory DHT has one store: the
    nodes' answers are mocked by wrapping its ``announce_many``.)"""
    import logging

    with InProcessSwarm(str(tiny_llama_dir), [SPAN], dht_prefix="flap", announce_period_s=60.0,
                        record_ttl_s=120.0) as swarm:
        server = swarm.servers[0]
        peer = server.announcer.peer
        real = peer.announce_many

        async def refused(items, expiration_time):
            return False

        def announce(how) -> bool:
            peer.announce_many = how
            return swarm.loop.run(server.announcer.announce_now())

        with caplog.at_level(logging.WARNING, logger="corolla.server.announcer"):
            assert [announce(refused), announce(real), announce(refused), announce(real)] == [False, True] * 2
            assert caplog.text == ""  # one refusal at a time: a node's, not the key's
            assert [announce(refused) for _ in range(3)] == [False] * 3
            assert "refused this server's record (blocks 0:4) under its model's key 3 times in a row" in caplog.text
            assert announce(real) and "keep this server's record under its model's key again" in caplog.text
        peer.announce_many = real
