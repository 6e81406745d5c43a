"""BLOOM: ALiBi positions built from the attention mask, fused QKV, layers taking ``layer_past``.

BLOOM ignores ``position_ids``: like the HF model, positions are ``cumsum(attention_mask) - 1`` on real tokens.
Its attention adds the mask to the scores itself, so masks are built for the eager implementation (additive
float masks). The client applies ``word_embeddings_layernorm`` before block 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import BloomForCausalLM, BloomForSequenceClassification
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from corolla.models.family import ClientParts, ModelFamily, without_suffix


@dataclass(frozen=True)
class AlibiInputs:
    """What every layer of a BLOOM stack receives for one forward."""

    causal_mask: torch.Tensor | None  # [batch, 1, new, past+new], additive (0 / dtype min)
    alibi: torch.Tensor  # [batch * heads, 1, past+new]


class AlibiRunner(nn.Module):
    """Runs ``BloomBlock``-style layers: ``(hidden_states, alibi, attention_mask, layer_past, use_cache)``."""

    def __init__(self, config: transformers.PretrainedConfig, device: torch.device):
        super().__init__()
        self.config = config

    def prepare(
        self,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        attention_mask: torch.Tensor,  # [batch, past+new]
        position_ids: torch.Tensor,  # [batch, new], unused: ALiBi positions come from the mask
        cache: transformers.Cache | None,
    ) -> AlibiInputs:
        alibi = build_alibi_tensor(attention_mask, self.config.num_attention_heads, dtype=hidden_states.dtype)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
        )
        return AlibiInputs(causal_mask, alibi)

    def run_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        prepared: AlibiInputs,
        cache: transformers.Cache | None,
    ) -> torch.Tensor:  # [batch, new, hidden]
        hidden_states, _attention_probs = layer(
            hidden_states,
            alibi=prepared.alibi,
            attention_mask=prepared.causal_mask,
            layer_past=cache,
            use_cache=cache is not None,
        )
        return hidden_states


def _client_parts(config) -> ClientParts:
    modules = {
        "word_embeddings": nn.Embedding(config.vocab_size, config.hidden_size),
        "word_embeddings_layernorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
        "ln_f": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
    }
    return ClientParts(modules, "word_embeddings", "ln_f", "h", after_embed="word_embeddings_layernorm")


def _float_linears(config) -> tuple[str, ...]:
    # with pretraining_tp > 1 and slow_but_exact, BloomAttention and BloomMLP sum products of slices of
    # ``dense.weight`` and ``dense_4h_to_h.weight`` (read as tensors, without their biases) instead of calling them
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        return ("self_attention.dense", "mlp.dense_4h_to_h")
    return ()


FAMILY = ModelFamily(
    model_type="bloom",
    layers_path="transformer.h",
    layer_class=BloomBlock,
    make_runner=AlibiRunner,
    causal_lm_class=BloomForCausalLM,
    sequence_classification_class=BloomForSequenceClassification,
    client_parts=_client_parts,
    base_attr="transformer",
    lora_targets=("self_attention.query_key_value",),
    float_linears=_float_linears,
    attn_implementation="eager",
    # the weights Petals re-saved for its swarms ("bloom-petals", "bloomz-petals") are BLOOM's own
    dht_name=without_suffix("-petals"),
)
BLOOM = FAMILY
