"""Checkpoints laid out as the hub's originals of BLOOM (bigscience/bloom-*: "word_embeddings.weight", "h.0.…") and
OPT (facebook/opt-*: "decoder.embed_tokens.weight", "decoder.layers.0.…"), saved from the base model without the
causal LM's "transformer."/"model." prefix: transformers loads them, and so do Corolla's servers and clients."""
from __future__ import annotations

import pytest
import torch
import transformers

from corolla.core.blocks import BlockRange
from corolla.models.checkpoint import read_tensors
from corolla.models.family import family_for
from corolla.testing.inprocess import InProcessSwarm
from corolla.testing.tiny import save_tiny_model


@pytest.mark.parametrize("name", ["bloom", "opt"])
def test_checkpoint_saved_from_the_base_model_runs_through_the_swarm(name, tmp_path):
    model = save_tiny_model(name, tmp_path / "full", num_layers=4)
    family = family_for(model.config)
    getattr(model, family.base_attr).save_pretrained(str(tmp_path / "hub"))  # the head is tied to the embeddings
    assert not any(key.startswith(family.base_attr + ".") for key in read_tensors(tmp_path / "hub", lambda key: True))
    local = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hub"), dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with InProcessSwarm(str(tmp_path / "hub"), [BlockRange(0, 2), BlockRange(2, 4)], dht_prefix=name) as swarm:
        remote = swarm.client(torch_dtype=torch.float32)
        try:
            with torch.no_grad():
                expected = local(ids).logits
                assert (remote(ids).logits - expected).abs().max().item() < 1e-4
                assert (model(ids).logits - expected).abs().max().item() < 1e-5  # the weights are the original's
            greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert remote.generate(ids[:1], **greedy).tolist() == local.generate(ids[:1], **greedy).tolist()
        finally:
            remote.close()
