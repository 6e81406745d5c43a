"""One ``ModelFamily`` per supported architecture: everything Corolla knows about it, in that family's module.

A family says where the decoder layers live in the Hugging Face ``*ForCausalLM`` model and in the checkpoint, which
Hugging Face layer class to build, which *runner* prepares the per-forward inputs that the full model computes once
for all layers (causal, sliding-window and padding masks; rotary embeddings or ALiBi) and calls one layer, what each
layer's attention type is, how a token's cache is laid out, what the client holds (embeddings, the norm after them
if any, the final norm, the head: ``ClientParts``), which Hugging Face classes the client's models extend, the
default LoRA targets and the DHT name rule. Adding an architecture means one module under ``corolla/models/`` that defines its
``ModelFamily`` and one line in ``_FAMILY_MODULES``; no other package changes.
"""
from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Optional, Protocol

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


def attention_type(config: transformers.PretrainedConfig, index: int) -> str:
    """``full_attention`` or ``sliding_attention``: the mask block ``index`` of a model attends with, as the HF
    model decides it (``config.layer_types`` where the config has them, else a sliding window if one is set)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    uses_window = getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
    return "sliding_attention" if uses_window else "full_attention"


@dataclass(frozen=True)
class ClientParts:
    """What a client holds of a model besides the head: modules by their checkpoint names inside the base model."""

    modules: dict[str, nn.Module]  # by dotted path inside the base model ("decoder.embed_tokens" in OPT)
    embed: str  # the token embeddings, e.g. "embed_tokens"
    final_norm: Optional[str]  # the norm after the last block, e.g. "norm" (None: the model has none)
    layers: str  # where the remote blocks sit, e.g. "layers"
    after_embed: Optional[str] = None  # a module applied to the embeddings before block 0 (BLOOM's layernorm)
    after_norm: tuple[str, ...] = ()  # modules applied after the final norm (OPT's project_out)
    # (base model, embeddings [batch, new, ·], attention_mask [batch, past+new] or None, position_ids or None,
    # past length) -> block 0's input; for what the embedding stage needs besides tokens (OPT's positions)
    prepare_inputs: Optional[Callable] = None


@dataclass(frozen=True)
class ModelFamily:
    """How Corolla runs one architecture (one HF ``model_type``), on servers and on clients."""

    model_type: str
    # Attribute path of the decoder layers' ModuleList in the HF *ForCausalLM model, e.g. "model.layers".
    layers_path: str
    # The HF layer class, called as layer_class(config, layer_idx=global_index).
    layer_class: type[nn.Module]
    # Builds the runner of one stack from (config, device).
    make_runner: Callable[[transformers.PretrainedConfig, torch.device], nn.Module]
    # The client: HF classes its models extend, the attribute of the base model in them, and its modules.
    causal_lm_class: type
    client_parts: Callable[[transformers.PretrainedConfig], ClientParts]
    base_attr: str = "model"
    # Where the client's base model (embeddings, remote blocks, final norm) sits, if deeper than ``base_attr``
    # (OPT's causal LM calls ``model.decoder``).
    remote_base_path: Optional[str] = None
    sequence_classification_class: Optional[type] = None
    lm_head_bias: bool = False
    # Width of what reaches the head (and a classifier's score), if not ``hidden_size`` (OPT-350m's projection).
    head_features: Optional[Callable[[transformers.PretrainedConfig], int]] = None
    # Checkpoint name prefixes of the client's tensors that transformers 5 renames on load, e.g. GPT-NeoX's
    # "embed_out." (its head in Pythia checkpoints) -> "lm_head.".
    client_renames: tuple[tuple[str, str], ...] = ()
    # Linear layers (paths inside a block) that LoRA adapts when the user names none.
    lora_targets: tuple[str, ...] = ()
    # Linear layers (paths inside a block) whose ``.weight`` the HF layer reads itself under ``config`` instead of
    # calling them (BLOOM's slow_but_exact): they stay ``nn.Linear``, never quantized nor packed.
    float_linears: Optional[Callable[[transformers.PretrainedConfig], tuple[str, ...]]] = None
    # Attention implementation the layers run with (and the masks are built for).
    attn_implementation: str = "sdpa"
    # True if the runner may run several sessions' steps through a layer at once (``run_layer_batched``): the
    # layer must be built exactly as Llama's (norms, q/k/v/o projections, MLP), nothing more.
    batched_layers: bool = False
    # True if the fast path (``corolla.models.fused.FusedLayer``) computes the family's layers: Llama's structure,
    # optionally with per-head RMS norms of queries and keys (Qwen3). Several sessions then also share a pass.
    fused_layers: bool = False
    # Names other than ``model_type`` that checkpoints of this family carry (none so far).
    aliases: tuple[str, ...] = ()
    # Maps one block's tensors as a checkpoint names them (inside the layer) to the layer's own names, where the
    # two differ (Mixtral's checkpoints keep one tensor per expert, its layer one tensor for all experts).
    convert_block_state: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None
    # The family's DHT name rule: maps the generic name of a checkpoint (``model_dht_prefix``) to the swarm's name,
    # where names that differ denote the same weights (Llama's "-hf" conversions, BLOOM's "-petals" copies).
    dht_name: Optional[Callable[[str], str]] = None

    @property
    def base_path(self) -> str:
        return self.remote_base_path or self.base_attr

    def output_features(self, config: transformers.PretrainedConfig) -> int:
        return self.head_features(config) if self.head_features is not None else config.hidden_size

    def linears_kept_float(self, config: transformers.PretrainedConfig) -> tuple[str, ...]:
        """Paths inside a block of the linear layers that must stay ``nn.Linear`` (see ``float_linears``)."""
        return tuple(self.float_linears(config)) if self.float_linears is not None else ()

    def layer_type(self, config: transformers.PretrainedConfig, index: int) -> str:
        """``full_attention`` or ``sliding_attention``: the mask block ``index`` attends with."""
        return attention_type(config, index)

    def block_prefix(self, index: int) -> str:
        """Checkpoint name prefix of block ``index``, as saved from the *ForCausalLM model."""
        return f"{self.layers_path}.{index}."

    @property
    def _block_name_pattern(self) -> re.Pattern[str]:
        # Checkpoints saved from the base model lack the causal LM's base model prefix, as the hub's originals of
        # BLOOM ("h.3.…") and OPT ("decoder.layers.3.…") do; transformers loads both layouts, so Corolla does too.
        base = f"{self.base_attr}."
        if self.layers_path.startswith(base):
            inner = self.layers_path[len(base):]
            return re.compile(f"^(?:{re.escape(base)})?{re.escape(inner)}\\.(\\d+)\\.(.+)$")
        return re.compile(f"^{re.escape(self.layers_path)}\\.(\\d+)\\.(.+)$")

    def split_block_tensor(self, name: str) -> tuple[int, str] | None:
        """``(block index, name inside the layer)`` of a checkpoint tensor name, or None if not a block tensor."""
        match = self._block_name_pattern.match(name)
        return (int(match.group(1)), match.group(2)) if match else None

    def is_block_tensor(self, name: str) -> int | None:
        """The block index a checkpoint tensor belongs to, or None for embeddings, final norm, head..."""
        split = self.split_block_tensor(name)
        return split[0] if split else None

    def client_tensors(self, tensors: dict[str, torch.Tensor], expected: Collection[str]) -> dict[str, torch.Tensor]:
        """The client's checkpoint tensors (``tensors``, by checkpoint name) by the names the client model has
        (``expected``, its state dict's names), as transformers maps them on load: first the family's renames
        (``client_renames``), then the base model prefix added where the checkpoint was saved from the base model
        (BLOOM's "word_embeddings.weight" is the causal LM's "transformer.word_embeddings.weight", OPT's
        "decoder.embed_tokens.weight" its "model.decoder.embed_tokens.weight"). Names matching nothing stay as
        they are."""
        renamed = {}
        for name, tensor in tensors.items():
            for old, new in self.client_renames:
                if name.startswith(old):
                    name = new + name[len(old):]
            renamed[name] = tensor
        prefixed = {}
        for name, tensor in renamed.items():
            with_base = f"{self.base_attr}.{name}"
            if name not in expected and with_base in expected and with_base not in renamed:
                name = with_base
            prefixed[name] = tensor
        return prefixed

    def build_layer(self, config: transformers.PretrainedConfig, index: int) -> nn.Module:
        """Build block ``index`` (global numbering) with the HF layer class, on the current default device."""
        return self.layer_class(config, layer_idx=index)

    def cache_values_per_token_per_layer(self, config: transformers.PretrainedConfig) -> int:
        """Number of key+value elements one token of one batch row stores in one layer's cache."""
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * num_kv_heads * head_dim


def without_suffix(suffix: str) -> Callable[[str], str]:
    """A DHT name rule dropping ``suffix`` from the end of a name (a name that is only the suffix stays)."""

    def rule(name: str) -> str:
        return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name

    return rule


# model_type -> the module under corolla.models that defines its family as ``FAMILY`` (imported when first needed).
_FAMILY_MODULES = {
    "llama": "llama",
    "bloom": "bloom",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "opt": "opt",
}


@functools.cache
def _known_families() -> dict[str, ModelFamily]:
    families = {}
    for model_type, module in _FAMILY_MODULES.items():
        family = importlib.import_module(f"corolla.models.{module}").FAMILY
        if family.model_type != model_type:
            raise TypeError(f"corolla.models.{module} defines {family.model_type!r}, expected {model_type!r}")
        families[model_type] = family
        for alias in family.aliases:
            families[alias] = family
    return families


def all_families() -> list[ModelFamily]:
    return [family for model_type, family in _known_families().items() if model_type == family.model_type]


def supported_model_types() -> list[str]:
    return sorted(_known_families())


def family_for(config: transformers.PretrainedConfig) -> ModelFamily:
    """The family of ``config.model_type``; raises ``CorollaError`` listing the supported ones otherwise."""
    return family_for_type(getattr(config, "model_type", None))


def family_for_type(model_type: Optional[str]) -> ModelFamily:
    family = _known_families().get(model_type)
    if family is None:
        raise CorollaError(
            f"unsupported model_type {model_type!r}: Corolla supports {', '.join(supported_model_types())}"
        )
    return family
