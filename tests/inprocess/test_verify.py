"""Outputs checked: a server that returns wrong outputs (noise added, or its inputs sent back) is caught by
redundant computation, banned, and the generation goes back to its last checked position: the tokens equal local
transformers'. Honest servers are never accused.

The lying servers are test-only variants: real servers whose computed outputs are altered after the fact.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from corolla.client.config import ClientConfig
from corolla.core.blocks import BlockRange
from corolla.testing.inprocess import InProcessSwarm

IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def local6(tiny_llama6_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama6_dir).eval()


def _make_liar(server, how: str) -> None:
    """Alter what ``server`` computes: its sessions' outputs and its forward passes."""
    compute = server.handler.compute
    steps, forward = compute.session_steps, compute.forward

    def alter(outputs, inputs):
        if how == "echo":
            return inputs.clone()
        return outputs + torch.randn_like(outputs) * outputs.abs().mean() * 0.5

    def lying_steps(items):
        results = steps(items)
        return [r if isinstance(r, BaseException) else alter(r, step.hidden_states)
                for r, (_, step) in zip(results, items)]

    def lying_forward(request, lora):
        reply = forward(request, lora)
        return type(reply)(hidden_states=alter(reply.hidden_states, request.hidden_states),
                           activation_id=reply.activation_id)

    compute.session_steps, compute.forward = lying_steps, lying_forward


@pytest.fixture
def swarm(tiny_llama6_dir):
    """Primaries 0:2, 2:4, 4:6 (fast: chosen first) and replicas 0:3, 3:6, 2:4 (so that a dispute about blocks 2:4
    has a third opinion to settle it); the 2:4 primary is the liar."""
    with InProcessSwarm(str(tiny_llama6_dir), dht_prefix="verify") as swarm:
        for span in (BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)):
            swarm.start_server(span, throughput=1000.0)
        for span in (BlockRange(0, 3), BlockRange(3, 6), BlockRange(2, 4)):
            swarm.start_server(span, throughput=10.0)
        yield swarm


@pytest.mark.parametrize("how", ["noise", "echo"])
def test_a_lying_server_is_caught_banned_and_the_tokens_are_honest(how, swarm, local6):
    liar = swarm.servers[1]
    _make_liar(liar, how)
    model = swarm.client(client_config=ClientConfig(verify_fraction=0.5, verify_seed=3))
    try:
        with model.inference_session(max_length=64) as session:
            got = model.generate(IDS, max_new_tokens=16, do_sample=False)
            assert session.checks["caught"] >= 1, session.checks
            assert liar.peer.peer_id not in [peer for peer, _ in session.chain]
        assert got.tolist() == local6.generate(IDS, max_new_tokens=16, do_sample=False).tolist()
        assert model.swarm.bans.is_banned(liar.peer.peer_id)
        # later sessions do not use it either
        with model.inference_session(max_length=64) as session:
            assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, 9)
            assert liar.peer.peer_id not in [peer for peer, _ in session.chain]
    finally:
        model.close()


def test_a_lying_server_in_a_forward_pass_is_caught(swarm, local6):
    liar = swarm.servers[1]
    _make_liar(liar, "noise")
    model = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=0))
    honest = swarm.client(client_config=ClientConfig(verify_fraction=0.0))
    try:
        embeds = local6.model.embed_tokens(IDS).detach()
        with torch.no_grad():
            got = model.model.layers(embeds)
        assert model.swarm.bans.is_banned(liar.peer.peer_id)
        honest.swarm.ban_liar(liar.peer.peer_id)  # an honest reference that avoids the liar from the start
        with torch.no_grad():
            expected = honest.model.layers(embeds)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        model.close()
        honest.close()


def test_with_no_third_server_the_disputed_one_is_avoided(tiny_llama_dir):
    """Two servers of the same blocks disagree and nobody can decide: the session stops using the one it was
    checking, and the tokens are the honest one's."""
    local = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with InProcessSwarm(str(tiny_llama_dir), dht_prefix="dispute") as swarm:
        liar = swarm.start_server(BlockRange(0, 4), throughput=1000.0)
        swarm.start_server(BlockRange(0, 4), throughput=10.0)
        _make_liar(liar, "noise")
        model = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=0))
        try:
            with model.inference_session(max_length=32) as session:
                got = model.generate(IDS, max_new_tokens=8, do_sample=False)
                assert session.checks["disputed"] >= 1
            assert got.tolist() == local.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
        finally:
            model.close()


def test_honest_servers_are_never_accused(swarm, local6):
    """Every step checked, with batching, relays and replicas of other spans computing the same: all agree."""
    model = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=0))
    try:
        with model.inference_session(max_length=64) as session:
            got = model.generate(IDS, max_new_tokens=12, do_sample=False)
            session.settle()
            assert session.checks["run"] >= 12 and session.checks["agreed"] == session.checks["run"], session.checks
        assert got.tolist() == local6.generate(IDS, max_new_tokens=12, do_sample=False).tolist()
    finally:
        model.close()


