"""Fuzzing what arrives from the network (Hypothesis, a bounded number of examples): frames, headers, messages,
records and routes. Whatever the bytes, the parsers answer with a ``BadRequestError`` naming the cause (or None for
a record): never another exception, never a hang."""
from __future__ import annotations

import asyncio
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError
from corolla.wire.codec import MAGIC, PREFIX, decode_frame
from corolla.wire.framing import encode_message, read_message
from corolla.wire.messages import ForwardRequest, SessionStep, message_from_frame
from corolla.wire.records import decode_record
from corolla.wire.relay import parse_route

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
FIELDS = ["type", "version", "tensors", "session_id", "blocks", "hidden_states", "max_length", "batch_size",
          "next_hops", "start_from_position", "position", "lora_scaling", "codec", "name", "dtype", "shape"]


def _read(data: bytes):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await asyncio.wait_for(read_message(reader, 2**20, frame_timeout_s=5), 5)

    return asyncio.run(go())


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_on_a_stream(data):
    try:
        _read(data)
    except (BadRequestError, asyncio.IncompleteReadError):
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8), st.binary(max_size=64))
def test_any_header_and_body(header, body):
    try:
        message_from_frame(decode_frame(json.dumps(header).encode(), body))
    except BadRequestError:
        pass


@FUZZ
@given(st.data())
def test_real_frames_with_bytes_flipped(data):
    """A valid message with some of its bytes changed: parsed or refused, never a crash."""
    hidden = torch.linspace(-3, 3, 16).reshape(1, 2, 8)  # fixed: the frame's length may not vary between runs
    message = SessionStep("s", hidden, attention_mask=torch.ones(1, 2, dtype=torch.long),
                          next_hops=[{"peer_id": "p", "session_id": "x", "token": "t" * 16, "dtype": "float32"}])
    frame = bytearray(encode_message(message, codec=data.draw(st.sampled_from([None, "float16", "int8-block64"]))))
    for _ in range(data.draw(st.integers(1, 6))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    try:
        _read(bytes(frame))
    except (BadRequestError, asyncio.IncompleteReadError):
        pass


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**40))
def test_lying_lengths_in_the_prefix(header_len, body_len):
    try:
        _read(PREFIX.pack(MAGIC, header_len, body_len) + b"{}" * 8)
    except (BadRequestError, asyncio.IncompleteReadError):
        pass


@FUZZ
@given(json_values)
def test_any_record_value(value):
    record = decode_record(value, 30, "model", 0.0)
    assert record is None or isinstance(record.blocks, BlockRange)
    decode_record(value)  # unsigned reading too


@FUZZ
@given(json_values)
def test_any_route(value):
    try:
        parse_route(value)
    except BadRequestError:
        pass


def test_the_fuzzed_parsers_still_read_the_real_thing():
    message = ForwardRequest(BlockRange(0, 3), torch.randn(2, 3, 8))
    assert torch.equal(_read(encode_message(message)).hidden_states, message.hidden_states)
