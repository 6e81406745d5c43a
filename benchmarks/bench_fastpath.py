"""The fast path of a server's blocks, in one process: decode-step time of all 30 blocks of the embedded model with
and without it (float32 and int8 weights), and how far each path's logits lie from a float64 computation, beside
transformers' own float32 model.

Run: .venv/bin/python benchmarks/bench_fastpath.py [--threads 1] [--steps 64] [--text-tokens 200]

Speed: a 16-token prefill, then ``--steps`` decode steps of one token through ``BlockStack`` (the server's compute,
without the network), median step time; ``--no-fast-path`` is the slow row. Exactness: the first ``--text-tokens``
tokens of Python's documentation topics, a 20-token prefill then one token per step (as a session runs), the
stack's outputs through the model's final norm and head, against the float64 model; transformers' float32 model on
the same text for scale.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.core.blocks import BlockRange
from corolla.models import cpu_kernels
from corolla.models.checkpoint import load_config, resolve_model
from corolla.models.stack import load_block_stack


def step_times(stack, hidden_size: int, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    cache = stack.new_cache()
    times = []
    with torch.inference_mode():
        stack(torch.randn(1, 16, hidden_size, generator=generator), None, None, cache)
        for _ in range(steps):
            x = torch.randn(1, 1, hidden_size, generator=generator)
            start = time.perf_counter()
            stack(x, None, None, cache)
            times.append(time.perf_counter() - start)
    return times


def session_logits(stack, model, ids: torch.Tensor, prefill: int = 20) -> torch.Tensor:
    with torch.inference_mode():
        embeddings = model.model.embed_tokens(ids)
        cache = stack.new_cache()
        outputs = [stack(embeddings[:, :prefill], None, None, cache)]
        for index in range(prefill, ids.shape[1]):
            outputs.append(stack(embeddings[:, index : index + 1], None, None, cache))
        return model.lm_head(model.model.norm(torch.cat(outputs, dim=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    config = load_config(path)
    blocks = BlockRange(0, config.num_hidden_layers)
    print(f"model {path.name}: {len(blocks)} blocks, {args.threads} thread(s); CPU kernels: "
          f"{'built' if cpu_kernels.available() else cpu_kernels.unavailable_reason()}")

    rows = {}
    for quant in ("none", "int8"):
        for fast in (False, True):
            stack = load_block_stack(path, config, blocks, torch.float32, "cpu", quant, fast_path=fast)
            rows[(quant, fast)] = statistics.median(step_times(stack, config.hidden_size, args.steps)) * 1e3
            del stack
    print("\n| weights | decode step, transformers' layers | fast path | speed-up |")
    print("|---|---|---|---|")
    for quant in ("none", "int8"):
        slow, fast = rows[(quant, False)], rows[(quant, True)]
        print(f"| {quant} | {slow:.1f} ms | {fast:.1f} ms | {slow / fast:.2f}x |")
    print(f"(int8 fast path against float32 transformers' layers: {rows[('none', False)] / rows[('int8', True)]:.2f}x)")

    from pydoc_data.topics import topics

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = " ".join(list(topics.values())[:3])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.text_tokens]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.inference_mode():
        exact = model64(ids).logits.float()
        local = model(ids).logits
    print(f"\nlogits against float64 over {ids.shape[1]} tokens (largest |logit| {exact.abs().max():.1f}):")
    print("| computation | max abs error | mean abs error |")
    print("|---|---|---|")
    print(f"| transformers float32 (one pass) | {(local - exact).abs().max():.2e} | {(local - exact).abs().mean():.2e} |")
    for fast in (False, True):
        stack = load_block_stack(path, config, blocks, torch.float32, "cpu", fast_path=fast)
        logits = session_logits(stack, model, ids)
        name = "fast path" if fast else "transformers' layers"
        print(f"| server blocks, {name}, a session | {(logits - exact).abs().max():.2e} | "
              f"{(logits - exact).abs().mean():.2e} |")


if __name__ == "__main__":
    main()
