"""``RemoteCache``: the Hugging Face ``Cache`` object that connects ``generate()`` to an inference session.

The keys and values live on the servers; this object only reports how many tokens they hold (so
``generate()`` feeds just the new tokens) and records beam reorderings to send with the next step.
``ReplayCache`` is what calls outside a session return: the inputs so far, sent again with the next tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache


class _LayerlessCache(Cache):
    """A ``Cache`` that holds no layers here (the keys and values are on the servers, or not kept at all): what the
    base class derives from its local layers is answered as such a cache's."""

    def __init__(self):
        super().__init__(layers=[])

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


class RemoteCache(_LayerlessCache):
    def __init__(self, session):
        super().__init__()
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


class ReplayCache(_LayerlessCache):
    """What ``model(...)`` returns as its cache outside an inference session, where the servers keep nothing: the
    inputs of the first block so far (and their positions). Passed back with the next tokens (transformers' manual
    decoding loop), the model runs the whole sequence again through the blocks and returns the new tokens' outputs,
    as a local cache would give them; each call costs the whole sequence, so long loops belong in a session."""

    def __init__(self, block_inputs: torch.Tensor, position_ids: Optional[torch.Tensor]):
        super().__init__()
        self.block_inputs = block_inputs  # [batch, tokens, hidden]
        self.position_ids = position_ids  # [batch, tokens], or None: 0..tokens-1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.block_inputs.shape[1]
