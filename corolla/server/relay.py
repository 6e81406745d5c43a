"""Relaying sessions' hidden states to the next server of their chains.

After running a step that carries ``next_hops``, a server pushes its outputs to the first of them; that server runs
them, replies to the client on the session's own stream, and forwards them further. A step then costs the compute
plus one one-way delay per link, instead of a client round trip per server.

A server keeps one push stream to each server it relays to (``RelayLink``), shared by every session it relays
there. The stream opens with the first session's ``RelayOpen`` (its relay token, as the client gave it); each
further session joins with a ``RelayOpen`` of its own on the same stream, and the receiver answers each join
(``RelayOpened``, or why not) before any step of that session goes. Each step names its session and the token
it joined with: the receiver runs it only in a session that joined the stream with that very token. (Two clients
of this server may name one session id there with different tokens, only one of them its own: were steps matched
by session id alone, the other's steps, pushed behind its refused join, would run in the first one's session.)

Steps that leave for the same server in the same turn of the event loop (the sessions of one batched call, which
resume together) go out in one write: each its own frame, but one message through the libp2p daemons. And since a
stream per session counted against the receiver's cap of streams per peer (256), one server could relay at most 256
sessions to another; now there is no such limit. Measured with eight sessions on a 3-server loopback swarm, six
alternating rounds in one swarm: 109.8 tokens/s (median) against 107.6 with a stream per session (the difference is
within this machine's noise: shared streams won four rounds of six).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
from typing import Awaitable, Callable, Optional

from corolla.core.errors import CorollaError, RemoteError
from corolla.net.exchange import read_reply, start_exchange
from corolla.net.transport import Transport
from corolla.wire.codec import dtype_from_name
from corolla.wire.compression import roundtrip
from corolla.wire.framing import encode_message
from corolla.wire.messages import ErrorReply, RelayOpen, RelayOpened, SessionStep
from corolla.wire.relay import NextHop, encode_route, trail_tag

logger = logging.getLogger(__name__)


def relay_failure(peer_id: str, exc: BaseException) -> str:
    """What a client is told when its step could not be relayed to ``peer_id`` (``SessionStepReply.relay_error``)."""
    return f"cannot relay to {peer_id}: {type(exc).__name__}: {exc}"


class RelayLink:
    """This server's push stream to one other server, shared by the sessions it relays there.

    A session joins with a ``RelayOpen`` (the first one opens the stream). Its steps may follow the join at once,
    before the receiver's answer: the receiver reads the stream in order, so it judges the join before the steps
    behind it, and runs them only if the join holds. Each join's answer resolves its future (``pending``) with None,
    or with the refusal as the receiver's ``RemoteError``; a session is ``joined`` once the receiver accepted it."""

    def __init__(self, peer_id: str, reader, writer, first: NextHop):
        self.peer_id = peer_id
        self._writer = writer
        self.sessions: dict[str, str] = {}  # joined sessions and their tokens
        self._joins: dict[str, tuple[str, asyncio.Future]] = {}  # sessions whose join awaits an answer: token, future
        self._opening: Optional[str] = first.session_id  # the session the stream opened for, until its answer
        self._joins[first.session_id] = (first.token, asyncio.get_running_loop().create_future())
        self._outbox: list[bytes] = []  # frames to go out in the next write
        self._written: list[Optional[asyncio.Future]] = []  # per frame of the outbox: resolved once written
        self.writes = 0  # writes to the stream, and the steps they carried
        self.frames = 0
        self._reader = asyncio.create_task(self._read_answers(reader))

    @classmethod
    async def start(cls, transport: Transport, hop: NextHop, timeout_s: float,
                    swarm_key: Optional[bytes] = None) -> "RelayLink":
        """A stream to ``hop``'s server, opened with ``hop``'s join (the future of its answer: ``join(hop)``)."""
        reader, writer = await start_exchange(transport, hop.peer_id, hop.maddrs, RelayOpen(hop.session_id, hop.token),
                                              timeout_s, swarm_key=swarm_key)
        return cls(hop.peer_id, reader, writer, hop)

    @property
    def closed(self) -> bool:
        return self._reader.done()

    def joined(self, hop: NextHop) -> bool:
        token = self.sessions.get(hop.session_id)
        return token is not None and hmac.compare_digest(token.encode(), hop.token.encode())

    def join(self, hop: NextHop) -> Optional[asyncio.Future]:
        """Send ``hop``'s join unless it is on the stream (or joining) with that token: the future of the receiver's
        answer, or None if the session is on the stream already. (Another session with the same id but another
        token must join, and the receiver judges it.)"""
        if self.joined(hop):
            return None
        waiting = self._joins.get(hop.session_id)
        if waiting is not None:  # under way (with another token: answers come by session id, so that one first)
            return waiting[1]
        future = asyncio.get_running_loop().create_future()
        self._joins[hop.session_id] = (hop.token, future)
        self._send(encode_message(RelayOpen(hop.session_id, hop.token)), tracked=False)
        return future

    def may_push(self, hop: NextHop) -> bool:
        """Whether steps of ``hop``'s session may go: it joined, or its join (with this token) is on its way."""
        waiting = self._joins.get(hop.session_id)
        return self.joined(hop) or (waiting is not None and hmac.compare_digest(waiting[0].encode(),
                                                                                 hop.token.encode()))

    async def push(self, step: SessionStep, codec=None) -> None:
        """Send ``step`` (of a session that joined, or is joining): written with the other frames of this turn of
        the loop."""
        await self._send(encode_message(step, codec=codec))
        await self._writer.drain()

    def _send(self, frame: bytes, tracked: bool = True) -> Optional[asyncio.Future]:
        if self.closed:
            raise ConnectionError(f"the relay stream to {self.peer_id} is closed")
        future = asyncio.get_running_loop().create_future() if tracked else None
        self._outbox.append(frame)
        self._written.append(future)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def _flush(self) -> None:
        frames, futures = self._outbox, self._written
        self._outbox, self._written = [], []
        error: Optional[BaseException] = None
        try:
            if self.closed:
                raise ConnectionError(f"the relay stream to {self.peer_id} is closed")
            self._writer.write(b"".join(frames))
            self.writes += 1
            self.frames += sum(future is not None for future in futures)
        except Exception as exc:  # noqa: BLE001 - each sender hears of it
            error = exc
        for future in futures:
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _answer(self, session_id: str, refusal: Optional[RemoteError]) -> None:
        token, future = self._joins.pop(session_id, (None, None))
        if future is None:
            return
        if refusal is None:
            self.sessions[session_id] = token
        if not future.done():
            future.set_result(refusal)

    async def _read_answers(self, reader) -> None:
        """The receiver answers joins; anything else it sends refuses something (its client hears of it too)."""
        ended = "the relay stream closed"
        try:
            while True:
                reply = await read_reply(reader, self.peer_id, None)
                if reply is None:
                    return
                if isinstance(reply, RelayOpened):
                    if reply.session_id == self._opening:
                        self._opening = None
                    self._answer(reply.session_id, None if reply.refused is None else RemoteError.from_reply(
                        "BadRequestError", reply.refused[:500], self.peer_id))  # the receiver's words, bounded
                elif isinstance(reply, ErrorReply) and self._opening is not None:  # the stream itself was refused
                    refusal = RemoteError.from_reply(reply.kind[:100], reply.message[:500], self.peer_id)
                    ended = f"{refusal.kind}: {refusal.remote_message}"
                    self._answer(self._opening, refusal)
                    self._opening = None
                    return  # the link is closed: its sender ends the exchange (the receiver waits for that)
                elif isinstance(reply, ErrorReply):
                    logger.info("relay to %s: %s: %s", self.peer_id, reply.kind, reply.message)
        except (CorollaError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writer.close()
            for session_id in list(self._joins):
                self._answer(session_id, RemoteError("ConnectionClosed", f"the relay stream closed ({ended})",
                                                     self.peer_id))

    def leave(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        _, future = self._joins.pop(session_id, (None, None))
        if future is not None:  # its answer no longer matters
            future.cancel()

    @property
    def idle(self) -> bool:
        """No session on the stream, nor joining it."""
        return not self.sessions and not self._joins

    def close(self) -> None:
        self._reader.cancel()
        self._writer.close()


class RelayLinks:
    """A server's relay streams, one per server it relays to; a stream closes when its last session leaves.

    ``locate(peer_id)``: where a server of this model announces it can be dialled (its signed record's addresses;
    empty while not known yet), or None if it announces no blocks of this model. A route names its next hops' addresses, but it comes from a
    client: dialling them as given would let any client make this server connect wherever it likes (probing the
    server's own network, say). With ``locate``, a link dials only what the next server announces itself, and a
    hop that is no server of this model is refused."""

    def __init__(self, transport: Transport, timeout_s: float, swarm_key: Optional[bytes] = None,
                 locate: Optional[Callable[[str], Awaitable[Optional[tuple[str, ...]]]]] = None):
        self.transport = transport
        self.timeout_s = timeout_s
        self.swarm_key = swarm_key
        self.locate = locate
        self._links: dict[str, RelayLink] = {}
        self._opening: dict[str, asyncio.Future] = {}
        self.writes = 0  # of links closed since (the open ones count their own)
        self.frames = 0

    @property
    def open_links(self) -> int:
        return sum(not link.closed for link in self._links.values())

    async def link(self, hop: NextHop, wait: bool = True) -> tuple[RelayLink, Optional[asyncio.Future]]:
        """The stream to ``hop``'s server with ``hop``'s session on it (opened for it, or joined), and the future
        of the receiver's answer to the join if ``wait`` is False and it has not come (``RelayLink``); with
        ``wait``, the answer has come and a refusal raised ``RemoteError``."""
        while True:
            link = self._links.get(hop.peer_id)
            if link is not None and link.closed:
                self.drop(link)
                link = None
            if link is None:
                opening = self._opening.get(hop.peer_id)
                if opening is None:  # ours to open (unreachable: raised)
                    opening = self._opening[hop.peer_id] = asyncio.ensure_future(self._open(hop))
                    await asyncio.shield(opening)
                else:
                    try:  # another session is opening it: join once it is open (or open it ourselves)
                        await asyncio.shield(opening)
                    except Exception:  # noqa: BLE001 - that session's failure, not ours
                        pass
                continue
            pending = link.join(hop)
            if pending is not None and (wait or not link.may_push(hop)):
                refusal = await asyncio.shield(pending)
                if refusal is not None:
                    if link.idle:
                        self.drop(link)
                    raise refusal
                if not link.joined(hop):  # another token's join was answered: ours goes now
                    continue
                pending = None
            return link, pending

    async def _open(self, hop: NextHop) -> RelayLink:
        try:
            if self.locate is not None:
                maddrs = await self.locate(hop.peer_id)  # (empty: not known yet; only a connection the daemon
                if maddrs is None:                          # has already can reach it)
                    raise ConnectionError(f"{hop.peer_id} announces no blocks of this model: not relayed to")
                hop = dataclasses.replace(hop, maddrs=tuple(maddrs))
            link = self._links[hop.peer_id] = await RelayLink.start(self.transport, hop, self.timeout_s,
                                                                    self.swarm_key)
            return link
        finally:
            self._opening.pop(hop.peer_id, None)

    def leave(self, link: RelayLink, session_id: str) -> None:
        link.leave(session_id)
        if link.idle:
            self.drop(link)

    def drop(self, link: RelayLink) -> None:
        """Close ``link`` (broken, or its last session left); later relays to its server open a new one."""
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        link.close()
        self.writes += link.writes
        self.frames += link.frames
        link.writes = link.frames = 0

    def totals(self) -> tuple[int, int]:
        """(writes, steps they carried) of every relay stream so far."""
        links = list(self._links.values())
        return self.writes + sum(link.writes for link in links), self.frames + sum(link.frames for link in links)

    def close(self) -> None:
        for link in list(self._links.values()):
            self.drop(link)
        for opening in self._opening.values():
            opening.cancel()


class Relays:
    """What one session relays, over its server's shared links; leaves them when the session closes."""

    def __init__(self, links: RelayLinks, codec=None):
        self.links = links
        self.codec = codec  # the session's wire codec, for what it relays
        self._used: dict[tuple[str, str], RelayLink] = {}  # (next server, session id there) -> link

    @property
    def transport(self) -> Transport:
        return self.links.transport

    async def forward(self, step: SessionStep, outputs, route: list[NextHop], trail: Optional[dict] = None,
                      tags: Optional[list] = None, trail_key: Optional[str] = None,
                      pending: Optional[list] = None) -> Optional[str]:
        """Push ``outputs`` of ``step`` to ``route[0]`` with the rest of the route (and, for an ``answer_last``
        step, the trail with these outputs' tag); None, or why it failed. A session's first step there waits for
        the receiver to accept its join, unless ``pending`` is given: then the step follows the join at once and
        ``(next server, future of the answer)`` is appended to ``pending`` (see ``RelayLink``)."""
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
            relay_token=hop.token,
        )
        key = (hop.peer_id, hop.session_id)
        link = None
        try:
            async with asyncio.timeout(self.links.timeout_s):
                link, joining = await self.links.link(hop, wait=pending is None)
                previous = self._used.get(key)
                if previous is not None and previous is not link:
                    self.links.leave(previous, hop.session_id)
                self._used[key] = link
                await link.push(relayed, self.codec)
            if joining is not None:
                pending.append((hop.peer_id, joining))
            return None
        except Exception as exc:  # unreachable, refused, broken: the client hears why and takes over
            if link is not None and not isinstance(exc, RemoteError):  # a stream in an unknown state: a new one
                self.links.drop(link)
            return relay_failure(hop.peer_id, exc)

    def close(self) -> None:
        for (_, session_id), link in self._used.items():
            self.links.leave(link, session_id)
        self._used.clear()
