"""``Dispatcher``: serves each incoming stream by the service table.

It reads the stream's first message, finds its service (``corolla.wire.services``) and calls the handler's method
of that name: ``handler.<name>(request, peer)`` returns the reply of a single exchange; for a session or a push
stream, ``handler.<name>(request, channel, peer)`` talks over a ``SessionChannel``. Every failure a request causes becomes
an ``ErrorReply`` on its own stream; nothing a client sends can stop the server or disturb other streams.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Optional

from corolla.core.errors import BadRequestError, CorollaError, FrameTimeoutError
from corolla.server.frames import FrameBudget, FrameReservation
from corolla.server.sessions import ServerBusyError
from corolla.wire.swarm_key import stream_proof_valid
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import ErrorReply, Message
from corolla.wire.services import SERVICES, Exchange, Service, service_for

logger = logging.getLogger(__name__)


class ServerShuttingDownError(CorollaError):
    """The server is leaving the swarm and takes no new work."""


class Dispatcher:
    def __init__(self, handler, max_message_bytes: int, session_idle_timeout_s: float,
                 first_frame_timeout_s: float = 30.0, frame_timeout_s: float = 60.0, max_streams_per_peer: int = 256,
                 swarm_key: Optional[bytes] = None, local_peer_id: str = "", frame_budget_bytes: int = 2**30,
                 close_wait_s: float = 10.0):
        missing = [s.name for s in SERVICES if not callable(getattr(handler, s.name, None))]
        if missing:
            raise TypeError(f"{type(handler).__name__} does not answer {missing} of the service table")
        self.handler = handler
        self.methods = {s.request: getattr(handler, s.name) for s in SERVICES}
        self.max_message_bytes = max_message_bytes
        self.session_idle_timeout_s = session_idle_timeout_s
        self.first_frame_timeout_s = first_frame_timeout_s  # a stream that says nothing this long is closed
        self.frame_timeout_s = frame_timeout_s  # a frame begun must arrive whole within this
        self.max_streams_per_peer = max_streams_per_peer
        self.swarm_key = swarm_key  # a private swarm: every stream must prove it knows this
        self.local_peer_id = local_peer_id
        self.frames = FrameBudget(frame_budget_bytes)  # request frames held at once, all streams together
        self.close_wait_s = close_wait_s  # how long a stream answered is kept open for its requester to close it
        self.accepting = True
        self.in_flight = 0  # streams being served, sessions included
        self.streams_by_peer: dict[str, int] = {}
        self._channels: set["SessionChannel"] = set()

    async def handle_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self.in_flight += 1
        self.streams_by_peer[peer] = self.streams_by_peer.get(peer, 0) + 1
        frame = self.frames.reservation(peer)  # the first frame's bytes as they arrive, until its request is answered
        in_step = False  # a whole frame was read: the stream is in step, and what we answer should arrive
        try:
            if self.streams_by_peer[peer] > self.max_streams_per_peer:
                await reply_error(writer, ServerBusyError(
                    f"you have {self.max_streams_per_peer} streams open here already, the most one peer may"))
                return
            header: dict = {}
            try:
                request = await read_message(reader, self.max_message_bytes, self.frame_timeout_s,
                                             start_timeout_s=self.first_frame_timeout_s, header_out=header,
                                             hold=frame.grow)
            except asyncio.TimeoutError:
                await reply_error(writer, FrameTimeoutError(
                    f"no request arrived within {self.first_frame_timeout_s:g} s of opening the stream"))
                return
            except CorollaError as exc:
                in_step = not isinstance(exc, FrameTimeoutError)  # (a frame too large is read and dropped whole)
                await reply_error(writer, exc)
                return
            if request is None:
                return
            in_step = True
            if self.swarm_key is not None and not stream_proof_valid(self.swarm_key, header, peer, self.local_peer_id):
                await reply_error(writer, PrivateSwarmError("this swarm is private: your stream has no valid swarm proof"))
                return
            if not self.accepting:
                await reply_error(writer, ServerShuttingDownError("this server is shutting down; use another"))
                return
            try:
                service = self._service(request)
                if service.exchange is Exchange.UNARY:
                    reply = await self.methods[service.request](request, peer)
                    _check_type(service.reply, reply)
                    await write_message(writer, reply, codec=getattr(request, "wire_codec", None))
                else:
                    frame.release()  # what a session keeps of its opening request is budgeted elsewhere
                    channel = SessionChannel(self, service, reader, writer, peer)
                    self._channels.add(channel)
                    try:
                        await self.methods[service.request](request, channel, peer)
                    finally:
                        self._channels.discard(channel)
                        # a session or push stream that opened and ends here (out of step, shutting down) is closed
                        # at once: its end is what tells the peer, which may not be reading for an answer; unless
                        # the handler ended it with a last word the peer must read (``SessionChannel.end``)
                        in_step = not channel.opened or channel.last_word
            except CorollaError as exc:
                await reply_error(writer, exc)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("stream from %s ended abruptly: %s", peer, exc)
        except Exception as exc:  # a bug of ours: report it to the client, keep serving
            logger.exception("request from %s failed", peer)
            await reply_error(writer, exc)
        finally:
            frame.release()
            try:
                if in_step:  # (a stream cut off for silence or a stalled frame is closed at once)
                    await requester_closed(reader, self.close_wait_s)
            finally:
                self.in_flight -= 1
                self.streams_by_peer[peer] -= 1
                if not self.streams_by_peer[peer]:
                    del self.streams_by_peer[peer]

    def _service(self, request: Message) -> Service:
        try:
            return service_for(request)
        except BadRequestError:
            stray = getattr(self.handler, "stray_step", None)
            if stray is not None and any(s.step is not None and isinstance(request, s.step) for s in SERVICES):
                raise stray(request) from None  # a step without its session: say which session is unknown
            raise

    @property
    def open_sessions(self) -> int:
        return len(self._channels)

    def close_sessions(self) -> int:
        """End every session by closing its stream; their clients fail over to other servers."""
        channels = list(self._channels)
        for channel in channels:
            channel.close()
        return len(channels)


class PrivateSwarmError(CorollaError):
    """A peer without the swarm's key tried to use a private swarm."""


