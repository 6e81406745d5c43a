"""A server refuses, before announcing anything, a checkpoint it cannot serve: unsupported family, a block's tensor
missing or of another shape, a quantization its device cannot run, a model that is not the swarm's under that name.
A client ignores servers announcing another architecture than its checkpoint's."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from corolla.client.config import ClientConfig
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError, CorollaError
from corolla.testing.inprocess import InProcessSwarm
from corolla.testing.tiny import save_tiny_model


def _announced(swarm, prefix="errors") -> list:
    from corolla.net.records import fetch_records

    peer = swarm.network.factory("reader")
    transport = swarm.loop.run(peer(), 10)
    try:
        return swarm.loop.run(fetch_records(transport, prefix, range(4), 4), 10)
    finally:
        swarm.loop.run(transport.shutdown(), 10)


def test_bad_checkpoints_are_refused_before_announcing(tmp_path):
    good = tmp_path / "good"
    save_tiny_model("llama", good, num_layers=4)
    broken = tmp_path / "broken"
    save_tiny_model("llama", broken, num_layers=4)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.3.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    other = tmp_path / "other"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(other)

    with InProcessSwarm(str(good), [BlockRange(0, 4)], dht_prefix="errors") as swarm:
        with pytest.raises(CorollaError, match=r"does not hold block 2 .* lacks \['mlp.up_proj.weight'\]"):
            swarm.start_server(BlockRange(2, 4), model=str(broken))
        with pytest.raises(CorollaError, match=r"block 3 .* other shapes for \['self_attn.o_proj.weight'\]"):
            swarm.start_server(BlockRange(3, 4), model=str(broken))
        with pytest.raises(CorollaError, match="unsupported model_type 'gpt2': Corolla supports bloom, falcon"):
            swarm.start_server(BlockRange(0, 2), model=str(gpt2))
        with pytest.raises(CorollaError, match="nf4 .* needs CUDA; on CPU use --quant int4"):
            swarm.start_server(BlockRange(0, 2), quant="nf4")
        with pytest.raises(CorollaError, match="not the model the swarm serves under 'errors'"):
            swarm.start_server(BlockRange(0, 2), model=str(other))
        assert len(swarm.servers) == 1 and len(_announced(swarm)) == 1  # none of them announced anything

        # a client of the other checkpoint does not use the swarm's server (another architecture)
        config = ClientConfig(wait_for_blocks_s=0.5)
        from corolla.client.model import AutoDistributedModelForCausalLM

        stranger = AutoDistributedModelForCausalLM.from_pretrained(
            str(other), dht_prefix="errors", client_config=config, transport_factory=swarm.network.factory("c"))
        try:
            with pytest.raises(BlocksNotServedError, match="served by nobody"):
                stranger(torch.tensor([[1, 2, 3]]))
        finally:
            stranger.close()
        model = swarm.client()
        try:
            assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
        finally:
            model.close()
