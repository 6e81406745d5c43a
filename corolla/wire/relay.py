"""The route a relayed inference step carries: ``SessionStep.next_hops``, the servers after the current one.

Each entry names the next server (peer id, where to dial it), the id of this session there, the relay token that
session accepts (a secret the client gave both ends), and the dtype that server computes in. The list comes from
the client, so a server parses it with bounds before using it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from corolla.core.errors import BadRequestError
from corolla.wire.codec import dtype_from_name

MAX_HOPS = 64  # servers one route may name
MAX_ID = 200  # characters of a peer id, session id or token
MAX_MADDRS = 8
MAX_MADDR = 300


@dataclass(frozen=True)
class NextHop:
    peer_id: str
    session_id: str
    token: str
    dtype: str
    maddrs: tuple[str, ...] = ()

    def to_value(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "session_id": self.session_id, "token": self.token, "dtype": self.dtype,
                "maddrs": list(self.maddrs)}


def encode_route(hops: list[NextHop]) -> Optional[list[dict[str, Any]]]:
    return [hop.to_value() for hop in hops] or None


def parse_route(value: Any) -> list[NextHop]:
    """``SessionStep.next_hops`` as ``NextHop``s; ``BadRequestError`` naming what is wrong."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_HOPS:
        raise BadRequestError(f"next_hops must be a list of at most {MAX_HOPS} hops")
    hops = []
    for entry in value:
        if not isinstance(entry, dict):
            raise BadRequestError("each of next_hops must be an object")
        fields = {}
        for name in ("peer_id", "session_id", "token", "dtype"):
            item = entry.get(name)
            if not isinstance(item, str) or not 0 < len(item) <= MAX_ID:
                raise BadRequestError(f"next_hops: {name} must be a string of 1..{MAX_ID} characters")
            fields[name] = item
        dtype_from_name(fields["dtype"])
        maddrs = entry.get("maddrs", [])
        if not isinstance(maddrs, list) or len(maddrs) > MAX_MADDRS or not all(
                isinstance(a, str) and len(a) <= MAX_MADDR for a in maddrs):
            raise BadRequestError(f"next_hops: maddrs must be a list of at most {MAX_MADDRS} addresses")
        hops.append(NextHop(**fields, maddrs=tuple(maddrs)))
    return hops
