"""``RemoteCache``: the Hugging Face ``Cache`` object that connects ``generate()`` to an inference session.

The keys and values live on the servers; this object only reports how many tokens they hold (so
``generate()`` feeds just the new tokens) and records beam reorderings to send with the next step.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache


class RemoteCache(Cache):
    def __init__(self, session):
        super().__init__(layers=[])
        self.session = session
        self._pending_hypo_ids: Optional[torch.Tensor] = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.prefix_length  # tokens of the user's sequence, not the prompt

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.detach().cpu().long()
        if self._pending_hypo_ids is not None:
            beam_idx = self._pending_hypo_ids[beam_idx]
        self._pending_hypo_ids = beam_idx

    def take_hypo_ids(self) -> Optional[torch.Tensor]:
        hypo_ids, self._pending_hypo_ids = self._pending_hypo_ids, None
        return hypo_ids

    # The base class derives these from local cache layers, which a remote cache does not have.
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def is_croppable(self) -> bool:
        return False
