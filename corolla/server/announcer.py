"""Keeping this server's DHT record alive (under its model's directory key and the list of models), refreshed before
it expires."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from corolla.core.records import ServerRecord
from corolla.wire.identity import Identity
from corolla.wire.records import MAX_RECORD_TTL_S, MODELS_KEY, encode_record, servers_key
from corolla.net.transport import Transport

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(self, peer: Transport, model_prefix: str, record: Callable[[], ServerRecord], period_s: float,
                 ttl_s: float, identity: Identity, swarm_key: Optional[bytes] = None):
        if not 0 < period_s < ttl_s <= MAX_RECORD_TTL_S:
            raise ValueError(f"announcing every {period_s:g} s records that live {ttl_s:g} s: the period must be "
                             f"positive and below the lifetime, which DHT nodes take up to {MAX_RECORD_TTL_S:g} s")
        self.peer = peer
        self.identity = identity  # signs the records: readers accept only records signed by the peer they name
        self.swarm_key = swarm_key  # a private swarm's: proves the records belong to it
        self.model_prefix = model_prefix
        self.record = record
        self.period_s = period_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task | None = None
        self._kept = True  # whether the last announcement was kept (a change is logged)

    async def announce_now(self, ttl_s: float | None = None) -> bool:
        record = self.record()
        expires = self.peer.now() + (ttl_s or self.ttl_s)
        value = encode_record(record, self.identity, self.model_prefix, expires, self.swarm_key)
        items = [(servers_key(self.model_prefix), record.peer_id, value),
                 (MODELS_KEY, record.peer_id, value)]  # so that a swarm page can list the models served
        try:
            stored = await self.peer.announce_many(items, expires)
        except Exception as exc:
            logger.warning("announcing %s failed: %s", record.blocks, exc)
            self._kept = False
            return False
        if not stored and self._kept:
            logger.warning("the DHT nodes refused this server's record (blocks %s): clients may not find it until one "
                           "keeps it (its model's key full, as under a flood of records, or no DHT node reachable); "
                           "retrying every %g s", record.blocks, self.period_s)
        elif stored and not self._kept:
            logger.info("the DHT nodes keep this server's record again")
        self._kept = stored
        return stored

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            await self.announce_now()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
