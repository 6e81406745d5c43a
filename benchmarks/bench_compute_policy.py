"""How the servers' compute-thread scheduling moves eight concurrent sessions, measured in ONE swarm.

Run: .venv/bin/python benchmarks/bench_compute_policy.py [--variants idle nice5 nice0 ...] [--rounds 10]

This machine's speed drifts by 10-20% within minutes, more than the effects sought here, so comparing two runs of
bench_concurrency cannot tell them apart. This benchmark keeps one 3-server loopback swarm of the embedded model and
eight client processes that stay up (no process start-up inside the timing), and switches the servers' compute
threads (named ``corolla-compute``) between the variants between waves, in alternating order (ABC, CBA, ...). A wave
is every client generating 64 greedy tokens at once; its figure is all their tokens over the wave's span. It prints
each variant's waves and each variant's paired difference against the first one (mean, its standard error, and
the waves it won), so that drift hits every variant alike. Run the first variant twice (``--variants idle idle``)
to see what noise alone gives.

Variants: ``idle`` (``SCHED_IDLE``, the default of CPU servers), ``niceN`` (``SCHED_OTHER`` at nice N, 0-19;
``--no-compute-idle`` servers run at nice 5), ``batchN`` (``SCHED_BATCH`` at nice N).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_concurrency import PROMPTS, _read_json, warm_client  # noqa: E402 - a sibling script on sys.path

NEW_TOKENS = 64


def client_main(config: dict) -> None:
    """One user: load the model once, then generate on every "go" line, printing the span of each."""
    model, ids = warm_client(config)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        started = time.time()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=False)
        print(json.dumps({"start": started, "end": time.time(), "tokens": out.shape[1] - ids.shape[1]}), flush=True)
    model.close()


def _policy(name: str) -> tuple[int, int]:
    """A variant's (scheduling policy, nice)."""
    if name == "idle":
        return os.SCHED_IDLE, 0
    for prefix, policy in (("nice", os.SCHED_OTHER), ("batch", os.SCHED_BATCH)):
        if name.startswith(prefix) and name[len(prefix):].isdigit() and 0 <= int(name[len(prefix):]) <= 19:
            return policy, int(name[len(prefix):])
    raise SystemExit(f"unknown variant {name!r}: idle, niceN or batchN (N in 0..19)")


def _compute_threads(pids: list[int]) -> list[int]:
    threads = []
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                    if comm.read().strip() == "corolla-compute":
                        threads.append(int(tid))
            except OSError:
                pass
    return threads


def _apply(threads: list[int], variant: str) -> None:
    policy, nice = _policy(variant)
    for tid in threads:
        os.sched_setscheduler(tid, policy, os.sched_param(0))
        if policy != os.SCHED_IDLE:
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["nice5", "idle"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=8)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("per-thread scheduling policies are Linux's")
    for variant in args.variants:
        _policy(variant)

    from corolla.models.checkpoint import resolve_model
    from corolla.testing.local_swarm import LocalSwarm

    model = str(resolve_model(None))
    order = list(args.variants)  # a variant given twice runs twice per round (an A/A check)
    runs: dict[int, list[float]] = {index: [] for index in range(len(order))}
    with LocalSwarm(model=model, num_servers=3, num_threads=1) as swarm:
        # each server's compute thread, and any thread started from it (it inherits the name, as it inherits the
        # policy: torch's own threads)
        threads = _compute_threads([server.process.pid for server in swarm.servers])
        if len(threads) < 3:
            raise SystemExit(f"found {len(threads)} threads named corolla-compute, fewer than the 3 servers")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        clients = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "client", json.dumps(
                {"model": model, "initial_peers": swarm.initial_peers, "prompt": PROMPTS[i % len(PROMPTS)]})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            for i in range(args.sessions)]
        try:
            for client in clients:
                _read_json(client)

            def wave() -> float:
                for client in clients:
                    client.stdin.write("go\n")
                    client.stdin.flush()
                spans = [_read_json(client) for client in clients]
                return sum(s["tokens"] for s in spans) / (max(s["end"] for s in spans) - min(s["start"] for s in spans))

            wave()
            print(f"3-server swarm, {args.sessions} persistent clients, {NEW_TOKENS} greedy tokens each per wave; "
                  f"variants {' '.join(args.variants)}", flush=True)
            for round_index in range(args.rounds):
                indices = list(range(len(order)))
                for index in indices if round_index % 2 == 0 else indices[::-1]:
                    _apply(threads, order[index])
                    time.sleep(0.3)
                    rate = wave()
                    runs[index].append(rate)
                    print(f"  round {round_index + 1}: {order[index]:>7} {rate:6.1f} tokens/s", flush=True)
        finally:
            for client in clients:
                try:
                    client.stdin.close()
                except OSError:
                    pass
            for client in clients:
                try:
                    client.wait(30)
                except subprocess.TimeoutExpired:
                    client.kill()
                    client.wait(10)
    base = runs[0]
    for index, variant in enumerate(order):
        rates = runs[index]
        line = f"{variant:>7}: mean {statistics.mean(rates):6.1f} tokens/s, median {statistics.median(rates):6.1f}"
        if index:
            diffs = [b - a for a, b in zip(base, rates)]
            error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            line += (f"; against {order[0]}: {statistics.mean(diffs):+.1f} +- {error:.1f} tokens/s, "
                     f"won {sum(d > 0 for d in diffs)} of {len(diffs)} waves")
        print(line, flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "client":
        client_main(json.loads(sys.argv[2]))
    else:
        main()
