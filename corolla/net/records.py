"""Reading every server's records for a model's blocks from the DHT."""
from __future__ import annotations

from typing import Iterable, Optional

from corolla.core.records import ServerRecord
from corolla.wire.records import MODELS_KEY, decode_record, servers_key
from corolla.net.transport import Transport


async def fetch_records(peer: Transport, model_prefix: str, blocks: Iterable[int],
                        num_blocks: Optional[int] = None, swarm_key: Optional[bytes] = None) -> list[ServerRecord]:
    """The live record of each server of model ``model_prefix`` holding any of ``blocks``, read from the model's
    directory key (one lookup). A record that is malformed, unsigned or mis-signed, signed for another model,
    expired, implausible (see ``decode_record``; ``num_blocks``: the model's), or not stored under its own peer's
    subkey, is skipped without disturbing the others."""
    wanted = list(blocks)
    key = servers_key(model_prefix)
    found = await peer.lookup_many([key])
    now = peer.now()
    records: list[ServerRecord] = []
    for subkey, value in found.get(key, {}).items():
        record = decode_record(value, num_blocks, model_prefix, now, swarm_key)
        if record is None or record.peer_id != subkey or not any(b in record.blocks for b in wanted):
            continue
        records.append(record)
    return records


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
