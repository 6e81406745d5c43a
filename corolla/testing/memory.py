"""A whole swarm's network inside one process: ``MemoryNetwork`` and its ``MemoryTransport`` peers.

Streams are pairs of asyncio streams, so the real protocol (frames, sessions, errors) runs over them unchanged; a
dict with expirations stands in for the DHT. Peers may live on different event loops (each transport belongs to
the loop it was created on; bytes cross loops thread-safely). For failures and distance:

- ``network.set_delay(a, b, seconds)`` delays what ``a`` sends to ``b`` (one way), ``set_default_delay`` every link;
- ``transport.kill()`` is a SIGKILL: its streams break at once and it can no longer be reached;
- ``transport.freeze()`` / ``thaw()`` is SIGSTOP / SIGCONT: bytes to and from it wait until it thaws;
- ``network.block(a, b)`` makes ``b`` unreachable from ``a`` (a firewall between two hosts).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from typing import Any, Optional, Sequence

from corolla.net.transport import StreamHandler, Transport


class MemoryNetwork:
    """Peers by id, the record store, link delays. Thread-safe: peers on several event loops share it."""

    def __init__(self, default_delay_s: float = 0.0):
        self.default_delay_s = default_delay_s
        self._delays: dict[tuple[str, str], float] = {}
        self._blocked: set[tuple[str, str]] = set()
        self.bytes_sent: collections.Counter = collections.Counter()  # (sender, receiver) -> bytes written
        self._peers: dict[str, "MemoryTransport"] = {}
        self._records: dict[str, dict[str, tuple[Any, float]]] = {}  # key -> subkey -> (value, expiration)
        self._lock = threading.Lock()
        self._ids = itertools.count()

    async def create_transport(self, name: str = "peer", identity=None) -> "MemoryTransport":
        """A new peer on the running event loop (named by ``identity``'s peer id, if given)."""
        peer_id = identity.peer_id if identity is not None else f"mem-{name}-{next(self._ids)}"
        transport = MemoryTransport(self, peer_id, asyncio.get_running_loop())
        with self._lock:
            self._peers[transport.peer_id] = transport
        return transport

    def factory(self, name: str = "peer"):
        """A transport factory (for ``RemoteSwarm``, ``Server``): each call makes a new peer on its loop."""
        return lambda identity=None: self.create_transport(name, identity)

    def set_delay(self, sender: str, receiver: str, delay_s: float) -> None:
        self._delays[(sender, receiver)] = delay_s

    def set_default_delay(self, delay_s: float) -> None:
        self.default_delay_s = delay_s

    def block(self, dialer: str, target: str) -> None:
        """``dialer`` can no longer open streams to ``target`` (streams already open stay)."""
        self._blocked.add((dialer, target))

    def delay_s(self, sender: str, receiver: str) -> float:
        return self._delays.get((sender, receiver), self.default_delay_s)

    def peer(self, peer_id: str) -> Optional["MemoryTransport"]:
        with self._lock:
            return self._peers.get(peer_id)

    @property
    def peers(self) -> list["MemoryTransport"]:
        with self._lock:
            return list(self._peers.values())

    # ---------------------------------------------------------------- the record store

    def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> None:
        with self._lock:
            self._records.setdefault(key, {})[subkey] = (value, expiration_time)

    def lookup(self, key: str) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            entries = self._records.get(key, {})
            return {subkey: value for subkey, (value, expiration) in entries.items() if expiration >= now}


class MemoryTransport(Transport):
    """One peer of a ``MemoryNetwork``, bound to the event loop it was created on."""

    def __init__(self, network: MemoryNetwork, peer_id: str, loop: asyncio.AbstractEventLoop):
        self.network = network
        self.peer_id = peer_id
        self.loop = loop
        self._handlers: dict[str, StreamHandler] = {}
        self._pipes: set[_Pipe] = set()  # every stream end this peer sends or receives on
        self._tasks: set[asyncio.Task] = set()
        self.dead = False
        self._thawed = threading.Event()
        self._thawed.set()

    @property
    def reachable(self) -> bool:
        return not self.dead

    async def serve(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    async def open_stream(self, peer_id: str, protocol: str, maddrs: Optional[Sequence[str]] = None):
        if self.dead:
            raise ConnectionError(f"{self.peer_id} is shut down")
        remote = self.network.peer(peer_id)
        if (self.peer_id, peer_id) in self.network._blocked:
            raise ConnectionError(f"cannot open a stream to {peer_id}: unreachable from {self.peer_id}")
        if remote is None or remote.dead:
            raise ConnectionError(f"cannot open a stream to {peer_id}: no such peer is reachable")
        while not remote._thawed.is_set():  # a frozen peer does not answer the dial
            await asyncio.sleep(0.01)
            if remote.dead:
                raise ConnectionError(f"cannot open a stream to {peer_id}: it died")
        handler = remote._handlers.get(protocol)
        if handler is None:
            raise ConnectionError(f"{peer_id} does not serve protocol {protocol}")
        outgoing = _Pipe(self, remote)  # what we send
        incoming = _Pipe(remote, self)  # what it sends back
        remote.loop.call_soon_threadsafe(remote._start_handler, handler, outgoing.reader, incoming.writer, self.peer_id)
        return incoming.reader, outgoing.writer

    def _start_handler(self, handler: StreamHandler, reader, writer, remote_id: str) -> None:
        async def run():
            try:
                await handler(reader, writer, remote_id)
            finally:
                writer.close()

        task = self.loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def announce_many(self, items, expiration_time: float) -> bool:
        if self.dead:
            return False
        for key, subkey, value in items:
            self.network.store(key, subkey, value, expiration_time)
        return True

    async def lookup_many(self, keys):
        if self.dead:
            raise ConnectionError(f"{self.peer_id} is shut down")
        return {key: self.network.lookup(key) for key in keys}

    def now(self) -> float:
        return time.time()

    async def visible_maddrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}"]

    async def shutdown(self) -> None:
        self.kill()

    # ---------------------------------------------------------------- failures

    def kill(self) -> None:
        """Like SIGKILL: every stream of this peer breaks now, and nobody can reach it any more."""
        self.dead = True
        self._thawed.set()
        for pipe in list(self._pipes):
            pipe.break_()
        for task in list(self._tasks):
            self.loop.call_soon_threadsafe(task.cancel)

    def freeze(self) -> None:
        """Like SIGSTOP: bytes to and from this peer wait (its own work goes on) until ``thaw()``."""
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()
        for pipe in list(self._pipes):
            pipe.wake()

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()


class _Pipe:
    """One direction of a stream: bytes ``sender`` writes arrive, after the link's delay, in ``reader`` on the
    receiver's event loop, in order."""

    def __init__(self, sender: MemoryTransport, receiver: MemoryTransport):
        self.sender, self.receiver = sender, receiver
        self.reader = asyncio.StreamReader(loop=receiver.loop)
        self.writer = _PipeWriter(self)
        self._queue: collections.deque = collections.deque()  # (due time, bytes or None = end of stream)
        self._wakeup: Optional[asyncio.Event] = None
        self._broken = False
        self._ended = False
        sender._pipes.add(self)
        receiver._pipes.add(self)
        self._delivery = None
        receiver.loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._wakeup = asyncio.Event()
        self._delivery = self.receiver.loop.create_task(self._deliver())
        self.receiver._tasks.add(self._delivery)
        self._delivery.add_done_callback(self.receiver._tasks.discard)
        if self._queue:
            self._wakeup.set()

    def send(self, data: Optional[bytes]) -> None:
        """Called on the sender's loop: queue ``data`` (None = end of stream) for the receiver."""
        if self._broken or self._ended:
            return
        if data is None:
            self._ended = True
        else:
            self.sender.network.bytes_sent[self.sender.peer_id, self.receiver.peer_id] += len(data)
        due = time.monotonic() + self.sender.network.delay_s(self.sender.peer_id, self.receiver.peer_id)
        self.receiver.loop.call_soon_threadsafe(self._enqueue, due, data)

    def _enqueue(self, due: float, data: Optional[bytes]) -> None:
        self._queue.append((due, data))
        if self._wakeup is not None:
            self._wakeup.set()

    def wake(self) -> None:
        def _set():
            if self._wakeup is not None:
                self._wakeup.set()

        try:
            self.receiver.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the receiver's loop is closed
            pass

    async def _deliver(self) -> None:
        try:
            while True:
                while not self._queue or self.sender.frozen or self.receiver.frozen:
                    self._wakeup.clear()
                    if self._queue and (self.sender.frozen or self.receiver.frozen):
                        await asyncio.sleep(0.01)
                    else:
                        await self._wakeup.wait()
                due, data = self._queue[0]
                wait_s = due - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue
                self._queue.popleft()
                if data is None:
                    self.reader.feed_eof()
                    return
                self.reader.feed_data(data)
        finally:
            self.sender._pipes.discard(self)
            self.receiver._pipes.discard(self)

    def break_(self) -> None:
        """The connection dies: the receiver reads what arrived so far, then the end of the stream."""
        self._broken = True

        def _break():
            self._queue.clear()
            if self._delivery is not None:
                self._delivery.cancel()
            if not self.reader.at_eof():
                self.reader.set_exception(ConnectionResetError("the peer's connection was reset"))

        try:
            self.receiver.loop.call_soon_threadsafe(_break)
        except RuntimeError:
            pass


class _PipeWriter:
    """The sending end of a pipe, with the part of ``asyncio.StreamWriter`` Corolla uses."""

    def __init__(self, pipe: _Pipe):
        self._pipe = pipe
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("write to a closed stream")
        if self._pipe._broken:
            raise ConnectionResetError("the connection was reset")
        if data:
            self._pipe.send(bytes(data))

    async def drain(self) -> None:
        if self._pipe._broken:
            raise ConnectionResetError("the connection was reset")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pipe.send(None)

    def is_closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        return None
