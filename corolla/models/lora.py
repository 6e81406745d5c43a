"""Low-rank adapters (LoRA) on a block stack, applied per call; the base weights never change.

A ``LoraSet`` maps target linear layers, named ``"<block>.<module path>"`` (``"12.self_attn.q_proj"``, blocks
numbered as in the full model), to a pair ``A [rank, in_features]``, ``B [out_features, rank]``; while applied, that
layer computes ``base(x) + scaling * (x @ A.T) @ B.T``. The same set travels with a client's training requests
(flattened to tensors ``"<key>.lora_A"`` / ``"<key>.lora_B"``) or is loaded by a server from a PEFT adapter.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError

PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved adapter files
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSet:
    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "<block>.<path>" -> (A [rank, in], B [out, rank])

    @classmethod
    def from_flat(cls, tensors: dict[str, torch.Tensor], scaling: float) -> "LoraSet":
        keys = {name.rsplit(".", 1)[0] for name in tensors}
        pairs = {}
        for key in sorted(keys):
            a, b = tensors.get(f"{key}.lora_A"), tensors.get(f"{key}.lora_B")
            if a is None or b is None:
                raise BadRequestError(f"LoRA tensors for {key!r} need both {key}.lora_A and {key}.lora_B")
            pairs[key] = (a, b)
        unknown = [n for n in tensors if not n.endswith((".lora_A", ".lora_B"))]
        if unknown:
            raise BadRequestError(f"LoRA tensor names must end in .lora_A or .lora_B, got {unknown[:3]}")
        return cls(float(scaling), pairs)

    def to_flat(self) -> dict[str, torch.Tensor]:
        flat = {}
        for key, (a, b) in self.pairs.items():
            flat[f"{key}.lora_A"], flat[f"{key}.lora_B"] = a, b
        return flat

    def for_blocks(self, blocks: BlockRange) -> "LoraSet":
        return LoraSet(self.scaling, {k: v for k, v in self.pairs.items() if block_of(k) in blocks})

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.pairs.values() for t in pair]


def block_of(key: str) -> int:
    try:
        return int(key.split(".", 1)[0])
    except ValueError:
        raise BadRequestError(f"LoRA key {key!r} must look like '<block>.<module path>'") from None


def linear_targets(layer: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one decoder block that LoRA may target, by module path (quantized ones included)."""
    from corolla.models.quant import QuantizedExperts, QuantizedLinear

    # quantized experts hold a linear layer per expert where a float server has fused tensors (no linear layer): a
    # server takes the same adapters whatever its quantization
    experts = tuple(name + "." for name, module in layer.named_modules() if isinstance(module, QuantizedExperts))
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, (nn.Linear, QuantizedLinear)) and not name.startswith(experts)}


def check_lora(stack, lora: LoraSet, span: BlockRange) -> None:
    """Every key names a linear layer of a block in ``span``; shapes, rank, dtype and values fit it."""
    if not math.isfinite(lora.scaling):
        raise BadRequestError(f"LoRA scaling must be finite, got {lora.scaling}")
    for key, (a, b) in lora.pairs.items():
        block = block_of(key)
        if block not in span:
            raise BadRequestError(f"LoRA weights for block {block} sent with a request for blocks {span}")
        path = key.split(".", 1)[1]
        targets = linear_targets(stack.layer(block))
        if path not in targets:
            raise BadRequestError(
                f"block {block} has no linear layer {path!r} to adapt; its targets are {sorted(targets)}"
            )
        linear = targets[path]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise BadRequestError(
                f"LoRA {key}: A must be [rank, in] and B [out, rank] with the same rank; got {list(a.shape)} and "
                f"{list(b.shape)}"
            )
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise BadRequestError(
                f"LoRA {key}: {path} maps {linear.in_features} -> {linear.out_features} features, but A is "
                f"{list(a.shape)} and B is {list(b.shape)}"
            )
        for name, tensor in (("A", a), ("B", b)):
            if tensor.dtype != stack.dtype:
                raise BadRequestError(f"LoRA {key}.{name} has dtype {tensor.dtype}, this server computes in {stack.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise BadRequestError(f"LoRA {key}.{name} contains non-finite values")


@contextlib.contextmanager
def lora_applied(stack, lora: LoraSet | None) -> Iterator[None]:
    """While inside, the targeted layers of ``stack`` add their low-rank updates (autograd flows into A and B)."""
    if lora is None or not lora.pairs:
        yield
        return
    handles = []
    scaling = lora.scaling
    try:
        for key, (a, b) in lora.pairs.items():
            block, path = key.split(".", 1)
            module = linear_targets(stack.layer(int(block)))[path]
            a, b = a.to(stack.device), b.to(stack.device)

            def hook(module, inputs, output, a=a, b=b):
                return output + (inputs[0] @ a.t()) @ b.t() * scaling  # [..., in] -> [..., rank] -> [..., out]

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- the PEFT file format


def peft_scaling(config: dict) -> float:
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_peft_adapter(path: str | Path, family, blocks: BlockRange | None = None, dtype=None) -> tuple[LoraSet, dict]:
    """A PEFT LoRA adapter directory as a ``LoraSet`` (only ``blocks`` if given) and its config. The whole modules a
    task adapter saves beside it (``modules_to_save``: a classifier head) are the client's: ``config["saved_modules"]``
    holds them (``{name in the model: tensor}``)."""
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a PEFT adapter: it has no {ADAPTER_CONFIG}") from None
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter; only LORA is supported")
    tensors = load_file(path / ADAPTER_WEIGHTS)
    flat, saved = {}, {}
    whole = tuple(config.get("modules_to_save") or ())
    for name, tensor in tensors.items():
        inner = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        split = family.split_block_tensor(inner)
        if split is None and inner.split(".", 1)[0] in whole:
            saved[inner] = tensor
            continue
        if split is None:
            raise ValueError(f"adapter tensor {name} of {path} is not inside a decoder block; not supported")
        block, local = split  # local: "self_attn.q_proj.lora_A.weight"
        if blocks is not None and block not in blocks:
            continue
        module_path, kind, _ = local.rsplit(".", 2)
        flat[f"{block}.{module_path}.{kind}"] = tensor if dtype is None else tensor.to(dtype)
    config["saved_modules"] = saved
    return LoraSet.from_flat(flat, peft_scaling(config)), config


def write_peft_adapter(path: str | Path, lora: LoraSet, family, rank: int, alpha: float,
                       base_model: str, target_modules: list[str], task_type: str = "CAUSAL_LM",
                       saved_modules: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Save in PEFT's format, so ``peft.PeftModel.from_pretrained(local_model, path)`` loads it; ``saved_modules``
    (``{name in the model: tensor}``, a task head trained whole) go with it as PEFT's ``modules_to_save``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (a, b) in lora.pairs.items():
        block, module_path = key.split(".", 1)
        prefix = PEFT_PREFIX + family.block_prefix(int(block)) + module_path
        tensors[f"{prefix}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().contiguous().cpu()
    for name, tensor in (saved_modules or {}).items():
        tensors[PEFT_PREFIX + name] = tensor.detach().contiguous().cpu()
    save_file(tensors, path / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(target_modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": sorted({name.split(".", 1)[0] for name in saved_modules}) if saved_modules else None,
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
