"""Quantized servers in a swarm: records say how they are quantized, clients choose by ``min_quant`` and
``mixed_quant``, checks compare a server only with servers of its own quantization, and a full-precision client
still gets local transformers' tokens."""
from __future__ import annotations

import pytest
import torch

from corolla.client.config import ClientConfig
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError
from corolla.testing.inprocess import InProcessSwarm
from corolla.testing.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-llama")
    local = save_tiny_model("llama", path, num_layers=4, seed=7)
    return path, local


def _ids():
    return torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))


def test_clients_choose_servers_by_quantization(model_dir):
    path, local = model_dir
    with InProcessSwarm(str(path), dht_prefix="quant") as swarm:
        full = swarm.start_server(BlockRange(0, 4), quant="none")
        int8 = swarm.start_server(BlockRange(0, 4), quant="int8")
        int8_b = swarm.start_server(BlockRange(0, 4), quant="int8")  # a replica: checks compare the two
        four = swarm.start_server(BlockRange(0, 2), quant="int4")
        four_b = swarm.start_server(BlockRange(2, 4), quant="int4")
        peers = {s.peer.peer_id: s.quant for s in (full, int8, int8_b, four, four_b)}
        exact = swarm.client(client_config=ClientConfig(min_quant="none", verify_fraction=1.0, verify_seed=0))
        no4 = swarm.client(client_config=ClientConfig(min_quant="int8", wait_for_blocks_s=1.0))
        anything = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=1))
        try:
            records = anything.swarm.run(anything.swarm.refresh())
            assert sorted(r.quant for r in records) == ["int4", "int4", "int8", "int8", "none"]
            # a full-precision client: only the float server, the tokens local transformers gives
            expected = local.generate(_ids(), max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert exact.generate(_ids(), max_new_tokens=8, do_sample=False, pad_token_id=0).tolist() == expected.tolist()
            assert {r.quant for r in exact.swarm.run(exact.swarm.records())} == {"none"}
            assert {r.quant for r in no4.swarm.run(no4.swarm.records())} == {"none", "int8"}
            # checks at every step compare each server with servers of its own quantization: nobody is accused,
            # though an int8 server's outputs differ from the float server's by more than float rounding
            for _ in range(3):
                with anything.inference_session(max_length=12) as session:
                    anything.generate(_ids(), max_new_tokens=6, do_sample=False, pad_token_id=0, session=session)
                    checked = session.checks["run"]
                assert checked > 0
            assert not any(anything.swarm.bans.is_banned(peer) for peer in peers)
            # two int8 replicas check each other at every step: quantized, but the same quantization, so they agree
            pair = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=2, allowed_servers=(
                int8.peer.peer_id, int8_b.peer.peer_id)))
            try:
                with pair.inference_session(max_length=12) as session:
                    pair.generate(_ids(), max_new_tokens=6, do_sample=False, pad_token_id=0)
                    session.settle()
                    assert session.checks["run"] >= 5
                assert not any(pair.swarm.bans.is_banned(peer) for peer in peers)
            finally:
                pair.close()
            assert not any(exact.swarm.bans.is_banned(peer) for peer in peers)
        finally:
            for client in (exact, no4, anything):
                client.close()
        # with the float server gone, a client that refuses 4-bit weights uses the int8 server; one that wants
        # full precision finds the blocks served by nobody acceptable to it
        swarm.loop.run(full.shutdown(), 30)  # announces itself offline
        swarm.servers.remove(full)
        late_exact = swarm.client(client_config=ClientConfig(min_quant="none", wait_for_blocks_s=1.0))
        single = swarm.client(client_config=ClientConfig(mixed_quant=False))
        try:
            with pytest.raises(BlocksNotServedError, match="served by nobody.*left out: quantized below min_quant=none"):
                late_exact.generate(_ids(), max_new_tokens=2, do_sample=False, pad_token_id=0)
            chain = single.swarm.run(single.swarm.plan_inference(BlockRange(0, 4)))
            assert [peers[record.peer_id] for record, _ in chain] == ["int8"]  # one quantization, the most precise
        finally:
            late_exact.close()
            single.close()


def test_int8_server_tokens_stay_close_to_float(model_dir):
    """On a tiny random model, int8 weights move the logits a little (measured quality on the embedded model is in
    benchmarks/bench_quant.py)."""
    path, local = model_dir
    with InProcessSwarm(str(path), [BlockRange(0, 2), BlockRange(2, 4)], dht_prefix="q8", quant="int8") as swarm:
        model = swarm.client()
        try:
            ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected, got = local(ids).logits, model(ids).logits
            assert ((got - expected).norm() / expected.norm()).item() < 0.05
            assert [s.record().quant for s in swarm.servers] == ["int8", "int8"]
        finally:
            model.close()


def test_mixtral_int8_server_quantizes_its_experts_as_a_local_model_would(tmp_path):
    """Mixtral's experts (fused parameters in transformers 5, not linear layers) are quantized on an int8 server,
    which computes as the local model whose layers ``quantize_layer`` quantized: the same logits and tokens."""
    import functools

    from corolla.models.family import family_for
    from corolla.models.quant import quantize_layer

    local = save_tiny_model("mixtral", tmp_path, num_layers=4, seed=3)
    for layer in functools.reduce(getattr, family_for(local.config).layers_path.split("."), local):
        quantize_layer(layer, "int8", torch.device("cpu"))
    with InProcessSwarm(str(tmp_path), [BlockRange(0, 2), BlockRange(2, 4)], dht_prefix="q8moe", quant="int8") as swarm:
        for server in swarm.servers:  # what stays float: norms and the 4-expert router
            assert server.record().quant == "int8"
            assert [name for name, p in server.stack.named_parameters() if p.numel() > 4 * 64] == []
        model = swarm.client()
        try:
            ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected, got = local(ids).logits, model(ids).logits
            assert (got - expected).abs().max().item() < 1e-4
            greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert model.generate(ids[:1], **greedy).tolist() == local.generate(ids[:1], **greedy).tolist()
        finally:
            model.close()
