"""Relaying a session's hidden states to the next server of its chain.

After running a step that carries ``next_hops``, a server pushes its outputs to the first of them over a push
stream (``RelayOpen`` with the token the client gave), kept open for the session's life; that server runs them,
replies to the client on its own session stream, and forwards them further. A step then costs the compute plus one
one-way delay per link, instead of a client round trip per server.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from corolla.core.errors import CorollaError
from corolla.net.exchange import open_exchange, read_reply
from corolla.net.transport import Transport
from corolla.wire.codec import dtype_from_name
from corolla.wire.framing import write_message
from corolla.wire.messages import RelayOpen, SessionStep
from corolla.wire.compression import roundtrip
from corolla.wire.relay import NextHop, encode_route, trail_tag

logger = logging.getLogger(__name__)


class PushStream:
    """This server's stream into another server's session."""

    def __init__(self, hop: NextHop, reader, writer):
        self.hop = hop
        self._writer = writer
        self._drain = asyncio.create_task(self._read_errors(reader))

    @classmethod
    async def open(cls, transport: Transport, hop: NextHop, timeout_s: float,
                   swarm_key: Optional[bytes] = None) -> "PushStream":
        _, reader, writer, _ = await open_exchange(transport, hop.peer_id, hop.maddrs,
                                                   RelayOpen(hop.session_id, hop.token), timeout_s,
                                                   swarm_key=swarm_key)
        return cls(hop, reader, writer)

    async def push(self, step: SessionStep, codec=None) -> None:
        if self._drain.done():
            raise ConnectionError(f"the relay stream to {self.hop.peer_id} is closed")
        await write_message(self._writer, step, codec=codec)

    async def _read_errors(self, reader) -> None:
        """The receiver answers a push stream only to refuse something: log it (its client hears of it too)."""
        try:
            while True:
                reply = await read_reply(reader, self.hop.peer_id, None)
                if reply is None:
                    return
                logger.info("relay to %s: %s", self.hop.peer_id, reply)
        except (CorollaError, ConnectionError, asyncio.CancelledError):
            return

    def close(self) -> None:
        self._drain.cancel()
        self._writer.close()


class Relays:
    """The push streams of one session, by next hop; closed with the session."""

    def __init__(self, transport: Transport, timeout_s: float, codec=None, swarm_key: Optional[bytes] = None):
        self.transport = transport
        self.swarm_key = swarm_key
        self.timeout_s = timeout_s
        self.codec = codec  # the session's wire codec, for what it relays
        self._streams: dict[tuple[str, str], PushStream] = {}

    async def forward(self, step: SessionStep, outputs, route: list[NextHop], trail: Optional[dict] = None,
                      tags: Optional[list] = None, trail_key: Optional[str] = None) -> Optional[str]:
        """Push ``outputs`` of ``step`` to ``route[0]`` with the rest of the route (and, for an ``answer_last``
        step, the trail with these outputs' tag); None, or why it failed."""
        hop, rest = route[0], route[1:]
        sent = outputs.to(dtype_from_name(hop.dtype))
        if step.answer_last:  # sign the outputs as the next server will decode them
            tags = [*tags, trail_tag(trail_key, step.session_id, step.step_index, step.attempt,
                                     roundtrip(sent, self.codec))]
        relayed = SessionStep(
            hop.session_id, sent, attention_mask=step.attention_mask,
            position_ids=step.position_ids, hypo_ids=step.hypo_ids, start_from_position=step.start_from_position,
            step_index=step.step_index, attempt=step.attempt, next_hops=encode_route(rest),
            answer_last=step.answer_last, trail=trail or None, trail_tags=tags if step.answer_last else None,
        )
        key = (hop.peer_id, hop.session_id)
        try:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = await PushStream.open(self.transport, hop, self.timeout_s, self.swarm_key)
            async with asyncio.timeout(self.timeout_s):
                await stream.push(relayed, self.codec)
            return None
        except Exception as exc:  # unreachable, refused, broken: the client hears why and takes over
            stream = self._streams.pop(key, None)
            if stream is not None:
                stream.close()
            return f"cannot relay to {hop.peer_id}: {type(exc).__name__}: {exc}"

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
