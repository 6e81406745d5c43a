"""One ``ModelFamily`` per supported architecture: how its blocks are named, built and run.

A family knows where the decoder layers live in the Hugging Face ``*ForCausalLM`` model and in the checkpoint,
which Hugging Face layer class to build, and which *runner* prepares the per-forward inputs that the full model
would compute once for all layers (causal/padding mask, rotary embeddings or ALiBi) and calls one layer.
Adding an architecture means writing (or reusing) a runner and adding one ``ModelFamily`` to ``_known_families``.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import transformers
from torch import nn

from corolla.core.errors import CorollaError


class LayerRunner(Protocol):
    """Computes what all layers of a stack share for one forward, then runs one layer at a time."""

    def prepare(
        self,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        attention_mask: torch.Tensor,  # [batch, past+new], 1 real token / 0 padding
        position_ids: torch.Tensor,  # [batch, new]
        cache: transformers.Cache | None,
    ) -> object: ...

    def run_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        prepared: object,
        cache: transformers.Cache | None,
    ) -> torch.Tensor: ...  # [batch, new, hidden]


@dataclass(frozen=True)
class ModelFamily:
    """How Corolla runs a slice of the decoder layers of one architecture (one HF ``model_type``)."""

    model_type: str
    # Attribute path of the decoder layers' ModuleList in the HF *ForCausalLM model, e.g. "model.layers".
    layers_path: str
    # The HF layer class, called as layer_class(config, layer_idx=global_index).
    layer_class: type[nn.Module]
    # Builds the runner of one stack from (config, device).
    make_runner: Callable[[transformers.PretrainedConfig, torch.device], nn.Module]
    # Attention implementation the layers run with (and the masks are built for).
    attn_implementation: str = "sdpa"

    def block_prefix(self, index: int) -> str:
        """Checkpoint name prefix of block ``index``, as saved from the *ForCausalLM model."""
        return f"{self.layers_path}.{index}."

    @property
    def _block_name_pattern(self) -> re.Pattern[str]:
        # Checkpoints saved from the base model (e.g. BLOOM's "h.3.…") lack the leading "transformer."/"model.".
        base, _, layers = self.layers_path.rpartition(".")
        optional_base = f"(?:{re.escape(base)}\\.)?" if base else ""
        return re.compile(f"^{optional_base}{re.escape(layers)}\\.(\\d+)\\.(.+)$")

    def split_block_tensor(self, name: str) -> tuple[int, str] | None:
        """``(block index, name inside the layer)`` of a checkpoint tensor name, or None if not a block tensor."""
        match = self._block_name_pattern.match(name)
        return (int(match.group(1)), match.group(2)) if match else None

    def is_block_tensor(self, name: str) -> int | None:
        """The block index a checkpoint tensor belongs to, or None for embeddings, final norm, head..."""
        split = self.split_block_tensor(name)
        return split[0] if split else None

    def build_layer(self, config: transformers.PretrainedConfig, index: int) -> nn.Module:
        """Build block ``index`` (global numbering) with the HF layer class, on the current default device."""
        return self.layer_class(config, layer_idx=index)

    def cache_values_per_token_per_layer(self, config: transformers.PretrainedConfig) -> int:
        """Number of key+value elements one token of one batch row stores in one layer's cache."""
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * num_kv_heads * head_dim


@functools.cache
def _known_families() -> dict[str, ModelFamily]:
    from corolla.models.bloom import BLOOM
    from corolla.models.llama import LLAMA

    return {family.model_type: family for family in (LLAMA, BLOOM)}


def supported_model_types() -> list[str]:
    return sorted(_known_families())


def family_for(config: transformers.PretrainedConfig) -> ModelFamily:
    """The family of ``config.model_type``; raises ``CorollaError`` listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    family = _known_families().get(model_type)
    if family is None:
        raise CorollaError(
            f"unsupported model_type {model_type!r}: Corolla supports {', '.join(supported_model_types())}"
        )
    return family
