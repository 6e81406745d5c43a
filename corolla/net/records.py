"""Reading every server's records for a model's blocks from the DHT."""
from __future__ import annotations

import random
from typing import Collection, Iterable, Optional

from corolla.core.records import ServerRecord
from corolla.wire.records import MODELS_KEYS, decode_record, servers_key
from corolla.net.transport import Transport

# Records of one directory key a read decodes (each checks a signature): anyone can file a record under a model's key
# with a key pair of their own, so a flood of them (a Sybil attack) must not cost every reader in proportion. Far
# above any swarm of one model; past it a reader keeps the peers it already knows, then a random choice of the rest.
MAX_RECORDS_READ = 1024
MAX_MODEL_RECORDS_READ = 8192  # records the list of models' keys (all of them together) may give one read


def _bounded(entries: list, known: Collection[str], limit: Optional[int] = None) -> list:
    """At most ``limit`` (default ``MAX_RECORDS_READ``, read when called) of ``entries`` ``[(subkey, value), ...]``:
    those of peers in ``known`` first, then a random sample of the others (which an attacker filing records cannot
    steer)."""
    limit = MAX_RECORDS_READ if limit is None else limit
    if len(entries) <= limit:
        return entries
    first = [entry for entry in entries if entry[0] in known][:limit]
    rest = [entry for entry in entries if entry[0] not in known]
    return first + random.sample(rest, min(len(rest), limit - len(first)))


async def fetch_records(peer: Transport, model_prefix: str, blocks: Iterable[int],
                        num_blocks: Optional[int] = None, swarm_key: Optional[bytes] = None,
                        known: Collection[str] = ()) -> list[ServerRecord]:
    """The live record of each server of model ``model_prefix`` holding any of ``blocks``, read from the model's
    directory key (one lookup). A record that is malformed, unsigned or mis-signed, signed for another model,
    expired, implausible (see ``decode_record``; ``num_blocks``: the model's), or not stored under its own peer's
    subkey, is skipped without disturbing the others. At most ``MAX_RECORDS_READ`` records are decoded, those of
    the peers in ``known`` first."""
    wanted = list(blocks)
    key = servers_key(model_prefix)
    found = await peer.lookup_many([key])
    now = peer.now()
    records: list[ServerRecord] = []
    for subkey, value in _bounded(list(found.get(key, {}).items()), known):
        record = decode_record(value, num_blocks, model_prefix, now, swarm_key)
        if record is None or record.peer_id != subkey or not any(b in record.blocks for b in wanted):
            continue
        records.append(record)
    return records


async def fetch_models(peer: Transport, swarm_key: Optional[bytes] = None) -> dict[str, list[ServerRecord]]:
    """The models servers announce, each with its servers' records (signed for that model, live, under their own
    peer's subkey; anything else is skipped), read from every key of the list of models in one lookup; at most
    ``MAX_MODEL_RECORDS_READ`` records are decoded."""
    found = await peer.lookup_many(list(MODELS_KEYS))
    now = peer.now()
    entries = {}  # a peer's record once, even if it was found under more than one key
    for key in MODELS_KEYS:
        for subkey, value in found.get(key, {}).items():
            entries.setdefault(subkey, value)
    models: dict[str, list[ServerRecord]] = {}
    for subkey, value in _bounded(list(entries.items()), (), MAX_MODEL_RECORDS_READ):
        model = value.get("model") if isinstance(value, dict) else None
        if not isinstance(model, str) or not 0 < len(model) <= 256:
            continue
        record = decode_record(value, None, model, now, swarm_key)
        if record is None or record.peer_id != subkey:
            continue
        models.setdefault(model, []).append(record)
    return models
