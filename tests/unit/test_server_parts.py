"""Server pieces that need no network: cache accounting and request validation."""
from __future__ import annotations

import pytest
import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, CacheExhaustedError
from corolla.server.cache import CacheBudget
from corolla.server.validation import check_blocks, check_hidden, check_mask, check_positions


def test_cache_budget_reserve_and_release():
    budget = CacheBudget(total_tokens=100, bytes_per_token=1024)
    budget.reserve(60)
    assert budget.free_tokens == 40
    with pytest.raises(CacheExhaustedError, match="40 of 100 free"):
        budget.reserve(50)
    with pytest.raises(CacheExhaustedError, match="whole cache of 100 tokens"):
        budget.reserve(101)
    budget.release(60)
    assert budget.free_tokens == 100


def test_validation_messages():
    with pytest.raises(BadRequestError, match="holds blocks 0:10, not 5:15"):
        check_blocks(BlockRange(5, 15), BlockRange(0, 10))
    check_blocks(BlockRange(0, 10), BlockRange(0, 10))
    check_blocks(BlockRange(3, 7), BlockRange(0, 10))
    with pytest.raises(BadRequestError, match=r"\[batch, seq, hidden\]"):
        check_hidden("h", torch.zeros(2, 8), 8, torch.float32)
    with pytest.raises(BadRequestError, match="over this server's limit of 10"):
        check_hidden("h", torch.zeros(4, 4, 8), 8, torch.float32, max_tokens=10)
    with pytest.raises(BadRequestError, match="only 0"):
        check_mask("m", torch.full((1, 3), 2), 1, 3)
    with pytest.raises(BadRequestError, match=r"shape \[1, 3\]"):
        check_mask("m", torch.ones(1, 4, dtype=torch.long), 1, 3)
    with pytest.raises(BadRequestError, match=r"lie in \[0, 16\)"):
        check_positions(torch.tensor([[3, 16]]), 1, 2, 16)


def test_activation_store_budget_ttl_and_take():
    from corolla.server.activations import ActivationStore, Graph

    def graph(size):
        return Graph(outputs=None, wrt=[], blocks=BlockRange(0, 1), has_prompts=False, lora_keys=[], size_bytes=size)

    store = ActivationStore(budget_bytes=100, ttl_s=60)
    a, b = store.put(graph(60)), store.put(graph(30))
    assert len(store) == 2
    c = store.put(graph(50))  # over budget: the oldest goes
    assert store.take(a) is None and store.take(b) is not None and len(store) == 1
    assert store.put(graph(101)) is None  # alone larger than the budget: not kept
    assert store.take(c).size_bytes == 50 and store.take(c) is None
    store.ttl_s = -1  # everything is now too old
    d = store.put(graph(10))
    assert store.take(d) is None
