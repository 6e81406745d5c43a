"""Choosing servers: the fastest chain for inference, load spreading for batches, and bans with backoff.

Pure functions over ``ServerRecord``s and measured latencies; the client acts on what they return.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError
from corolla.core.records import ServerRecord
from corolla.core.spans import describe_blocks, unserved_blocks

Chain = list[tuple[ServerRecord, BlockRange]]

SLOW_BLOCK_TIME_S = 1.0  # assumed per-block time of a server announcing no throughput (still joining/measuring)


def block_time_s(record: ServerRecord) -> float:
    """Seconds one token takes through one of ``record``'s blocks, from its announced throughput."""
    if record.throughput <= 0:
        return SLOW_BLOCK_TIME_S
    return 1.0 / (record.throughput * len(record.blocks))


def _no_chain(records: Sequence[ServerRecord], wanted: BlockRange, position: int) -> BlocksNotServedError:
    missing = unserved_blocks(records, BlockRange(position, wanted.end)) or [position]
    return BlocksNotServedError(
        f"blocks {describe_blocks(missing)} are served by nobody usable "
        f"(needed {wanted}; {len(records)} usable server(s) known)"
    )


def plan_inference_route(
    records: Sequence[ServerRecord],
    wanted: BlockRange,
    latency_s: Mapping[str, float],
    default_latency_s: float = 0.01,
    measured_block_s: Optional[Mapping[str, float]] = None,
) -> Chain:
    """The chain with the least expected time per inference step.

    A hop to server s running k of its blocks costs ``latency(s) + k * block_time(s)``; the chain may change
    server at any block boundary. Exact shortest path over block boundaries (dynamic programming).
    ``measured_block_s`` holds what the client measured of some servers: it replaces their claims.
    """
    measured_block_s = measured_block_s or {}
    inf = float("inf")
    best = {b: inf for b in range(wanted.start, wanted.end + 1)}
    came_from: dict[int, tuple[int, ServerRecord]] = {}
    best[wanted.start] = 0.0
    for start in range(wanted.start, wanted.end):
        if best[start] == inf:
            continue
        for record in records:
            if start not in record.blocks:
                continue
            hop = latency_s.get(record.peer_id, default_latency_s)
            per_block = measured_block_s.get(record.peer_id) or block_time_s(record)
            for end in range(start + 1, min(record.blocks.end, wanted.end) + 1):
                cost = best[start] + hop + (end - start) * per_block
                if cost < best[end] - 1e-12:
                    best[end] = cost
                    came_from[end] = (start, record)
    if best[wanted.end] == inf:
        reachable = max(b for b, cost in best.items() if cost < inf)
        raise _no_chain(records, wanted, reachable)
    chain: Chain = []
    end = wanted.end
    while end != wanted.start:
        start, record = came_from[end]
        chain.append((record, BlockRange(start, end)))
        end = start
    chain.reverse()
    return chain


def plan_batch_route(records: Sequence[ServerRecord], wanted: BlockRange, rng: random.Random,
                     measured_block_s: Optional[Mapping[str, float]] = None) -> Chain:
    """A chain for forward/backward batches that spreads load: at each point a server holding the block is drawn
    with probability proportional to its throughput (what the client measured of it, where it has, rather than its
    claim), and runs as many of the wanted blocks as it holds."""
    measured_block_s = measured_block_s or {}
    chain: Chain = []
    position = wanted.start
    while position < wanted.end:
        candidates = [r for r in records if position in r.blocks]
        if not candidates:
            raise _no_chain(records, wanted, position)
        weights = [max(_throughput(r, measured_block_s), 1e-3) for r in candidates]
        record = rng.choices(candidates, weights=weights)[0]
        span = BlockRange(position, min(record.blocks.end, wanted.end))
        chain.append((record, span))
        position = span.end
    return chain


def _throughput(record: ServerRecord, measured_block_s: Mapping[str, float]) -> float:
    """Tokens/s through all of ``record``'s blocks: measured if known, else announced."""
    measured = measured_block_s.get(record.peer_id)
    return 1.0 / (measured * len(record.blocks)) if measured else record.throughput


@dataclass
class SpeedMeter:
    """What the client measured of servers' speed: seconds per block for one decode step, a moving average of
    each server's steps. Trusted once a server has ``min_samples`` of them; then it replaces the server's claim."""

    min_samples: int = 3
    smoothing: float = 0.3
    _block_s: dict[str, float] = field(default_factory=dict)
    _samples: dict[str, int] = field(default_factory=dict)

    def observe(self, peer_id: str, blocks: int, seconds: float) -> None:
        if blocks < 1 or not 0 <= seconds < 3600:
            return
        sample = seconds / blocks
        previous = self._block_s.get(peer_id)
        self._block_s[peer_id] = sample if previous is None else (1 - self.smoothing) * previous + self.smoothing * sample
        self._samples[peer_id] = self._samples.get(peer_id, 0) + 1

    def block_s(self) -> dict[str, float]:
        """Seconds per block of every server measured enough."""
        return {peer: value for peer, value in self._block_s.items() if self._samples[peer] >= self.min_samples}


@dataclass
class BanList:
    """Servers that failed recently. A ban lasts ``base_s * 2**(failures - 1)`` (capped at ``max_s``); a success
    clears the count. ``clock`` is injectable for tests."""

    base_s: float = 5.0
    max_s: float = 300.0
    clock: Callable[[], float] = field(default=None)  # type: ignore[assignment]
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.clock is None:
            import time

            self.clock = time.monotonic

    def ban(self, peer_id: str) -> float:
        """Ban ``peer_id`` after a failure; returns the ban's length in seconds."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        duration = min(self.base_s * 2 ** (failures - 1), self.max_s)
        self._until[peer_id] = self.clock() + duration
        return duration

    def succeeded(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        until: Optional[float] = self._until.get(peer_id)
        return until is not None and self.clock() < until

    def filter(self, records: Sequence[ServerRecord]) -> list[ServerRecord]:
        return [r for r in records if not self.is_banned(r.peer_id)]
