"""The embedded SmolLM2 model: GGUF conversion into a fresh cache, then a 30-block stack against the HF model."""
from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.core.blocks import BlockRange
from corolla.models.checkpoint import load_config, model_dht_prefix, read_tensors, resolve_model
from corolla.models.embedded import embedded_model_dir
from corolla.models.family import family_for
from corolla.models.stack import load_block_stack


def _rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)  # [batch, seq, 1]
    return weight * (hidden_states * torch.rsqrt(variance + eps))  # [batch, seq, hidden]


def test_embedded_model_converts_once_and_matches_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("COROLLA_CACHE_DIR", str(tmp_path))
    model_dir = resolve_model(None)
    assert model_dir == tmp_path / "models" / "SmolLM2-135M-Instruct"
    names = {path.name for path in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [path for path in tmp_path.glob("models/.*tmp*")]  # the temporary directory was renamed

    started = time.perf_counter()
    assert embedded_model_dir(model_dir) == model_dir
    assert resolve_model("smollm2") == model_dir
    assert time.perf_counter() - started < 1.0
    assert model_dht_prefix(model_dir) == "smollm2-135m-instruct"

    config = load_config(model_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, seq]

    stack = load_block_stack(model_dir, config, BlockRange(0, 30), torch.float32, "cpu")
    family = family_for(config)
    client_tensors = read_tensors(model_dir, lambda name: family.is_block_tensor(name) is None)
    embeddings = client_tensors["model.embed_tokens.weight"]  # [vocab, hidden]
    head = client_tensors.get("lm_head.weight", embeddings)  # tied embeddings: the head is the embedding matrix
    with torch.no_grad():
        hidden_states = torch.nn.functional.embedding(input_ids, embeddings)  # [1, seq, hidden]
        hidden_states = stack(hidden_states, torch.ones_like(input_ids))
        normed = _rms_norm(hidden_states, client_tensors["model.norm.weight"], config.rms_norm_eps)
        logits = normed @ head.T  # [1, seq, vocab]

        reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        expected = reference(input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
