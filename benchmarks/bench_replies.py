"""Replies lost on the way: single exchanges (forward requests, half of them refused with an error) from fresh clients
to a real two-server swarm on loopback, while two more threads keep starting clients, asking once and leaving.

Run: .venv/bin/python benchmarks/bench_replies.py [--seconds 240] [--rounds 2] [--close-wait 0 10] [--tokens 3]

For each ``--close-wait`` value (what ``corolla serve --close-wait`` sets: how long a server keeps an answered stream
open for its requester to close it; 0 closes at once) and each round, it starts a fresh swarm of the tiny random
Llama and counts, over ``--seconds``, the calls answered (a reply or the expected error) and those whose reply was
lost: the stream ended with no reply at all ("the server closed the stream without replying") or part of one ("the
stream broke"). ``--tokens`` is the length of each request's hidden states (64 values a token, as the reply's).
The values take turns round by round, so a slow minute of the machine does not land on one of them only.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import time

import torch

from corolla.client.config import ClientConfig
from corolla.client.rpc import call
from corolla.client.swarm import RemoteSwarm, hivemind_client
from corolla.core.blocks import BlockRange
from corolla.core.errors import RemoteError
from corolla.testing.local_swarm import LocalSwarm
from corolla.testing.tiny import save_tiny_model
from corolla.wire.messages import ForwardRequest

HIDDEN = 64
CALLS_PER_CLIENT = 12
LOST = ("closed the stream without replying", "the stream broke")


def new_client(swarm: LocalSwarm) -> tuple[RemoteSwarm, object, BlockRange]:
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers))
    client = RemoteSwarm(config, "replies", 4, hivemind_client(config))
    try:
        record, span = client.run(client.plan_inference(BlockRange(0, 2)))[0]
    except BaseException:
        client.close()
        raise
    return client, record, span


def ask(client: RemoteSwarm, record, request, counts: collections.Counter, refused: bool) -> None:
    try:
        client.run(call(client.transport, record, request, 30))
        counts["answered"] += 1
    except RemoteError as exc:
        if any(words in str(exc) for words in LOST):
            counts["lost"] += 1
        elif refused and "prompts must be" in str(exc):
            counts["answered"] += 1
        else:
            counts["other errors"] += 1
            print(f"  unexpected: {exc}", flush=True)


def one_round(model_dir: str, close_wait: float, seconds: float, tokens: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    spans = [BlockRange(0, 2), BlockRange(2, 4)]
    with LocalSwarm(model=model_dir, spans=spans, dht_prefix="replies",
                    extra_server_args=["--close-wait", f"{close_wait:g}"]) as swarm:
        stop = time.monotonic() + seconds

        def churn() -> None:  # clients that come, ask once, and go (as in a busy swarm)
            while time.monotonic() < stop:
                try:
                    client, record, span = new_client(swarm)
                except Exception as exc:
                    counts["clients that failed to start"] += 1
                    print(f"  a client did not start: {exc}", flush=True)
                    continue
                try:
                    ask(client, record, ForwardRequest(span, torch.randn(1, tokens, HIDDEN)), counts, False)
                finally:
                    client.close()

        threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        while time.monotonic() < stop:
            client, record, span = new_client(swarm)
            try:
                for i in range(CALLS_PER_CLIENT):
                    refused = i % 2 == 0  # prompts for 5 blocks on a 2-block span: the server answers an error
                    prompts = torch.randn(5, 1, 2, HIDDEN) if refused else None
                    ask(client, record, ForwardRequest(span, torch.randn(1, tokens, HIDDEN), prompts=prompts),
                        counts, refused)
            finally:
                client.close()
        for thread in threads:
            thread.join()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="length of each round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per --close-wait value")
    parser.add_argument("--close-wait", type=float, nargs="+", default=[0.0, 10.0])
    parser.add_argument("--tokens", type=int, default=3, help="tokens of hidden states per request and reply")
    args = parser.parse_args()
    torch.set_num_threads(1)
    totals = {wait: collections.Counter() for wait in args.close_wait}
    with tempfile.TemporaryDirectory(prefix="bench-replies-") as folder:
        save_tiny_model("llama", folder, num_layers=4)
        for round_index in range(args.rounds):
            for wait in args.close_wait:
                counts = one_round(folder, wait, args.seconds, args.tokens)
                totals[wait].update(counts)
                print(f"round {round_index + 1}, --close-wait {wait:g}: {dict(counts)}", flush=True)
    print(f"\n{'--close-wait':>12} {'calls':>8} {'lost':>6} {'one lost in':>12}")
    for wait, counts in totals.items():
        calls = counts["answered"] + counts["lost"] + counts["other errors"]
        rate = f"{calls / counts['lost']:,.0f}" if counts["lost"] else "none lost"
        print(f"{wait:>12g} {calls:>8} {counts['lost']:>6} {rate:>12}")


if __name__ == "__main__":
    main()
