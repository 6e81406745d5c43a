"""Keeping this server's DHT record alive (under its model's directory key and the list of models), refreshed before
it expires."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from corolla.core.records import ServerRecord
from corolla.wire.identity import Identity
from corolla.wire.records import MAX_RECORD_TTL_S, encode_record, models_key, servers_key
from corolla.net.transport import Transport

logger = logging.getLogger(__name__)


REFUSALS_TO_WARN = 3  # refreshes in a row refused before the operator is warned (see Announcer.announce_now)

# where a server files its record, and what it misses while that key refuses it
_KEYS = {"model": ("its model's key", "clients cannot find it until one keeps it"),
         "list": ("the list of models", "the swarm page does not list it (clients still find it)")}


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
        self._refusals = {"model": 0, "list": 0}  # refreshes refused in a row under each key (0: the last was kept)

    async def announce_now(self, ttl_s: float | None = None) -> bool:
        """File this server's record under its model's key and under the list of models; True if both were kept.

        A refusal is logged, and the operator warned once a key has refused ``REFUSALS_TO_WARN`` refreshes in a row
        (a key full, as under a flood of records): hivemind reports the answer of whichever DHT node answered last,
        so on a healthy swarm one node's "no" now and then looked like a refusal, and the warning flapped."""
        record = self.record()
        expires = self.peer.now() + (ttl_s or self.ttl_s)
        value = encode_record(record, self.identity, self.model_prefix, expires, self.swarm_key)
        keys = {"model": servers_key(self.model_prefix), "list": models_key(record.peer_id)}
        results = await asyncio.gather(*(self.peer.announce_many([(key, record.peer_id, value)], expires)
                                         for key in keys.values()), return_exceptions=True)
        for what, result in zip(keys, results):
            where, missed = _KEYS[what]
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            kept, before = result is True, self._refusals[what]
            self._refusals[what] = 0 if kept else before + 1
            if isinstance(result, Exception):
                logger.warning("announcing %s failed: %s", record.blocks, result)
            elif not kept and self._refusals[what] == REFUSALS_TO_WARN:
                logger.warning("the DHT nodes refused this server's record (blocks %s) under %s %d times in a row: %s; "
                               "retrying every %g s (a key full, as under a flood of records, or no DHT node "
                               "reachable)", record.blocks, where, REFUSALS_TO_WARN, missed, self.period_s)
            elif not kept:
                logger.info("a DHT node refused this server's record under %s (%d in a row)", where,
                            self._refusals[what])
            elif before >= REFUSALS_TO_WARN:
                logger.warning("the DHT nodes keep this server's record under %s again", where)
        return not any(self._refusals.values())

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
