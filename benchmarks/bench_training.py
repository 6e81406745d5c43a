"""Training speed: a prompt-tuning step (forward + backward) through a three-server swarm vs the same step locally.

Run: .venv/bin/python benchmarks/bench_training.py [--batch 4] [--seq 128] [--steps 3] [--threads 1]

In one run, with the embedded model in float32: the local step is transformers' model with a trainable soft prompt
prepended to the embeddings (its own weights frozen), loss = next-token cross-entropy, backward, Adam step. The
swarm step is the same through ``AutoDistributedModelForCausalLM(tuning_mode="ptune")`` and a local swarm of three
servers (the local baseline, the client and each server with ``--threads`` torch threads). It prints
seconds per step, tokens per second and the ratio, and checks that the first step's loss agrees.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")  # as `corolla` sets it for its processes; before torch loads

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.testing.local_swarm import LocalSwarm
from corolla.models.checkpoint import resolve_model


def make_batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(100, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def time_steps(step, steps: int) -> tuple[float, float]:
    first_loss = step()  # warm-up, and the loss to compare
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (client and local)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    local.requires_grad_(False)
    ids = make_batch(local.config.vocab_size, args.batch, args.seq)
    tokens = args.batch * args.seq

    torch.manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(args.pre_seq_len, local.config.hidden_size) * 0.02)
    local_opt = torch.optim.Adam([prompt], lr=1e-3)

    def local_step() -> float:
        local_opt.zero_grad()
        embeds = local.model.embed_tokens(ids)
        embeds = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], 1)
        logits = local(inputs_embeds=embeds).logits[:, args.pre_seq_len:]
        loss = loss_of(logits, ids)
        loss.backward()
        local_opt.step()
        return loss.item()

    local_s, local_loss = time_steps(local_step, args.steps)
    print(f"model {path.name}, batch {args.batch} x {args.seq} tokens, soft prompt {args.pre_seq_len}, float32, "
          f"{args.threads} torch thread(s) per process (local, client, each server); median of {args.steps} steps")
    print(f"  local transformers: {local_s:.2f} s/step, {tokens / local_s:.0f} tokens/s")

    with LocalSwarm(model=str(path), num_servers=3, num_threads=args.threads) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
        )
        try:
            with torch.no_grad():
                model.model.prompt_tuning.prompt_embeddings.weight.copy_(torch.randn(args.pre_seq_len, local.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02)
            prompt.data.copy_(model.model.prompt_tuning.prompt_embeddings.weight)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

            def swarm_step() -> float:
                opt.zero_grad()
                loss = loss_of(model(ids).logits, ids)
                loss.backward()
                opt.step()
                return loss.item()

            swarm_s, swarm_loss = time_steps(swarm_step, args.steps)
        finally:
            model.close()
    print(f"  3-server swarm:     {swarm_s:.2f} s/step, {tokens / swarm_s:.0f} tokens/s = {local_s / swarm_s:.2f} x local")
    print(f"  first-step loss: local {local_loss:.5f}, swarm {swarm_loss:.5f}")
    print("\n| setup | s/step | tokens/s | ratio to local |\n|---|---|---|---|")
    print(f"| local transformers | {local_s:.2f} | {tokens / local_s:.0f} | 1.00 |")
    print(f"| 3-server swarm | {swarm_s:.2f} | {tokens / swarm_s:.0f} | {local_s / swarm_s:.2f} |")


if __name__ == "__main__":
    main()
