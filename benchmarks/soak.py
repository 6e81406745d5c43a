"""Soak: clients generating without a pause while servers die and come back, and a hostile peer pesters the swarm.

Run: .venv/bin/python benchmarks/soak.py [--minutes 30] [--clients 4] [--kill-every 60] [--tokens 24]

A loopback swarm of the embedded model: a chain 0:10, 10:20, 20:30 and replicas 0:15, 15:30 (server processes).
``--clients`` client threads (each its own client: its own peer and event loop) generate ``--tokens`` greedy tokens
after prompts drawn in turn from a list, one session after another. Every ``--kill-every`` seconds one server, drawn
at random, is SIGKILLed and started again 10 s later on the same blocks. A hostile peer, all along: it opens streams
and says nothing, sends garbage and half frames, and writes forged records (infinite throughput, blocks past the
model's end, another server's name). Reported: sessions completed, sessions lost (an error reached the caller; goal:
none), sessions whose tokens differ from local greedy (goal: none), and each server's memory (PSS) over time.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")

import argparse
import asyncio
import random
import signal
import threading
import time
from collections import Counter

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla import AutoDistributedModelForCausalLM, ClientConfig
from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord, ServerState
from corolla.models.checkpoint import model_dht_prefix
from corolla.models.embedded import embedded_model_dir
from corolla.net.loop import LoopThread
from corolla.net.peer import Peer, PeerConfig
from corolla.testing.local_swarm import LocalSwarm
from corolla.wire.codec import MAGIC, PREFIX
from corolla.wire.identity import Identity
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL
from corolla.wire.records import encode_record, models_key, servers_key

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "The three laws of robotics are",
           "My favourite recipe for pancakes", "In 1969, the first humans", "Water boils at",
           "The largest planet in the solar system", "Photosynthesis is"]
SPANS = [BlockRange(0, 10), BlockRange(10, 20), BlockRange(20, 30), BlockRange(0, 15), BlockRange(15, 30)]
CONFIG = ClientConfig(step_timeout_s=5.0, wait_for_blocks_s=60.0, refresh_period_s=2.0)


def pss_mb(pid: int) -> float:
    total = 0
    try:
        process = psutil.Process(pid)
        for proc in [process, *process.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        return 0.0
    return total / 2**20


def client_loop(index, model_dir, peers, expected, ids_of, tokens, stop, stats, errors):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=peers, client_config=CONFIG,
                                                            torch_dtype=torch.float32)
    try:
        turn = index
        while not stop.is_set():
            prompt = PROMPTS[turn % len(PROMPTS)]
            turn += 1
            try:
                out = model.generate(ids_of[prompt], max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                stats["completed"] += 1
                if out[0, ids_of[prompt].shape[1]:].tolist() != expected[prompt]:
                    stats["different"] += 1
            except Exception as exc:  # reported: a lost session
                stats["lost"] += 1
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        model.close()


async def pester(peer: Peer, targets: list[str], prefix: str, identity: Identity) -> None:
    """One round of hostility against every server."""
    now = peer.now()
    # the current protocol version: the records must be refused for what is wrong with them, not for their version
    version = PROTOCOL_VERSION
    forged = [ServerRecord(identity.peer_id, BlockRange(0, 30), ServerState.ONLINE, float("inf"), "float32", version,
                           100),
              ServerRecord(identity.peer_id, BlockRange(0, 10**9), ServerState.ONLINE, 1e3, "float32", version, 100)]
    items = [(servers_key(prefix), identity.peer_id, encode_record(forged[0])),
             (models_key(identity.peer_id), identity.peer_id, encode_record(forged[1]))]
    if targets:
        fake = encode_record(ServerRecord(targets[0], BlockRange(0, 30), ServerState.ONLINE, 1e6, "float16", version,
                                          1))
        items.append((servers_key(prefix), identity.peer_id + "-2", fake))
    try:
        await peer.announce_many(items, now + 60)
    except Exception:
        pass
    for target in targets:
        try:
            reader, writer = await peer.open_stream(target, RPC_PROTOCOL)
            kind = random.choice(["silent", "garbage", "half", "huge"])
            if kind == "garbage":
                writer.write(os.urandom(200))
            elif kind == "half":
                writer.write(PREFIX.pack(MAGIC, 10, 10**6) + b"{}" * 5)
            elif kind == "huge":
                writer.write(PREFIX.pack(MAGIC, 2**31, 2**40))
            await asyncio.sleep(0.1)
            writer.close()
        except Exception:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids_of = {p: tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS}
    expected = {p: local.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                  do_sample=False)[0, ids.shape[1]:].tolist() for p, ids in ids_of.items()}
    del local
    stats, errors = Counter(), []
    memory: list[tuple[float, dict]] = []
    events: list[str] = []
    with LocalSwarm(model=model_dir, spans=SPANS, num_threads=1) as swarm:
        started = time.monotonic()
        span_of = {child.name: span for child, span in zip(swarm.servers, SPANS)}
        stop = threading.Event()
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(i, model_dir, swarm.initial_peers, expected, ids_of, args.tokens, stop,
                                          stats, errors)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        loop = LoopThread("hostile")
        identity = Identity.generate()
        hostile = loop.run(Peer.create(PeerConfig(initial_peers=tuple(swarm.initial_peers), identity=identity)), 60)
        prefix = model_dht_prefix(model_dir)
        next_kill = started + args.kill_every
        next_sample = started
        try:
            while time.monotonic() - started < args.minutes * 60:
                now = time.monotonic()
                if now >= next_sample:
                    memory.append((now - started, {c.name: pss_mb(c.process.pid) for c in swarm.servers
                                                   if c.process.poll() is None}))
                    next_sample = now + 30
                if now >= next_kill:
                    alive = [c for c in swarm.servers if c.process.poll() is None]
                    victim = random.choice(alive)
                    os.killpg(victim.process.pid, signal.SIGKILL)
                    events.append(f"{now - started:6.0f} s: SIGKILL {victim.name} ({span_of[victim.name]})")
                    time.sleep(10)
                    restarted = swarm.start_server(span_of[victim.name])
                    span_of[restarted.name] = span_of[victim.name]
                    events.append(f"{time.monotonic() - started:6.0f} s: restarted as {restarted.name}")
                    next_kill = time.monotonic() + args.kill_every
                targets = [c.peer_id for c in swarm.servers if c.process.poll() is None and c.peer_id]
                loop.run(pester(hostile, targets, prefix, identity), 60)
                time.sleep(2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(180)
            loop.run(hostile.shutdown(), 30)
            loop.stop()
        elapsed = time.monotonic() - started
    print(f"soak: {elapsed / 60:.1f} min, {args.clients} clients, {args.tokens} greedy tokens a session, a server "
          f"killed every {args.kill_every:.0f} s and restarted 10 s later, a hostile peer all along")
    print(f"  sessions completed {stats['completed']}, lost {stats['lost']}, tokens unlike local greedy "
          f"{stats['different']}")
    for error in errors[:10]:
        print(f"    lost: {error}")
    for event in events:
        print(f"  {event}")
    print("  server memory (PSS, MB) over time:")
    for at, sample in memory:
        print(f"    {at:6.0f} s: " + ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(sample.items())))
    return 0 if stats["lost"] == 0 and stats["different"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
