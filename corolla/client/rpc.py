"""Talking to one server through a transport: ``call()`` for single exchanges and ``SessionStream`` for sessions,
both built from the service table (``corolla.wire.services``): the reply type comes from the table, never from
the caller."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Optional

from corolla.core.errors import MessageTooLargeError
from corolla.core.records import ServerRecord
from corolla.net.exchange import SMALL_REPLY_BYTES, check_reply, open_exchange, proof_header, read_reply, \
    reply_limit, service_of
from corolla.net.transport import Transport
from corolla.wire.framing import write_message
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL, ErrorReply, Message, SessionStepReply
from corolla.wire.services import Exchange, Service


async def call(transport: Transport, record: ServerRecord, request: Message, timeout_s: float,
               version: int = PROTOCOL_VERSION, codec=None, swarm_key: Optional[bytes] = None) -> Message:
    """Send one request on a new stream and return its reply (of the type the service table names); a server's
    error becomes ``RemoteError``."""
    service = service_of(request, Exchange.UNARY)

    async def _call() -> Message:
        reader, writer = await transport.open_stream(record.peer_id, RPC_PROTOCOL, record.maddrs)
        try:
            # the server may reject a request (too large, say) before reading all of it: then read why it did
            with contextlib.suppress(ConnectionError):
                await write_message(writer, request, version, codec,
                                    extra=proof_header(transport, record.peer_id, swarm_key))
            reply = await read_reply(reader, record.peer_id, None, reply_limit(request))
            return check_reply(reply, service.reply, record.peer_id)
        finally:
            writer.close()

    return await asyncio.wait_for(_call(), timeout_s)


class SessionStream:
    """One session exchange with one server: a stream that stays open between steps.

    Its replies are read in the background, one message at a time (``next_message``): waiting for them can stop
    (a timeout, or a reply from another server coming first) without ever cutting a frame in half."""

    def __init__(self, record: ServerRecord, service: Service, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.record = record
        self.service = service
        self._reader = reader
        self._writer = writer
        self.limit = SMALL_REPLY_BYTES  # the most bytes the next reply may take (what the last step sent allows)
        self._pending: Optional[asyncio.Future] = None

    @classmethod
    async def open(cls, transport: Transport, record: ServerRecord, request: Message, timeout_s: float,
                   version: int = PROTOCOL_VERSION, swarm_key: Optional[bytes] = None) -> "SessionStream":
        """Open the session ``request`` starts (e.g. ``OpenSession``) and wait for its opening reply."""
        service, reader, writer, _ = await open_exchange(transport, record.peer_id, record.maddrs, request,
                                                         timeout_s, version, swarm_key)
        return cls(record, service, reader, writer)

    async def send(self, message: Message, version: int = PROTOCOL_VERSION, codec=None) -> None:
        if not isinstance(message, self.service.step):
            raise TypeError(f"a {self.service.name} session takes {self.service.step.WIRE_NAME!r} steps, "
                            f"not {message.WIRE_NAME!r}")
        await write_message(self._writer, message, version, codec)

    def next_message(self) -> asyncio.Future:
        """The stream's next message, read in the background (the same future until ``take`` takes it). A frame
        over ``limit`` (as it stands when the frame begins), a broken stream or a frame that does not parse is
        that server's failure: ``RemoteError``."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(
                read_reply(self._reader, self.record.peer_id, None, admit=self._admit))
        return self._pending

    def take(self, future: asyncio.Future) -> Optional[Message]:
        """The message of a finished ``next_message`` future; the next call reads the one after it."""
        if future is self._pending:
            self._pending = None
        return future.result()

    def _admit(self, size: int) -> None:
        if size > self.limit:
            raise MessageTooLargeError(f"a reply of {size} bytes exceeds the {self.limit} this step's replies may take")

    def is_stale(self, reply: Optional[Message], step_index, attempt) -> bool:
        """Whether ``reply`` answers an earlier step or try than (``step_index``, ``attempt``)."""
        return isinstance(reply, (SessionStepReply, ErrorReply)) and step_index is not None \
            and reply.step_index is not None and (reply.step_index, reply.attempt) != (step_index, attempt)

    async def receive(self, timeout_s: float, step_index=None, attempt=None, max_bytes: int = 2**20) -> Message:
        """The reply to the step numbered (``step_index``, ``attempt``), at most ``max_bytes``: replies and errors of
        other steps (left over from an earlier try of a relayed step) are skipped."""
        self.limit = max_bytes
        deadline = time.monotonic() + timeout_s
        while True:
            future = self.next_message()
            done, _ = await asyncio.wait([future], timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise asyncio.TimeoutError(f"no reply from {self.record.peer_id} within {timeout_s:g} s")
            reply = self.take(future)
            if self.is_stale(reply, step_index, attempt):
                continue  # stale: an earlier step or try
            return self.checked(reply)

    def checked(self, reply: Optional[Message]) -> Message:
        """``reply`` if it is the step reply the service table names; an error, a closed stream or another message
        as this server's ``RemoteError``."""
        return check_reply(reply, self.service.step_reply, self.record.peer_id)

    async def step(self, message: Message, timeout_s: float, version: int = PROTOCOL_VERSION, codec=None) -> Message:
        """Send one step of the session and return its reply."""
        await self.send(message, version, codec)
        return await self.receive(timeout_s, getattr(message, "step_index", None), getattr(message, "attempt", None),
                                  reply_limit(message))

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._writer.close()
