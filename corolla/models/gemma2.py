"""Gemma 2: sliding-window and global layers alternating (``config.layer_types``), soft-capped attention scores
(inside the layers) and logits (the client's head, as the Hugging Face class does), norms around both sublayers,
word embeddings scaled by ``sqrt(hidden_size)``."""
from __future__ import annotations

from transformers import Gemma2ForCausalLM, Gemma2ForSequenceClassification
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2DecoderLayer,
    Gemma2RMSNorm,
    Gemma2RotaryEmbedding,
    Gemma2TextScaledWordEmbedding,
)

from corolla.models.family import ClientParts, ModelFamily
from corolla.models.rotary import RotaryRunner


def scaled_embedding_parts(config, embedding_class, norm_class) -> ClientParts:
    """Gemma's client parts: word embeddings scaled by ``sqrt(hidden_size)`` and an RMS norm (Gemma 2 and 3)."""
    modules = {
        "embed_tokens": embedding_class(config.vocab_size, config.hidden_size, config.pad_token_id,
                                        embed_scale=config.hidden_size**0.5),
        "norm": norm_class(config.hidden_size, eps=config.rms_norm_eps),
    }
    return ClientParts(modules, "embed_tokens", "norm", "layers")


FAMILY = ModelFamily(
    model_type="gemma2",
    layers_path="model.layers",
    layer_class=Gemma2DecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, Gemma2RotaryEmbedding),
    causal_lm_class=Gemma2ForCausalLM,
    sequence_classification_class=Gemma2ForSequenceClassification,
    client_parts=lambda config: scaled_embedding_parts(config, Gemma2TextScaledWordEmbedding, Gemma2RMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    attn_implementation="eager",  # as transformers does for Gemma 2: sdpa cannot soft-cap the attention scores
)
