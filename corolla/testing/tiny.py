"""Tiny random-weight models of every supported family, built from their transformers configs (for tests and
benchmarks: no download). Each is small (hidden 64, 4 to 6 blocks) but keeps what makes its family different:
sliding windows shorter than a test's session, alternating layer types, soft-capping, biases, q/k norms, experts."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False)

TINY_CONFIGS = {
    "llama": lambda layers: transformers.LlamaConfig(num_hidden_layers=layers, **COMMON),
    "mistral": lambda layers: transformers.MistralConfig(num_hidden_layers=layers, sliding_window=8, **COMMON),
    "mixtral": lambda layers: transformers.MixtralConfig(num_hidden_layers=layers, num_local_experts=4,
                                                         num_experts_per_tok=2, **COMMON),
    "qwen2": lambda layers: transformers.Qwen2Config(num_hidden_layers=layers, **COMMON),
    "qwen3": lambda layers: transformers.Qwen3Config(num_hidden_layers=layers, head_dim=16, **COMMON),
    "gemma2": lambda layers: transformers.Gemma2Config(num_hidden_layers=layers, head_dim=16, sliding_window=8,
                                                       query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                                                       attn_logit_softcapping=50.0, **COMMON),
    "gemma3_text": lambda layers: transformers.Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, sliding_window=8,
                                                                query_pre_attn_scalar=16, sliding_window_pattern=2,
                                                                **COMMON),
    "phi3": lambda layers: transformers.Phi3Config(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2, **COMMON),
    "gpt_neox": lambda layers: transformers.GPTNeoXConfig(num_hidden_layers=layers, vocab_size=128, hidden_size=64,
                                                         intermediate_size=128, num_attention_heads=4,
                                                         rotary_pct=0.5, max_position_embeddings=256,
                                                         initializer_range=0.1),
    "falcon": lambda layers: transformers.FalconConfig(num_hidden_layers=layers, vocab_size=128, hidden_size=64,
                                                       num_attention_heads=4, num_kv_heads=2,
                                                       new_decoder_architecture=True, initializer_range=0.1),
    "falcon-old": lambda layers: transformers.FalconConfig(num_hidden_layers=layers, vocab_size=128, hidden_size=64,
                                                           num_attention_heads=4, multi_query=True,
                                                           parallel_attn=True, initializer_range=0.1),
    "falcon-alibi": lambda layers: transformers.FalconConfig(num_hidden_layers=layers, vocab_size=128, hidden_size=64,
                                                             num_attention_heads=4, alibi=True, multi_query=False,
                                                             parallel_attn=False, bias=True, initializer_range=0.1),
    "opt": lambda layers: transformers.OPTConfig(num_hidden_layers=layers, vocab_size=128, hidden_size=64, ffn_dim=128,
                                                 num_attention_heads=4, max_position_embeddings=256, pad_token_id=1,
                                                 init_std=0.1),
    "opt-350m": lambda layers: transformers.OPTConfig(num_hidden_layers=layers, vocab_size=128, hidden_size=64,
                                                      ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32,
                                                      do_layer_norm_before=False, max_position_embeddings=256,
                                                      pad_token_id=1, init_std=0.1),
    "bloom": lambda layers: transformers.BloomConfig(hidden_size=64, n_layer=layers, n_head=4, vocab_size=128,
                                                     initializer_range=0.1),
}


def tiny_config(name: str, num_layers: int = 6) -> transformers.PretrainedConfig:
    """The tiny config ``name``: a model_type, or a variant of one (``falcon-old``, ``falcon-alibi``)."""
    return TINY_CONFIGS[name](num_layers)


def save_tiny_model(name: str, path: str | Path, num_layers: int = 6, seed: int = 0,
                    max_shard_size: str | None = None, grid: str | None = None) -> transformers.PreTrainedModel:
    """Build the tiny causal LM ``name`` with seeded random weights, save it at ``path``, return it (eval).

    ``grid``: put every linear layer's weights on a grid first, as a model converted from a GGUF file has them:
    ``"Q4_1"`` or ``"Q8_0"`` (quantized and dequantized by the ``gguf`` package, as transformers loads such files),
    or ``"bf16"`` (rounded to bfloat16 values)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(name, num_layers))
    model.eval()
    if grid is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(on_grid(module.weight, grid))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


def on_grid(weight: torch.Tensor, grid: str) -> torch.Tensor:
    """``weight`` (float32, [out, in] with in % 32 == 0 for the GGUF grids) as a GGUF round trip through ``grid``
    (``Q4_1``, ``Q8_0``) or as bfloat16 values (``bf16``) would give it, in float32."""
    if grid == "bf16":
        return weight.detach().to(torch.bfloat16).float()
    import gguf.quants

    kind = getattr(gguf.GGMLQuantizationType, grid)
    array = weight.detach().float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind).copy()).view(weight.shape)