class SessionChannel:
    """The stream of a session (or a push): the handler sends the opening reply, then iterates over the steps
    (and, in a session, replies to each)."""

    def __init__(self, dispatcher: Dispatcher, service: Service, reader, writer, peer: str = ""):
        self._dispatcher = dispatcher
        self._peer = peer
        self.service = service
        self._reader = reader
        self._writer = writer
        self._opened = False
        self.codec = None  # the wire codec of step replies (the session's)
        self.last_word = False  # the handler ended the stream with an error its peer must read (``end``)

    async def reply(self, message: Message) -> None:
        """The opening reply first, then (in a session) one step reply per step."""
        expected = self.service.step_reply if self._opened else self.service.reply
        if expected is None:
            raise TypeError(f"a {self.service.exchange.value} stream has no replies to its steps")
        _check_type(expected, message)
        self._opened = True
        await write_message(self._writer, message, codec=self.codec)

    @property
    def opened(self) -> bool:
        """Whether the opening reply went out (the session or push stream is open)."""
        return self._opened

    async def answer_join(self, message: Message) -> None:
        """On a push stream: the answer to a ``join`` message (the opening reply's type)."""
        _check_type(self.service.reply, message)
        await write_message(self._writer, message)

    async def error(self, exc: BaseException, step_index: Optional[int] = None, attempt: Optional[int] = None) -> None:
        await reply_error(self._writer, exc, step_index, attempt)

    async def end(self, exc: BaseException) -> None:
        """End the stream with ``exc`` (the handler returns next): an error its peer must read, not learn from the
        stream closing (an idle session evicted, which its client reopens without blaming the server). The stream
        then waits for its peer to close it, as a single exchange does, at most the dispatcher's ``close_wait_s``."""
        await self.error(exc)
        self.last_word = True

    async def steps(self, idle_timeout_s: Optional[float] = -1.0,
                    still_needed: Optional[Callable[[], bool]] = None) -> AsyncIterator[Message]:
        """The steps (and, on a push stream, the join messages) sent on this stream until its sender closes it. A
        bad frame or a message of the wrong kind is answered with an error and skipped; past ``idle_timeout_s``
        without a message (default: the server's session idle timeout; None: no limit) the stream is closed with an
        error, unless ``still_needed()`` says it serves on: then it waits that long again."""
        timeout_s = self._dispatcher.session_idle_timeout_s if idle_timeout_s == -1.0 else idle_timeout_s
        frame = self._dispatcher.frames.reservation(self._peer)  # the last step's frame, until the next is asked for
        try:
            async for step in self._steps(timeout_s, frame, still_needed):
                yield step
                frame.release()
        finally:
            frame.release()

    async def _steps(self, timeout_s: Optional[float], frame: FrameReservation,
                     still_needed: Optional[Callable[[], bool]]) -> AsyncIterator[Message]:
        while True:
            try:
                step = await read_message(self._reader, self._dispatcher.max_message_bytes,
                                          self._dispatcher.frame_timeout_s, start_timeout_s=timeout_s,
                                          hold=frame.grow)
            except asyncio.TimeoutError:  # (only between frames: a frame begun has frame_timeout_s to arrive)
                if still_needed is not None and still_needed():
                    continue
                await self.error(BadRequestError(f"{self.service.exchange.value} stream idle for {timeout_s:.0f} s: "
                                                 "closed"))
                return
            except FrameTimeoutError as exc:  # the stream is out of step: end it
                await self.error(exc)
                return
            except CorollaError as exc:
                frame.release()
                await self.error(exc)
                continue
            except (ConnectionError, asyncio.IncompleteReadError):
                raise
            except Exception as exc:  # a bug of ours (``read_message`` says a peer's bad frame as a CorollaError):
                # where the stream stands is unknown, so it ends, with the peer told; the session's handler sees
                # its steps end and closes it, never left waiting for steps nobody reads
                logger.exception("a frame from %s could not be read", self._peer)
                await self.error(exc)
                return
            if step is None:
                return
            if not self._dispatcher.accepting:
                await self.error(ServerShuttingDownError("this server is shutting down; use another"))
                return
            join = self.service.join
            if not isinstance(step, self.service.step) and not (join is not None and isinstance(step, join)):
                await self.error(BadRequestError(
                    f"expected {self.service.step.WIRE_NAME!r} inside a session, got {step.WIRE_NAME!r}"))
                continue
            yield step

    def close(self) -> None:
        self._writer.close()


