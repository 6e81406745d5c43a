"""Private swarms and allow-lists: without the swarm's key a peer's streams are refused and its records ignored; a
client can restrict itself to servers it names."""
from __future__ import annotations

import pytest
import torch

from corolla.client.config import ClientConfig
from corolla.client.rpc import call
from corolla.core.blocks import BlockRange
from corolla.core.errors import CorollaError, RemoteError
from corolla.testing.inprocess import InProcessSwarm
from corolla.wire.messages import InfoRequest

IDS = torch.tensor([[5, 6, 7, 8]])


def test_a_private_swarm_refuses_strangers(tiny_llama_dir, tmp_path):
    key_file = tmp_path / "swarm.key"
    key_file.write_bytes(b"a-shared-secret-of-32-bytes-long")
    with InProcessSwarm(str(tiny_llama_dir), dht_prefix="private") as swarm:
        member = swarm.start_server(BlockRange(0, 4), swarm_key_path=str(key_file))
        stranger = swarm.start_server(BlockRange(0, 4), throughput=1e6)  # no key: announces a very fast server
        friend = swarm.client(client_config=ClientConfig(swarm_key=key_file.read_bytes().strip()))
        outsider = swarm.client(client_config=ClientConfig(wait_for_blocks_s=1.0, max_retries=1))
        try:
            # the member's client sees only the member (the stranger's records carry no proof) and works
            assert [r.peer_id for r in friend.swarm.run(friend.swarm.refresh())] == [member.peer.peer_id]
            assert friend.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, 8)
            # without the key, the member refuses every stream
            record = next(r for r in outsider.swarm.run(outsider.swarm.refresh()) if r.peer_id == member.peer.peer_id)
            with pytest.raises(RemoteError, match="this swarm is private"):
                outsider.swarm.run(call(outsider.swarm.transport, record, InfoRequest(), 10))
            assert stranger.peer.peer_id != member.peer.peer_id
        finally:
            friend.close()
            outsider.close()


def test_an_allow_list_keeps_a_client_to_the_servers_it_names(tiny_llama_dir):
    with InProcessSwarm(str(tiny_llama_dir), dht_prefix="allow") as swarm:
        trusted = swarm.start_server(BlockRange(0, 4), throughput=1.0)
        swarm.start_server(BlockRange(0, 4), throughput=1e6)  # faster, but not on the list
        model = swarm.client(client_config=ClientConfig(allowed_servers=(trusted.peer.peer_id,)))
        try:
            with model.inference_session(max_length=16) as session:
                model.generate(IDS, max_new_tokens=4, do_sample=False)
                assert session.chain == [(trusted.peer.peer_id, BlockRange(0, 4))]
            model.swarm.bans.ban(trusted.peer.peer_id)  # the listed server out of the way: nobody else is allowed
            with pytest.raises(CorollaError, match="served by nobody.*; 1 left out: not in allowed_servers"):
                model.swarm.run(model.swarm.plan_inference(BlockRange(0, 4), wait=False))
        finally:
            model.close()
