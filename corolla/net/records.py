"""Reading every server's records for a model's blocks from the DHT."""
from __future__ import annotations

from typing import Iterable

from corolla.core.records import ServerRecord
from corolla.wire.records import block_key, decode_record
from corolla.net.transport import Transport


async def fetch_records(peer: Transport, model_prefix: str, blocks: Iterable[int]) -> list[ServerRecord]:
    """The latest live record of each server announcing any of ``blocks`` (malformed records are skipped)."""
    found = await peer.lookup_many([block_key(model_prefix, b) for b in blocks])
    records: dict[str, ServerRecord] = {}
    for values in found.values():
        for value in values.values():
            record = decode_record(value)
            if record is not None:
                records[record.peer_id] = record
    return list(records.values())
