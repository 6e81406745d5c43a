"""Reading every server's records for a model's blocks from the DHT."""
from __future__ import annotations

from typing import Iterable, Optional

from corolla.core.records import ServerRecord
from corolla.wire.records import MODELS_KEY, block_key, decode_record
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


async def fetch_models(peer: Transport, swarm_key: Optional[bytes] = None) -> dict[str, list[ServerRecord]]:
    """The models servers announce, each with its servers' records (signed for that model, live, under their own
    peer's subkey; anything else is skipped)."""
    found = await peer.lookup_many([MODELS_KEY])
    now = peer.now()
    models: dict[str, list[ServerRecord]] = {}
    for subkey, value in found.get(MODELS_KEY, {}).items():
        model = value.get("model") if isinstance(value, dict) else None
        if not isinstance(model, str) or not 0 < len(model) <= 256:
            continue
        record = decode_record(value, None, model, now, swarm_key)
        if record is None or record.peer_id != subkey:
            continue
        models.setdefault(model, []).append(record)
    return models
