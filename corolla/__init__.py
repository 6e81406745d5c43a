"""Corolla: run and fine-tune large language models collaboratively.

Public API (names resolve lazily, so ``import corolla`` is cheap and starts nothing):

- ``AutoDistributedModelForCausalLM``, ``DistributedLlamaForCausalLM``, ``DistributedBloomForCausalLM``:
  models whose blocks run in a swarm; ``from_pretrained(name_or_path, initial_peers=[...])``.
- ``AutoDistributedSpeculativeModel``: the same, decoding speculatively with a small local draft model
  (``from_pretrained(name, small_model=..., initial_peers=[...])``).
- ``RemoteSequential``, ``InferenceSession``: the remote block stack and its sessions.
- ``ServerConfig``, ``ClientConfig``: settings objects.
- ``BlockRange``, ``EMBEDDED_MODEL_NAME`` and the error types (also in ``corolla.core.errors``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AutoDistributedModelForCausalLM": "corolla.client.model",
    "DistributedLlamaForCausalLM": "corolla.client.model",
    "DistributedBloomForCausalLM": "corolla.client.model",
    "AutoDistributedModelForSequenceClassification": "corolla.client.model",
    "DistributedLlamaForSequenceClassification": "corolla.client.model",
    "DistributedBloomForSequenceClassification": "corolla.client.model",
    "AutoDistributedSpeculativeModel": "corolla.client.speculative_model",
    "DistributedLlamaForSpeculativeGeneration": "corolla.client.speculative_model",
    "DistributedBloomForSpeculativeGeneration": "corolla.client.speculative_model",
    "RemoteSequential": "corolla.client.sequential",
    "InferenceSession": "corolla.client.session",
    "ClientConfig": "corolla.client.config",
    "ServerConfig": "corolla.server.config",
    "BlockRange": "corolla.core.blocks",
    "CorollaError": "corolla.core.errors",
    "BlocksNotServedError": "corolla.core.errors",
    "RemoteError": "corolla.core.errors",
    "AdapterNotServedError": "corolla.core.errors",
    "EMBEDDED_MODEL_NAME": "corolla.models.embedded",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
