"""Inference speed and server memory: local transformers vs. a one-server and a three-server swarm on loopback.

Run: .venv/bin/python benchmarks/bench_inference.py [--new-tokens 64] [--threads 1 2] [--model PATH]
     [--quant none int8] [--paths fast dense slow]

For each torch thread count (per process) it measures, in this one run: transformers' local greedy generate(),
then the same prompt through a local swarm of 1 and of 3 servers (each server a separate process with that
many threads; the client in this process). It prints tokens/s, the ratio to local, and each server's memory
(PSS summed over the server and its child processes, e.g. its libp2p daemon) against its weights' bytes as it holds
them (packed, quantized or float32).

Server paths: ``fast`` is the default (the fast path; float32 weights that lie on a grid held packed: the embedded
model's do, see ``corolla.models.packing``), ``dense`` the fast path with ``--no-weight-packing`` (what a float32
checkpoint without such a grid gets), ``slow`` is ``--no-fast-path``.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")  # as `corolla` sets it for its processes; before torch loads

import argparse
import json
import statistics
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.testing.local_swarm import LocalSwarm, split_blocks
from corolla.models.checkpoint import load_config, resolve_model

PROMPT = "Write a short story about a robot who learns to paint."


def pss_bytes(pid: int) -> int:
    """PSS of a process and all its descendants."""
    total = 0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def held_block_bytes(path: Path, config, quant: str, server_path: str) -> int:
    """Bytes of one block's weights as a server holds them with ``--quant`` on ``server_path`` (packed or not; blocks
    of these models are alike)."""
    from corolla.core.blocks import BlockRange
    from corolla.models.stack import load_block_stack

    return load_block_stack(path, config, BlockRange(0, 1), torch.float32, "cpu", quant,
                            fast_path=server_path != "slow", pack_weights=server_path == "fast").weight_bytes()


PATH_ARGS = {"fast": [], "dense": ["--no-weight-packing"], "slow": ["--no-fast-path"]}
PATH_NAMES = {"fast": "", "dense": ", --no-weight-packing", "slow": ", --no-fast-path"}


def timed_generate(model, ids, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", nargs="+", default=["none"],
                        help="server weight modes to measure, each a swarm of its own (none, int8, int4)")
    parser.add_argument("--paths", nargs="+", default=["fast"], choices=tuple(PATH_ARGS),
                        help="server paths to measure: fast (the default path), dense (the fast path without "
                             "packed weights, --no-weight-packing) and/or slow (--no-fast-path)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    path = resolve_model(args.model)
    config = load_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    print(f"model {path.name}: {config.num_hidden_layers} blocks, prompt {ids.shape[1]} tokens, "
          f"{args.new_tokens} new tokens, greedy, float32, median of {args.repeats}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        local_tps, expected = timed_generate(local, ids, args.new_tokens, args.repeats)
        rows.append({"threads": threads, "setup": "local transformers", "tok_s": local_tps, "ratio": 1.0})
        print(f"\n[{threads} thread(s) per process] local transformers: {local_tps:.1f} tok/s")
        for servers, quant, server_path in [(n, q, p) for p in args.paths for q in args.quant for n in args.servers]:
            extra = ["--quant", quant] + PATH_ARGS[server_path]
            with LocalSwarm(model=str(path), num_servers=servers, num_threads=threads,
                            extra_server_args=extra) as swarm:
                model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
                try:
                    tps, got = timed_generate(model, ids, args.new_tokens, args.repeats)
                finally:
                    model.close()
                same = got.tolist() == expected.tolist()
                memory = []
                for child, span in zip(swarm.servers, split_blocks(config.num_hidden_layers, servers)):
                    held = len(span) * held_block_bytes(path, config, quant, server_path)
                    memory.append({"blocks": str(span), "pss_mb": pss_bytes(child.process.pid) / 2**20,
                                   "weights_mb": held / 2**20})
            setup = (f"{servers}-server swarm" + ("" if quant == "none" else f", {quant} weights")
                     + PATH_NAMES[server_path])
            row = {"threads": threads, "setup": setup, "tok_s": tps, "ratio": tps / local_tps,
                   "same_tokens": same, "servers": memory}
            rows.append(row)
            print(f"  {setup}: {tps:.1f} tok/s = {tps / local_tps:.2f} x local; "
                  f"tokens identical to local: {same}")
            for m in memory:
                print(f"    server {m['blocks']:>6}: PSS {m['pss_mb']:.0f} MB for {m['weights_mb']:.0f} MB of weights "
                      f"(+{m['pss_mb'] - m['weights_mb']:.0f} MB)")
    print("\n| threads/process | setup | tokens/s | ratio to local | server PSS vs weights |")
    print("|---|---|---|---|---|")
    for row in rows:
        memory = "; ".join(f"{m['blocks']}: {m['pss_mb']:.0f} MB / {m['weights_mb']:.0f} MB" for m in row.get("servers", []))
        print(f"| {row['threads']} | {row['setup']} | {row['tok_s']:.1f} | {row['ratio']:.2f} | {memory or '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
