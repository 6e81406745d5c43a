"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (a router picks the top experts per token).

Checkpoints keep one tensor per expert (``block_sparse_moe.experts.N.w1/w2/w3``); the transformers 5 layer holds all
experts in two tensors (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``): ``convert_block_state`` maps one
to the other as the block is loaded.
"""
from __future__ import annotations

import re

import torch
from transformers import MixtralForCausalLM, MixtralForSequenceClassification
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from corolla.core.errors import CorollaError
from corolla.models.family import ModelFamily
from corolla.models.llama import rms_norm_parts
from corolla.models.rotary import RotaryRunner

_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def convert_block_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> the fused tensors of the layer (a state already fused passes through)."""
    experts: dict[int, dict[str, torch.Tensor]] = {}
    converted = {}
    for name, tensor in state.items():
        match = _EXPERT.match(name)
        if match:
            experts.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif name.startswith("block_sparse_moe."):
            converted["mlp." + name[len("block_sparse_moe."):]] = tensor
        else:
            converted[name] = tensor
    if experts:
        count = len(experts)
        if sorted(experts) != list(range(count)) or any(set(e) != {"w1", "w2", "w3"} for e in experts.values()):
            raise CorollaError(f"the checkpoint's experts are incomplete: {sorted(experts)}")
        # gate (w1) and up (w3) projections side by side, as the layer splits them; down (w2) as it is
        converted["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["w1"], experts[e]["w3"]], dim=0) for e in range(count)])
        converted["mlp.experts.down_proj"] = torch.stack([experts[e]["w2"] for e in range(count)])
    return converted


FAMILY = ModelFamily(
    model_type="mixtral",
    layers_path="model.layers",
    layer_class=MixtralDecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, MixtralRotaryEmbedding),
    causal_lm_class=MixtralForCausalLM,
    sequence_classification_class=MixtralForSequenceClassification,
    client_parts=lambda config: rms_norm_parts(config, MixtralRMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    convert_block_state=convert_block_state,
)
