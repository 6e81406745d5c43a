"""Inference over distance: a three-server chain whose hosts are network namespaces with emulated delay and rate.

Run (root; see corolla/testing/netns.py): .venv/bin/python benchmarks/bench_distance.py [--new-tokens 24]
    [--recovery-tokens 40] [--kill-after 10] [--no-recovery] [--speculative-tokens 48] [--no-speculative]
    [--no-throughput]
    [--keep-logs DIR]

Hosts: ``dht``, ``s0``/``s1``/``s2`` (blocks 0:10, 10:20, 20:30), ``client``, and for the recovery part ``r0``/``r1``
(a second chain: 0:15, 15:30). Every impairment applies to what a host sends, so the RTT between two hosts is the
sum of their one-way delays. In one run, on the same swarm, it measures greedy ``generate()`` of the embedded model
(float32, one token per step) from the client host:

* local: no delay, no rate limit (the namespaces and the switch only);
* (a) every host 2 ms one-way: 4 ms RTT between any two hosts;
* (b) every host 50 ms one-way and 100 Mbit/s upload: 100 ms RTT;

printing decode steps per second (from token timestamps taken by a transformers streamer, prefill excluded), the
ratio to local, and the first-token time; transformers' local generate() in the client process is a reference.
The local phase runs again last: if the two local figures differ much, the machine's load changed during the run.

Recovery (under (a)): with the second chain up, the client generates ``--recovery-tokens`` once unbroken, then again
and, right after token ``--kill-after``, SIGKILLs the process group of the server in the middle of the chain its
session uses. It reports the gap between the tokens before and after the kill against the median gap, and whether
the tokens equal the unbroken run -- or "recovery: failed: <error>" if the generation raised.

Relay against client-hub (``--no-relay`` skips it): the same greedy decoding with every step relayed server to
server and with the client as the hub of every step (``ClientConfig(relay=False)``), at 0, 25 and 100 ms RTT on
every link, through the three-server chain and through a six-server chain (hosts ``t0``..``t5``, blocks 0:5 ...
25:30, its own DHT prefix); the relay's median step against the compute (its no-delay step) plus (servers + 1)
one-way delays.

Speculative decoding (under (b), then with no delay): greedy ``generate()`` of ``--speculative-tokens`` tokens by
the plain distributed model, by ``AutoDistributedSpeculativeModel`` with the embedded model itself as the draft (it
agrees with the swarm on nearly every token) and with a tiny random model of the same vocabulary as the draft (it
almost never agrees), in one client process; tokens per second over the whole call (prefill included), the ratio
to plain, rounds (verification steps), drafts accepted, and whether the tokens equal plain greedy.

The client always runs on its own host: this file's ``client`` mode, started under ``ip netns exec``, prints JSON.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")  # as `corolla` sets it for its processes; before torch loads

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

PROMPT = "The history of the printing press begins"
PHASES = [  # (label, one-way delay per host in ms, upload rate per host in Mbit/s)
    ("local (no delay, no rate limit)", 0.0, None),
    ("(a) 4 ms RTT (2 ms one-way per host)", 2.0, None),
    ("(b) 100 ms RTT, 100 Mbit/s (50 ms one-way per host)", 50.0, 100.0),
    ("local again (drift check: other load on the machine)", 0.0, None),
]


# ---------------------------------------------------------------------------------------------- client side


def _session_chain(session) -> list[str]:
    """Peer ids of the servers a session runs on, in chain order, whatever the session's internals are."""
    chain = getattr(session, "chain", None)
    if chain:
        return [entry[0] if isinstance(entry, tuple) else getattr(entry, "peer_id", str(entry)) for entry in chain]
    for attr in ("_hops", "_streams"):
        items = getattr(session, attr, None)
        if items:
            return [item.record.peer_id for item in items]
    return []


