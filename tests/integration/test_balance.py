"""Block choice and rebalancing with real server processes."""
from __future__ import annotations

import os
import signal
import time

import torch

from corolla.testing.local_swarm import LocalSwarm
from corolla.core.blocks import BlockRange
from corolla.core.records import ServerState
from corolla.net.loop import LoopThread
from corolla.net.peer import Peer, PeerConfig
from corolla.net.records import fetch_records


def _online_spans(initial_peers, prefix, num_blocks):
    loop = LoopThread()
    try:
        peer = loop.run(Peer.create(PeerConfig(initial_peers=tuple(initial_peers), client_mode=True)), 30)
        try:
            records = loop.run(fetch_records(peer, prefix, range(num_blocks)), 30)
        finally:
            loop.run(peer.shutdown(), 10)
    finally:
        loop.stop()
    return {r.peer_id: r.blocks for r in records if r.state is ServerState.ONLINE}


def test_servers_with_num_blocks_cover_the_model(tiny_llama6_dir):
    with LocalSwarm(model=str(tiny_llama6_dir), spans=[], dht_prefix="cover") as swarm:
        for _ in range(3):  # one after another, as volunteers arrive
            swarm.start_server(extra_args=["--num-blocks", "2"])
        spans = sorted(_online_spans(swarm.initial_peers, "cover", 6).values())
        assert spans == [BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)]


def test_over_served_server_moves_to_uncovered_blocks(tiny_llama_dir):
    from corolla import DistributedLlamaForCausalLM
    from corolla.client.config import ClientConfig

    spans = [BlockRange(0, 2), BlockRange(2, 4)]  # fixed spans: these servers never move
    # short-lived records: the killed holder's lingers 6 s, not the default 30 s
    with LocalSwarm(model=str(tiny_llama_dir), spans=spans, dht_prefix="move",
                    extra_server_args=["--announce-period", "2", "--record-ttl", "6"]) as swarm:
        mover = swarm.start_server(extra_args=["--num-blocks", "2", "--rebalance-period", "1"])
        before = _online_spans(swarm.initial_peers, "move", 4)[mover.peer_id]
        lost = BlockRange(2, 4) if before.start < 2 else BlockRange(0, 2)  # the blocks the mover does not hold
        holder = swarm.servers[spans.index(lost)]
        os.kill(holder.process.pid, signal.SIGKILL)  # its record lingers until it expires, then nobody serves them
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = _online_spans(swarm.initial_peers, "move", 4).get(mover.peer_id)
            if now == lost:
                break
            time.sleep(1)
        assert now == lost, f"the mover serves {now}, expected it to move to the lost blocks {lost}:\n{mover.log_tail()}"
        model = DistributedLlamaForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, dht_prefix="move",
            client_config=ClientConfig(wait_for_blocks_s=20, step_timeout_s=3),
        )
        try:
            assert model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
        finally:
            model.close()
