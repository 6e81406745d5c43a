"""Tensor and message encoding.

A frame is ``MAGIC | u32 header_bytes | u64 body_bytes | header (UTF-8 JSON) | body``. The header holds the
message type, the protocol version, its plain fields and a descriptor per tensor (name, dtype, shape, and the
wire codec if one was used, see ``compression.py``); the body holds the tensors' bytes back to back, in the order
of the descriptors.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Optional

import torch

from corolla.core.errors import BadRequestError
from corolla.wire.compression import WireCodec, compress, decompress, encoded_size, parse_codec

MAGIC = b"CRL1"
PREFIX = struct.Struct("<4sIQ")  # magic, header length, body length
MAX_HEADER_DEPTH = 16  # JSON nesting a header may have; the deepest message needs 4 (header, next_hops, hop, maddrs)
MAX_TENSOR_VALUES = 2**40  # the product of a tensor's non-zero dimensions: no peer sends 4 TiB in one frame, and a
#                            shape past it (possible with a zero dimension, whose tensor has no bytes) overflows torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise BadRequestError(f"tensors of dtype {dtype} cannot be sent; supported: {sorted(_DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):  # (TypeError: a list or an object in a header, which no dict can look up)
        raise BadRequestError(f"unknown tensor dtype {_shown(name)}; supported: {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class Frame:
    """A decoded frame: the JSON header and the named tensors."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def encode_frame(header: dict[str, Any], tensors: dict[str, torch.Tensor],
                 codecs: Optional[dict[str, WireCodec]] = None) -> bytes:
    """A frame of ``header`` and ``tensors``; ``codecs`` names a wire codec for some floating-point tensors."""
    descriptors, chunks = [], []
    for name, tensor in tensors.items():
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        descriptor = {"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        codec = codecs.get(name, WireCodec.NONE) if codecs else WireCodec.NONE
        if codec is not WireCodec.NONE and tensor.is_floating_point() and tensor.numel():
            body, fields = compress(tensor.contiguous(), codec)
            descriptor.update(codec=codec.value, **fields)
            chunks.append(body)
        elif tensor.numel():  # the tensor's own bytes (a view; join copies them once, into the frame)
            chunks.append(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        descriptors.append(descriptor)
    header_bytes = json.dumps({**header, "tensors": descriptors}, separators=(",", ":")).encode()
    body = b"".join(chunks)
    return PREFIX.pack(MAGIC, len(header_bytes), len(body)) + header_bytes + body


def decode_prefix(prefix: bytes) -> tuple[int, int]:
    magic, header_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise BadRequestError(f"not a Corolla frame (magic {magic!r}, expected {MAGIC!r})")
    return header_len, body_len


def parse_header(header_bytes: bytes) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise BadRequestError(f"frame header is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recursed once per level: '[' * 100000 ends here
        raise BadRequestError(f"frame header nests deeper than the {MAX_HEADER_DEPTH} levels allowed") from None
    if not isinstance(header, dict):
        raise BadRequestError("frame header must be a JSON object")
    _check_depth(header)
    descriptors = header.get("tensors", [])
    if not isinstance(descriptors, list) or not all(isinstance(d, dict) for d in descriptors):
        raise BadRequestError("frame header: tensors must be a list of descriptors")
    return header


def _check_depth(header: dict) -> None:
    """``BadRequestError`` if ``header`` nests deeper than ``MAX_HEADER_DEPTH``. What the parser accepted may still
    be nested near the interpreter's recursion limit, deep enough for any later recursive walk of it (a ``repr`` in
    an error message) to fail: so it is measured here, without recursion, level by level."""
    level, depth = [header], 1
    while level:
        if depth > MAX_HEADER_DEPTH:
            raise BadRequestError(f"frame header nests deeper than the {MAX_HEADER_DEPTH} levels allowed")
        inner = []
        for value in level:
            items = value.values() if isinstance(value, dict) else value
            inner.extend(v for v in items if isinstance(v, (dict, list)))
        level, depth = inner, depth + 1


@dataclass(frozen=True)
class Described:
    """A checked tensor descriptor of a frame header, and the bytes its tensor takes in the body."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    numel: int
    codec: WireCodec
    outliers: int
    size: int


def _describe(desc: dict) -> Described:
    """A tensor descriptor, checked."""
    name = desc.get("name")
    if type(name) is not str or len(name) > 256:
        raise BadRequestError("a tensor descriptor needs a name (a string of at most 256 characters)")
    dtype = dtype_from_name(desc.get("dtype"))
    shape = desc.get("shape")
    # (type(d) is int: a JSON true or false is a bool, which is not a shape)
    if type(shape) is not list or len(shape) > 8 or not all(type(d) is int for d in shape):
        raise BadRequestError(f"tensor {name!r}: shape must be a list of at most 8 integers")
    numel, values = 1, 1  # (values: the product of the non-zero dimensions)
    for d in shape:
        if d < 0:
            raise BadRequestError(f"tensor {name!r} has a negative dimension: {_shown(shape)}")
        numel *= d
        values *= d or 1
        if values > MAX_TENSOR_VALUES:  # checked as it grows: Python's integers never overflow, torch's do
            raise BadRequestError(f"tensor {name!r}: shape {_shown(shape)} is too large (its non-zero dimensions "
                                  f"multiply past {MAX_TENSOR_VALUES})")
    codec = parse_codec(desc.get("codec"))
    if codec is not WireCodec.NONE and not dtype.is_floating_point:
        raise BadRequestError(f"tensor {name!r}: codec {codec.value} is for floating-point tensors only")
    outliers = desc.get("outliers", 0)
    if type(outliers) is not int or not 0 <= outliers <= numel:
        raise BadRequestError(f"tensor {name!r}: outliers must be a count of at most its {numel} values")
    return Described(name, dtype, shape, numel, codec, outliers, encoded_size(codec, numel, dtype, outliers))


def _shown(value, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters: a peer's value in an error message, never a page of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_tensors(header: dict[str, Any]) -> list[Described]:
    """The checked descriptors of a parsed header's tensors, in body order."""
    return [_describe(desc) for desc in header.get("tensors", [])]


def decode_tensors(header: dict[str, Any], chunks: list, described: list[Described]) -> Frame:
    """The frame a parsed header (its ``describe_tensors``: ``described``) and its tensors' bytes (one buffer each)
    make."""
    header = dict(header)
    header.pop("tensors", None)
    if len(chunks) != len(described):
        raise BadRequestError("the frame's body does not match its descriptors")
    tensors: dict[str, torch.Tensor] = {}
    for desc, chunk in zip(described, chunks):
        name, dtype, shape, numel, codec = desc.name, desc.dtype, desc.shape, desc.numel, desc.codec
        if len(chunk) != desc.size:
            raise BadRequestError(f"tensor {name!r} ({shape}, {dtype}) does not match its bytes")
        if numel and codec is not WireCodec.NONE:
            tensors[name] = decompress(chunk, 0, numel, dtype, codec, name, desc.outliers).reshape(shape)
        elif numel:
            tensors[name] = torch.frombuffer(chunk, dtype=dtype, count=numel).reshape(shape)
        else:
            tensors[name] = torch.empty(shape, dtype=dtype)
    return Frame(header, tensors)


def decode_frame(header_bytes: bytes, body: bytes) -> Frame:
    """A whole frame's header and body, decoded (tensors copied out of ``body`` into buffers of their own)."""
    header = parse_header(header_bytes)
    described = describe_tensors(header)
    sizes = [desc.size for desc in described]
    if sum(sizes) > len(body):
        raise BadRequestError("a tensor runs past the frame body")
    if sum(sizes) != len(body):
        raise BadRequestError(f"frame body has {len(body) - sum(sizes)} bytes no tensor descriptor accounts for")
    chunks, offset = [], 0
    for size in sizes:
        chunks.append(bytearray(body[offset:offset + size]))
        offset += size
    return decode_tensors(header, chunks, described)
