"""The DHT record format: one record per block a server holds, under key ``{model}.{block}``, subkey = the
server's peer id, value = a msgpack-friendly dict of its ``ServerRecord``.

Records come from untrusted peers: ``decode_record`` returns None for anything malformed instead of raising.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord, ServerState
from corolla.wire.compression import SUPPORTED_CODECS

MAX_ADAPTERS = 256  # adapter names one record may list
MAX_ADAPTER_NAME = 512  # characters of one adapter name (a path or a hub id)


def block_key(model_prefix: str, block: int) -> str:
    """DHT key under which every server of ``block`` of model ``model_prefix`` announces itself."""
    return f"{model_prefix}.{block}"


def encode_record(record: ServerRecord) -> dict[str, Any]:
    """The value stored in the DHT."""
    value = asdict(record)
    value["blocks"] = [record.blocks.start, record.blocks.end]
    value["state"] = record.state.value
    value["maddrs"] = list(record.maddrs)
    value["adapters"] = list(record.adapters)
    value["codecs"] = list(record.codecs)
    return value


def decode_record(value: Any) -> Optional[ServerRecord]:
    """Parse a DHT value; None for anything malformed."""
    try:
        start, end = value["blocks"]
        return ServerRecord(
            peer_id=str(value["peer_id"]),
            blocks=BlockRange(int(start), int(end)),
            state=ServerState(value["state"]),
            throughput=float(value["throughput"]),
            dtype=str(value["dtype"]),
            protocol_version=int(value["protocol_version"]),
            cache_tokens_free=int(value["cache_tokens_free"]),
            maddrs=tuple(str(a) for a in value.get("maddrs", ())),
            adapters=_names(value.get("adapters", ())),
            codecs=_codecs(value.get("codecs", ["none"])),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _codecs(value: Any) -> tuple[str, ...]:
    """The codecs a record lists that this side knows (unknown ones, from newer peers, are ignored)."""
    if not isinstance(value, (list, tuple)) or len(value) > 32:
        raise ValueError("codecs must be a short list")
    return tuple(name for name in value if name in SUPPORTED_CODECS)


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ADAPTERS:
        raise ValueError(f"adapters must be a list of at most {MAX_ADAPTERS} names")
    if not all(isinstance(name, str) and 0 < len(name) <= MAX_ADAPTER_NAME for name in value):
        raise ValueError("adapter names must be non-empty strings")
    return tuple(value)
