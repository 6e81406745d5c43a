"""Qwen3: Qwen2's layout with RMS norms on the queries and keys of each head (and no projection biases)."""
from __future__ import annotations

from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from corolla.models.family import ModelFamily
from corolla.models.llama import rms_norm_parts
from corolla.models.rotary import RotaryRunner

FAMILY = ModelFamily(
    model_type="qwen3",
    layers_path="model.layers",
    layer_class=Qwen3DecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, Qwen3RotaryEmbedding),
    causal_lm_class=Qwen3ForCausalLM,
    sequence_classification_class=Qwen3ForSequenceClassification,
    client_parts=lambda config: rms_norm_parts(config, Qwen3RMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    fused_layers=True,  # the fast path applies the per-head norms; sessions share a pass only on the fast path
)
