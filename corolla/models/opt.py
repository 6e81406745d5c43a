"""OPT (the seed paper's OPT-175B family): learned position embeddings (offset by 2) added on the client, pre- or
post-layer-norm blocks (``do_layer_norm_before``), and, where ``word_embed_proj_dim`` differs from the hidden size
(OPT-350m), projections in and out of the blocks' width on the client. Blocks attend with a causal + padding mask
only; positions never reach them."""
from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import OPTForCausalLM, OPTForSequenceClassification
from transformers.masking_utils import create_causal_mask
from transformers.models.opt.modeling_opt import OPTDecoderLayer, OPTLearnedPositionalEmbedding

from corolla.models.family import ClientParts, ModelFamily


class MaskRunner(nn.Module):
    """Runs layers that take ``(hidden_states, attention_mask, cache, use_cache, position_ids)``: OPT's."""

    def __init__(self, config: transformers.PretrainedConfig, device: torch.device):
        super().__init__()
        self.config = config

    def prepare(self, hidden_states, attention_mask, position_ids, cache):
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        return mask, position_ids

    def run_layer(self, layer, hidden_states, prepared, cache) -> torch.Tensor:
        mask, position_ids = prepared
        return layer(hidden_states, attention_mask=mask, cache=cache, use_cache=cache is not None,
                     position_ids=position_ids)


def _prepare_inputs(base, embeddings, attention_mask, position_ids, past: int) -> torch.Tensor:
    """Token embeddings -> block 0's input, as OPT's decoder computes it: project in, add learned positions."""
    decoder = base  # the client's base model stands where OPT's decoder does
    batch, new = embeddings.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + new, dtype=torch.long, device=embeddings.device)
    if position_ids is None:
        position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()[:, past:]
    positions = decoder.embed_positions(attention_mask, past, position_ids=position_ids)
    if getattr(decoder, "project_in", None) is not None:
        embeddings = decoder.project_in(embeddings)
    return embeddings + positions.to(embeddings.dtype)


def _client_parts(config) -> ClientParts:
    modules = {
        "embed_tokens": nn.Embedding(config.vocab_size, config.word_embed_proj_dim, config.pad_token_id),
        "embed_positions": OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size),
    }
    final_norm, after_norm = None, ()
    if config.do_layer_norm_before and not config._remove_final_layer_norm:
        modules["final_layer_norm"] = nn.LayerNorm(config.hidden_size,
                                                   elementwise_affine=config.layer_norm_elementwise_affine)
        final_norm = "final_layer_norm"
    if config.word_embed_proj_dim != config.hidden_size:
        modules["project_in"] = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
        modules["project_out"] = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        after_norm = ("project_out",)
    return ClientParts(modules, "embed_tokens", final_norm, "layers", after_norm=after_norm,
                       prepare_inputs=_prepare_inputs)


FAMILY = ModelFamily(
    model_type="opt",
    layers_path="model.decoder.layers",
    layer_class=OPTDecoderLayer,
    make_runner=MaskRunner,
    causal_lm_class=OPTForCausalLM,
    sequence_classification_class=OPTForSequenceClassification,
    client_parts=_client_parts,
    remote_base_path="model.decoder",
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    head_features=lambda config: config.word_embed_proj_dim,
)