def test_a_liar_running_two_spans_of_a_chain_leaves_both(tiny_llama6_dir, local6):
    """The chain visits the liar twice (liar 0:2, fast 2:4, liar 4:6), and its first span's replacement takes two
    servers: both of the liar's spans are replaced, the fast server's span kept, and the tokens equal local."""
    with InProcessSwarm(str(tiny_llama6_dir), dht_prefix="twice-liar") as swarm:
        liar = swarm.start_server(BlockRange(0, 6), throughput=1.0)
        fast = swarm.start_server(BlockRange(2, 4), throughput=1000.0)
        swarm.start_server(BlockRange(2, 4), throughput=10.0)  # a third opinion on 2:4
        for span in (BlockRange(0, 1), BlockRange(1, 2), BlockRange(4, 6)):  # slower than the liar: used after it
            swarm.start_server(span, throughput=0.2)
        _make_liar(liar, "noise")
        model = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=0))
        try:
            with model.inference_session(max_length=32) as session:
                planned = model.swarm.run(model.swarm.plan_inference(BlockRange(0, 6)))
                assert [record.peer_id for record, _ in planned] == [liar.peer.peer_id, fast.peer.peer_id,
                                                                     liar.peer.peer_id]
                got = model.generate(IDS, max_new_tokens=8, do_sample=False)
                assert session.rejections
                chain = session.chain
                assert liar.peer.peer_id not in [peer for peer, _ in chain]
                assert [span for _, span in chain] == [BlockRange(0, 1), BlockRange(1, 2), BlockRange(2, 4),
                                                       BlockRange(4, 6)]
            assert got.tolist() == local6.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
        finally:
            model.close()


def test_checks_feed_each_checking_server_only_what_is_new(swarm, local6):
    """Every step checked: each span's checking server (a replica, in a check session) computes each position once,
    not the whole history at every check; a rewind sends it again only what follows the rewound position. Every
    check agrees, and the tokens equal local."""
    expected = local6.generate(IDS, max_new_tokens=16, do_sample=False)
    model = swarm.client(client_config=ClientConfig(verify_fraction=1.0, verify_seed=0))
    replicas = swarm.servers[3:]
    try:
        with model.inference_session(max_length=64) as session:
            got = model.generate(IDS, max_new_tokens=16, do_sample=False)
            session.settle()
            assert session.checks["run"] >= 16 and session.checks["agreed"] == session.checks["run"], session.checks
            fed = sum(server.tokens_run for server in replicas)
            # each position of the session (20) computed once by each checking server (one or two per span); a
            # whole-history replay per check would have cost ~200 positions per checking server
            checkers = sum(len(checking.hops) for checking in session._check_sessions.values())
            assert len(session._check_sessions) == 3 and 0 < fed <= checkers * session.position, (fed, checkers)

            session.position = IDS.shape[1] + 3
            again = model.generate(None, max_new_tokens=8, do_sample=False)
            session.settle()
            assert session.checks["agreed"] == session.checks["run"], session.checks
            fed_again = sum(server.tokens_run for server in replicas) - fed
            assert 0 < fed_again <= checkers * (session.position - IDS.shape[1] - 2), (fed_again, checkers)
        assert got.tolist() == expected.tolist()
        assert again.tolist() == expected[:, IDS.shape[1] + 3: IDS.shape[1] + 11].tolist()
    finally:
        model.close()


def test_check_sessions_get_the_sessions_lora_and_deep_prompts(swarm):
    """A session with client LoRA weights and deep prompts, every step checked: the check sessions run with the same
    weights and prompts (each check agrees), and the outputs equal those of the same steps unchecked."""
    from corolla.models.lora import LoraSet

    torch.manual_seed(0)
    lora = LoraSet(2.0, {f"{block}.mlp.down_proj": (torch.randn(4, 128) * 0.3, torch.randn(64, 4) * 0.3)
                         for block in range(6)})
    prompts = torch.randn(6, 1, 3, 64) * 0.1
    inputs = [torch.randn(1, 8, 64)] + [torch.randn(1, 1, 64) for _ in range(8)]
    outputs = {}
    for rate in (0.0, 1.0):
        model = swarm.client(client_config=ClientConfig(verify_fraction=rate, verify_seed=0))
        try:
            with model.model.layers.inference_session(max_length=32, lora=lora) as session:
                steps = [session.step(inputs[0], prompts=prompts)] + [session.step(x) for x in inputs[1:]]
                session.settle()
                if rate:
                    assert session.checks["run"] == len(inputs) == session.checks["agreed"], session.checks
            outputs[rate] = torch.cat(steps, dim=1)
        finally:
            model.close()
    assert torch.allclose(outputs[0.0], outputs[1.0], atol=1e-5)
