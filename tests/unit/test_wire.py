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
    data = encode_message(InfoRequest(), version=PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolVersionError, match=f"version {PROTOCOL_VERSION}, got {PROTOCOL_VERSION + 1}"):
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


def _frame(header, body: bytes = b"") -> bytes:
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(b"CRL1", len(header_bytes), len(body)) + header_bytes + body


PAD = {"name": "pad", "dtype": "float32", "shape": [4]}  # a tensor of 16 bytes, so that each frame has a body


def _open(**fields) -> dict:
    return {"type": "session.open", "version": PROTOCOL_VERSION, "session_id": "s", "blocks": "0:2",
            "max_length": 8, "batch_size": 1, "tensors": [PAD], **fields}


def _empty_tensor(**descriptor) -> dict:
    return _open(tensors=[PAD, {"name": "t", "dtype": "float32", "shape": [0, 4], **descriptor}])


@pytest.mark.parametrize("header, cause", [
    (b"[" * 100_000, "nests deeper than the 16 levels"),  # the JSON parser recursed: RecursionError
    (_open(session_id=[[[[[[[[[[[[[[[[[["s"]]]]]]]]]]]]]]]]]]), "nests deeper than the 16 levels"),
    (_empty_tensor(shape=[0, 2**64]), r"shape \[0, 18446744073709551616\] is too large"),  # torch.empty: TypeError
    (_empty_tensor(shape=[0, 2**62, 2**62]), "is too large"),  # torch: stride calculation overflowed
    (_empty_tensor(dtype=["float32"]), r"unknown tensor dtype \['float32'\]"),  # a dict lookup: unhashable
    (_open(blocks=[0, 2]), r"blocks must be BlockRange, got \[0, 2\]"),  # BlockRange.parse: no .split
    (_open(blocks=5), "blocks must be BlockRange, got 5"),
])
def test_frames_that_do_not_decode_are_bad_requests_naming_the_cause(header, cause):
    """Whatever the header, a frame read from a peer raises ``BadRequestError`` (the peer's fault, answered or
    blamed), never the parser's or torch's own exception, which a reader would take for its own crash; and the
    stream stays in step: the frame after it is read."""
    frame = _frame(header, b"\0" * 16)  # (a body too: it is skipped with the frame)
    with pytest.raises(BadRequestError, match=cause):
        _roundtrip(frame + encode_message(InfoRequest()))

    async def next_one():
        reader = asyncio.StreamReader()
        reader.feed_data(frame + encode_message(InfoRequest()))
        reader.feed_eof()
        with pytest.raises(BadRequestError):
            await read_message(reader)
        return await read_message(reader)

    assert isinstance(asyncio.run(next_one()), InfoRequest)


def test_what_the_parsers_did_not_foresee_is_still_the_peers_bad_request(monkeypatch):
    """The line behind the parsers' checks: an exception a frame makes decoding raise, of a kind nobody foresaw, is
    that frame's fault, said with its cause."""
    from corolla.wire import framing

    def unforeseen(frame):
        raise RuntimeError("torch could not take it")

    monkeypatch.setattr(framing, "message_from_frame", unforeseen)
    with pytest.raises(BadRequestError, match="could not be decoded: RuntimeError: torch could not take it"):
        _roundtrip(encode_message(InfoRequest()))


def test_empty_tensors_of_any_plausible_shape_still_decode():
    got, _ = _roundtrip(_frame(_empty_tensor(shape=[0, 2**20, 2**20]), b"\0" * 16))
    assert got.lora is None  # (a tensor not of the message: dropped, after it decoded)
    frame = decode_frame(json.dumps({"tensors": [{"name": "t", "dtype": "float32", "shape": [0, 2**40]}]}).encode(), b"")
    assert frame.tensors["t"].shape == (0, 2**40)


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


@pytest.mark.parametrize("codec, bytes_per_value, tolerance", [
    ("none", 4, 0.0), ("float16", 2, 1e-3), ("bfloat16", 2, 1e-2), ("int8-block64", 1 + 4 / 64, 1 / 127 + 1e-6)])
def test_wire_codecs_round_trip_within_their_precision(codec, bytes_per_value, tolerance):
    from corolla.wire.codec import PREFIX, decode_frame, decode_prefix

    hidden = torch.randn(2, 100, 64) * torch.logspace(-2, 3, 64)  # magnitudes from 0.01 to 1000
    mask = torch.ones(2, 100, dtype=torch.long)
    data = encode_message(SessionStep("s", hidden, attention_mask=mask), codec=codec)
    header_len, body_len = decode_prefix(data[:PREFIX.size])
    outliers = json.loads(data[PREFIX.size:PREFIX.size + header_len])["tensors"][0].get("outliers", 0)
    assert body_len == pytest.approx(hidden.numel() * bytes_per_value + mask.numel() * 8 + 8 * outliers, abs=8)
    assert outliers < hidden.numel() / 20
    message = message_from_frame(decode_frame(data[PREFIX.size:PREFIX.size + header_len], data[PREFIX.size + header_len:]))
    assert message.hidden_states.dtype == torch.float32 and message.attention_mask.equal(mask)  # ids stay exact
    if codec == "int8-block64":  # outliers exact; the rest within half a step of its block's scale
        blocks = hidden.reshape(-1, 64)
        error = (message.hidden_states.reshape(-1, 64) - blocks).abs()
        outlier = blocks.abs() > 4 * blocks.pow(2).mean(1, keepdim=True).sqrt()
        assert float(error[outlier].max()) == 0
        scale = torch.where(outlier, torch.zeros_like(blocks), blocks).abs().amax(1, keepdim=True)
        assert float((error - scale / 254).max()) <= 1e-4
    else:
        excess = (message.hidden_states - hidden).abs() - (tolerance * hidden.abs() + 1e-4)  # 16-bit: relative
        assert float(excess.max()) <= 0


