"""Coverage of a model's blocks by servers: gaps, and the span a new server should take.

Pure functions over ``ServerRecord``s; the client and the server act on what they return.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError
from corolla.core.records import ServerRecord, ServerState


def usable(records: Iterable[ServerRecord], protocol_version: int) -> list[ServerRecord]:
    return [r for r in records if r.state is ServerState.ONLINE and r.protocol_version == protocol_version]


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


def choose_span(num_blocks_total: int, records: Iterable[ServerRecord], span_length: int) -> BlockRange:
    """The span of ``span_length`` blocks a new server should take.

    The first block nobody serves starts the span; when every block is served, the span whose blocks have
    the fewest servers (summed over the span) wins, earliest first.
    """
    if not 1 <= span_length:
        raise ValueError(f"--num-blocks must be at least 1, got {span_length}")
    span_length = min(span_length, num_blocks_total)
    counts = [0] * num_blocks_total
    for record in records:
        if record.state is ServerState.OFFLINE:
            continue
        for b in record.blocks:
            if 0 <= b < num_blocks_total:
                counts[b] += 1
    for start, count in enumerate(counts):
        if count == 0:
            return BlockRange(start, min(start + span_length, num_blocks_total))
    starts = range(0, num_blocks_total - span_length + 1)
    best = min(starts, key=lambda s: (sum(counts[s : s + span_length]), s))
    return BlockRange(best, best + span_length)
