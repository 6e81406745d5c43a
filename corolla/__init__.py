"""Corolla: run and fine-tune large language models collaboratively.

Public API (importing it starts nothing):

- ``AutoDistributedModelForCausalLM``, ``DistributedLlamaForCausalLM``, ``DistributedBloomForCausalLM``:
  models whose blocks run in a swarm; ``from_pretrained(name_or_path, initial_peers=[...])``.
- ``RemoteSequential``, ``InferenceSession``: the remote block stack and its sessions.
- ``ServerConfig``, ``ClientConfig``: settings objects.
- ``BlockRange`` and the error types in ``corolla.core.errors``.
"""
from corolla.client.config import ClientConfig
from corolla.client.model import (
    AutoDistributedModelForCausalLM,
    DistributedBloomForCausalLM,
    DistributedLlamaForCausalLM,
)
from corolla.client.sequential import RemoteSequential
from corolla.client.session import InferenceSession
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError, CorollaError, RemoteError
from corolla.models.embedded import EMBEDDED_MODEL_NAME
from corolla.server.config import ServerConfig

__all__ = [
    "AutoDistributedModelForCausalLM",
    "BlockRange",
    "BlocksNotServedError",
    "ClientConfig",
    "CorollaError",
    "DistributedBloomForCausalLM",
    "DistributedLlamaForCausalLM",
    "EMBEDDED_MODEL_NAME",
    "InferenceSession",
    "RemoteError",
    "RemoteSequential",
    "ServerConfig",
]
__version__ = "0.1.0"
