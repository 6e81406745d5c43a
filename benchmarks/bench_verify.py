"""What checking servers' outputs costs, and how fast it catches a liar.

Run: .venv/bin/python benchmarks/bench_verify.py [--new-tokens 64] [--trials 20]

Cost: the embedded model on a loopback swarm of five server processes (0:10, 10:20, 20:30 and replicas 0:15,
15:30, so every span has another server to check it), one session generating ``--new-tokens`` greedy tokens with
``verify_fraction`` 0 (no checks), 0.05 and the default (0.2), alternating, median of three each, in one run.

Detection: in one process (real servers on the in-memory network), the 10:20 server of the embedded model adds
noise to everything it computes; ``--trials`` sessions with different seeds each generate until the lie is caught
(or ``--new-tokens`` tokens): how many steps it took, at the default rate, and whether the tokens equalled local
transformers'.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla import AutoDistributedModelForCausalLM, ClientConfig
from corolla.core.blocks import BlockRange
from corolla.models.embedded import embedded_model_dir
from corolla.testing.inprocess import InProcessSwarm
from corolla.testing.local_swarm import LocalSwarm

PROMPT = "Write a short story about a robot who learns to paint."
SPANS = [BlockRange(0, 10), BlockRange(10, 20), BlockRange(20, 30), BlockRange(0, 15), BlockRange(15, 30)]
RATES = tuple(sorted({0.0, 0.05, ClientConfig().verify_fraction}))  # none, a low rate, the default


def cost(model_dir: str, ids, new_tokens: int) -> None:
    with LocalSwarm(model=model_dir, spans=SPANS, num_threads=1) as swarm:
        models = {rate: AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=swarm.initial_peers, client_config=ClientConfig(verify_fraction=rate))
            for rate in RATES}
        times = {rate: [] for rate in RATES}
        checks = {rate: 0 for rate in RATES}
        try:
            for model in models.values():
                model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            for _ in range(3):
                for rate, model in models.items():
                    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                        started = time.perf_counter()
                        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                        times[rate].append(time.perf_counter() - started)
                        checks[rate] += session.checks["run"]
        finally:
            for model in models.values():
                model.close()
    base = new_tokens / statistics.median(times[0.0])
    print(f"cost: {new_tokens} greedy tokens through 5 server processes (3-server chain + 2 replicas), median of 3")
    for rate in RATES:
        speed = new_tokens / statistics.median(times[rate])
        print(f"  verify_fraction {rate:<5} {speed:6.2f} tokens/s  x{speed / base:.3f} of no checks  "
              f"({checks[rate] / 3:.1f} checks a generation)")


def detection(model_dir: str, ids, new_tokens: int, trials: int) -> None:
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = local.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    rate = ClientConfig().verify_fraction
    caught_at, honest = [], 0
    with InProcessSwarm(model_dir, dht_prefix="liar") as swarm:
        for span in SPANS[:3]:
            swarm.start_server(span, throughput=1000.0)
        for span in (*SPANS[3:], BlockRange(10, 20)):
            swarm.start_server(span, throughput=10.0)
        compute = swarm.servers[1].handler.compute  # the 10:20 primary lies from now on
        steps = compute.session_steps

        def lying(items):
            return [r if isinstance(r, BaseException) else r + torch.randn_like(r) * r.abs().mean() * 0.1
                    for r in steps(items)]

        compute.session_steps = lying
        for seed in range(trials):
            model = swarm.client(client_config=ClientConfig(verify_fraction=rate, verify_seed=seed),
                                 torch_dtype=torch.float32)
            try:
                with model.inference_session(max_length=ids.shape[1] + new_tokens + 1) as session:
                    got = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                    if session.rejections:
                        caught_at.append(session.rejections[0][0])
                honest += got.tolist() == expected.tolist()
            finally:
                model.close()
    print(f"\ndetection: the 10:20 server adds noise to every step; verify_fraction {rate}; {trials} sessions of "
          f"{new_tokens} tokens (step 1 is the prompt)")
    if caught_at:
        print(f"  caught in {len(caught_at)}/{trials} sessions, at step {min(caught_at)} to {max(caught_at)} "
              f"(median {statistics.median(caught_at):.0f}); tokens equal local transformers in {honest}/{trials}")
    else:
        print(f"  never caught; tokens equal local transformers in {honest}/{trials}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = str(embedded_model_dir())
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt")["input_ids"]
    cost(model_dir, ids, args.new_tokens)
    detection(model_dir, ids, args.new_tokens, args.trials)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
