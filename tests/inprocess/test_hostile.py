"""Hostile peers, in one process: forged records, servers that lie about errors, send garbage or floods. Each case
ends with the honest servers still serving and honest clients getting local transformers' tokens.

The lying servers here are test-only variants: a real server whose session handler is replaced after start-up.
Also here: where records live (one directory key per model), which the forged records target.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from corolla.client.config import ClientConfig
from corolla.client.rpc import SessionStream
from corolla.core.blocks import BlockRange
from corolla.core.errors import RemoteError
from corolla.core.records import ServerRecord, ServerState
from corolla.server.server import Server
from corolla.testing.inprocess import InProcessSwarm
from corolla.wire.codec import PREFIX, MAGIC
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL, ErrorReply, OpenSession, SessionOpened, SessionStep
from corolla.wire.records import decode_record, encode_record, servers_key

IDS = torch.tensor([[5, 6, 7, 8, 9]])
FAST = ClientConfig(step_timeout_s=2.0, wait_for_blocks_s=5.0, refresh_period_s=0.5)


@pytest.fixture(scope="module")
def local(tiny_llama_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _expected(local, tokens=8):
    return local.generate(IDS, max_new_tokens=tokens, do_sample=False)


# Reply headers that well-formed frames carry, which the JSON parser or torch could not take: the parser recursed once
# per level (RecursionError), torch.empty overflowed on a dimension of a tensor with no values (TypeError). Each
# escaped the client's checks as a crash of generate(), not as the server's failure.
UNDECODABLE = {
    "nested_header": b"[" * 100_000,
    "huge_empty_tensor": json.dumps({"type": "session.step.reply", "version": PROTOCOL_VERSION, "position": 1,
                                     "tensors": [{"name": "hidden_states", "dtype": "float32",
                                                  "shape": [0, 2**64]}]}).encode(),
}


def _turn_hostile(server: Server, behaviour: str) -> None:
    """Replace how ``server`` answers sessions: it opens them like an honest server, then misbehaves."""

    async def hostile_open_session(request: OpenSession, channel, peer: str) -> None:
        await channel.reply(SessionOpened(request.session_id, 64))
        async for _ in channel.steps():
            writer = channel._writer
            if behaviour == "bad_request":  # blames the client for a fine request
                await write_message(writer, ErrorReply("BadRequestError", "your request is wrong (it is not)"))
            elif behaviour == "garbage":
                writer.write(b"\x00garbage, not a frame" * 10)
                await writer.drain()
            elif behaviour == "flood":  # announces a reply of 2**40 bytes
                writer.write(PREFIX.pack(MAGIC, 10, 2**40) + b"{}" * 5)
                await writer.drain()
            elif behaviour in UNDECODABLE:
                writer.write(PREFIX.pack(MAGIC, len(UNDECODABLE[behaviour]), 0) + UNDECODABLE[behaviour])
                await writer.drain()

    from corolla.wire.messages import OpenSession as Open

    server.dispatcher.methods[Open] = hostile_open_session


@pytest.mark.parametrize("behaviour", ["bad_request", "garbage", "flood", *UNDECODABLE])
def test_a_server_that_misbehaves_is_the_servers_failure(behaviour, tiny_llama_dir, local):
    """Its claims are not the client's fault: the client bans it, fails over to the honest replica, and returns
    the tokens an honest swarm gives."""
    with InProcessSwarm(str(tiny_llama_dir), dht_prefix=f"hostile-{behaviour}") as swarm:
        liar = swarm.start_server(BlockRange(0, 4), throughput=1000.0)  # the fastest: chosen first
        honest = swarm.start_server(BlockRange(0, 4), throughput=10.0)
        _turn_hostile(liar, behaviour)
        model = swarm.client(client_config=FAST)
        try:
            with model.inference_session(max_length=32) as session:
                got = model.generate(IDS, max_new_tokens=8, do_sample=False)
                assert session.failovers == 1 and session.chain == [(honest.peer.peer_id, BlockRange(0, 4))]
            assert got.tolist() == _expected(local).tolist()
            assert model.swarm.bans.is_banned(liar.peer.peer_id)
        finally:
            model.close()


def _bad_frame(header: bytes) -> bytes:
    return PREFIX.pack(MAGIC, len(header), 0) + header


def test_frames_a_server_cannot_decode_are_bad_requests_said_without_a_traceback(tiny_llama_dir, caplog):
    """The frames that crashed clients, sent to a server: as a stream's first frame, or inside an open session,
    each is answered as a bad request naming its cause, at no cost in its log (each was a full traceback, 'a bug of
    ours'; inside a session it killed the reader of the session's steps, which then answered nothing, holding its
    cache until the idle timeout). The session stays usable."""
    step_header = json.dumps({"type": "session.step", "version": PROTOCOL_VERSION, "session_id": "s",
                              "tensors": [{"name": "hidden_states", "dtype": "float32", "shape": [0, 2**64]}]})
    frames = {_bad_frame(b"[" * 100_000): "nests deeper than the 16 levels",
              _bad_frame(step_header.encode()): "is too large"}
    with InProcessSwarm(str(tiny_llama_dir), [BlockRange(0, 4)], dht_prefix="undecodable") as swarm:
        server = swarm.servers[0]
        attacker = swarm.loop.run(swarm.network.create_transport("attacker"))

        async def first_frames():
            replies = []
            for frame in list(frames) * 10:
                reader, writer = await attacker.open_stream(server.peer.peer_id, RPC_PROTOCOL)
                writer.write(frame)
                await writer.drain()
                replies.append(await read_message(reader))
                writer.close()
            return replies

        async def in_a_session():
            stream = await SessionStream.open(attacker, server.record(), OpenSession("s", BlockRange(0, 4), 16, 1), 10)
            try:
                replies = []
                for frame in frames:
                    stream._writer.write(frame)
                    await stream._writer.drain()
                    replies.append(await read_message(stream._reader))
                step = await stream.step(SessionStep("s", torch.randn(1, 2, 64)), 10)
                return replies, step.position
            finally:
                stream.close()

        with caplog.at_level(logging.DEBUG, logger="corolla.server"):
            replies = swarm.loop.run(first_frames(), 60)
            session_replies, position = swarm.loop.run(in_a_session(), 60)
        causes = list(frames.values())
        for got, expected in ((replies, causes * 10), (session_replies, causes)):
            assert [(r.kind, cause in r.message) for r, cause in zip(got, expected)] == \
                [("BadRequestError", True)] * len(expected)
        assert position == 2  # the session answers its next good step
        assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []


def test_a_session_whose_steps_cannot_be_read_ends_and_frees_its_cache(tiny_llama_dir, monkeypatch, caplog):
    """Reading a session's stream fails in a way nobody foresaw (a bug of ours): the client is told, and the session
    ends at once, its cache freed, rather than wait for steps that nobody reads until its idle timeout."""
    from corolla.server import dispatch

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in reading frames")

    with InProcessSwarm(str(tiny_llama_dir), [BlockRange(0, 4)], dht_prefix="unread") as swarm:
        server = swarm.servers[0]
        attacker = swarm.loop.run(swarm.network.create_transport("client"))

        async def session():
            stream = await SessionStream.open(attacker, server.record(), OpenSession("s", BlockRange(0, 4), 16, 1), 10)
            try:
                assert server.budget.held_tokens > 0
                monkeypatch.setattr(dispatch, "read_message", broken)  # from the read after the next step's on
                await stream.send(SessionStep("s", torch.randn(1, 2, 64)))
                replies = []  # the step's reply and the error, in either order (the error may overtake the step)
                while (reply := await asyncio.wait_for(read_message(stream._reader), 10)) is not None:
                    replies.append(reply)
                return replies  # (and the stream ended)
            finally:
                stream.close()

        with caplog.at_level(logging.ERROR, logger="corolla.server"):
            replies = swarm.loop.run(session(), 60)
        assert sorted(type(r).__name__ for r in replies) == ["ErrorReply", "SessionStepReply"]
        error = next(r for r in replies if isinstance(r, ErrorReply))
        assert error.kind == "InternalServerError" and "a bug in reading frames" in error.message
        deadline = time.monotonic() + 5
        while ("s" in server.handler.sessions or server.budget.held_tokens) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "s" not in server.handler.sessions and server.budget.held_tokens == 0
        assert len([r for r in caplog.records if r.exc_info]) == 1  # said once, with its traceback


def test_forged_and_implausible_records_do_not_disturb_the_swarm(tiny_llama_dir, local):
    """Records in the model's directory claiming infinite throughput or blocks far past the model's end (signed by
    their own peers), signed for another model, unsigned, or filed under another peer's id are dropped by readers;
    clients and a server choosing its blocks carry on."""
    from corolla.wire.identity import Identity

    with InProcessSwarm(str(tiny_llama_dir), [BlockRange(0, 4)], dht_prefix="forged") as swarm:
        honest = swarm.servers[0]
        attacker = swarm.loop.run(swarm.network.create_transport("attacker"))
        liars = [Identity.generate() for _ in range(3)]
        expires = attacker.now() + 600

        def signed(identity, blocks, throughput, model="forged"):
            record = ServerRecord(identity.peer_id, blocks, ServerState.ONLINE, throughput, "float32", PROTOCOL_VERSION, 100)
            return identity.peer_id, encode_record(record, identity, model, expires)

        replayed = swarm.loop.run(attacker.lookup_many([servers_key("forged")]))[servers_key("forged")][honest.peer.peer_id]
        items = [(servers_key("forged"), *signed(liars[0], BlockRange(0, 4), float("inf"))),
                 (servers_key("forged"), *signed(liars[1], BlockRange(0, 10**15), 1e3)),
                 (servers_key("forged"), *signed(liars[2], BlockRange(0, 4), 1e6, model="another-model")),
                 (servers_key("forged"), "mem-attacker", encode_record(  # unsigned
                     ServerRecord("mem-attacker", BlockRange(0, 4), ServerState.ONLINE, 1e6, "float32", PROTOCOL_VERSION,
                                  100))),
                 (servers_key("forged"), "mem-attacker-2", replayed)]  # the honest record under another peer's id
        assert swarm.loop.run(attacker.announce_many(items, expires))
        fine = signed(liars[2], BlockRange(0, 4), 1e6)[1]  # the same record signed for this model would be read
        assert decode_record(fine, 4, "forged", attacker.now()) is not None
        model = swarm.client(client_config=FAST)
        try:
            records = model.swarm.run(model.swarm.refresh())
            assert [r.peer_id for r in records] == [honest.peer.peer_id]
            assert model.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == _expected(local).tolist()
            started = time.monotonic()
            chooser = swarm.start_server(num_blocks=2)  # reads the same records to choose its span
            assert time.monotonic() - started < 30 and len(chooser.blocks) == 2
        finally:
            model.close()


def test_a_flood_of_records_costs_a_reader_a_bounded_amount_of_work(tiny_llama_dir, local, monkeypatch):
    """A Sybil flood: 60 well-signed records of servers that do not exist, each under its own key pair, in the
    model's directory. A reader decodes at most ``MAX_RECORDS_READ`` of them per read (20 here), keeping the servers
    that answered it before; a client measures at most ``PINGS_PER_REFRESH`` new servers per refresh (the rest wait
    for later refreshes, and those that do not answer are banned); the honest server keeps serving its tokens."""
    from corolla.client import swarm as swarm_module
    from corolla.net import records as records_module
    from corolla.wire.identity import Identity

    with InProcessSwarm(str(tiny_llama_dir), [BlockRange(0, 4)], dht_prefix="flood") as swarm:
        honest = swarm.servers[0]
        # (no background refresh: one running beside a counted one would double the count)
        model = swarm.client(client_config=dataclasses.replace(FAST, refresh_period_s=3600.0))
        try:
            assert [r.peer_id for r in model.swarm.run(model.swarm.refresh())] == [honest.peer.peer_id]
            attacker = swarm.loop.run(swarm.network.create_transport("attacker"))
            expires = attacker.now() + 600
            items = []
            for _ in range(60):
                identity = Identity.generate()
                record = ServerRecord(identity.peer_id, BlockRange(0, 4), ServerState.ONLINE, 1.0, "float32",
                                      PROTOCOL_VERSION, 100)
                items.append((servers_key("flood"), identity.peer_id, encode_record(record, identity, "flood", expires)))
            assert swarm.loop.run(attacker.announce_many(items, expires))

            monkeypatch.setattr(records_module, "MAX_RECORDS_READ", 20)
            decoded, pinged = [], []
            decode = records_module.decode_record
            client_thread = model.swarm.loop._thread  # the servers here read records on their own thread
            monkeypatch.setattr(records_module, "decode_record", lambda *args: decoded.append(
                threading.current_thread() is client_thread) or decode(*args))
            ping = model.swarm.ping

            async def counted_ping(record):
                pinged.append(record.peer_id)
                return await ping(record)

            monkeypatch.setattr(model.swarm, "ping", counted_ping)
            for _ in range(3):
                decoded.clear()
                pinged.clear()
                records = model.swarm.run(model.swarm.refresh())
                assert decoded.count(True) == 20 and len(records) == 20
                assert honest.peer.peer_id in [r.peer_id for r in records]  # it answered before: always read
                assert 0 < len(pinged) <= swarm_module.PINGS_PER_REFRESH and honest.peer.peer_id not in pinged
            assert all(model.swarm.bans.is_banned(peer) for peer in pinged)  # nobody answered for them
            assert model.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == _expected(local).tolist()
        finally:
            model.close()


def test_a_refresh_reads_one_key_for_every_server_of_the_model(tiny_llama_dir, local):
    """Every server files its record once, under its model's directory key: a client's refresh is one lookup of one
    key, whatever the servers and spans, and a reader asking for some blocks gets the servers holding any of them."""
    from corolla.net.records import fetch_records

    spans = [BlockRange(0, 2), BlockRange(1, 3), BlockRange(2, 4)]
    with InProcessSwarm(str(tiny_llama_dir), spans, dht_prefix="directory") as swarm:
        model = swarm.client(client_config=FAST)
        try:
            transport = model.swarm.transport
            answer, lookups = transport.lookup_many, []

            async def counted(keys):
                lookups.append(list(keys))
                return await answer(keys)

            transport.lookup_many = counted
            records = model.swarm.run(model.swarm.refresh())
            assert lookups == [[servers_key("directory")]]
            assert sorted((r.blocks.start, r.blocks.end) for r in records) == [(0, 2), (1, 3), (2, 4)]
            some = model.swarm.run(fetch_records(transport, "directory", [0], 4))
            assert [(r.blocks.start, r.blocks.end) for r in some] == [(0, 2)]
            assert model.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == _expected(local).tolist()
        finally:
            model.close()


def test_one_peer_cannot_take_a_quiet_servers_cache_by_opening_sessions(tiny_llama_dir, local):
    """The cache wedge: one ``OpenSession`` of batch 512 and max_length 1 reserved a quiet server's whole cache (a
    page of 64 tokens for each of 512 rows) with no compute, and honest sessions then waited and failed 'cache full'.
    Now a session's batch is bounded (256 rows: half the default cache), and one peer opens sessions only while
    they hold at most half of it, alone too: honest generation, greedy and beam search, goes on beside it."""
    span = BlockRange(0, 4)
    with InProcessSwarm(str(tiny_llama_dir), [span], dht_prefix="wedge", cache_wait_s=0.5) as swarm:  # a default cache
        budget = swarm.servers[0].budget
        attacker, model = swarm.client(client_config=FAST), swarm.client(client_config=FAST)
        try:
            hostile = attacker.swarm
            record = hostile.run(hostile.refresh())[0]

            async def wedge():
                with pytest.raises(RemoteError, match=r"batch 512 would hold 32768 cache tokens .* batch 256 at most"):
                    await SessionStream.open(hostile.transport, record, OpenSession("wedge", span, 1, 512), 10)
                half = await SessionStream.open(hostile.transport, record, OpenSession("half", span, 1, 256), 10)
                with pytest.raises(RemoteError, match=r"past 16384, the most one peer's sessions may hold for one"):
                    await SessionStream.open(hostile.transport, record, OpenSession("more", span, 1, 256), 10)
                return half

            half = hostile.run(wedge(), 30)
            assert budget.held_tokens == budget.total_tokens // 2 == 16384
            for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
                got = model.generate(IDS, max_new_tokens=8, **kwargs)
                assert got.tolist() == local.generate(IDS, max_new_tokens=8, **kwargs).tolist()
            assert not model.swarm.bans.is_banned(swarm.servers[0].peer.peer_id)
            assert hostile.run(half.step(SessionStep("half", torch.zeros(256, 0, 64)), 10), 20).position == 0
            half.close()
        finally:
            attacker.close()
            model.close()
