"""``ServerConfig``: one frozen object holding every server setting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from corolla.core.blocks import BlockRange


@dataclass(frozen=True)
class ServerConfig:
    model: Optional[str] = None  # checkpoint directory, hub id, or None for the embedded model
    dht_prefix: Optional[str] = None  # DHT name of the model; None derives it from the checkpoint
    blocks: Optional[BlockRange] = None  # span to serve; None chooses one of num_blocks blocks
    num_blocks: Optional[int] = None  # with blocks None: how many blocks to take (None = all)
    initial_peers: tuple[str, ...] = ()  # multiaddrs of peers already in the swarm
    new_swarm: bool = False  # be our own bootstrap peer (no initial peers needed)
    host: str = "127.0.0.1"  # IP address to listen on and announce
    port: int = 0  # TCP port; 0 picks a free one
    address_file: Optional[str] = None  # where to write our multiaddrs once reachable
    identity_path: Optional[str] = None  # the server's key (its peer id); created there if missing; None: new per run
    swarm_key_path: Optional[str] = None  # a private swarm's secret (corolla.wire.swarm_key); None: an open swarm
    dtype: str = "float32"  # compute dtype: float32, bfloat16, float16 or auto (the checkpoint's)
    quant: str = "none"  # weights: none, int8, int4 (CPU), nf4 (CUDA) or auto (corolla.models.quant)
    device: str = "cpu"  # torch device of the blocks: cpu, cuda, cuda:1, ...
    fast_path: bool = True  # run Llama-built layers fused, on Corolla's CPU kernels where they apply (models.fused)
    pack_weights: bool = True  # with fast_path: hold float32 weights that lie on a grid as its codes (models.packing)
    num_threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    cache_tokens: int = 32768  # session cache budget: tokens held (of one batch row, in whole pages)
    cache_page_tokens: int = 64  # sessions' caches grow and shrink in pages of this many tokens
    cache_wait_s: float = 10.0  # a session that needs cache while the budget is full waits this long, then fails
    max_batch: int = 64  # the most sessions' steps one pass through the blocks takes
    batch_gather_s: float = 0.2  # the longest a batch of steps waits for sessions due to step (0: never waits)
    compute_idle: bool = True  # CPU servers: the compute thread under SCHED_IDLE, on a core only when nobody else wants it
    compute_nice: int = 5  # without compute_idle: its priority this far below the process's (Linux; 0: the same)
    max_message_bytes: int = 256 * 2**20  # largest request frame accepted
    max_batch_tokens: int = 8192  # largest batch * seq of one forward/backward request
    session_idle_timeout_s: float = 600.0  # a session that sends nothing for this long is closed
    first_frame_timeout_s: float = 30.0  # a stream whose request does not begin within this is closed
    frame_timeout_s: float = 60.0  # a frame begun must arrive whole within this (a stalled sender holds nothing)
    max_streams_per_peer: int = 256  # streams one peer may have open here at once
    close_wait_s: float = 10.0  # an answered stream waits this long for its requester to close it (dispatch.py)
    frame_budget_bytes: int = 2**30  # request frames held at once, all streams together (corolla.server.frames)
    max_sessions_per_peer: int = 64  # sessions one peer may hold here
    max_cache_share: float = 0.5  # the part of --cache-tokens one peer's sessions may hold
    relay_timeout_s: float = 10.0  # opening a relay stream to the next server of a chain, or pushing a step into it
    announce_period_s: float = 10.0  # how often DHT records are refreshed
    record_ttl_s: float = 30.0  # how long a record lives without refresh
    throughput: Optional[float] = None  # tokens/s to announce; None measures it at start-up
    shutdown_grace_s: float = 5.0  # time given to in-flight requests on SIGTERM/SIGINT
    activation_cache_bytes: int = 2 * 2**30  # activations kept between training forward and backward passes
    activation_ttl_s: float = 120.0  # kept activations whose backward never comes are dropped after this
    adapters: tuple[str, ...] = ()  # PEFT LoRA adapters (directories or hub ids) clients may pick by that name
    rebalance_period_s: float = 60.0  # how often a server that chose its own span checks whether to move
    balance_quality: float = 0.75  # move only if the swarm's throughput rises above current / this
