"""What a server announces in the DHT for each block it holds."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from corolla.core.blocks import BlockRange


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

    def to_value(self) -> dict[str, Any]:
        """The msgpack-friendly value stored in the DHT."""
        value = asdict(self)
        value["blocks"] = [self.blocks.start, self.blocks.end]
        value["state"] = self.state.value
        value["maddrs"] = list(self.maddrs)
        value["adapters"] = list(self.adapters)
        return value

    @classmethod
    def from_value(cls, value: Any) -> "ServerRecord | None":
        """Parse a DHT value; None for anything malformed (records come from untrusted peers)."""
        try:
            start, end = value["blocks"]
            return cls(
                peer_id=str(value["peer_id"]),
                blocks=BlockRange(int(start), int(end)),
                state=ServerState(value["state"]),
                throughput=float(value["throughput"]),
                dtype=str(value["dtype"]),
                protocol_version=int(value["protocol_version"]),
                cache_tokens_free=int(value["cache_tokens_free"]),
                maddrs=tuple(str(a) for a in value.get("maddrs", ())),
                adapters=_names(value.get("adapters", ())),
            )
        except (KeyError, TypeError, ValueError):
            return None


MAX_ADAPTERS = 256  # adapter names one record may list
MAX_ADAPTER_NAME = 512  # characters of one adapter name (a path or a hub id)


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ADAPTERS:
        raise ValueError("adapters must be a list of at most %d names" % MAX_ADAPTERS)
    if not all(isinstance(name, str) and 0 < len(name) <= MAX_ADAPTER_NAME for name in value):
        raise ValueError("adapter names must be non-empty strings")
    return tuple(value)


def block_key(model_prefix: str, block: int) -> str:
    """DHT key under which every server of ``block`` of model ``model_prefix`` announces itself."""
    return f"{model_prefix}.{block}"
