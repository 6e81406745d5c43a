"""Healing in one process: real servers and model code on the in-memory network, killed and frozen at will.

The failover logic (replay, bans, retries, bounded failure, moves) is the same code that runs over libp2p; the
process-level tests in tests/integration keep the cases only real processes show (SIGKILL, SIGSTOP, daemons).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from corolla.client.config import ClientConfig
from corolla.client.session import InferenceSession
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError
from corolla.testing.inprocess import InProcessSwarm

FAST = ClientConfig(step_timeout_s=1.0, wait_for_blocks_s=5.0, refresh_period_s=0.5, ban_base_s=2.0)
PRIMARIES = [BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)]
REPLICAS = [BlockRange(0, 3), BlockRange(3, 6)]
IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def local6(tiny_llama6_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama6_dir).eval()


@pytest.fixture
def swarm(tiny_llama6_dir):
    """Primaries 0:2, 2:4, 4:6 (fast) and replicas 0:3, 3:6 (slow, so they are used only after a failure).

    The replicas announce a chain 2 s slower than the primaries' (6 blocks at 1/3 s), so noise in the measured
    round trips (0.1 s per hop where a test adds delay) cannot tip the route to their two-hop chain. At 10
    tokens/s their chain was only 0.1 s slower, and a CI run on a loaded machine once took it."""
    with InProcessSwarm(str(tiny_llama6_dir), dht_prefix="heal") as swarm:
        for span in PRIMARIES:
            swarm.start_server(span, throughput=1000.0)
        for span in REPLICAS:
            swarm.start_server(span, throughput=1.0)
        yield swarm


class _AfterTokens(BaseStreamer):
    """Calls ``action`` once, after ``count`` generated tokens (the first ``put`` is the prompt)."""

    def __init__(self, count: int, action):
        self.count, self.action, self.seen = count, action, -1
        self.times: list[float] = []

    def put(self, value):
        self.seen += 1
        self.times.append(time.monotonic())
        if self.seen == self.count:
            self.action()

    def end(self):
        pass


@pytest.mark.parametrize("block", [0, 3, 5], ids=["first", "middle", "last"])
def test_killed_server_is_replaced_and_tokens_are_identical(block, swarm, local6):
    expected = local6.generate(IDS, max_new_tokens=16, do_sample=False)
    model = swarm.client(client_config=FAST)
    try:
        with model.inference_session(max_length=32) as session:
            victims = []

            def kill():
                peer = next(p for p, span in session.chain if block in span)
                victims.append(swarm.server_by_peer(peer))
                swarm.kill(victims[0])

            got = model.generate(IDS, max_new_tokens=16, do_sample=False, streamer=_AfterTokens(6, kill))
            assert session.failovers == 1
            assert victims[0].peer.peer_id not in [p for p, _ in session.chain]
        assert got.tolist() == expected.tolist()
        assert model.swarm.bans.is_banned(victims[0].peer.peer_id)
    finally:
        model.close()


def test_a_replacement_is_planned_without_waiting_for_the_dht(swarm, local6):
    """A server dies while the DHT has stopped answering (each lookup takes 5 s): the replacement, and the checks of
    every step (verify_fraction 1), plan on the view the client already holds, so neither the next token nor the end
    of generate() waits for a lookup. With the view re-read first, the next token came 5 s after the kill."""
    expected = local6.generate(IDS, max_new_tokens=12, do_sample=False)
    model = swarm.client(client_config=dataclasses.replace(FAST, refresh_period_s=0.05, verify_fraction=1.0))
    transport = model.swarm.transport
    answer = transport.lookup_many

    async def slow_lookup(keys):
        await asyncio.sleep(5.0)
        return await answer(keys)

    killed = []
    try:
        with model.inference_session(max_length=32) as session:
            def kill():
                transport.lookup_many = slow_lookup
                time.sleep(0.15)  # a lookup already under way ends: the view is now older than refresh_period_s
                swarm.kill(swarm.server_by_peer(session.chain[1][0]))
                killed.append(time.monotonic())

            streamer = _AfterTokens(4, kill)
            got = model.generate(IDS, max_new_tokens=12, do_sample=False, streamer=streamer)
            finished = time.monotonic()
            assert session.failovers == 1
            assert session.checks["run"] >= 12
        assert got.tolist() == expected.tolist()
        delay = next(t for t in streamer.times if t > killed[0]) - killed[0]
        assert delay < 2.5, f"the next token came {delay:.2f} s after the kill"
        assert finished - killed[0] < 2.5, f"generate() returned {finished - killed[0]:.2f} s after the kill"
    finally:
        model.close()


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
def test_frozen_server_is_noticed_at_the_step_timeout(position, swarm, local6):
    # decode steps travel with a trail (only the last server answers): the silent chain is probed, and the frozen
    # server is the one that does not answer; replacing any other would leave it in the chain (a second failover)
    expected = local6.generate(IDS, max_new_tokens=12, do_sample=False)
    model = swarm.client(client_config=FAST)
    frozen = []
    try:
        with model.inference_session(max_length=32) as session:
            def freeze():
                # (a CI run once found fewer than three servers here; another routed the opens test around the
                # primaries: ping noise, while the replicas announced 10 tokens/s; see the fixture. If it recurs,
                # say what happened to the chain.)
                assert len(session.chain) == 3 and session.failovers == 0, (
                    f"before the freeze the chain was {session.chain} after {session.failovers} failovers; "
                    f"checks {session.checks}")
                frozen.append(swarm.server_by_peer(session.chain[position][0]))
                swarm.freeze(frozen[0])

            streamer = _AfterTokens(4, freeze)
            got = model.generate(IDS, max_new_tokens=12, do_sample=False, streamer=streamer)
            assert session.failovers == 1
        assert got.tolist() == expected.tolist()
        gap = max(b - a for a, b in zip(streamer.times, streamer.times[1:]))
        assert gap >= FAST.step_timeout_s  # the frozen server was given its step timeout, then replaced
    finally:
        swarm.thaw(frozen[0]) if frozen else None
        model.close()


@pytest.mark.parametrize("position", [1, 2], ids=["middle", "last"])
def test_a_server_that_stalls_in_a_segment_where_every_server_answers_is_the_one_replaced(position, swarm, local6):
    """Steps that every server of a relayed segment answers (long ones, or once trails are off): the servers before
    the frozen one answered, and the one that did not is replaced, no other. The failed hop was located at the
    segment's start plus the answers, counted twice: a stalled last hop raised IndexError out of generate(), a
    stalled middle one had the honest server after it banned and replaced."""
    expected = local6.generate(IDS, max_new_tokens=12, do_sample=False)
    model = swarm.client(client_config=FAST)
    frozen = []
    try:
        with model.inference_session(max_length=32) as session:
            def freeze():
                assert len(session.chain) == 3 and session.failovers == 0, session.chain
                frozen.append(swarm.server_by_peer(session.chain[position][0]))
                session._trails = False  # every server answers from now on, as they do a step over TRAIL_MAX_ROWS
                swarm.freeze(frozen[0])

            got = model.generate(IDS, max_new_tokens=12, do_sample=False, streamer=_AfterTokens(4, freeze))
            assert session.failovers == 1
            assert frozen[0].peer.peer_id not in [peer for peer, _ in session.chain]
        assert got.tolist() == expected.tolist()
        innocent = [s.peer.peer_id for s in swarm.servers if s is not frozen[0]]
        assert [peer for peer in innocent if model.swarm.bans.is_banned(peer)] == []
    finally:
        swarm.thaw(frozen[0]) if frozen else None
        model.close()


def test_beam_search_and_rewinds_survive_a_kill(swarm, local6):
    """Replay reproduces the beam reorderings the failed server had applied, and stops at a rewound position."""
    kwargs = dict(max_new_tokens=10, do_sample=False, num_beams=3)
    expected = local6.generate(IDS, **kwargs)
    model = swarm.client(client_config=FAST)
    try:
        killed = []

        class KillAfter(LogitsProcessor):
            def __init__(self, session):
                self.session, self.calls = session, 0

            def __call__(self, input_ids, scores):
                self.calls += 1
                if self.calls == 5 and not killed:
                    killed.append(swarm.server_by_peer(self.session.chain[1][0]))
                    swarm.kill(killed[0])
                return scores

        with model.inference_session(max_length=32) as session:
            got = model.generate(IDS, logits_processor=LogitsProcessorList([KillAfter(session)]), **kwargs)
            assert session.failovers == 1
        assert got.tolist() == expected.tolist()

        # a rewound session: the replacement is rebuilt to the rewound position only
        swarm.start_server(killed[0].blocks, throughput=1000.0)  # every block has two holders again
        greedy = local6.generate(IDS, max_new_tokens=12, do_sample=False)
        with model.inference_session(max_length=32) as session:
            model.generate(IDS, max_new_tokens=12, do_sample=False)
            session.position = IDS.shape[1] + 3
            swarm.kill(swarm.server_by_peer(session.chain[-1][0]))
            again = model.generate(None, max_new_tokens=9, do_sample=False)
            assert session.failovers == 1
        assert again.tolist() == greedy[:, IDS.shape[1] + 3:].tolist()
    finally:
        model.close()


def test_forward_and_backward_survive_a_killed_server(swarm, local6):
    model = swarm.client(client_config=FAST)
    try:
        layers = model.model.layers
        embeds = local6.model.embed_tokens(IDS).detach()
        reference_in = embeds.clone().requires_grad_(True)
        reference = layers(reference_in)
        reference.pow(2).mean().backward()

        remote_in = embeds.clone().requires_grad_(True)
        out = layers(remote_in)
        _, hops = out.grad_fn.saved  # (pieces, [[(record, span, inputs, activation id)]])
        record = next(record for record, span, *_ in hops[0] if 3 in span)
        swarm.kill(swarm.server_by_peer(record.peer_id))  # the backward pass needs it
        out.pow(2).mean().backward()
        assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
        assert torch.allclose(remote_in.grad, reference_in.grad, rtol=1e-4, atol=1e-6)
        again = layers(embeds)  # a new forward pass avoids the dead server
        assert torch.allclose(again, reference, rtol=1e-5, atol=1e-5)
    finally:
        model.close()


def test_a_server_joining_later_is_used_and_a_moved_server_is_left(tiny_llama_dir):
    local = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    expected = local.generate(IDS, max_new_tokens=8, do_sample=False)
    with InProcessSwarm(str(tiny_llama_dir), [BlockRange(0, 4)], dht_prefix="join") as swarm:
        model = swarm.client(client_config=FAST)
        try:
            assert model.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
            newcomer = swarm.start_server(BlockRange(0, 4))
            first = swarm.servers[0]
            with model.inference_session(max_length=16) as session:
                head = model.generate(IDS, max_new_tokens=3, do_sample=False)
                mover = swarm.server_by_peer(session.chain[0][0])
                other = newcomer if mover is first else first
                swarm.loop.run(mover.move_to(BlockRange(0, 2)), 60)  # ends its sessions: the client fails over
                tail = model.generate(None, max_new_tokens=5, do_sample=False)
                assert session.failovers == 1 and session.chain == [(other.peer.peer_id, BlockRange(0, 4))]
            assert torch.cat([head, tail], 1).tolist() == expected.tolist()
            assert mover.blocks == BlockRange(0, 2) and mover.moves == 1
        finally:
            model.close()


def test_when_nothing_works_the_error_says_what_was_tried(tiny_llama_dir):
    config = ClientConfig(step_timeout_s=1.0, wait_for_blocks_s=1.5, refresh_period_s=0.5)
    with InProcessSwarm(str(tiny_llama_dir), [BlockRange(0, 4)], dht_prefix="doomed") as swarm:
        model = swarm.client(client_config=config)
        try:
            layers = model.model.layers
            with layers.inference_session(max_length=8) as session:
                session.step(torch.randn(1, 2, 64))
                swarm.kill(swarm.servers[0])
                started = time.monotonic()
                with pytest.raises(BlocksNotServedError, match=r"blocks 0:4 of doomed are served by nobody.*banned"):
                    session.step(torch.randn(1, 1, 64))
                assert time.monotonic() - started < 10
            with pytest.raises(BlocksNotServedError, match="0:4"):
                layers(torch.randn(1, 2, 64))
        finally:
            model.close()


def test_a_chain_may_visit_one_server_twice(tiny_llama_dir):
    """A slow server holding everything and a fast one holding the middle: the least-time chain goes slow -> fast
    -> slow, so one server runs two spans of the same session."""
    local = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with InProcessSwarm(str(tiny_llama_dir), dht_prefix="twice") as swarm:
        slow = swarm.start_server(BlockRange(0, 4), throughput=1.0)
        fast = swarm.start_server(BlockRange(1, 3), throughput=1000.0)
        model = swarm.client(client_config=FAST)
        try:
            with model.inference_session(max_length=16) as session:
                got = model.generate(IDS, max_new_tokens=6, do_sample=False)
                assert session.chain == [(slow.peer.peer_id, BlockRange(0, 1)), (fast.peer.peer_id, BlockRange(1, 3)),
                                         (slow.peer.peer_id, BlockRange(3, 4))]
            assert got.tolist() == local.generate(IDS, max_new_tokens=6, do_sample=False).tolist()
        finally:
            model.close()


def test_speculative_generation_survives_a_kill(swarm, local6):
    """Speculative rounds rewind the session after nearly every step; a kill mid-generation changes no token."""
    from transformers import LlamaConfig

    from corolla import AutoDistributedSpeculativeModel

    torch.manual_seed(11)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    expected = local6.generate(IDS, max_new_tokens=20, do_sample=False)
    model = swarm.client(AutoDistributedSpeculativeModel, small_model=draft, client_config=FAST)
    try:
        with model.inference_session(max_length=64) as session:
            def kill():
                swarm.kill(swarm.server_by_peer(session.chain[1][0]))

            got = model.generate(IDS, max_new_tokens=20, do_sample=False, num_draft_tokens=3,
                                 streamer=_AfterTokens(8, kill))
            assert session.failovers == 1
        assert got.tolist() == expected.tolist()
        assert model.last_speculation["rounds"] >= 5
    finally:
        model.close()


def test_a_new_session_opens_on_every_server_at_once_and_one_that_fails_is_replaced(swarm, local6, monkeypatch):
    """With nothing to replay, a session asks every server of its chain at once: the opens overlap (one round trip
    for the chain, not one per server). When one of them fails, the sessions the others opened are closed, it is
    banned, and the session opens on a chain around it, with local's tokens."""
    swarm.network.set_default_delay(0.05)  # each open takes a round trip of at least 0.1 s
    opens = []
    original = InferenceSession._open_hop

    async def recorded(self, record, span, in_chain=True):
        started = time.monotonic()
        try:
            return await original(self, record, span, in_chain)
        finally:
            if in_chain:  # not the checking servers' sessions
                opens.append((started, time.monotonic(), record.peer_id))

    monkeypatch.setattr(InferenceSession, "_open_hop", recorded)
    model = swarm.client(client_config=dataclasses.replace(FAST, step_timeout_s=5.0, verify_fraction=0.0))
    try:
        expected = local6.generate(IDS, max_new_tokens=3, do_sample=False).tolist()
        assert model.generate(IDS, max_new_tokens=3, do_sample=False).tolist() == expected
        assert len(opens) == 3 and max(s for s, _, _ in opens) < min(e for _, e, _ in opens)  # all at once
        dead = swarm.servers[1]  # the primary for 2:4
        swarm.kill(dead)
        opens.clear()
        assert model.generate(IDS, max_new_tokens=3, do_sample=False).tolist() == expected
        assert dead.peer.peer_id in {peer for _, _, peer in opens[:3]}  # it was asked first, with the others
        assert dead.peer.peer_id not in {peer for _, _, peer in opens[3:]}  # then left out
        for server in swarm.servers:
            if server is not dead:  # the sessions opened beside the failed one were closed, like every other
                assert _wait_until(lambda: not server.handler.sessions), server.blocks
    finally:
        model.close()


def _wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
