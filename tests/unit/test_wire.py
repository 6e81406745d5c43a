"""The protocol module: typed messages, tensor codec, framing and size limits."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, MessageTooLargeError, ProtocolVersionError
from corolla.wire.codec import PREFIX, decode_frame, decode_prefix, encode_frame
from corolla.wire.framing import encode_message, read_message
from corolla.wire.messages import (
    PROTOCOL_VERSION,
    ForwardRequest,
    InfoRequest,
    Message,
    OpenSession,
    SessionStep,
    message_from_frame,
)
from corolla.wire.services import SERVICES, Exchange, service_for


def _roundtrip(data: bytes, max_bytes: int = 2**30):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        first = await read_message(reader, max_bytes)
        return first, await read_message(reader, max_bytes)

    return asyncio.run(go())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_roundtrip(dtype):
    tensor = (torch.randn(2, 3, 5) * 10).to(dtype)
    frame_bytes = encode_frame({"type": "x"}, {"t": tensor, "empty": torch.zeros(2, 0, 5, dtype=dtype)})
    header_len, body_len = decode_prefix(frame_bytes[: PREFIX.size])
    frame = decode_frame(frame_bytes[PREFIX.size : PREFIX.size + header_len], frame_bytes[PREFIX.size + header_len :])
    assert torch.equal(frame.tensors["t"], tensor) and frame.tensors["t"].dtype == dtype
    assert frame.tensors["empty"].shape == (2, 0, 5)


def test_message_roundtrip_through_stream():
    request = ForwardRequest(BlockRange(3, 9), torch.randn(2, 4, 8), attention_mask=torch.ones(2, 4, dtype=torch.long))
    got, end = _roundtrip(encode_message(request) + encode_message(InfoRequest()))
    assert isinstance(got, ForwardRequest) and got.blocks == BlockRange(3, 9)
    assert torch.equal(got.hidden_states, request.hidden_states) and got.position_ids is None
    assert isinstance(end, InfoRequest)


def test_end_of_stream_is_none():
    assert _roundtrip(b"") == (None, None)


def test_oversized_frame_is_dropped_and_stream_stays_in_step():
    big = encode_message(ForwardRequest(BlockRange(0, 1), torch.zeros(10, 10, 10)))

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(big + encode_message(InfoRequest()))
        reader.feed_eof()
        with pytest.raises(MessageTooLargeError, match="exceeds this peer's limit of 1000 bytes"):
            await read_message(reader, 1000)
        return await read_message(reader, 1000)

    assert isinstance(asyncio.run(go()), InfoRequest)


def test_version_mismatch():
    data = encode_message(InfoRequest(), version=7)
    with pytest.raises(ProtocolVersionError, match=f"version {PROTOCOL_VERSION}, got 7"):
        _roundtrip(data)


def test_bad_frames_name_the_cause():
    with pytest.raises(BadRequestError, match="not a Corolla frame"):
        _roundtrip(b"XXXX" + b"\0" * (PREFIX.size - 4))
    frame = decode_frame(json.dumps({"type": "Nope", "version": PROTOCOL_VERSION}).encode(), b"")
    with pytest.raises(BadRequestError, match="unknown message type 'Nope'"):
        message_from_frame(frame)
    frame = decode_frame(json.dumps({"type": "session.step", "version": PROTOCOL_VERSION}).encode(), b"")
    with pytest.raises(BadRequestError, match="missing its field 'session_id'"):
        message_from_frame(frame)
    frame = decode_frame(json.dumps({"type": "session.open", "version": PROTOCOL_VERSION, "session_id": "s",
                                     "blocks": "0:2", "max_length": "many", "batch_size": 1}).encode(), b"")
    with pytest.raises(BadRequestError, match="max_length must be int"):
        message_from_frame(frame)
    with pytest.raises(BadRequestError, match="runs past the frame body"):
        decode_frame(b'{"tensors": [{"name": "t", "dtype": "float32", "shape": [4]}]}', b"\0" * 8)


def test_optional_tensor_fields_default_to_none():
    step = SessionStep("s", torch.zeros(1, 0, 4))
    got, _ = _roundtrip(encode_message(step))
    assert got.attention_mask is None and got.hypo_ids is None and got.hidden_states.shape == (1, 0, 4)


def test_wire_names_are_explicit_constants():
    """The frame says "session.step", not a Python class name: renaming a class cannot change the protocol."""
    header, _ = SessionStep("s", torch.zeros(1, 0, 4)).to_parts()
    assert header["type"] == "session.step" == SessionStep.WIRE_NAME
    names = {cls.WIRE_NAME for cls in Message.registry.values()}
    assert len(names) == len(Message.registry) and all(name == name.lower() for name in names)
    with pytest.raises(TypeError, match="taken"):
        class Duplicate(Message, wire_name="session.step"):  # noqa: F841
            pass


def test_service_table_is_complete_and_consistent():
    requests = {service.request for service in SERVICES}
    assert {InfoRequest, ForwardRequest, OpenSession} <= requests
    for service in SERVICES:
        assert service.reply is not service.request
        assert (service.exchange is Exchange.UNARY) == (service.step is None)
        assert (service.exchange is Exchange.SESSION) == (service.step_reply is not None)
        assert service_for(service.request.__new__(service.request)) is service
    with pytest.raises(BadRequestError, match="does not start an exchange"):
        service_for(SessionStep("s", torch.zeros(1, 0, 4)))
