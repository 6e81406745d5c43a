"""``Transport``: everything Corolla needs from a network, as one small interface.

Servers and clients talk through a transport: byte streams to a peer's named protocol, and a record store (the DHT)
where servers announce themselves. ``corolla.net.peer.Peer`` is the real one (a libp2p daemon and a hivemind DHT
node); ``corolla.testing.memory.MemoryTransport`` runs a whole swarm inside one process, for tests that need only
logic. Objects that use a transport never build one: the edge (CLI, ``from_pretrained``, test fixtures) does.
"""
from __future__ import annotations

import abc
import asyncio
from typing import Any, Awaitable, Callable, Optional, Sequence

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]
TransportFactory = Callable[..., Awaitable["Transport"]]  # factory(identity=None): a transport on the running
#                                                          event loop, whose peer id is the identity's if given


class Transport(abc.ABC):
    """A peer of the swarm. Create it on the event loop that will use it; ``await shutdown()`` ends it."""

    peer_id: str  # this peer's id, as others name it in records and when opening streams

    @abc.abstractmethod
    async def serve(self, protocol: str, handler: StreamHandler) -> None:
        """Run ``handler(reader, writer, remote_peer_id)`` for each stream opened to ``protocol`` on this peer."""

    @abc.abstractmethod
    async def open_stream(
        self, peer_id: str, protocol: str, maddrs: Optional[Sequence[str]] = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to ``peer_id``'s ``protocol`` (``maddrs``: where to dial it, if known); ``ConnectionError`` if
        the peer cannot be reached."""

    @abc.abstractmethod
    async def announce_many(self, items: Sequence[tuple[str, str, Any]], expiration_time: float) -> bool:
        """Store ``(key, subkey, value)`` records until ``expiration_time`` (on the ``now()`` clock)."""

    @abc.abstractmethod
    async def lookup_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """For each key, its live records: ``{key: {subkey: value}}`` (an empty dict if none)."""

    @abc.abstractmethod
    def now(self) -> float:
        """The clock record expirations are measured on."""

    @abc.abstractmethod
    async def visible_maddrs(self) -> list[str]:
        """Addresses others may dial this peer at (given to clients as initial peers)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop serving and close every stream."""

    @property
    def reachable(self) -> bool:
        """Whether this peer can still reach the network (False once what carries its streams is gone: a libp2p
        daemon stopped with its server's process group, say). True unless a transport knows better."""
        return True
