"""The route a relayed inference step carries: ``SessionStep.next_hops``, the servers after the current one.

Each entry names the next server (peer id, where to dial it), the id of this session there, the relay token that
session accepts (a secret the client gave both ends), and the dtype that server computes in. The list comes from
the client, so a server parses it with bounds before using it.

A step sent with ``answer_last`` also carries a trail: the inputs of the relayed servers before the receiver (each
the outputs of the server before it), with a tag per output, an HMAC its producer computed with the secret only it
and the client hold (``OpenSession.trail_key``). The last server answers the client with the whole trail; servers
before it answer only to report an error. The client so learns every server's outputs from one message, and a
later server cannot alter an earlier one's outputs unnoticed.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Optional

import torch

from corolla.core.errors import BadRequestError
from corolla.wire.codec import dtype_from_name

MAX_HOPS = 64  # servers one route may name
MAX_ID = 200  # characters of a peer id, session id or token
MAX_MADDRS = 8
MAX_MADDR = 300
MAX_TAG = 64  # characters of a trail tag


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


def parse_route(value: Any, local_peer_id: Optional[str] = None) -> list[NextHop]:
    """``SessionStep.next_hops`` as ``NextHop``s; ``BadRequestError`` naming what is wrong. A route names each server
    once, and never the server reading it (``local_peer_id``): a step runs once on each server it passes, so a route
    that loops (B, A, B, A, ... for 64 hops) cannot have the servers compute it over and over for one send."""
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
    peers = [hop.peer_id for hop in hops]
    if local_peer_id is not None and local_peer_id in peers:
        raise BadRequestError(f"next_hops name this server ({local_peer_id}) again: a route visits each server once")
    if len(set(peers)) < len(peers):
        twice = next(peer for peer in peers if peers.count(peer) > 1)
        raise BadRequestError(f"next_hops name server {twice} {peers.count(twice)} times: a route visits each server "
                              "once")
    return hops


def trail_tag(key: str, session_id: str, step_index: Optional[int], attempt: Optional[int],
              tensor: torch.Tensor) -> str:
    """The tag of a server's outputs in a trail: an HMAC (SHA-256, 128 bits shown) of the step they answer and their
    bytes exactly as the next server decodes them, under the ``trail_key`` of that server's session."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    mac = hmac.new(key.encode(), f"{session_id}|{step_index}|{attempt}|{flat.dtype}|{list(tensor.shape)}|".encode(),
                   hashlib.sha256)
    mac.update(flat.view(torch.uint8).numpy().data)
    return mac.hexdigest()[:32]


def check_trail(step, relayed: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trail and tags of a step, checked for shape (never for content: only the client holds the keys).
    ``BadRequestError`` naming what is wrong."""
    trail, tags = step.trail or {}, step.trail_tags if step.trail_tags is not None else []
    if not step.answer_last:
        if trail or tags:
            raise BadRequestError("trail and trail_tags come only with answer_last")
        return {}, []
    if not relayed:
        if trail or tags:
            raise BadRequestError("a step from the client starts a trail: it carries none")
        return {}, []
    if not isinstance(tags, list) or len(tags) != len(trail) + 1 or len(tags) > MAX_HOPS:
        raise BadRequestError(f"a relayed step's trail_tags must be a list of one more tag than its trail "
                              f"({len(trail)} entries), at most {MAX_HOPS}")
    if not all(isinstance(tag, str) and 0 < len(tag) <= MAX_TAG for tag in tags):
        raise BadRequestError(f"each trail tag must be a string of 1..{MAX_TAG} characters")
    if set(trail) != {str(i) for i in range(len(trail))}:
        raise BadRequestError(f"trail entries must be named 0..{len(trail) - 1}, got {sorted(trail)[:8]}")
    shape = tuple(step.hidden_states.shape)
    for name, tensor in trail.items():
        if not tensor.is_floating_point() or tuple(tensor.shape) != shape:
            raise BadRequestError(f"trail entry {name} must be floating-point hidden states of shape {list(shape)}, "
                                  f"got {tensor.dtype} {list(tensor.shape)}")
    return dict(trail), list(tags)
