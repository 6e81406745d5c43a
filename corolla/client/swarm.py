"""``RemoteSwarm``: the client's own peer and its view of which servers hold which blocks."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, TypeVar

from corolla.client.config import ClientConfig
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError
from corolla.core.records import ServerRecord
from corolla.core.spans import describe_blocks, plan_chain, unserved_blocks, usable
from corolla.net.loop import LoopThread
from corolla.net.peer import Peer, PeerConfig
from corolla.net.records import fetch_records
from corolla.wire.messages import PROTOCOL_VERSION

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RemoteSwarm:
    """Owns a background event loop and a client-mode peer; plans chains of servers for block spans."""

    def __init__(self, config: ClientConfig, model_prefix: str, num_blocks: int):
        if not config.initial_peers:
            raise ValueError("a client needs initial_peers: the multiaddrs of any peer of the swarm")
        self.config = config
        self.model_prefix = model_prefix
        self.num_blocks = num_blocks
        self.loop = LoopThread("corolla-client")
        try:
            self.peer: Peer = self.loop.run(
                Peer.create(PeerConfig(initial_peers=tuple(config.initial_peers), client_mode=True)),
                config.connect_timeout_s,
            )
        except BaseException:
            self.loop.stop()
            raise
        self._closed = False

    def run(self, coro: Awaitable[T], timeout_s: float | None = None) -> T:
        return self.loop.run(coro, timeout_s)

    async def records(self, blocks: BlockRange) -> list[ServerRecord]:
        found = await fetch_records(self.peer, self.model_prefix, blocks)
        return usable(found, PROTOCOL_VERSION)

    async def plan(self, blocks: BlockRange) -> list[tuple[ServerRecord, BlockRange]]:
        """A chain of servers for ``blocks``, waiting up to ``wait_for_blocks_s`` for it to exist."""
        deadline = time.monotonic() + self.config.wait_for_blocks_s
        while True:
            records = await self.records(blocks)
            try:
                return plan_chain(records, blocks)
            except BlocksNotServedError as exc:
                if time.monotonic() >= deadline:
                    missing = unserved_blocks(records, blocks)
                    detail = (
                        f"blocks {describe_blocks(missing)} of {self.model_prefix} are served by nobody"
                        if missing
                        else str(exc)
                    )
                    raise BlocksNotServedError(
                        f"{detail} (waited {self.config.wait_for_blocks_s:.0f} s; {len(records)} usable server(s) "
                        f"known for blocks {blocks})"
                    ) from None
            await asyncio.sleep(self.config.lookup_period_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.run(self.peer.shutdown(), 10)
        except Exception as exc:
            logger.debug("client peer shutdown: %s", exc)
        self.loop.stop()