def _make_streamer(on_token):
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Records the time each new token arrives; the first ``put`` is the prompt."""

        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []
            self._prompt_seen = False

        def put(self, value):
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(time.monotonic())
            self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
            on_token(len(self.tokens))

        def end(self):
            pass

    return TimingStreamer()


def _decode_stats(started: float, times: list[float]) -> dict:
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {
        "first_token_s": times[0] - started,
        "steps_per_s": len(gaps) / (times[-1] - times[0]) if gaps else None,
        "median_step_s": statistics.median(gaps) if gaps else None,
    }


def client_main(config: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    result: dict = {"prompt_tokens": input_ids.shape[1]}
    if config.get("local_reference"):
        local = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
        local.generate(input_ids, max_new_tokens=2, do_sample=False)  # warm-up
        streamer = _make_streamer(lambda n: None)
        started = time.monotonic()
        local.generate(input_ids, max_new_tokens=config["new_tokens"], do_sample=False, streamer=streamer)
        result["local_transformers"] = {**_decode_stats(started, streamer.times), "tokens": streamer.tokens}
        del local
    if config["mode"] == "relay":
        result.update(_relay_against_hub(input_ids, config))
        return result
    model = AutoDistributedModelForCausalLM.from_pretrained(
        config["model"], initial_peers=config["initial_peers"], torch_dtype=torch.float32
    )
    try:
        model.generate(input_ids, max_new_tokens=2, do_sample=False)  # warm-up: connections, route, DHT lookups
        if config["mode"] == "speculative":
            result.update(_speculative(model, input_ids, config))
        elif config["mode"] == "throughput":
            streamer = _make_streamer(lambda n: None)
            started = time.monotonic()
            model.generate(input_ids, max_new_tokens=config["new_tokens"], do_sample=False, streamer=streamer)
            result["swarm"] = {**_decode_stats(started, streamer.times), "tokens": streamer.tokens}
        else:
            result.update(_recovery(model, input_ids, config))
    finally:
        model.close()
    return result


def _relay_against_hub(input_ids, config: dict) -> dict:
    """Greedy decode steps of the same chain with the client as the hub of every step, then with relay."""
    import torch

    from corolla import AutoDistributedModelForCausalLM, ClientConfig

    runs = {}
    for name, relay in (("hub", False), ("relay", True)):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            config["model"], initial_peers=config["initial_peers"], torch_dtype=torch.float32,
            dht_prefix=config.get("prefix"), client_config=ClientConfig(relay=relay))
        try:
            model.generate(input_ids, max_new_tokens=2, do_sample=False)  # warm-up: connections, route
            streamer = _make_streamer(lambda n: None)
            started = time.monotonic()
            with model.inference_session(max_length=input_ids.shape[1] + config["new_tokens"]) as session:
                model.generate(input_ids, max_new_tokens=config["new_tokens"], do_sample=False, streamer=streamer)
                chain = len(session.chain)
            runs[name] = {**_decode_stats(started, streamer.times), "tokens": streamer.tokens, "chain": chain}
        finally:
            model.close()
    return {"runs": runs}


def _speculative(plain, input_ids, config: dict) -> dict:
    """Plain greedy decoding against speculative decoding with a draft that agrees and one that does not."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from corolla import AutoDistributedSpeculativeModel

    same = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=same.config.vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    new_tokens = config["new_tokens"]
    runs: dict = {}

    def timed(model, name):
        model.generate(input_ids, max_new_tokens=2, do_sample=False)  # warm-up
        started = time.monotonic()
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
        elapsed = time.monotonic() - started
        runs[name] = {"s": elapsed, "tokens": out[0, input_ids.shape[1]:].tolist(),
                      "stats": dict(getattr(model, "last_speculation", {}) or {})}

    timed(plain, "plain")
    for name, draft in (("same", same), ("random", tiny)):
        model = AutoDistributedSpeculativeModel.from_pretrained(
            config["model"], initial_peers=config["initial_peers"], torch_dtype=torch.float32, small_model=draft)
        try:
            timed(model, name)
        finally:
            model.close()
    return {"speculative": runs}


