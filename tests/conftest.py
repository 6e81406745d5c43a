"""Shared fixtures: the embedded model and its local reference, tiny random models. Integration fixtures (in
tests/integration) start real processes on loopback and stop every one of them."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Each test process and each server gets one torch thread: the machine has 2 cores and several processes.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def embedded_dir():
    from corolla.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def llama_local(embedded_dir):
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


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
