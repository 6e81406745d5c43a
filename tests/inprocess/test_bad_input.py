"""Every kind of bad request gets an error naming its cause, and the server keeps serving.

A real server of the embedded model's blocks 0:10 on the in-memory network, spoken to with the real protocol.
"""
from __future__ import annotations

import pytest
import torch

from corolla.client.rpc import SessionStream, call
from corolla.core.blocks import BlockRange
from corolla.core.errors import RemoteError
from corolla.testing.inprocess import InProcessSwarm
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import (
    RPC_PROTOCOL,
    ErrorReply,
    ForwardRequest,
    InfoRequest,
    OpenSession,
    SessionStep,
)

HIDDEN = 576


@pytest.fixture(scope="module")
def llama_remote(embedded_dir):
    with InProcessSwarm(str(embedded_dir), [BlockRange(0, 10), BlockRange(10, 30)], dht_prefix="bad",
                        max_message_bytes=8 * 2**20) as swarm:
        model = swarm.client(torch_dtype=torch.float32)
        yield model
        model.close()


@pytest.fixture(scope="module")
def first_server(llama_remote):
    swarm = llama_remote.swarm
    chain = swarm.run(swarm.plan_inference(BlockRange(0, 30)))
    record, span = chain[0]
    assert span == BlockRange(0, 10)
    return swarm, record, span


def _call(swarm, record, request, version=None):
    kwargs = {} if version is None else {"version": version}
    return swarm.run(call(swarm.transport, record, request, 60, **kwargs))


def _assert_still_serves(swarm, record, span):
    reply = _call(swarm, record, ForwardRequest(span, torch.randn(1, 3, HIDDEN) * 0.1))
    assert reply.hidden_states.shape == (1, 3, HIDDEN)
    assert torch.isfinite(reply.hidden_states).all()


def _expect_error(swarm, record, span, request, *words, version=None):
    with pytest.raises(RemoteError) as info:
        _call(swarm, record, request, version=version)
    for word in words:
        assert word in str(info.value), str(info.value)
    _assert_still_serves(swarm, record, span)
    return info.value


def test_info(first_server):
    swarm, record, span = first_server
    info = _call(swarm, record, InfoRequest())
    assert info.blocks == span and info.hidden_size == HIDDEN and info.dtype == "float32"
    assert info.cache_tokens_free <= info.cache_tokens_total


def test_wrong_hidden_size(first_server):
    swarm, record, span = first_server
    _expect_error(swarm, record, span, ForwardRequest(span, torch.randn(1, 3, 100)), "hidden size 100", "576")


def test_wrong_dtype(first_server):
    swarm, record, span = first_server
    _expect_error(swarm, record, span, ForwardRequest(span, torch.randn(1, 3, HIDDEN, dtype=torch.float64)), "float64")


def test_non_finite_values(first_server):
    swarm, record, span = first_server
    hidden = torch.randn(1, 3, HIDDEN)
    hidden[0, 1, 7] = float("nan")
    _expect_error(swarm, record, span, ForwardRequest(span, hidden), "non-finite")


def test_blocks_not_held(first_server):
    swarm, record, span = first_server
    error = _expect_error(swarm, record, span, ForwardRequest(BlockRange(20, 30), torch.randn(1, 3, HIDDEN)), "holds blocks")
    assert error.is_bad_request


def test_message_over_limit(first_server):
    swarm, record, span = first_server  # the fixture's servers accept at most 8 MiB per message
    _expect_error(swarm, record, span, ForwardRequest(span, torch.zeros(4, 1000, HIDDEN)), "exceeds", "limit")


def test_unknown_protocol_version(first_server):
    swarm, record, span = first_server
    _expect_error(swarm, record, span, ForwardRequest(span, torch.randn(1, 3, HIDDEN)), "protocol version", version=99)


def test_unknown_session(first_server):
    """A step sent as the first message of a stream (``call()`` itself refuses to send one: not a request)."""
    swarm, record, span = first_server

    async def stray_step():
        reader, writer = await swarm.transport.open_stream(record.peer_id, RPC_PROTOCOL)
        try:
            await write_message(writer, SessionStep("no-such-session", torch.randn(1, 1, HIDDEN)))
            return await read_message(reader)
        finally:
            writer.close()

    reply = swarm.run(stray_step())
    assert isinstance(reply, ErrorReply) and "unknown session 'no-such-session'" in reply.message
    with pytest.raises(ValueError, match="does not start an exchange"):
        _call(swarm, record, SessionStep("no-such-session", torch.randn(1, 1, HIDDEN)))
    _assert_still_serves(swarm, record, span)


