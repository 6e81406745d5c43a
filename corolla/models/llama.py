"""Llama-style families: rotary position embeddings, grouped-query attention, causal + padding mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from corolla.models.family import ModelFamily


@dataclass(frozen=True)
class RotaryInputs:
    """What every layer of a rotary stack receives for one forward."""

    causal_mask: torch.Tensor | None  # [batch, 1, new, past+new] (bool for sdpa), or None for plain causal
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [batch, new, head_dim] each
    position_ids: torch.Tensor  # [batch, new]


class RotaryRunner(nn.Module):
    """Runs layers that take ``(hidden_states, attention_mask, position_ids, cache, use_cache,
    position_embeddings)`` and return a tensor, as Llama, Mistral, Qwen2 and Gemma do."""

    def __init__(
        self,
        config: transformers.PretrainedConfig,
        device: torch.device,
        rotary_class: type[nn.Module] = LlamaRotaryEmbedding,
    ):
        super().__init__()
        self.config = config
        # inv_freq stays float32, as in the HF model; cos/sin come out in the hidden states' dtype.
        self.rotary_emb = rotary_class(config=config).to(device)

    def prepare(
        self,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        attention_mask: torch.Tensor,  # [batch, past+new]
        position_ids: torch.Tensor,  # [batch, new]
        cache: transformers.Cache | None,
    ) -> RotaryInputs:
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        return RotaryInputs(causal_mask, position_embeddings, position_ids)

    def run_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        prepared: RotaryInputs,
        cache: transformers.Cache | None,
    ) -> torch.Tensor:  # [batch, new, hidden]
        return layer(
            hidden_states,
            attention_mask=prepared.causal_mask,
            position_ids=prepared.position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=prepared.position_embeddings,
        )


LLAMA = ModelFamily(
    model_type="llama",
    layers_path="model.layers",
    layer_class=LlamaDecoderLayer,
    make_runner=RotaryRunner,
)
