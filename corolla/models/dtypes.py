"""Turning dtype names from the command line or the API into torch dtypes."""
from __future__ import annotations

from typing import Optional

import torch

_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(name: "str | torch.dtype | None", config=None) -> torch.dtype:
    """``"auto"``/None: the checkpoint's dtype (float32 if it names none); else the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        stored: Optional[object] = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, torch.dtype):
            return stored
        if isinstance(stored, str) and stored in _NAMES:
            return _NAMES[stored]
        return torch.float32
    try:
        return _NAMES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(_NAMES))}") from None
