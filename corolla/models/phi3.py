"""Phi-3: rotary attention with fused query/key/value and gate/up projections."""
from __future__ import annotations

from transformers import Phi3ForCausalLM, Phi3ForSequenceClassification
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RMSNorm, Phi3RotaryEmbedding

from corolla.models.family import ModelFamily
from corolla.models.llama import rms_norm_parts
from corolla.models.rotary import RotaryRunner

FAMILY = ModelFamily(
    model_type="phi3",
    layers_path="model.layers",
    layer_class=Phi3DecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, Phi3RotaryEmbedding),
    causal_lm_class=Phi3ForCausalLM,
    sequence_classification_class=Phi3ForSequenceClassification,
    client_parts=lambda config: rms_norm_parts(config, Phi3RMSNorm),
    lora_targets=("self_attn.qkv_proj",),
)
