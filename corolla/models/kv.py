"""``PagedLayer``: a layer's attention cache that grows page by page as tokens arrive.

Keys and values live in one buffer per layer, ``[batch, kv_heads, capacity, head_dim]``, whose capacity is a whole
number of pages and grows (one copy per page crossed, not per token as transformers' ``DynamicLayer`` does) or
shrinks (after a rewind) to fit the tokens held. A server accounts for a session's cache in pages, reserving them
as the session grows instead of ``max_length`` up front (``corolla.server.cache``).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin

DEFAULT_PAGE_TOKENS = 64


def pages_for(tokens: int, page_tokens: int) -> int:
    """Pages needed to hold ``tokens`` tokens."""
    return -(-tokens // page_tokens)


class PagedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, page_tokens: int = DEFAULT_PAGE_TOKENS):
        self.page_tokens = page_tokens
        self.is_initialized = False
        self._keys: Optional[torch.Tensor] = None  # [batch, kv_heads, capacity, head_dim]
        self._values: Optional[torch.Tensor] = None
        self.length = 0

    # the held part, as the attention reads it
    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self._keys is None else self._keys[:, :, : self.length]

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self._values is None else self._values[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _resize(self, tokens: int, like_keys: torch.Tensor, like_values: torch.Tensor) -> None:
        """Make the capacity the whole pages ``tokens`` needs, keeping the held tokens."""
        capacity = pages_for(tokens, self.page_tokens) * self.page_tokens
        if capacity == self.capacity:
            return
        batch, heads, _, dim = like_keys.shape
        keys = like_keys.new_empty(batch, heads, capacity, dim)
        values = like_values.new_empty(batch, like_values.shape[1], capacity, like_values.shape[3])
        kept = min(self.length, capacity)
        if kept:
            keys[:, :, :kept] = self._keys[:, :, :kept]
            values[:, :, :kept] = self._values[:, :, :kept]
        self._keys, self._values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, new, head_dim]`` keys and values; returns all held ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            self._resize(end, key_states, value_states)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    def append_slot(self, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Make room for one more token of a one-row cache (growing a page if needed) and count it held; returns
        its position, where the caller writes its key and value (``cpu_kernels.decode_attention`` does)."""
        if self._keys is None:
            empty = torch.empty(1, kv_heads, 0, head_dim, dtype=dtype)
            self.lazy_initialization(empty, empty)
            self._resize(1, empty, empty)
        elif self.length + 1 > self.capacity:
            self._resize(self.length + 1, self._keys, self._values)
        self.length += 1
        return self.length - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count); pages no longer
        needed are freed."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self._keys is not None and pages_for(self.length, self.page_tokens) * self.page_tokens < self.capacity:
            if self.length == 0:
                self._keys = self._values = None
            else:
                self._resize(self.length, self._keys, self._values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._keys is not None:
            index = beam_idx.to(self._keys.device)
            self._keys = self._keys.index_select(0, index)
            self._values = self._values.index_select(0, index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = 0
        self.is_initialized = False

    def offload(self):  # the server keeps every session's cache on its device
        return None

    def prefetch(self):
        return None

    @property
    def memory_bytes(self) -> int:
        if self._keys is None:
            return 0
        return self._keys.numel() * self._keys.element_size() + self._values.numel() * self._values.element_size()
