"""Trainable parts that live on the client while the servers' weights stay frozen.

- ``PromptTuning``: a soft prompt of ``pre_seq_len`` vectors prepended to the input embeddings (``ptune``), and for
  ``deep_ptune`` also one prompt per block, added to the first ``pre_seq_len`` hidden states entering that block
  (sent to the servers with each request; they return its gradient).
- ``RemoteLora``: LoRA weights ``A``, ``B`` for chosen linear layers of every remote block (sent with each request;
  the servers apply them and return their gradients). Saved and loaded in PEFT's format.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from corolla.core.blocks import BlockRange
from corolla.models.lora import LoraSet, linear_targets, read_peft_adapter, write_peft_adapter


class TuningMode(enum.Enum):
    NONE = "none"
    PTUNE = "ptune"
    DEEP_PTUNE = "deep_ptune"
    LORA = "lora"


@dataclass(frozen=True)
class TuningConfig:
    mode: TuningMode = TuningMode.NONE
    pre_seq_len: int = 0  # prompt length for ptune / deep_ptune
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: Optional[tuple[str, ...]] = None  # module paths inside a block; None: the family's default


class PromptTuning(nn.Module):
    """Petals-compatible names: ``prompt_embeddings`` and ``intermediate_prompt_embeddings``."""

    def __init__(self, num_blocks: int, hidden_size: int, pre_seq_len: int, deep: bool):
        super().__init__()
        if pre_seq_len < 1:
            raise ValueError(f"prompt tuning needs pre_seq_len >= 1, got {pre_seq_len}")
        self.num_blocks, self.hidden_size, self.pre_seq_len = num_blocks, hidden_size, pre_seq_len
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden_size)
        nn.init.normal_(self.prompt_embeddings.weight, std=0.02)
        self.intermediate_prompt_embeddings = None
        if deep:
            self.intermediate_prompt_embeddings = nn.Embedding(pre_seq_len, num_blocks * hidden_size)
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)  # starts as the plain model

    def input_prompts(self, batch: int) -> torch.Tensor:
        return self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)  # [batch, pre_seq_len, hidden]

    def deep_prompts(self) -> Optional[torch.Tensor]:
        """[num_blocks, 1, pre_seq_len, hidden] (broadcast over the batch), or None for ptune."""
        if self.intermediate_prompt_embeddings is None:
            return None
        weight = self.intermediate_prompt_embeddings.weight  # [pre_seq_len, num_blocks * hidden]
        return weight.view(self.pre_seq_len, self.num_blocks, self.hidden_size).permute(1, 0, 2).unsqueeze(1)


def block_linear_shapes(family, config) -> dict[str, tuple[int, int]]:
    """``{module path: (in_features, out_features)}`` of one decoder block, built on the meta device."""
    with torch.device("meta"):
        layer = family.build_layer(config, 0)
    return {path: (m.in_features, m.out_features) for path, m in linear_targets(layer).items()}


class RemoteLora(nn.Module):
    """LoRA weights for the remote blocks; ``lora_set()`` gives them (as live parameters) to send with requests."""

    def __init__(self, family, config, num_blocks: int, rank: int, alpha: float, targets: Optional[Sequence[str]]):
        super().__init__()
        shapes = block_linear_shapes(family, config)
        named = tuple(targets or family.lora_targets)
        # as PEFT: a name is a layer's path in the block or the end of one ("q_proj" for "self_attn.q_proj")
        matches = {t: [path for path in shapes if path == t or path.endswith("." + t)] for t in named}
        unknown = [t for t in named if not matches[t]]
        if unknown or not named:
            raise ValueError(f"LoRA targets {list(unknown or named)} are not linear layers of a "
                             f"{family.model_type} block; choose among {sorted(shapes)}")
        targets = tuple(dict.fromkeys(path for t in named for path in matches[t]))
        self.family, self.rank, self.alpha, self.targets = family, rank, alpha, targets
        self.scaling = alpha / rank
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for block in range(num_blocks):
            for path in targets:
                in_features, out_features = shapes[path]
                a = torch.empty(rank, in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT initialises A; B starts at zero
                self.lora_A[self._name(block, path)] = nn.Parameter(a)
                self.lora_B[self._name(block, path)] = nn.Parameter(torch.zeros(out_features, rank))

    @staticmethod
    def _name(block: int, path: str) -> str:
        return f"{block}__{path.replace('.', '__')}"

    def lora_set(self, blocks: Optional[BlockRange] = None) -> LoraSet:
        pairs = {}
        for name, a in self.lora_A.items():
            block, path = name.split("__", 1)
            if blocks is None or int(block) in blocks:
                pairs[f"{block}.{path.replace('__', '.')}"] = (a, self.lora_B[name])
        return LoraSet(self.scaling, pairs)

    def save_pretrained(self, path: str | Path, base_model: str, task_type: str = "CAUSAL_LM",
                        saved_modules: Optional[dict] = None) -> None:
        """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), with ``saved_modules``
        (a task head's tensors, by their names in the model) as PEFT's ``modules_to_save``."""
        write_peft_adapter(path, self.lora_set(), self.family, self.rank, self.alpha, base_model, list(self.targets),
                           task_type, saved_modules)

    @torch.no_grad()
    def load_pretrained(self, path: str | Path) -> dict:
        """Load a PEFT adapter saved by ``save_pretrained`` (or by PEFT) into these weights: afterwards they compute
        what the adapter does, with its scaling (``lora_alpha`` / ``r``, or rsLoRA's), and the layers these weights
        target but it does not get none (their B is zeroed). Returns the whole modules it saved (a task head)."""
        lora, config = read_peft_adapter(path, self.family)
        if int(config["r"]) != self.rank:
            raise ValueError(f"the adapter at {path} has rank {config['r']}, these weights have rank {self.rank}")
        names = {}
        for key in lora.pairs:
            block, module_path = key.split(".", 1)
            names[key] = self._name(int(block), module_path)
            if names[key] not in self.lora_A:
                raise ValueError(f"the adapter at {path} adapts {key}, which these weights do not target")
        for key, (a, b) in lora.pairs.items():
            self.lora_A[names[key]].copy_(a)
            self.lora_B[names[key]].copy_(b)
        for name in set(self.lora_B) - set(names.values()):
            self.lora_B[name].zero_()
        self.scaling = lora.scaling
        self.alpha = lora.scaling * self.rank  # what save_pretrained writes (as plain LoRA) keeps this scaling
        return config["saved_modules"]