def _recovery(model, input_ids, config: dict) -> dict:
    new_tokens, kill_after = config["new_tokens"], config["kill_after"]
    max_length = input_ids.shape[1] + new_tokens
    unbroken = _make_streamer(lambda n: None)
    with model.inference_session(max_length=max_length) as session:
        model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, streamer=unbroken)
        chain_unbroken = _session_chain(session)
    pids = config["peer_pids"]
    killed: dict = {}

    def on_token(count: int) -> None:
        if count != kill_after or killed:
            return
        chain = _session_chain(session)
        victim = chain[len(chain) // 2] if chain else None
        if victim not in pids:  # cannot see the chain: kill a primary server blindly
            killed["note"] = f"chain not visible ({chain}); killed s1 (blocks 10:20) blindly"
            victim = config["fallback_victim"]
        killed.update(peer_id=victim, chain_before=chain, time=time.monotonic())
        os.killpg(pids[victim], signal.SIGKILL)

    broken = _make_streamer(on_token)
    started = time.monotonic()
    out: dict = {"chain_unbroken_run": chain_unbroken, "tokens_unbroken": unbroken.tokens}
    try:
        with model.inference_session(max_length=max_length) as session:
            model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, streamer=broken)
            out["chain_after"] = _session_chain(session)
            out["failovers"] = getattr(session, "failovers", None)
        out["error"] = None
    except Exception as exc:  # reported, not hidden: failover may not exist yet
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["killed"] = killed
    out["tokens_broken"] = broken.tokens
    times = broken.times
    out["tokens_generated"] = len(times)
    if len(times) > kill_after:
        gaps = [b - a for a, b in zip(times, times[1:])]
        out["gap_s"] = times[kill_after] - times[kill_after - 1]
        out["median_gap_s"] = statistics.median(gaps)
    out["total_s"] = time.monotonic() - started
    return out


# ---------------------------------------------------------------------------------------------- orchestration

SPANS = {"s0": "0:10", "s1": "10:20", "s2": "20:30", "r0": "0:15", "r1": "15:30"}
SPANS6 = {f"t{i}": f"{5 * i}:{5 * i + 5}" for i in range(6)}  # a six-server chain, under its own DHT prefix
PREFIX6 = "relay6"
RELAY_DELAYS_MS = (0.0, 12.5, 50.0)  # one way per host: 0, 25 and 100 ms RTT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--recovery-tokens", type=int, default=40)
    parser.add_argument("--kill-after", type=int, default=10)
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--speculative-tokens", type=int, default=48)
    parser.add_argument("--no-speculative", action="store_true")
    parser.add_argument("--no-throughput", action="store_true", help="skip the plain throughput phases")
    parser.add_argument("--no-relay", action="store_true", help="skip relay against client-hub")
    parser.add_argument("--keep-logs", default=None, help="keep logs and address files in this directory")
    args = parser.parse_args()

    from corolla.models.embedded import embedded_model_dir
    from corolla.testing.netns import HostSpec, NetnsSwarm, netns_available

    ok, reason = netns_available()
    if not ok:
        print(f"cannot run: {reason}")
        return 1
    model_dir = str(embedded_model_dir())
    names = ["dht", "s0", "s1", "s2", "r0", "r1", "client"] + list(SPANS6)
    print(f"network: {reason}")
    started = time.monotonic()
    with NetnsSwarm([HostSpec(n) for n in names], workdir=args.keep_logs) as net:
        print(f"backend {net.backend}; hosts: " + ", ".join(f"{n}={net.address(n)}" for n in names))
        net.start_dht("dht")
        primaries = [net.start_server(host, model_dir, SPANS[host], wait=False) for host in ("s0", "s1", "s2")]
        six = [] if args.no_relay else [
            net.start_server(host, model_dir, span, ["--dht-prefix", PREFIX6], wait=False) for host, span in SPANS6.items()]
        net.wait_ready(primaries + six)
        print(f"chain s0 0:10 -> s1 10:20 -> s2 20:30 ready in {time.monotonic() - started:.1f} s"
              + ("" if args.no_relay else f"; chain t0 0:5 -> ... -> t5 25:30 ({PREFIX6})"), flush=True)
        results = []
        for i, (label, delay_ms, rate_mbit) in enumerate([] if args.no_throughput else PHASES):
            net.shape_all(delay_ms=delay_ms, rate_mbit=rate_mbit)
            config = {"mode": "throughput", "model": model_dir, "initial_peers": net.initial_peers,
                      "new_tokens": args.new_tokens, "local_reference": i == 0}
            results.append((label, _run_client(net, config, f"client-{i}")))
        if results:
            _print_throughput(results, args)
        if not args.no_relay:
            _measure_relay(net, model_dir, args)
        if not args.no_speculative:
            _measure_speculative(net, model_dir, args)
        if not args.no_recovery:
            _measure_recovery(net, model_dir, primaries, args)
    print(f"\ntotal {time.monotonic() - started:.0f} s; every namespace and process removed")
    return 0


