"""Reading and writing message frames on asyncio streams, with a size limit on what is read."""
from __future__ import annotations

import asyncio
import contextlib

from typing import Callable, Optional

from corolla.core.errors import BadRequestError, CorollaError, FrameTimeoutError, MessageTooLargeError
from corolla.wire.codec import PREFIX, decode_prefix, decode_tensors, describe_tensors, encode_frame, parse_header
from corolla.wire.compression import WireCodec, parse_codec, recodes_exactly
from corolla.wire.messages import PROTOCOL_VERSION, Message, message_from_frame

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 2**20  # a JSON header this large is never needed (tensor descriptors, routes, names)


def encode_message(message: Message, version: int = PROTOCOL_VERSION, codec=None, extra: Optional[dict] = None) -> bytes:
    """The frame of ``message``; ``codec`` (a wire codec name) compresses its activation fields; ``extra`` adds
    frame-level header fields that are not the message's (a swarm proof)."""
    header, tensors = message.to_parts(version)
    header.update(extra or {})
    codec = parse_codec(codec)
    codecs = None
    if codec is not WireCodec.NONE:
        codecs = {name: codec for name in message.COMPRESSIBLE}
        if recodes_exactly(codec):  # a field of named tensors travels as "<field>/<name>"
            codecs.update({name: codec for name in tensors if name.partition("/")[0] in message.RECOMPRESSIBLE})
    return encode_frame(header, tensors, codecs)


async def write_message(writer: asyncio.StreamWriter, message: Message, version: int = PROTOCOL_VERSION,
                        codec=None, extra: Optional[dict] = None) -> None:
    writer.write(encode_message(message, version, codec, extra))
    await writer.drain()