def _check_type(expected: type[Message], reply: Optional[Message]) -> None:
    if not isinstance(reply, expected):
        raise TypeError(f"the handler answered {type(reply).__name__}, the service table says {expected.__name__}")


async def requester_closed(reader: asyncio.StreamReader, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until the peer that opened a stream closes it, discarding anything it still sends.

    The requester ends an exchange (a single exchange, or the refused opening of a session), not the side that
    answers it. When the server closed first, about one reply in 5,000 was lost on the way (stress tests of fresh
    clients on loopback: the server had written the reply, the client read only the end of the stream): hivemind's
    daemon ends a stream that one side closed with a reset, which can overtake the last bytes still on their way.
    With the server waiting for the client, which closes as soon as it has read the reply, none of 35,000 was
    lost. A requester that does not close is cut off after ``timeout_s``; until then its stream counts towards its
    limit of open streams."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(2**16):
                pass
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass


async def reply_error(writer, exc: BaseException, step_index: Optional[int] = None,
                      attempt: Optional[int] = None) -> None:
    kind = type(exc).__name__ if isinstance(exc, CorollaError) else "InternalServerError"
    try:
        await write_message(writer, ErrorReply(kind=kind, message=str(exc), step_index=step_index, attempt=attempt))
    except (ConnectionError, RuntimeError):
        pass