def _run_client(net, config: dict, name: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "client", json.dumps(config)]
    return net.run_json("client", argv, name=name, timeout_s=300)


def _fmt_rate(steps_per_s) -> str:
    return "   n/a" if steps_per_s is None else f"{steps_per_s:6.2f}"


def _print_throughput(results: list, args) -> None:
    base = results[0][1]
    reference = base["local_transformers"]
    print(f"\ngreedy generate(), {args.new_tokens} new tokens after a {base['prompt_tokens']}-token prompt, "
          "float32, 1 torch thread per process; steps/s over decode steps (prefill excluded)")
    print(f"  {'transformers, local (client process)':<52} {_fmt_rate(reference['steps_per_s'])} steps/s   "
          f"first token {reference['first_token_s']:.3f} s")
    for label, result in results:
        swarm = result["swarm"]
        ratio = swarm["steps_per_s"] / base["swarm"]["steps_per_s"]
        same = "same tokens as local transformers" if swarm["tokens"] == reference["tokens"] else "TOKENS DIFFER"
        print(f"  {label:<52} {_fmt_rate(swarm['steps_per_s'])} steps/s   "
              f"first token {swarm['first_token_s']:.3f} s   median step {swarm['median_step_s'] * 1000:6.1f} ms   "
              f"x{ratio:.2f} of local   {same}")


def _measure_relay(net, model_dir: str, args) -> None:
    print(f"\nrelay against client-hub: greedy, {args.new_tokens} tokens, every host delayed (client and servers), "
          "no rate limit; median decode step")
    results = {}
    for delay_ms in RELAY_DELAYS_MS:
        net.shape_all(delay_ms=delay_ms, rate_mbit=None)
        for servers, prefix in ((3, None), (6, PREFIX6)):
            config = {"mode": "relay", "model": model_dir, "initial_peers": net.initial_peers,
                      "new_tokens": args.new_tokens, "prefix": prefix}
            results[servers, delay_ms] = _run_client(net, config, f"client-relay-{servers}-{int(delay_ms * 10)}")["runs"]
    print(f"  {'servers':>7} {'RTT':>6} {'hub step':>9} {'relay step':>10} {'hub/relay':>9} "
          f"{'compute + (n+1) one-way':>24} {'relay / that':>12}  tokens")
    for servers in (3, 6):
        compute_s = results[servers, 0.0]["relay"]["median_step_s"]  # no delay: compute and local overhead
        for delay_ms in RELAY_DELAYS_MS:
            runs = results[servers, delay_ms]
            hub, relay = runs["hub"]["median_step_s"], runs["relay"]["median_step_s"]
            bound = compute_s + (servers + 1) * delay_ms / 1000
            same = "equal" if runs["hub"]["tokens"] == runs["relay"]["tokens"] else "DIFFER"
            print(f"  {servers:>7} {2 * delay_ms:>4.0f}ms {hub * 1000:>7.1f}ms {relay * 1000:>8.1f}ms "
                  f"{hub / relay:>8.2f}x {bound * 1000:>22.1f}ms {relay / bound:>12.2f}  {same} "
                  f"(chains of {runs['hub']['chain']} and {runs['relay']['chain']})")


