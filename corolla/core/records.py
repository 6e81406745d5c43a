"""What a server announces about itself: its state and the blocks it holds (the data; the DHT format of a record
is part of the protocol, in ``corolla.wire.records``)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from corolla.core.blocks import BlockRange


# Quantizations of a server's weights, and their bits per weight ("none": the 16- or 32-bit weights of its dtype).
QUANT_BITS = {"none": 16, "int8": 8, "int4": 4, "nf4": 4}


class ServerState(enum.Enum):
    JOINING = "joining"  # announced its span, still loading weights
    ONLINE = "online"  # answers requests
    OFFLINE = "offline"  # leaving: send it nothing new


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str
    blocks: BlockRange
    state: ServerState
    throughput: float  # tokens per second through all of its blocks, measured at start-up
    dtype: str
    protocol_version: int
    cache_tokens_free: int
    maddrs: tuple[str, ...] = field(default=())  # where to dial it
    adapters: tuple[str, ...] = field(default=())  # LoRA adapters it loaded (--adapters), by the name clients use
    codecs: tuple[str, ...] = field(default=("none",))  # wire codecs it reads and writes (corolla.wire.compression)
    quant: str = "none"  # how its weights are quantized (QUANT_BITS); outputs of different ones differ slightly
    config_digest: str = ""  # digest of its checkpoint's architecture (corolla.models.checkpoint.config_digest)
