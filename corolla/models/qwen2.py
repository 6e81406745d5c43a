"""Qwen2 and Qwen2.5: Llama's layer with biases on the query, key and value projections; optional sliding-window
layers (``use_sliding_window``, ``layer_types``)."""
from __future__ import annotations

from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from corolla.models.family import ModelFamily
from corolla.models.llama import rms_norm_parts
from corolla.models.rotary import RotaryRunner

FAMILY = ModelFamily(
    model_type="qwen2",
    layers_path="model.layers",
    layer_class=Qwen2DecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, Qwen2RotaryEmbedding),
    causal_lm_class=Qwen2ForCausalLM,
    sequence_classification_class=Qwen2ForSequenceClassification,
    client_parts=lambda config: rms_norm_parts(config, Qwen2RMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    batched_layers=True,  # the biases live in the projections, which the batched pass calls as they are
    fused_layers=True,
)
