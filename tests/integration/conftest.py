"""Fixtures that run real swarms: a DHT node and server processes on 127.0.0.1."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

from corolla.cli.local_swarm import LocalSwarm


@pytest.fixture(scope="session")
def llama_swarm(embedded_dir):
    """The embedded model (30 blocks) split among three servers: 0:10, 10:20, 20:30."""
    with LocalSwarm(model=str(embedded_dir), num_servers=3, extra_server_args=["--max-message-mb", "8"]) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def llama_local(embedded_dir):
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def llama_remote(embedded_dir, llama_swarm):
    from corolla import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(embedded_dir), initial_peers=llama_swarm.initial_peers, torch_dtype=torch.float32
    )
    yield model
    model.close()


@pytest.fixture(scope="session")
def bloom_dir(tmp_path_factory):
    """A tiny BLOOM with random weights (fixed seed), saved in sharded safetensors."""
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=256, hidden_size=64, n_layer=6, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-bloom")
    model.save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="session")
def bloom_swarm(bloom_dir):
    with LocalSwarm(model=str(bloom_dir), num_servers=3) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def bloom_local(bloom_dir):
    return BloomForCausalLM.from_pretrained(bloom_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def bloom_remote(bloom_dir, bloom_swarm):
    from corolla import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(bloom_dir), initial_peers=bloom_swarm.initial_peers)
    yield model
    model.close()


def _save_tiny_llama(tmp_path_factory, name: str, num_layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp(name)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama with random weights (4 blocks), for process-level tests that need no real model."""
    return _save_tiny_llama(tmp_path_factory, "tiny-llama", 4, seed=0)


@pytest.fixture(scope="session")
def tiny_llama6_dir(tmp_path_factory):
    """A tiny Llama with random weights and 6 blocks, for block-choice tests."""
    return _save_tiny_llama(tmp_path_factory, "tiny-llama6", 6, seed=1)
