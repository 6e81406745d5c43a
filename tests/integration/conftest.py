"""Fixtures that run real swarms: a DHT node and server processes on 127.0.0.1."""
from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from corolla.testing.local_swarm import LocalSwarm


@pytest.fixture(scope="session")
def llama_swarm(embedded_dir):
    """The embedded model (30 blocks) split among three servers: 0:10, 10:20, 20:30."""
    with LocalSwarm(model=str(embedded_dir), num_servers=3, extra_server_args=["--max-message-mb", "8"]) as swarm:
        yield swarm


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
