"""The DHT record format: one record per server of a model, under the model's directory key ``{model}.servers``,
subkey = the server's peer id, value = a msgpack-friendly dict of its ``ServerRecord`` (its span included), signed.

One key per model rather than one per block: a reader wants every server of the model anyway, and a lookup of one
key returns each record once, where a key per block returned each record once per block it holds (checked and
decoded as many times: 30 keys cost a client 30 ms of CPU per read of the embedded model's swarm, one key 2 ms).

The value also holds the model's name, when it stops being valid, the server's public key and a signature over
all of it by that key (``corolla.wire.identity``). A reader accepts a record only if the signature holds, the key
is the one the record's peer id is derived from, and it has not expired: nobody can forge or replay another
server's record. Records come from untrusted peers: ``decode_record`` returns None for anything malformed,
unsigned, mis-signed or implausible, instead of raising.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict
from typing import Any, Optional

from corolla.core.blocks import BlockRange
from corolla.core.records import QUANT_BITS, ServerRecord, ServerState
from corolla.wire.compression import SUPPORTED_CODECS
from corolla.wire.identity import MAX_PUBLIC_KEY_BYTES, Identity, peer_id_of, verify
from corolla.wire.swarm_key import FIELD as swarm_key_field
from corolla.wire.swarm_key import record_proof

MAX_ADAPTERS = 256  # adapter names one record may list
MAX_ADAPTER_NAME = 512  # characters of one adapter name (a path or a hub id)
MAX_PEER_ID = 128  # characters of a peer id
MAX_MADDRS = 16  # addresses one record may list
MAX_MADDR = 300  # characters of one address
MAX_THROUGHPUT = 1e7  # tokens/s through a server's blocks: no hardware comes near; a bigger claim is a lie
MAX_CACHE_TOKENS = 2**40
MAX_RECORD_TTL_S = 3600.0  # how far ahead a record may expire: DHT nodes refuse later ones (corolla.net.dht_storage)
DTYPES = ("float32", "float16", "bfloat16")  # what a server may compute in


MODELS_KEY = "corolla-models"  # every server also files its record under one of these keys: the models a swarm serves
# The list of models is spread over this many keys by peer id: a DHT node holds ~750 servers' records per key (see
# corolla.net.dht_storage), and this list holds every server of every model. Sharded, a swarm page sees ~6,000.
MODELS_KEY_SHARDS = 8
MODELS_KEYS = tuple(f"{MODELS_KEY}.{shard}" for shard in range(MODELS_KEY_SHARDS))


def models_key(peer_id: str) -> str:
    """The key of the list of models under which server ``peer_id`` files its record (the same in every process)."""
    return MODELS_KEYS[hashlib.sha256(peer_id.encode()).digest()[0] % MODELS_KEY_SHARDS]


def servers_key(model_prefix: str) -> str:
    """DHT key under which every server of model ``model_prefix`` announces itself (subkey: its peer id)."""
    return f"{model_prefix}.servers"


def encode_record(record: ServerRecord, identity: Optional[Identity] = None, model: str = "",
                  expires: float = 0.0, swarm_key: Optional[bytes] = None) -> dict[str, Any]:
    """The value stored in the DHT; signed by ``identity`` (which must be the record's peer) for model ``model``,
    valid until ``expires`` (on the DHT clock)."""
    value = asdict(record)
    value["blocks"] = [record.blocks.start, record.blocks.end]
    value["state"] = record.state.value
    value["maddrs"] = list(record.maddrs)
    value["adapters"] = list(record.adapters)
    value["codecs"] = list(record.codecs)
    if identity is not None:
        if identity.peer_id != record.peer_id:
            raise ValueError(f"identity {identity.peer_id} cannot sign a record of {record.peer_id}")
        value.update(model=model, expires=float(expires), public_key=base64.b64encode(identity.public_der).decode())
        value["signature"] = identity.sign(_signed_bytes(value))
        if swarm_key is not None:  # a private swarm's records prove they belong to it
            value[swarm_key_field] = record_proof(swarm_key, _signed_bytes(value) + value["signature"].encode())
    return value


def _signed_bytes(value: dict[str, Any]) -> bytes:
    """What a record's signature covers: every field but the signature, canonically."""
    return json.dumps({k: v for k, v in value.items() if k not in ("signature", swarm_key_field)}, sort_keys=True,
                      separators=(",", ":")).encode()


def _check_signature(value: dict[str, Any], model: str, now: float) -> None:
    """Raise ValueError unless ``value`` is signed by the key its peer id comes from, for ``model``, unexpired."""
    public_key, signature = value.get("public_key"), value.get("signature")
    if not isinstance(public_key, str) or not isinstance(signature, str) or len(public_key) > 2 * MAX_PUBLIC_KEY_BYTES \
            or len(signature) > 2048:
        raise ValueError("unsigned")
    der = base64.b64decode(public_key, validate=True)
    if peer_id_of(der) != value.get("peer_id"):
        raise ValueError("signed by a key that is not the record's peer")
    if value.get("model") != model or not isinstance(value.get("expires"), float) or value["expires"] < now:
        raise ValueError("for another model, or expired")
    if not verify(der, _signed_bytes(value), signature):
        raise ValueError("bad signature")


def decode_record(value: Any, num_blocks: Optional[int] = None, model: Optional[str] = None,
                  now: float = 0.0, swarm_key: Optional[bytes] = None) -> Optional[ServerRecord]:
    """Parse a DHT value, checking every field (blocks inside the model's ``num_blocks``, a finite throughput under
    a sane ceiling, a known dtype, bounded lists) and, when ``model`` is given, its signature (see the module
    docstring; ``now`` on the DHT clock); None for anything malformed, unsigned or implausible."""
    try:
        if model is not None:
            _check_signature(value, model, now)
        if swarm_key is not None:
            expected = record_proof(swarm_key, _signed_bytes(value) + str(value.get("signature")).encode())
            if not hmac.compare_digest(str(value.get(swarm_key_field)), expected):
                raise ValueError("not a record of this private swarm")
        start, end = value["blocks"]
        blocks = BlockRange(_int(start), _int(end))
        if num_blocks is not None and blocks.end > num_blocks:
            raise ValueError("blocks past the model's end")
        throughput = float(value["throughput"])
        if not 0 <= throughput <= MAX_THROUGHPUT:  # NaN fails this too
            raise ValueError("implausible throughput")
        if value["dtype"] not in DTYPES:
            raise ValueError("unknown dtype")
        quant = value.get("quant", "none")
        if quant not in QUANT_BITS:
            raise ValueError("unknown quantization")
        digest = value.get("config_digest", "")
        if not isinstance(digest, str) or len(digest) > 64:
            raise ValueError("bad config digest")
        cache_tokens_free = _int(value["cache_tokens_free"])
        if not 0 <= cache_tokens_free <= MAX_CACHE_TOKENS:
            raise ValueError("implausible cache size")
        peer_id = value["peer_id"]
        if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID:
            raise ValueError("bad peer id")
        maddrs = value.get("maddrs", ())
        if not isinstance(maddrs, (list, tuple)) or len(maddrs) > MAX_MADDRS or not all(
                isinstance(a, str) and len(a) <= MAX_MADDR for a in maddrs):
            raise ValueError("bad addresses")
        return ServerRecord(
            peer_id=peer_id,
            blocks=blocks,
            state=ServerState(value["state"]),
            throughput=throughput,
            dtype=value["dtype"],
            protocol_version=_int(value["protocol_version"]),
            cache_tokens_free=cache_tokens_free,
            maddrs=tuple(maddrs),
            adapters=_names(value.get("adapters", ())),
            codecs=_codecs(value.get("codecs", ["none"])),
            quant=quant,
            config_digest=digest,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("not an integer")
    return value


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