def test_wrong_message_inside_a_session(first_server):
    swarm, record, span = first_server

    async def scenario():
        stream = await SessionStream.open(swarm.transport, record, OpenSession("mixed", span, 8, 1), 60)
        try:
            await write_message(stream._writer, InfoRequest())  # not a step
            reply = await read_message(stream._reader)
            assert isinstance(reply, ErrorReply) and "expected 'session.step' inside a session" in reply.message
            assert (await stream.step(SessionStep("mixed", torch.randn(1, 2, HIDDEN) * 0.1), 60)).position == 2
        finally:
            stream.close()

    swarm.run(scenario())


def test_max_length_over_cache(first_server):
    swarm, record, span = first_server
    info = _call(swarm, record, InfoRequest())
    request = OpenSession("too-big", span, max_length=2048, batch_size=info.cache_tokens_total // 2048 + 1)
    with pytest.raises(RemoteError) as error:
        swarm.run(SessionStream.open(swarm.transport, record, request, 60))
    assert "exceeds this server's whole cache" in str(error.value)
    _assert_still_serves(swarm, record, span)


def test_step_past_max_length(first_server):
    swarm, record, span = first_server

    async def scenario():
        stream = await SessionStream.open(swarm.transport, record, OpenSession("short", span, max_length=4, batch_size=1), 60)
        try:
            first = await stream.step(SessionStep("short", torch.randn(1, 3, HIDDEN) * 0.1), 60)
            assert first.position == 3
            with pytest.raises(RemoteError) as error:
                await stream.step(SessionStep("short", torch.randn(1, 2, HIDDEN) * 0.1), 60)
            assert "past its max_length of 4" in str(error.value)
            # the rejected step left the session usable
            last = await stream.step(SessionStep("short", torch.randn(1, 1, HIDDEN) * 0.1), 60)
            assert last.position == 4
            with pytest.raises(RemoteError) as wrong:
                await stream.step(SessionStep("other-id", torch.randn(1, 0, HIDDEN)), 60)
            assert "unknown session" in str(wrong.value)
        finally:
            stream.close()

    swarm.run(scenario())
    _assert_still_serves(swarm, record, span)


def test_bad_rewinds_are_refused(first_server):
    swarm, record, span = first_server

    async def scenario():
        stream = await SessionStream.open(swarm.transport, record, OpenSession("rewind", span, max_length=8, batch_size=1), 60)
        try:
            await stream.step(SessionStep("rewind", torch.randn(1, 3, HIDDEN) * 0.1), 60)
            for bad in (4, -1):
                with pytest.raises(RemoteError) as error:
                    step = SessionStep("rewind", torch.randn(1, 1, HIDDEN) * 0.1, start_from_position=bad)
                    await stream.step(step, 60)
                assert f"start_from_position {bad} is outside" in str(error.value) and "0..3" in str(error.value)
            with pytest.raises(RemoteError) as error:  # rewinding does not lift max_length
                step = SessionStep("rewind", torch.randn(1, 7, HIDDEN) * 0.1, start_from_position=2)
                await stream.step(step, 60)
            assert "past its max_length of 8" in str(error.value)
            # the refused steps left the session as it was; a valid rewind works
            step = SessionStep("rewind", torch.randn(1, 2, HIDDEN) * 0.1, start_from_position=1)
            assert (await stream.step(step, 60)).position == 3
        finally:
            stream.close()

    swarm.run(scenario())
    _assert_still_serves(swarm, record, span)


def test_client_side_errors_are_clear(llama_remote):
    with pytest.raises(ValueError, match="hidden_states must be"):
        llama_remote.model.layers(torch.randn(3, HIDDEN))


def test_bad_wire_codecs(first_server):
    swarm, record, span = first_server
    _expect_error(swarm, record, span, ForwardRequest(span, torch.randn(1, 3, HIDDEN), wire_codec="zip"),
                  "unknown wire codec 'zip'")

    async def corrupted():  # an 8-bit block whose scale is NaN
        from corolla.wire.codec import PREFIX, decode_prefix
        from corolla.wire.framing import encode_message

        data = bytearray(encode_message(ForwardRequest(span, torch.randn(1, 3, HIDDEN)), codec="int8-block64"))
        header_len, _ = decode_prefix(bytes(data[:PREFIX.size]))
        body = PREFIX.size + header_len
        data[body:body + 4] = torch.tensor([float("nan")]).numpy().tobytes()
        reader, writer = await swarm.transport.open_stream(record.peer_id, RPC_PROTOCOL)
        try:
            writer.write(bytes(data))
            await writer.drain()
            return await read_message(reader)
        finally:
            writer.close()

    reply = swarm.run(corrupted())
    assert isinstance(reply, ErrorReply) and "corrupted 8-bit block" in reply.message
    _assert_still_serves(swarm, record, span)
