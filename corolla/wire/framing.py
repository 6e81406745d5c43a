"""Reading and writing message frames on asyncio streams, with a size limit on what is read."""
from __future__ import annotations

import asyncio

from corolla.core.errors import MessageTooLargeError
from corolla.wire.codec import PREFIX, decode_frame, decode_prefix, encode_frame
from corolla.wire.compression import WireCodec, parse_codec
from corolla.wire.messages import PROTOCOL_VERSION, Message, message_from_frame

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20


def encode_message(message: Message, version: int = PROTOCOL_VERSION, codec=None) -> bytes:
    """The frame of ``message``; ``codec`` (a wire codec name) compresses its activation fields."""
    header, tensors = message.to_parts(version)
    codec = parse_codec(codec)
    codecs = {name: codec for name in message.COMPRESSIBLE} if codec is not WireCodec.NONE else None
    return encode_frame(header, tensors, codecs)


async def write_message(writer: asyncio.StreamWriter, message: Message, version: int = PROTOCOL_VERSION,
                        codec=None) -> None:
    writer.write(encode_message(message, version, codec))
    await writer.drain()


async def read_message(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message | None:
    """Read one message; None at a clean end of stream.

    A frame larger than ``max_bytes`` is read and dropped chunk by chunk (never held in memory), then raises
    ``MessageTooLargeError``; the stream stays usable.
    """
    try:
        prefix = await reader.readexactly(PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    header_len, body_len = decode_prefix(prefix)
    if header_len + body_len > max_bytes:
        # Read the frame to its end without keeping it, so the sender learns why and the stream stays in step.
        await _discard(reader, header_len + body_len)
        raise MessageTooLargeError(
            f"message of {header_len + body_len} bytes exceeds this peer's limit of {max_bytes} bytes "
            f"(split the batch into smaller pieces)"
        )
    header = await reader.readexactly(header_len)
    body = await reader.readexactly(body_len) if body_len else b""
    return message_from_frame(decode_frame(header, body))


async def _discard(reader: asyncio.StreamReader, size_bytes: int, chunk_bytes: int = 2**20) -> None:
    while size_bytes > 0:
        chunk = await reader.read(min(chunk_bytes, size_bytes))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", size_bytes)
        size_bytes -= len(chunk)
