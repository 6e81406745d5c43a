"""Talking to one server: unary requests and inference-session streams, over ``corolla.wire``."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Optional

from corolla.core.errors import CorollaError, RemoteError
from corolla.core.records import ServerRecord
from corolla.net.peer import Peer
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL, ErrorReply, Message, OpenSession, SessionOpened

REPLY_MAX_BYTES = 2**40  # replies are as large as the requests we chose to send


def _check_reply(reply: Optional[Message], expected: type, record: ServerRecord) -> Message:
    if reply is None:
        raise RemoteError("ConnectionClosed", "the server closed the stream without replying", record.peer_id)
    if isinstance(reply, ErrorReply):
        raise RemoteError.from_reply(reply.kind, reply.message, record.peer_id)
    if not isinstance(reply, expected):
        raise RemoteError("ProtocolError", f"expected {expected.__name__}, got {type(reply).__name__}", record.peer_id)
    return reply


async def call_unary(
    peer: Peer, record: ServerRecord, request: Message, expected: type, timeout_s: float,
    version: int = PROTOCOL_VERSION,
) -> Message:
    """Send one request on a new stream and return the reply; a server error becomes ``RemoteError``."""

    async def _call() -> Message:
        reader, writer = await peer.open_stream(record.peer_id, RPC_PROTOCOL, record.maddrs)
        try:
            # the server may reject a request (too large, say) before reading all of it: then read why it did
            with contextlib.suppress(ConnectionError):
                await write_message(writer, request, version)
            return _check_reply(await read_message(reader, REPLY_MAX_BYTES), expected, record)
        finally:
            writer.close()

    return await asyncio.wait_for(_call(), timeout_s)


class SessionStream:
    """One inference session on one server: a stream that stays open between steps."""

    def __init__(self, record: ServerRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.record = record
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, peer: Peer, record: ServerRecord, request: OpenSession, timeout_s: float) -> "SessionStream":
        reader, writer = await asyncio.wait_for(peer.open_stream(record.peer_id, RPC_PROTOCOL, record.maddrs), timeout_s)
        stream = cls(record, reader, writer)
        try:
            await stream.send(request)
            await stream.receive(SessionOpened, timeout_s)
        except BaseException:
            stream.close()
            raise
        return stream

    async def send(self, message: Message, version: int = PROTOCOL_VERSION) -> None:
        await write_message(self._writer, message, version)

    async def receive(self, expected: type, timeout_s: float) -> Message:
        try:
            reply = await asyncio.wait_for(read_message(self._reader, REPLY_MAX_BYTES), timeout_s)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise RemoteError("ConnectionClosed", f"the session stream broke: {exc}", self.record.peer_id) from None
        except CorollaError:
            raise
        return _check_reply(reply, expected, self.record)

    async def call(self, message: Message, expected: type, timeout_s: float, version: int = PROTOCOL_VERSION) -> Message:
        await self.send(message, version)
        return await self.receive(expected, timeout_s)

    def close(self) -> None:
        self._writer.close()
