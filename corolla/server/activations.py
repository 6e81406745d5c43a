"""Activations kept between a training forward pass and its backward pass, so backward needs no recompute."""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from corolla.core.blocks import BlockRange


@dataclass
class Graph:
    """A forward pass run with autograd: its outputs, the tensors to differentiate, what it ran."""

    outputs: Any  # [batch, seq, hidden], attached to the autograd graph
    wrt: list  # inputs, then prompts (if any), then trained LoRA tensors
    blocks: BlockRange
    has_prompts: bool
    lora_keys: list  # LoRA keys trained, in the order of their tensors in ``wrt`` (A, B per key)
    size_bytes: int
    created: float = 0.0


class ActivationStore:
    """Graphs by id, within a memory budget (least recently stored go first) and a time limit."""

    def __init__(self, budget_bytes: int, ttl_s: float):
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self._graphs: "OrderedDict[str, Graph]" = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def put(self, graph: Graph) -> Optional[str]:
        """Keep ``graph``; returns its id, or None when it alone exceeds the budget (backward will recompute)."""
        if graph.size_bytes > self.budget_bytes:
            return None
        self._expire()
        while self._graphs and self._bytes + graph.size_bytes > self.budget_bytes:
            self._drop(next(iter(self._graphs)))
        key = uuid.uuid4().hex
        graph.created = time.monotonic()
        self._graphs[key] = graph
        self._bytes += graph.size_bytes
        return key

    def take(self, key: str) -> Optional[Graph]:
        """The graph stored under ``key``, removed from the store; None if unknown, evicted or expired."""
        self._expire()
        graph = self._graphs.pop(key, None)
        if graph is not None:
            self._bytes -= graph.size_bytes
        return graph

    def expire(self) -> int:
        """Drop graphs past their time limit now (also done on every put and take); returns how many are left."""
        self._expire()
        return len(self._graphs)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, g in self._graphs.items() if now - g.created > self.ttl_s]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self._bytes -= self._graphs.pop(key).size_bytes
