"""A swarm spread over emulated hosts (network namespaces, corolla/testing/netns.py) with delay between them.

Hosts ``dht``, ``s0``/``s1``/``s2`` (blocks 0:10, 10:20, 20:30 of the embedded model) and ``client``; the client
always runs on its own host, as this file's ``client`` mode under ``ip netns exec``, and prints JSON. Needs root
and ``ip``/``tc``; skipped otherwise. Runs in about a minute.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corolla.testing.netns import HostSpec, NetnsSwarm, netns_available

PROMPT = "The three primary colours are"
SPANS = ["0:10", "10:20", "20:30"]

_available, _reason = netns_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _available, reason=f"network namespaces unavailable: {_reason}"),
]


def _client(net: NetnsSwarm, config: dict, name: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "client", json.dumps(config)]
    return net.run_json("client", argv, name=name, timeout_s=120)


@pytest.fixture(scope="module")
def chain(embedded_dir):
    hosts = [HostSpec(name) for name in ("dht", "s0", "s1", "s2", "client")]
    with NetnsSwarm(hosts) as net:
        net.start_dht("dht")
        servers = [net.start_server(f"s{i}", str(embedded_dir), span, wait=False) for i, span in enumerate(SPANS)]
        net.wait_ready(servers)
        yield net


@pytest.mark.timeout(300)
def test_chain_across_hosts_with_delay_matches_local_transformers(chain, embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chain.shape_all(delay_ms=20)  # 40 ms RTT between any two hosts
    config = {"mode": "generate", "model": str(embedded_dir), "initial_peers": chain.initial_peers, "new_tokens": 8}
    remote = _client(chain, config, "client-generate")

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype="float32")
    expected = local.generate(input_ids, max_new_tokens=8, do_sample=False)[0].tolist()
    assert remote["sequence"] == expected
    assert len(remote["sequence"]) == input_ids.shape[1] + 8


@pytest.mark.timeout(300)
def test_added_delay_shows_in_every_step(chain, embedded_dir):
    config = {"mode": "steps", "model": str(embedded_dir), "initial_peers": chain.initial_peers, "steps": 8}
    chain.shape_all(delay_ms=0)
    base = _client(chain, config, "client-steps-base")["step_s"]
    one_way_ms = 25  # every pair of hosts: 50 ms more RTT
    chain.shape_all(delay_ms=one_way_ms)
    delayed = _client(chain, config, "client-steps-delayed")["step_s"]
    added_rtt_s = 2 * one_way_ms / 1000
    # A step goes client -> s0 -> s1 -> s2 -> client at the very least (4 one-way trips), whoever relays it,
    # and the switch never delivers a packet before its delay: a hard lower bound, no tolerance needed.
    assert min(delayed) >= 4 * one_way_ms / 1000, (base, delayed)
    assert statistics.median(delayed) - statistics.median(base) >= added_rtt_s, (base, delayed)


def test_close_removes_namespaces_and_processes():
    with NetnsSwarm([HostSpec("a", delay_ms=1), HostSpec("b", rate_mbit=10, loss_pct=1)]) as net:
        namespaces = [net.namespace("a"), net.namespace("b")]
        sleeper = net.run("b", ["sleep", "600"])
        assert set(namespaces) <= set(_netns_list())
    assert sleeper.wait(5) is not None
    assert not set(namespaces) & set(_netns_list())


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- client host side


def client_main(config: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        config["model"], initial_peers=config["initial_peers"], torch_dtype=torch.float32
    )
    try:
        if config["mode"] == "generate":
            sequence = model.generate(input_ids, max_new_tokens=config["new_tokens"], do_sample=False)[0]
            return {"sequence": sequence.tolist()}
        layers = model.model.layers  # RemoteSequential over the 30 remote blocks
        with torch.no_grad():
            hidden = model.model.embed_tokens(input_ids)  # [1, prompt, hidden]
            with layers.inference_session(max_length=input_ids.shape[1] + config["steps"] + 2) as session:
                session.step(hidden)  # the prompt; opens the chain's streams
                session.step(hidden[:, -1:])  # one warm step
                step_s = []
                for _ in range(config["steps"]):
                    started = time.monotonic()
                    session.step(hidden[:, -1:])  # [1, 1, hidden]
                    step_s.append(time.monotonic() - started)
        return {"step_s": step_s}
    finally:
        model.close()


if __name__ == "__main__":
    print(json.dumps(client_main(json.loads(sys.argv[2]))), flush=True)
