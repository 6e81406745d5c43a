"""Gemma 3 (text): Gemma 2's alternation of sliding-window and global layers, with a rotary embedding per layer
type (local layers use their own base frequency), RMS norms on queries and keys, and scaled word embeddings."""
from __future__ import annotations

from transformers import Gemma3ForCausalLM, Gemma3TextForSequenceClassification
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextScaledWordEmbedding,
)

from corolla.models.family import ModelFamily
from corolla.models.gemma2 import scaled_embedding_parts
from corolla.models.rotary import RotaryRunner


FAMILY = ModelFamily(
    model_type="gemma3_text",
    layers_path="model.layers",
    layer_class=Gemma3DecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, Gemma3RotaryEmbedding, rotary_per_type=True),
    causal_lm_class=Gemma3ForCausalLM,
    sequence_classification_class=Gemma3TextForSequenceClassification,
    client_parts=lambda config: scaled_embedding_parts(config, Gemma3TextScaledWordEmbedding, Gemma3RMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    attn_implementation="sdpa",
)