def test_bad_codecs_are_refused_with_their_cause():
    from corolla.wire.codec import PREFIX, decode_frame, decode_prefix

    with pytest.raises(BadRequestError, match="unknown wire codec 'zip'"):
        encode_message(SessionStep("s", torch.randn(1, 1, 4)), codec="zip")
    data = bytearray(encode_message(SessionStep("s", torch.randn(1, 2, 64)), codec="int8-block64"))
    header_len, _ = decode_prefix(bytes(data[:PREFIX.size]))
    body = PREFIX.size + header_len
    for forged_scale in (float("nan"), -1.0):  # the first block's scale, forged
        data[body:body + 4] = torch.tensor([forged_scale], dtype=torch.float32).numpy().tobytes()
        with pytest.raises(BadRequestError, match="corrupted 8-bit block"):
            decode_frame(bytes(data[PREFIX.size:body]), bytes(data[body:]))
    spiky = torch.zeros(1, 1, 64)
    spiky[0, 0, 5] = 1000.0  # one outlier
    data = bytearray(encode_message(SessionStep("s", spiky), codec="int8-block64"))
    header_len, _ = decode_prefix(bytes(data[:PREFIX.size]))
    body = PREFIX.size + header_len
    data[-8:-4] = (10**6).to_bytes(4, "little")  # its index, past the tensor
    with pytest.raises(BadRequestError, match="an outlier's index"):
        decode_frame(bytes(data[PREFIX.size:body]), bytes(data[body:]))
    header = json.loads(bytes(data[PREFIX.size:body]))
    header["tensors"][0]["codec"] = "rot13"
    with pytest.raises(BadRequestError, match="unknown wire codec 'rot13'"):
        decode_frame(json.dumps(header).encode(), bytes(data[body:]))


def test_decoded_tensors_do_not_pin_the_rest_of_the_frame():
    """Each tensor gets a buffer of its own: keeping a small one does not keep a large one alive."""
    big, small = torch.zeros(1, 1000, 64), torch.ones(1, 3, 64)
    data = encode_message(ForwardRequest(BlockRange(0, 1), big, prompts=small.unsqueeze(0)))
    first, _ = _roundtrip(data)
    assert first.prompts.untyped_storage().nbytes() == small.numel() * 4
    assert first.hidden_states.untyped_storage().nbytes() == big.numel() * 4


def test_all_finite_answers_as_isfinite_does():
    from corolla.wire.validation import all_finite

    big = torch.full((4, 8), 3e38)  # finite values whose sum overflows: checked value by value
    assert all_finite(big) and not torch.isfinite(big.sum())
    assert all_finite(torch.full((3,), 6e4, dtype=torch.float16))  # the same in half precision
    assert all_finite(torch.empty(0, 5)) and all_finite(torch.arange(10))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 3, 16)
        x[1, 2, 7] = bad
        assert not all_finite(x), bad
    both = torch.zeros(6)
    both[0], both[5] = float("inf"), -float("inf")  # sums to NaN: not finite either way
    assert not all_finite(both)


@pytest.mark.parametrize("batch,new", [(1, 1), (2, 3), (4, 40)])  # (4 x 40: past the small-step shortcut)
def test_steps_carry_mask_and_positions_only_when_not_the_default(batch, new):
    from corolla.client.session import _defaults_dropped

    past = 17
    mask = torch.ones(batch, new, dtype=torch.long)
    positions = torch.arange(past, past + new).unsqueeze(0).expand(batch, new)
    assert _defaults_dropped(mask, positions, past) == (None, None)
    padded = mask.clone()
    padded[-1, 0] = 0
    kept_mask, dropped = _defaults_dropped(padded, positions, past)
    assert kept_mask is padded and dropped is None
    shifted = positions.clone()
    shifted[-1] -= 1  # a left-padded row's positions lag behind the cache length
    assert _defaults_dropped(mask, shifted, past)[1] is shifted
    assert _defaults_dropped(mask, positions, past + 1)[1] is positions
    # the new tokens' columns of a longer mask, as the model's forward slices them (not contiguous with batch > 1)
    wide = torch.ones(batch, past + new, dtype=torch.long)
    assert _defaults_dropped(wide[:, past:], positions, past) == (None, None)
    wide[0, -1] = 0
    assert _defaults_dropped(wide[:, past:], positions, past)[0] is not None
