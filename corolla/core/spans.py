"""Coverage of a model's blocks by servers: gaps, and the span a new server should take.

Pure functions over ``ServerRecord``s; the client and the server act on what they return.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional, Sequence

from corolla.core.blocks import BlockRange
from corolla.core.records import QUANT_BITS, ServerRecord, ServerState


def usable(records: Iterable[ServerRecord], protocol_version: int) -> list[ServerRecord]:
    return [r for r in records if r.state is ServerState.ONLINE and r.protocol_version == protocol_version]


def one_quantization(records: Sequence[ServerRecord], wanted: BlockRange) -> list[ServerRecord]:
    """The servers of one quantization: the most precise that serves every block of ``wanted`` (or, if none does,
    the one that serves the most of them), so that a client's outputs never mix quantizations."""
    modes = sorted({r.quant for r in records}, key=lambda q: (-QUANT_BITS[q], q))
    if not modes:
        return []
    by_mode = {q: [r for r in records if r.quant == q] for q in modes}
    covering = [q for q in modes if not unserved_blocks(by_mode[q], wanted)]
    best = covering[0] if covering else min(modes, key=lambda q: len(unserved_blocks(by_mode[q], wanted)))
    return by_mode[best]


def unserved_blocks(records: Iterable[ServerRecord], wanted: BlockRange) -> list[int]:
    served = set()
    for record in records:
        served.update(b for b in record.blocks if b in wanted)
    return [b for b in wanted if b not in served]


def describe_blocks(blocks: Sequence[int]) -> str:
    """``[0, 1, 2, 7]`` -> ``"0:3, 7:8"`` (half-open spans)."""
    spans, start, prev = [], None, None
    for b in sorted(blocks):
        if start is None:
            start = prev = b
        elif b == prev + 1:
            prev = b
        else:
            spans.append(f"{start}:{prev + 1}")
            start = prev = b
    if start is not None:
        spans.append(f"{start}:{prev + 1}")
    return ", ".join(spans)


def block_throughputs(num_blocks_total: int, records: Iterable[ServerRecord]) -> list[float]:
    """Total throughput serving each block, over servers that are not leaving.

    A server still joining has not measured its throughput yet; it counts as the median of the online ones (or 1),
    so that servers starting at the same time spread out instead of piling onto the same span.
    """
    records = [r for r in records if r.state is not ServerState.OFFLINE]
    measured = sorted(r.throughput for r in records if r.state is ServerState.ONLINE and r.throughput > 0)
    stand_in = measured[len(measured) // 2] if measured else 1.0
    totals = [0.0] * num_blocks_total
    for record in records:
        throughput = record.throughput if record.throughput > 0 else stand_in
        for b in record.blocks:
            if 0 <= b < num_blocks_total:
                totals[b] += throughput
    return totals


def choose_span(num_blocks_total: int, records: Iterable[ServerRecord], span_length: int) -> BlockRange:
    """The span of ``span_length`` blocks a new server should take: where the swarm is weakest.

    Windows are compared by how many of their blocks nobody serves (more first), then by the total throughput
    serving their blocks (less first), then by position (earlier first).
    """
    if span_length < 1:
        raise ValueError(f"--num-blocks must be at least 1, got {span_length}")
    span_length = min(span_length, num_blocks_total)
    totals = block_throughputs(num_blocks_total, records)

    def weakness(start: int):
        window = totals[start : start + span_length]
        return (-sum(1 for t in window if t <= 0), sum(window), start)

    best = min(range(num_blocks_total - span_length + 1), key=weakness)
    return BlockRange(best, best + span_length)


def swarm_throughput(totals: Sequence[float]) -> float:
    """What the whole swarm can push through the model: its weakest block."""
    return min(totals) if totals else 0.0


def choose_move(
    num_blocks_total: int, records: Sequence[ServerRecord], me: str, balance_quality: float = 0.75
) -> Optional[BlockRange]:
    """Where server ``me`` should move to, or None to stay.

    It moves when taking its span away and placing it where the swarm is then weakest raises the swarm's
    throughput (its weakest block) above the current figure divided by ``balance_quality`` (0.75: by a third);
    a block nobody serves always makes a move worth it.
    """
    mine = next((r for r in records if r.peer_id == me), None)
    if mine is None:
        return None
    others = [r for r in records if r.peer_id != me]
    target = choose_span(num_blocks_total, others, len(mine.blocks))
    if target == mine.blocks:
        return None
    now = swarm_throughput(block_throughputs(num_blocks_total, records))
    moved = replace(mine, blocks=target)
    after = swarm_throughput(block_throughputs(num_blocks_total, [*others, moved]))
    return target if after > now / balance_quality else None