def _measure_speculative(net, model_dir: str, args) -> None:
    print(f"\nspeculative decoding: greedy, {args.speculative_tokens} new tokens, 3-server chain; tokens/s over the "
          "whole generate() call")
    for label, delay_ms, rate_mbit in (PHASES[2], PHASES[0]):
        net.shape_all(delay_ms=delay_ms, rate_mbit=rate_mbit)
        config = {"mode": "speculative", "model": model_dir, "initial_peers": net.initial_peers,
                  "new_tokens": args.speculative_tokens}
        runs = _run_client(net, config, f"client-speculative-{int(delay_ms)}")["speculative"]
        plain = runs["plain"]
        print(f"  {label}")
        for name, text in (("plain", "plain generate()"), ("same", "speculative, draft = the embedded model"),
                           ("random", "speculative, draft = a random tiny model")):
            run = runs[name]
            rate = len(run["tokens"]) / run["s"]
            stats = run["stats"]
            detail = (f"{stats['rounds']:3d} rounds, {stats['accepted']:3d}/{stats['drafted']:3d} drafts accepted"
                      if stats else "one step per token")
            same = "same tokens as plain" if run["tokens"] == plain["tokens"] else "TOKENS DIFFER"
            print(f"    {text:<42} {rate:6.2f} tokens/s  x{plain['s'] / run['s']:.2f} of plain   {detail}   {same}")


def _measure_recovery(net, model_dir: str, primaries: list, args) -> None:
    net.shape_all(delay_ms=PHASES[1][1], rate_mbit=PHASES[1][2])
    replicas = [net.start_server(host, model_dir, SPANS[host], wait=False) for host in ("r0", "r1")]
    net.wait_ready(replicas)
    servers = primaries + replicas
    config = {"mode": "recovery", "model": model_dir, "initial_peers": net.initial_peers,
              "new_tokens": args.recovery_tokens, "kill_after": args.kill_after,
              "peer_pids": {s.peer_id: s.pid for s in servers}, "fallback_victim": primaries[1].peer_id}
    result = _run_client(net, config, "client-recovery")
    _print_recovery(result, {s.peer_id: f"{s.host} ({SPANS[s.host]})" for s in servers}, args)


def _print_recovery(rec: dict, names_by_peer: dict, args) -> None:
    name = lambda peer: names_by_peer.get(peer, peer)  # noqa: E731
    print(f"\nrecovery, under (a): second chain r0 0:15 -> r1 15:30 up; {args.recovery_tokens} tokens, SIGKILL "
          f"after token {args.kill_after}")
    print(f"  chain of the unbroken run: {' -> '.join(map(name, rec['chain_unbroken_run']))}")
    killed = rec.get("killed") or {}
    if killed:
        print(f"  killed: {name(killed['peer_id'])}; chain before: {' -> '.join(map(name, killed['chain_before']))}"
              + (f" [{killed['note']}]" if killed.get("note") else ""))
    if rec.get("chain_after"):
        print(f"  chain after: {' -> '.join(map(name, rec['chain_after']))}; failovers counted: {rec.get('failovers')}")
    if rec["error"]:
        print(f"  recovery: failed: {rec['error']} (after {rec['tokens_generated']} of {args.recovery_tokens} tokens)")
        return
    same = rec["tokens_broken"] == rec["tokens_unbroken"]
    print(f"  gap across the kill: {rec['gap_s'] * 1000:.0f} ms (median gap {rec['median_gap_s'] * 1000:.1f} ms); "
          f"tokens {'equal' if same else 'DIFFER from'} the unbroken run; whole run {rec['total_s']:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "client":
        print(json.dumps(client_main(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    sys.exit(main())
