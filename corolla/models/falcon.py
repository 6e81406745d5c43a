"""Falcon: the new decoder architecture (Falcon-40B/180B: grouped key/value heads, two layer norms) and the old one
(Falcon-7B: multi-query attention, attention and MLP in parallel), with rotary positions or ALiBi
(``config.alibi``). The layers take ``alibi``, ``layer_past`` and ``position_embeddings`` and return a tuple.

With ALiBi the model folds the bias into the attention mask (scaled by ``1/sqrt(head_dim)``) once per forward;
the runner does the same for the stack's layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import FalconForCausalLM, FalconForSequenceClassification
from transformers.masking_utils import create_causal_mask
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding, build_alibi_tensor

from corolla.models.family import ClientParts, ModelFamily


@dataclass(frozen=True)
class FalconInputs:
    mask: torch.Tensor | None  # [batch, 1 or heads, new, past+new]; with ALiBi, the bias folded in (additive)
    alibi: torch.Tensor | None  # [batch * heads, 1, past+new], or None with rotary positions
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor


class FalconRunner(nn.Module):
    def __init__(self, config: transformers.PretrainedConfig, device: torch.device):
        super().__init__()
        self.config = config
        self.rotary_emb = FalconRotaryEmbedding(config=config).to(device)

    def prepare(self, hidden_states, attention_mask, position_ids, cache) -> FalconInputs:
        batch = hidden_states.shape[0]
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids, allow_is_causal_skip=False)
        alibi = None
        if self.config.alibi:
            alibi = build_alibi_tensor(attention_mask, self.config.num_attention_heads, dtype=hidden_states.dtype)
            if mask is not None and mask.ndim == 4:
                lowest = torch.finfo(hidden_states.dtype).min
                if mask.dtype == torch.bool:  # True = attend
                    mask = torch.where(mask, torch.zeros((), dtype=hidden_states.dtype), lowest)
                head_dim = self.config.hidden_size // self.config.num_attention_heads
                bias = alibi.reshape(batch, -1, *alibi.shape[1:]) / math.sqrt(head_dim)  # [batch, heads, 1, total]
                mask = torch.masked_fill(bias, mask < -1, lowest)
        embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        return FalconInputs(mask, alibi, embeddings, position_ids)

    def run_layer(self, layer, hidden_states, prepared: FalconInputs, cache) -> torch.Tensor:
        output, _ = layer(hidden_states, alibi=prepared.alibi, attention_mask=prepared.mask,
                          position_ids=prepared.position_ids, layer_past=cache, use_cache=cache is not None,
                          position_embeddings=prepared.position_embeddings)
        return output


def _client_parts(config) -> ClientParts:
    modules = {
        "word_embeddings": nn.Embedding(config.vocab_size, config.hidden_size),
        "ln_f": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
    }
    return ClientParts(modules, "word_embeddings", "ln_f", "h")


FAMILY = ModelFamily(
    model_type="falcon",
    layers_path="transformer.h",
    layer_class=FalconDecoderLayer,
    make_runner=FalconRunner,
    causal_lm_class=FalconForCausalLM,
    sequence_classification_class=FalconForSequenceClassification,
    client_parts=_client_parts,
    base_attr="transformer",
    lora_targets=("self_attention.query_key_value",),
)
