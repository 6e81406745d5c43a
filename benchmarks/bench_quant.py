"""Quantized server weights on the embedded model: memory, speed and quality of each mode, in one run.

Run: .venv/bin/python benchmarks/bench_quant.py [--modes none int8 int4] [--tokens 2048] [--new-tokens 64]

Quality (in this process, one torch thread): the 30 blocks loaded as a server loads them (``load_block_stack`` with
``--quant``), with the model's own embeddings, norm and head. Perplexity over a fixed English text (Python's own
documentation topics, ``pydoc_data.topics``, the first ``--tokens`` tokens, in windows of 512), its change relative
to float32, and greedy agreement with float32 over 128 new tokens: top-1 agreement with float32's tokens fed in
(teacher-forced) and the number of tokens generated before free-running greedy text first differs.

Speed and memory: a 3-server loopback swarm per mode (``corolla serve --quant MODE``, one thread per process),
greedy decode tokens/s of the client (median of 3), local transformers' float32 generate() measured in the same run
as the baseline, and each server's PSS (with its libp2p daemon) against the bytes of the weights it holds.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")

import argparse
import math
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.core.blocks import BlockRange
from corolla.models.checkpoint import load_config, resolve_model
from corolla.models.stack import load_block_stack
from corolla.testing.local_swarm import LocalSwarm, split_blocks

from bench_inference import pss_bytes  # noqa: E402 - a sibling script (benchmarks/ is on sys.path when run)

PROMPT = "Write a short story about a robot who learns to paint."
WINDOW = 512


def fixed_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


class Pipeline:
    """The model's client parts around a stack of all its blocks, loaded with ``quant``."""

    def __init__(self, local, path, config, quant: str):
        self.local = local
        self.stack = load_block_stack(path, config, BlockRange(0, config.num_hidden_layers), torch.float32, "cpu",
                                      quant)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        hidden = self.stack(self.local.model.embed_tokens(ids), cache=cache)
        return self.local.lm_head(self.local.model.norm(hidden))

    def perplexity(self, ids: torch.Tensor) -> float:
        total, count = 0.0, 0
        for start in range(0, ids.shape[1] - 1, WINDOW):
            window = ids[:, start: start + WINDOW + 1]
            logits = self.logits(window[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
            total, count = total + float(loss), count + window.shape[1] - 1
        return math.exp(total / count)

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice with end-of-sequence ruled out, as generate(min_new_tokens=...) made the reference."""
        logits = logits.clone()
        logits[..., self.local.generation_config.eos_token_id] = float("-inf")
        return logits.argmax(-1)

    def teacher_forced_agreement(self, prompt: torch.Tensor, reference: torch.Tensor) -> float:
        logits = self.logits(torch.cat([prompt, reference], dim=1))[:, prompt.shape[1] - 1: -1]
        return float((self.next_tokens(logits) == reference).float().mean())

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new: int) -> torch.Tensor:
        cache = self.stack.new_cache()
        logits = self.logits(prompt, cache)
        tokens = []
        for _ in range(new):
            token = self.next_tokens(logits[:, -1:])
            tokens.append(token)
            logits = self.logits(token, cache)
        return torch.cat(tokens, dim=1)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the fixed text for perplexity")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per timed generation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-swarm", action="store_true", help="quality and weight bytes only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    path = resolve_model(None)
    config = load_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = tokenizer(fixed_text(), return_tensors="pt")["input_ids"][:, : args.tokens]
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = local.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)[:, prompt.shape[1]:]
    print(f"embedded model, {config.num_hidden_layers} blocks; perplexity over {text.shape[1]} tokens of "
          f"pydoc_data.topics in windows of {WINDOW}; greedy agreement over 128 new tokens")

    results = {}
    for mode in args.modes:
        pipeline = Pipeline(local, path, config, mode)
        ppl = pipeline.perplexity(text)
        agreement = pipeline.teacher_forced_agreement(prompt, reference)
        free = pipeline.greedy(prompt, 128)
        same = (free[0] == reference[0]).int()
        first_diff = int(same.argmin()) if not bool(same.all()) else 128
        per_block = pipeline.stack.weight_bytes() / config.num_hidden_layers
        results[mode] = dict(ppl=ppl, agreement=agreement, first_diff=first_diff, block_mb=per_block / 2**20)
        print(f"  {mode:5s}: perplexity {ppl:.3f}, top-1 agreement {agreement:.3f}, free-running greedy equal for "
              f"{first_diff} tokens, {per_block / 2**20:.2f} MB per block", flush=True)
        del pipeline
    base = results.get("none", {}).get("ppl")

    local_tps = None
    if not args.skip_swarm:
        local_tps = args.new_tokens / timed(
            lambda: local.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False), args.repeats)
        print(f"local transformers float32 generate(): {local_tps:.1f} tokens/s")
        spans = split_blocks(config.num_hidden_layers, 3)
        for mode in args.modes:
            with LocalSwarm(model=str(path), num_servers=3, num_threads=1,
                            extra_server_args=["--quant", mode]) as swarm:
                model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
                try:
                    seconds = timed(lambda: model.generate(prompt, max_new_tokens=args.new_tokens,
                                                           min_new_tokens=args.new_tokens, do_sample=False),
                                    args.repeats)
                finally:
                    model.close()
                pss = [pss_bytes(child.process.pid) / 2**20 for child in swarm.servers]
            results[mode].update(tps=args.new_tokens / seconds, pss=pss,
                                 weights=[results[mode]["block_mb"] * len(span) for span in spans])
            print(f"  {mode:5s}: 3-server swarm {results[mode]['tps']:.1f} tokens/s; server PSS "
                  + ", ".join(f"{p:.0f} MB ({w:.0f} MB of weights)" for p, w in zip(pss, results[mode]["weights"])),
                  flush=True)

    print("\n| weights | MB per block | perplexity | change vs float32 | top-1 agreement | greedy equal for | "
          "3-server tokens/s | vs local float32 | server PSS (weights) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        change = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else "-"
        swarm = (f"{r['tps']:.1f} | {r['tps'] / local_tps:.2f} | "
                 + "; ".join(f"{p:.0f} ({w:.0f}) MB" for p, w in zip(r["pss"], r["weights"]))) if "tps" in r else "- | - | -"
        print(f"| {mode} | {r['block_mb']:.2f} | {r['ppl']:.3f} | {change} | {r['agreement']:.3f} | "
              f"{r['first_diff']} tokens | {swarm} |")


if __name__ == "__main__":
    main()
