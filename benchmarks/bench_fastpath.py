"""The fast path of a server's blocks, in one process: decode-step time of all 30 blocks of the embedded model with
and without it (float32 weights dense and packed, int8 weights), and how far each path's logits lie from a float64
computation, beside transformers' own float32 model.

Packed float32 weights (``corolla.models.packing``) are the same values held as exact grid codes: the embedded
model's blocks come from a Q4_1 GGUF file, so every block of 32 weights is ``d * q + m``. The table shows the fast
path with them packed (the default) and held dense (``pack_weights=False``, what any checkpoint without such a grid
gets), and checks that both give the same bits.

Run: .venv/bin/python benchmarks/bench_fastpath.py [--threads 1] [--steps 64] [--text-tokens 200]

Speed: a 16-token prefill, then ``--steps`` decode steps of one token through ``BlockStack`` (the server's compute,
without the network), median step time; ``--no-fast-path`` is the slow row. Then sessions batched in one pass, and
the decode attention alone against PyTorch's at contexts of 64 to 2048 tokens. Exactness: the first ``--text-tokens``
tokens of Python's documentation topics, an 8-token prefill then one token per step (as a session runs), the
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


def batch_times(stack, hidden_size: int, sessions: int, steps: int) -> float:
    """Median time of one pass of ``sessions`` sessions' decode steps (one token each; caches of 10 to 80 tokens)
    through the stack together, as a server batches them (``BlockStack.forward_batch``)."""
    generator = torch.Generator().manual_seed(1)
    caches = [stack.new_cache() for _ in range(sessions)]
    times = []
    with torch.inference_mode():
        for index, cache in enumerate(caches):
            stack(torch.randn(1, 10 + (index * 5) % 70, hidden_size, generator=generator), None, None, cache)
        for _ in range(steps):
            parts = [(torch.randn(1, 1, hidden_size, generator=generator), None, None, c) for c in caches]
            start = time.perf_counter()
            stack.forward_batch(parts)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_times(config, sessions: int, length: int, calls: int) -> tuple[float, float]:
    """Median time of one decode attention of ``sessions`` sessions (one new token each, ``length`` tokens cached):
    PyTorch's scaled_dot_product_attention per session, as transformers' layers run it, and the kernel's one call
    for all of them (``cpu_kernels.decode_attention``, which also writes the new keys and values)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    generator = torch.Generator().manual_seed(2)
    keys = [torch.randn(1, kv_heads, length + 1, d, generator=generator) for _ in range(sessions)]
    values = [torch.randn(1, kv_heads, length + 1, d, generator=generator) for _ in range(sessions)]
    q = torch.randn(sessions, heads * d, generator=generator)
    k, v = (torch.randn(sessions, kv_heads, d, generator=generator) for _ in range(2))
    scale = d ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def pytorch():
        for s in range(sessions):
            sdpa(q[s].view(1, heads, 1, d), keys[s], values[s], scale=scale, enable_gqa=True)

    def kernel():
        cpu_kernels.decode_attention(q, k, v, keys, values, [length] * sessions, scale)

    medians = []
    for run in (pytorch, kernel):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return medians[0], medians[1]


def session_logits(stack, model, ids: torch.Tensor, prefill: int = 8) -> torch.Tensor:
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

    rows, sizes = {}, {}
    setups = [("float32", "none", True), ("float32 packed", "none", True), ("int8", "int8", True)]
    for name, quant, _ in setups:
        for fast in (False, True):
            if name == "float32 packed" and not fast:
                continue  # packing is part of the fast path
            stack = load_block_stack(path, config, blocks, torch.float32, "cpu", quant, fast_path=fast,
                                     pack_weights=name == "float32 packed")
            rows[(name, fast)] = statistics.median(step_times(stack, config.hidden_size, args.steps)) * 1e3
            sizes[(name, fast)] = (stack.weight_bytes(), stack.packed)
            del stack
    slow = rows[("float32", False)]
    print(f"\nbaseline: transformers' layers, float32 weights: {slow:.1f} ms per decode step "
          f"({sizes[('float32', False)][0] / 2**20:.0f} MiB of weights)")
    print("| weights | fast path decode step | weight bytes | against the float32 baseline |")
    print("|---|---|---|---|")
    for name, _, _ in setups:
        step = rows[(name, True)]
        size, packed = sizes[(name, True)]
        note = f" ({', '.join(f'{n} {k}' for k, n in packed.items())} layers packed)" if packed else ""
        print(f"| {name}{note} | {step:.1f} ms | {size / 2**20:.0f} MiB | {slow / step:.2f}x |")
    print(f"(int8 with transformers' layers: {rows[('int8', False)]:.1f} ms)")

    span = BlockRange(0, 10)  # a server of the 3-server swarms: several sessions' steps batched in one pass
    print(f"\nsessions batched in one decode pass through blocks {span} (float32; median of {args.steps // 2}):")
    print("| sessions | transformers' layers | fast path, packed | fast path per session |")
    print("|---|---|---|---|")
    stacks = {fast: load_block_stack(path, config, span, torch.float32, "cpu", fast_path=fast) for fast in (False, True)}
    for sessions in (1, 4, 8, 16):
        slow_ms, fast_ms = (batch_times(stacks[fast], config.hidden_size, sessions, args.steps // 2) * 1e3
                            for fast in (False, True))
        print(f"| {sessions} | {slow_ms:.1f} ms | {fast_ms:.1f} ms | {fast_ms / sessions:.2f} ms |")
    del stacks

    if cpu_kernels.available():
        print("\ndecode attention alone, 4 sessions (one new token each; this model's heads; median of 200 calls):")
        print("| tokens cached | PyTorch's attention, per session | the kernel, all at once | x |")
        print("|---|---|---|---|")
        for length in (64, 256, 1024, 2048):
            pytorch_s, kernel_s = attention_times(config, 4, length, 200)
            print(f"| {length} | {pytorch_s * 1e6:.0f} us | {kernel_s * 1e6:.0f} us | {pytorch_s / kernel_s:.2f} |")

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
    results = {}
    for name, fast, packed in (("transformers' layers", False, False), ("fast path, dense", True, False),
                               ("fast path, packed", True, True)):
        stack = load_block_stack(path, config, blocks, torch.float32, "cpu", fast_path=fast, pack_weights=packed)
        logits = results[name] = session_logits(stack, model, ids)
        print(f"| server blocks, {name}, a session | {(logits - exact).abs().max():.2e} | "
              f"{(logits - exact).abs().mean():.2e} |")
    same = torch.equal(results["fast path, dense"], results["fast path, packed"])
    print(f"packed and dense fast path logits bit-identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
