"""Measuring how many tokens per second this hardware pushes through the held blocks."""
from __future__ import annotations

import time

import torch


def measure_throughput(stack, prefix_tokens: int = 16, decode_steps: int = 8, progress: bool = False) -> float:
    """Tokens/s of single-token inference steps (batch 1) after a short prefix, through every held block
    (``progress``: a progress bar on stderr)."""
    from tqdm import tqdm

    cache = stack.new_cache()
    hidden = torch.randn(1, prefix_tokens, stack.hidden_size, dtype=stack.dtype, device=stack.device) * 0.1
    mask = torch.ones(1, prefix_tokens, dtype=torch.long, device=stack.device)
    with torch.inference_mode():
        stack(hidden, mask, None, cache)
        step = hidden[:, -1:]
        start = time.perf_counter()
        for _ in tqdm(range(decode_steps), desc="measuring throughput", unit="step", disable=not progress,
                      leave=False):
            mask = torch.cat([mask, mask[:, :1]], dim=1)
            step = stack(step, mask, None, cache)
        if stack.device.type == "cuda":
            torch.cuda.synchronize(stack.device)
        elapsed = time.perf_counter() - start
    return decode_steps / max(elapsed, 1e-9)
