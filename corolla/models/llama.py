"""Llama (and SmolLM2, the embedded model): rotary positions, grouped-query attention, RMS norms."""
from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from corolla.models.family import ClientParts, ModelFamily, without_suffix
from corolla.models.rotary import RotaryRunner


def rms_norm_parts(config, norm_class) -> ClientParts:
    """The client's parts of a model laid out as Llama's: ``embed_tokens``, an RMS ``norm``, ``layers``."""
    modules = {
        "embed_tokens": nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
        "norm": norm_class(config.hidden_size, eps=config.rms_norm_eps),
    }
    return ClientParts(modules, "embed_tokens", "norm", "layers")


FAMILY = ModelFamily(
    model_type="llama",
    layers_path="model.layers",
    layer_class=LlamaDecoderLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, LlamaRotaryEmbedding),
    causal_lm_class=LlamaForCausalLM,
    sequence_classification_class=LlamaForSequenceClassification,
    client_parts=lambda config: rms_norm_parts(config, LlamaRMSNorm),
    lora_targets=("self_attn.q_proj", "self_attn.v_proj"),
    batched_layers=True,
    fused_layers=True,
    # Meta's checkpoints and their Hugging Face conversions ("Llama-2-7b", "Llama-2-7b-hf") hold the same weights
    dht_name=without_suffix("-hf"),
)
LLAMA = FAMILY
