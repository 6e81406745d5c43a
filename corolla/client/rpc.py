"""Talking to one server through a transport: ``call()`` for single exchanges and ``SessionStream`` for sessions,
both built from the service table (``corolla.wire.services``): the reply type comes from the table, never from
the caller."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Optional

from corolla.core.errors import CorollaError, RemoteError
from corolla.core.records import ServerRecord
from corolla.net.transport import Transport
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL, ErrorReply, Message
from corolla.wire.services import Exchange, Service, service_for

REPLY_MAX_BYTES = 2**40  # replies are as large as the requests we chose to send


def _check_reply(reply: Optional[Message], expected: type[Message], record: ServerRecord) -> Message:
    if reply is None:
        raise RemoteError("ConnectionClosed", "the server closed the stream without replying", record.peer_id)
    if isinstance(reply, ErrorReply):
        raise RemoteError.from_reply(reply.kind, reply.message, record.peer_id)
    if not isinstance(reply, expected):
        raise RemoteError("ProtocolError", f"expected {expected.WIRE_NAME!r}, got {reply.WIRE_NAME!r}", record.peer_id)
    return reply


def _service(request: Message, exchange: Exchange) -> Service:
    service = service_for(request)
    if service.exchange is not exchange:
        raise TypeError(f"{request.WIRE_NAME!r} opens a {service.exchange.value} exchange, not a {exchange.value} one")
    return service


async def call(transport: Transport, record: ServerRecord, request: Message, timeout_s: float,
               version: int = PROTOCOL_VERSION) -> Message:
    """Send one request on a new stream and return its reply (of the type the service table names); a server's
    error becomes ``RemoteError``."""
    service = _service(request, Exchange.UNARY)

    async def _call() -> Message:
        reader, writer = await transport.open_stream(record.peer_id, RPC_PROTOCOL, record.maddrs)
        try:
            # the server may reject a request (too large, say) before reading all of it: then read why it did
            with contextlib.suppress(ConnectionError):
                await write_message(writer, request, version)
            return _check_reply(await read_message(reader, REPLY_MAX_BYTES), service.reply, record)
        finally:
            writer.close()

    return await asyncio.wait_for(_call(), timeout_s)


class SessionStream:
    """One session exchange with one server: a stream that stays open between steps."""

    def __init__(self, record: ServerRecord, service: Service, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.record = record
        self.service = service
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, transport: Transport, record: ServerRecord, request: Message, timeout_s: float,
                   version: int = PROTOCOL_VERSION) -> "SessionStream":
        """Open the session ``request`` starts (e.g. ``OpenSession``) and wait for its opening reply."""
        service = _service(request, Exchange.SESSION)
        reader, writer = await asyncio.wait_for(transport.open_stream(record.peer_id, RPC_PROTOCOL, record.maddrs),
                                                timeout_s)
        stream = cls(record, service, reader, writer)
        try:
            await stream._send(request, version)
            await stream._receive(service.reply, timeout_s)
        except BaseException:
            stream.close()
            raise
        return stream

    async def _send(self, message: Message, version: int = PROTOCOL_VERSION) -> None:
        await write_message(self._writer, message, version)

    async def _receive(self, expected: type[Message], timeout_s: float) -> Message:
        try:
            reply = await asyncio.wait_for(read_message(self._reader, REPLY_MAX_BYTES), timeout_s)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise RemoteError("ConnectionClosed", f"the session stream broke: {exc}", self.record.peer_id) from None
        except CorollaError:
            raise
        return _check_reply(reply, expected, self.record)

    async def step(self, message: Message, timeout_s: float, version: int = PROTOCOL_VERSION) -> Message:
        """Send one step of the session and return its reply."""
        if not isinstance(message, self.service.step):
            raise TypeError(f"a {self.service.name} session takes {self.service.step.WIRE_NAME!r} steps, "
                            f"not {message.WIRE_NAME!r}")
        await self._send(message, version)
        return await self._receive(self.service.step_reply, timeout_s)

    def close(self) -> None:
        self._writer.close()