async def read_message(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                       frame_timeout_s: Optional[float] = None, max_header_bytes: int = MAX_HEADER_BYTES,
                       start_timeout_s: Optional[float] = None, header_out: Optional[dict] = None,
                       admit: Optional[Callable[[int], None]] = None,
                       hold: Optional[Callable[[int], None]] = None) -> Message | None:
    """Read one message; None at a clean end of stream.

    Once a frame has begun, all of it must arrive within ``frame_timeout_s`` (a sender that stops half-way holds
    nothing for long). A header over ``max_header_bytes`` or a frame over ``max_bytes`` is read and dropped chunk by
    chunk (never held in memory), then raises ``MessageTooLargeError``; the stream stays usable. Each tensor is read
    into a buffer of its own, so a tensor kept later does not pin the rest of the frame. If no frame begins within
    ``start_timeout_s``, ``asyncio.TimeoutError``. A frame that does not decode (its header, its tensors, its
    message), whatever its bytes, raises ``BadRequestError`` naming the cause; the stream stays in step.
    ``header_out`` (a dict) receives the frame's header. ``admit`` is
    called with the frame's size before its header and body are read: if it raises a ``CorollaError`` (no room for
    the frame), the frame is read and dropped as an oversized one is, and the error is raised.

    ``hold`` is called with the size of each part of the frame just before that part is read: the prefix (already
    arrived), then the header and the body in parts of at most ``HOLD_PART_BYTES``. So what it has been given is
    never more than one part ahead of the bytes that arrived: a sender that declares a huge frame and sends nothing
    more is given one part, not the frame's size (a server's frame budget is ``hold``: a declared size costs the
    sender nothing, bytes do). If ``hold`` raises a ``CorollaError``, the rest of the frame is read and dropped,
    within the frame's time, and the error is raised.
    """
    try:
        async with asyncio.timeout(start_timeout_s):  # (a context, not wait_for: no task per frame)
            prefix = await reader.readexactly(PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    header_len, body_len = decode_prefix(prefix)
    if header_len > max_header_bytes or header_len + body_len > max_bytes:
        # Read the frame to its end without keeping it, so the sender learns why and the stream stays in step.
        await _with_timeout(_discard(reader, header_len + body_len), frame_timeout_s)
        what = f"header of {header_len} bytes" if header_len > max_header_bytes else \
            f"message of {header_len + body_len} bytes"
        limit = max_header_bytes if header_len > max_header_bytes else max_bytes
        raise MessageTooLargeError(f"{what} exceeds this peer's limit of {limit} bytes (split the batch into smaller pieces)")
    if admit is not None:
        try:
            admit(PREFIX.size + header_len + body_len)
        except CorollaError as refused:
            try:
                await _with_timeout(_discard(reader, header_len + body_len), frame_timeout_s)
            except FrameTimeoutError as exc:  # the stream is out of step now: say both
                raise FrameTimeoutError(f"{refused}; then {exc}") from None
            raise
    frame = _FrameReader(reader, header_len + body_len, hold)
    try:
        async with asyncio.timeout(frame_timeout_s):
            try:
                frame.held(PREFIX.size)
                return await frame.read(header_len, body_len, header_out)
            except CorollaError as exc:
                if not frame.refused:
                    raise
                refusal = exc.with_traceback(None)  # (its traceback would keep the parts read so far)
            await _discard(reader, frame.left)  # the rest of the refused frame, read without keeping it
            raise refusal
    except asyncio.TimeoutError:
        timed_out = f"a frame did not arrive whole within {frame_timeout_s:g} s"
        if frame.refused:  # the stream is out of step now: say both
            timed_out = f"{frame.refused}; then {timed_out}"
        raise FrameTimeoutError(timed_out) from None


HOLD_PART_BYTES = 64 * 2**10  # a frame is read (and held) this much at a time: asyncio's default stream buffer


class _FrameReader:
    """Reads one frame's header and tensors part by part, giving ``hold`` each part's size first; knows how much
    of the frame is left to read, and whether ``hold`` refused it."""

    def __init__(self, reader: asyncio.StreamReader, size: int, hold: Optional[Callable[[int], None]]):
        self.reader = reader
        self.left = size  # bytes of the frame not read yet
        self.hold = hold
        self.refused: Optional[CorollaError] = None

    async def read(self, header_len: int, body_len: int, header_out: Optional[dict]) -> Message:
        header_bytes = await self._exactly(header_len)
        try:
            with _decoding():
                header = parse_header(header_bytes)
                described = describe_tensors(header)
        except CorollaError:
            await self._skip(body_len)  # the frame's end is known: read past it, and the stream stays in step
            raise
        if header_out is not None:
            header_out.update(header)
        sizes = [desc.size for desc in described]
        if sum(sizes) != body_len:
            await self._skip(body_len)
            raise BadRequestError(f"the frame's tensors take {sum(sizes)} bytes, its body {body_len}")
        chunks = [await self._exactly(size) for size in sizes]
        with _decoding():
            return message_from_frame(decode_tensors(header, chunks, described))

    async def _skip(self, size: int) -> None:
        await _discard(self.reader, size)
        self.left -= size

    async def _exactly(self, size: int) -> bytearray:
        """The next ``size`` bytes of the frame, in a buffer of their own that grows as they arrive (a declared
        size allocates nothing)."""
        buffer = bytearray()
        while len(buffer) < size:
            part = min(HOLD_PART_BYTES, size - len(buffer))
            self.held(part)
            buffer += await self.reader.readexactly(part)
            self.left -= part
        return buffer

    def held(self, size: int) -> None:
        """Give ``hold`` the next ``size`` bytes, about to be read; remember a refusal."""
        if self.hold is not None:
            try:
                self.hold(size)
            except CorollaError as exc:
                self.refused = exc
                raise


# What decoding a peer's bytes may raise besides our own errors. The parsers check what they know to check; this is
# the line behind them: whatever a header or body still makes them raise is that peer's malformed input, said as
# such (a ``BadRequestError`` naming the cause), never a crash of the reader. A client so blames and bans the server
# that sent it; a server answers it as a bad request, as any other.
_UNFORESEEN = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RecursionError, RuntimeError)


@contextlib.contextmanager
def _decoding():
    try:
        yield
    except CorollaError:
        raise
    except _UNFORESEEN as exc:
        raise BadRequestError(f"the frame could not be decoded: {type(exc).__name__}: {str(exc)[:200]}") from exc


async def _with_timeout(awaitable, timeout_s: Optional[float]):
    try:
        async with asyncio.timeout(timeout_s):
            return await awaitable
    except asyncio.TimeoutError:
        raise FrameTimeoutError(f"a frame did not arrive whole within {timeout_s:g} s") from None


async def _discard(reader: asyncio.StreamReader, size_bytes: int, chunk_bytes: int = 2**20) -> None:
    while size_bytes > 0:
        chunk = await reader.read(min(chunk_bytes, size_bytes))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", size_bytes)
        size_bytes -= len(chunk)
