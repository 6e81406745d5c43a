"""``ClientConfig``: one frozen object holding every client setting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()  # multiaddrs of any peers of the swarm
    dht_prefix: Optional[str] = None  # DHT name of the model; None derives it from the checkpoint
    wait_for_blocks_s: float = 60.0  # how long to wait for every block to be served before failing
    connect_timeout_s: float = 20.0  # starting the client's own peer
    request_timeout_s: float = 120.0  # one forward/backward request or one inference step
    lookup_period_s: float = 0.5  # how often to re-read the DHT while waiting for blocks
    max_request_tokens: int = 4096  # forward/backward batches are split into pieces of at most this many tokens
