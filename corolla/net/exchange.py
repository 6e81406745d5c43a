"""Opening an exchange on a peer: a stream, its opening request, and the opening reply (checked against the
service table). Used by the client for sessions and by servers for relay streams."""
from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from corolla.core.errors import CorollaError, RemoteError
from corolla.net.transport import Transport
from corolla.wire.framing import DEFAULT_MAX_MESSAGE_BYTES, read_message, write_message
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL, ErrorReply, Message
from corolla.wire.services import Exchange, Service, service_for
from corolla.wire.swarm_key import FIELD, stream_proof

SMALL_REPLY_BYTES = 2**20  # the most a reply without tensors of the caller's size may take (headers, errors)


def reply_limit(request: Message) -> int:
    """The most bytes a reply to ``request`` may take: replies carry tensors of the request's sizes (outputs of
    its hidden states, gradients of what it sent), plus headers."""
    _, tensors = request.to_parts()
    return SMALL_REPLY_BYTES + sum(t.numel() * max(t.element_size(), 4) for t in tensors.values())


def check_reply(reply: Optional[Message], expected: type[Message], peer_id: str) -> Message:
    """``reply`` if it is an ``expected``; a server's error, a closed stream or another message as ``RemoteError``."""
    if reply is None:
        raise RemoteError("ConnectionClosed", "the stream ended without a reply (the server stopped, or dropped it)", peer_id)
    if isinstance(reply, ErrorReply):
        raise RemoteError.from_reply(reply.kind, reply.message, peer_id)
    if not isinstance(reply, expected):
        raise RemoteError("ProtocolError", f"expected {expected.WIRE_NAME!r}, got {reply.WIRE_NAME!r}", peer_id)
    return reply


def service_of(request: Message, *exchanges: Exchange) -> Service:
    service = service_for(request)
    if service.exchange not in exchanges:
        raise TypeError(f"{request.WIRE_NAME!r} opens a {service.exchange.value} exchange, "
                        f"not a {' or '.join(e.value for e in exchanges)} one")
    return service


async def read_reply(reader: asyncio.StreamReader, peer_id: str, timeout_s: Optional[float],
                     max_bytes: int = SMALL_REPLY_BYTES, admit=None) -> Optional[Message]:
    """The next message from a peer, at most ``max_bytes`` (and what ``admit``, given the frame's size, allows).
    A broken stream, a reply too large, a frame that does not parse: all are that peer's failure, as
    ``RemoteError``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_message(reader, max_bytes if admit is None else DEFAULT_MAX_MESSAGE_BYTES, admit=admit)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        raise RemoteError("ConnectionClosed", f"the stream broke: {exc}", peer_id) from None
    except CorollaError as exc:  # its fault, not ours: it sent something we cannot read
        raise RemoteError("MalformedReply", f"{type(exc).__name__}: {exc}", peer_id) from None


def proof_header(transport: Transport, peer_id: str, swarm_key: Optional[bytes]) -> Optional[dict]:
    """The frame header fields that prove this peer knows a private swarm's key (None in an open swarm)."""
    return None if swarm_key is None else {FIELD: stream_proof(swarm_key, transport.peer_id, peer_id)}


async def start_exchange(transport: Transport, peer_id: str, maddrs: Sequence[str], request: Message,
                         timeout_s: float, version: int = PROTOCOL_VERSION, swarm_key: Optional[bytes] = None):
    """Open a push exchange and send its opening request, without waiting for the opening reply (the caller reads
    it with what follows): returns ``(reader, writer)``."""
    service_of(request, Exchange.PUSH)
    return await _send_opening(transport, peer_id, maddrs, request, timeout_s, version, swarm_key)


async def _send_opening(transport: Transport, peer_id: str, maddrs: Sequence[str], request: Message,
                        timeout_s: float, version: int, swarm_key: Optional[bytes]):
    reader, writer = await asyncio.wait_for(transport.open_stream(peer_id, RPC_PROTOCOL, maddrs), timeout_s)
    try:
        await write_message(writer, request, version, extra=proof_header(transport, peer_id, swarm_key))
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def open_exchange(transport: Transport, peer_id: str, maddrs: Sequence[str], request: Message,
                        timeout_s: float, version: int = PROTOCOL_VERSION, swarm_key: Optional[bytes] = None):
    """Open a session or push exchange: returns ``(service, reader, writer, opening reply)``."""
    service = service_of(request, Exchange.SESSION, Exchange.PUSH)
    reader, writer = await _send_opening(transport, peer_id, maddrs, request, timeout_s, version, swarm_key)
    try:
        opened = check_reply(await read_reply(reader, peer_id, timeout_s), service.reply, peer_id)
    except BaseException:
        writer.close()
        raise
    return service, reader, writer, opened
