"""Reading every server's records for a model's blocks from the DHT."""
from __future__ import annotations

from typing import Iterable, Optional

from corolla.core.records import ServerRecord
from corolla.wire.records import block_key, decode_record
from corolla.net.transport import Transport


async def fetch_records(peer: Transport, model_prefix: str, blocks: Iterable[int],
                        num_blocks: Optional[int] = None, swarm_key: Optional[bytes] = None) -> list[ServerRecord]:
    """The latest live record of each server announcing any of ``blocks``. A record that is malformed, unsigned or
    mis-signed, expired, implausible (see ``decode_record``; ``num_blocks``: the model's), not stored under its own
    peer's subkey, or that does not cover the block it is filed under, is skipped without disturbing the others."""
    wanted = list(blocks)
    found = await peer.lookup_many([block_key(model_prefix, b) for b in wanted])
    now = peer.now()
    records: dict[str, ServerRecord] = {}
    for block in wanted:
        for subkey, value in found.get(block_key(model_prefix, block), {}).items():
            record = decode_record(value, num_blocks, model_prefix, now, swarm_key)
            if record is None or record.peer_id != subkey or block not in record.blocks:
                continue
            records[record.peer_id] = record
    return list(records.values())
