"""Mistral: Llama's layer with sliding-window attention (every layer attends within ``config.sliding_window``)."""
from __future__ import annotations

from transformers import MistralForCausalLM, MistralForSequenceClassification
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding

from corolla.models.family import ModelFamily
from corolla.models.llama import rms_norm_parts
from corolla.models.rotary import RotaryRunner

FAMILY = ModelFamily(
    model_type="mistral",
    layers_path="model.layers",
    layer_class=MistralDecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, MistralRotaryEmbedding),
    causal_lm_class=MistralForCausalLM,
    sequence_classification_class=MistralForSequenceClassification,
    client_parts=lambda config: rms_norm_parts(config, MistralRMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    batched_layers=True,
    fused_layers=True,
)
