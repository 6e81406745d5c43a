"""Private swarms: a shared secret (``--swarm-key FILE``) without which a peer's streams are refused and its DHT
records ignored.

The first frame of every exchange carries ``swarm_proof`` = HMAC-SHA256(key, sender peer id | receiver peer id):
both ids are authenticated by the transport (libp2p), so a proof cannot be replayed by a third peer. Every record
carries ``swarm_proof`` = HMAC-SHA256(key, its signed bytes). DHT requests and replies carry proofs too
(``corolla.net.swarm_auth``), so a peer without the key cannot join the DHT.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Optional

FIELD = "swarm_proof"  # in frame headers and in record values
MIN_KEY_BYTES = 16


def load_swarm_key(path: Optional[str]) -> Optional[bytes]:
    """The secret in ``path`` (its bytes, stripped of surrounding whitespace), or None for an open swarm."""
    if path is None:
        return None
    try:
        key = Path(path).expanduser().read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the swarm key {path}: {exc.strerror or exc} (make one with "
                         "`head -c 32 /dev/urandom | base64 > swarm.key` and give every peer a copy)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the swarm key in {path} is too short: use at least {MIN_KEY_BYTES} random bytes "
                         "(e.g. `head -c 32 /dev/urandom | base64 > swarm.key`)")
    return key


def stream_proof(key: bytes, sender: str, receiver: str) -> str:
    return hmac.new(key, f"corolla-stream|{sender}|{receiver}".encode(), hashlib.sha256).hexdigest()


def stream_proof_valid(key: bytes, header: dict, sender: str, receiver: str) -> bool:
    proof = header.get(FIELD)
    return isinstance(proof, str) and hmac.compare_digest(proof, stream_proof(key, sender, receiver))


def record_proof(key: bytes, signed: bytes) -> str:
    return hmac.new(key, b"corolla-record|" + signed, hashlib.sha256).hexdigest()
