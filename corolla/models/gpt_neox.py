"""GPT-NeoX (Pythia, GPT-NeoX-20B): partial rotary embeddings, fused query/key/value, parallel attention and MLP
residuals; the cache argument is ``layer_past``; checkpoints call the head ``embed_out``."""
from __future__ import annotations

from torch import nn
from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

from corolla.models.family import ClientParts, ModelFamily
from corolla.models.rotary import RotaryRunner


def _client_parts(config) -> ClientParts:
    modules = {
        "embed_in": nn.Embedding(config.vocab_size, config.hidden_size),
        "final_layer_norm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
    }
    return ClientParts(modules, "embed_in", "final_layer_norm", "layers")


FAMILY = ModelFamily(
    model_type="gpt_neox",
    layers_path="gpt_neox.layers",
    layer_class=GPTNeoXLayer,
    make_runner=lambda config, device: RotaryRunner(config, device, GPTNeoXRotaryEmbedding,
                                                    cache_argument="layer_past"),
    causal_lm_class=GPTNeoXForCausalLM,
    sequence_classification_class=GPTNeoXForSequenceClassification,
    client_parts=_client_parts,
    base_attr="gpt_neox",
    client_renames=(("embed_out.", "lm_head."),),
    lora_targets=("attention.query_key_value",),
)
