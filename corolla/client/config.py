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
    request_timeout_s: float = 120.0  # one forward/backward request to one server
    step_timeout_s: float = 10.0  # one inference step at one server (plus token_timeout_s per token sent)
    token_timeout_s: float = 0.05  # extra step time allowed per token of the step (long prefills)
    lookup_period_s: float = 0.5  # how often to re-read the DHT while waiting for blocks
    refresh_period_s: float = 5.0  # how often the background view of the swarm is refreshed
    ping_timeout_s: float = 5.0  # a round-trip measurement to one server
    default_latency_s: float = 0.01  # assumed round trip to a server not measured yet
    ban_base_s: float = 5.0  # first ban of a failed server; doubles on each further failure
    ban_max_s: float = 300.0  # longest ban
    full_avoid_s: float = 30.0  # after a server said it has no cache for a session, later sessions try others first
    #                             for this long (a capacity, not a fault: it is not banned)
    max_retries: int = 5  # replacement attempts for one failed span before giving up
    max_request_tokens: int = 4096  # forward/backward batches are split into pieces of at most this many tokens
    pipeline_pieces: int = 4  # ...and into at least this many (rows allowing), sent concurrently: servers of the
    #                           chain then work on different pieces at the same time
    relay: bool = True  # inference steps go server to server (each server forwards to the next); False: the client
    #                     sends every step to every server itself
    verify_fraction: float = 0.2  # the share of inference steps whose outputs another server recomputes (one
    #                                server of the chain, at random): see corolla.client.verify; 0 checks nothing
    verify_seed: Optional[int] = None  # seeds which steps are checked (tests)
    swarm_key: Optional[bytes] = None  # a private swarm's secret (corolla.wire.swarm_key); None: an open swarm
    allowed_servers: Optional[tuple[str, ...]] = None  # use only these servers (peer ids); None: any
    wire_codec: str = "none"  # how hidden states and gradients travel: none (exact), float16, bfloat16 or
    #                           int8-block64 (corolla.wire.compression); used with the servers that announce it
    min_quant: str = "nf4"  # the fewest bits per weight a server may use: "none" (full-precision servers only),
    #                         "int8" (no 4-bit servers), "int4"/"nf4" (any); see corolla.core.records.QUANT_BITS
    mixed_quant: bool = True  # False: all blocks from servers of one quantization (the most precise that covers
    #                           the model); True: servers of different quantizations are replicas of each other
