"""Server-to-server relay of inference steps: each server forwards its outputs to the next one of the chain; small
steps are answered by the last server with a signed trail of every server's outputs, long ones by every server;
unreachable links fall back to the client; forged relays, altered trails and malformed trails are refused."""
from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from corolla.client.config import ClientConfig
from corolla.client.session import TRAIL_MAX_ROWS
from corolla.client.rpc import SessionStream
from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, RemoteError
from corolla.net.exchange import open_exchange
from corolla.server.relay import RelayLinks, Relays
from corolla.testing.inprocess import InProcessSwarm
from corolla.wire.framing import encode_message, read_message, write_message
from corolla.wire.messages import ErrorReply, OpenSession, RelayOpen, RelayOpened, SessionStep
from corolla.wire.relay import NextHop, encode_route

SPANS = [BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)]
IDS = torch.tensor([[5, 6, 7, 8, 9]])
HIDDEN = 64


@pytest.fixture(scope="module")
def local6(tiny_llama6_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama6_dir).eval()


@pytest.fixture
def swarm(tiny_llama6_dir):
    with InProcessSwarm(str(tiny_llama6_dir), SPANS, dht_prefix="relay") as swarm:
        yield swarm


def _counts(swarm):
    return [dict(server.handler.counts) for server in swarm.servers]


def _first_two_records(swarm, client):
    """The DHT records of the chain's first two servers, as ``client`` sees them."""
    records = {r.peer_id: r for r in client.run(client.refresh())}
    return records[swarm.servers[0].peer.peer_id], records[swarm.servers[1].peer.peer_id]


async def _open_pair(client, rec1, rec2, token: str, trail_key=None):
    """Session "s1" at the first server (no relay token) and "s2" at the second, which accepts relays with
    ``token``; returns (s1's stream, s2's stream)."""
    target = await SessionStream.open(client.transport, rec2, OpenSession("s2", SPANS[1], 16, 1, relay_token=token,
                                                                          trail_key=trail_key), 10)
    source = await SessionStream.open(client.transport, rec1, OpenSession("s1", SPANS[0], 16, 1), 10)
    return source, target


def _relay_to_targets(swarm, scenario) -> None:
    """Run ``scenario(links, targets, hop)`` on a client standing in for the first server of two chains: ``links``
    its relay streams, ``targets`` sessions "s2a" and "s2b" at the second server (``_open_targets``), ``hop(name)``
    the route to one of them."""
    model = swarm.client()
    client = model.swarm
    try:
        _, rec2 = _first_two_records(swarm, client)

        def hop(name):
            return [NextHop(rec2.peer_id, f"s2{name}", name * 32, "float32", tuple(rec2.maddrs))]

        async def run():
            targets = await _open_targets(client, rec2)
            links = RelayLinks(client.transport, 10)
            try:
                await scenario(links, targets, hop)
            finally:
                links.close()
                for target in targets.values():
                    target.close()

        client.run(run(), 60)
    finally:
        model.close()


async def _open_targets(client, rec2):
    """Sessions "s2a" and "s2b" at the second server, accepting relays with tokens "a" * 32 and "b" * 32."""
    return {name: await SessionStream.open(client.transport, rec2, OpenSession(
        f"s2{name}", SPANS[1], 16, 1, relay_token=name * 32), 10) for name in ("a", "b")}


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "hub"])
def test_steps_travel_server_to_server(relay, swarm, local6):
    model = swarm.client(client_config=ClientConfig(relay=relay))
    try:
        expected = local6.generate(IDS, max_new_tokens=10, do_sample=False)
        with model.inference_session(max_length=32) as session:
            got = model.generate(IDS, max_new_tokens=10, do_sample=False)
            assert [span for _, span in session.chain] == SPANS
        assert got.tolist() == expected.tolist()
        beams = dict(max_new_tokens=6, do_sample=False, num_beams=3)
        assert model.generate(IDS, **beams).tolist() == local6.generate(IDS, **beams).tolist()
    finally:
        model.close()
    first, second, third = _counts(swarm)
    steps = first["client_steps"]
    assert steps >= 16  # 10 greedy + 6 beam steps, all sent to the first server by the client
    if relay:  # the others got every step from the server before them, none from the client; every step is small
        # enough for a trail: only the last server answered, with the others' outputs
        assert second == {"client_steps": 0, "relayed_in": steps, "relayed_out": steps, "answered": 0}
        assert third == {"client_steps": 0, "relayed_in": steps, "relayed_out": 0, "answered": steps}
        assert first["relayed_out"] == steps and first["answered"] == 0
    else:
        assert second["client_steps"] == third["client_steps"] == steps
        assert second["relayed_in"] == third["relayed_in"] == first["relayed_out"] == 0
        assert first["answered"] == second["answered"] == third["answered"] == steps


def test_an_unreachable_next_server_is_reported_and_the_client_carries_that_link(swarm, local6):
    first, second, third = swarm.servers
    swarm.network.block(second.peer.peer_id, third.peer.peer_id)  # a firewall between two servers
    model = swarm.client()
    try:
        with model.inference_session(max_length=32) as session:
            got = model.generate(IDS, max_new_tokens=8, do_sample=False)
            assert [hop.relay_ok for hop in session._hops] == [True, False, True]
            assert session.failovers == 0  # the third server is fine: only the link was bad
        assert got.tolist() == local6.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
    finally:
        model.close()
    counts = _counts(swarm)
    assert counts[1]["relayed_out"] == 0 and counts[2]["relayed_in"] == 0
    assert counts[2]["client_steps"] == counts[0]["client_steps"]  # the client sent each step to the third itself


def test_forged_relays_and_routes_are_refused_and_the_server_keeps_serving(swarm):
    model = swarm.client()
    client = model.swarm
    try:
        rec1, rec2 = _first_two_records(swarm, client)
        token = "t" * 32

        async def scenario():
            source, target = await _open_pair(client, rec1, rec2, token)
            try:
                # a relay into s2 with a wrong token, or into a session that does not exist
                for session_id, wrong in (("s2", "x" * 32), ("nope", token)):
                    with pytest.raises(RemoteError, match="accepts relays with that token"):
                        await open_exchange(client.transport, rec2.peer_id, rec2.maddrs,
                                            RelayOpen(session_id, wrong), 10)
                # the right token, but a pushed step naming another session
                _, reader, writer, _ = await open_exchange(client.transport, rec2.peer_id, rec2.maddrs,
                                                           RelayOpen("s2", token), 10)
                await write_message(writer, SessionStep("s1", torch.randn(1, 1, HIDDEN)))
                refused = await read_message(reader)
                assert isinstance(refused, ErrorReply) and "session 's1' has not joined this relay stream" \
                    in refused.message
                writer.close()
                # a malformed route is refused before any compute
                bad = SessionStep("s1", torch.randn(1, 2, HIDDEN), next_hops=[{"peer_id": rec2.peer_id}])
                with pytest.raises(RemoteError, match="next_hops: session_id must be a string"):
                    await source.step(bad, 10)
                # a route naming a peer that serves no blocks of this model (here: the client itself): s1 answers,
                # relays nowhere and says why
                stranger = NextHop(client.transport.peer_id, "s2", token, "float32", ("/ip4/10.9.8.7/tcp/4000",))
                reply = await source.step(SessionStep("s1", torch.randn(1, 2, HIDDEN),
                                                      next_hops=encode_route([stranger])), 10)
                assert "announces no blocks of this model" in reply.relay_error
                # a route naming s2 with a forged token (and addresses of the client's choosing): s1 answers, and says
                # it could not relay
                hop = NextHop(rec2.peer_id, "s2", "f" * 32, "float32", ("/ip4/10.9.8.7/tcp/4000",))
                reply = await source.step(SessionStep("s1", torch.randn(1, 2, HIDDEN), next_hops=encode_route([hop])),
                                          10)
                assert reply.position == 4 and "accepts relays with that token" in reply.relay_error
                # with the true token the step reaches s2, which answers on its own stream (s1 rewinds first, so
                # both hold the same tokens)
                hop = NextHop(rec2.peer_id, "s2", token, "float32", tuple(rec2.maddrs))
                reply = await source.step(SessionStep("s1", torch.randn(1, 3, HIDDEN), next_hops=encode_route([hop]),
                                                      start_from_position=0, step_index=7, attempt=1), 10)
                assert reply.relay_error is None and reply.position == 3
                relayed = await target.receive(10, 7, 1)
                assert relayed.position == 3 and relayed.hidden_states.shape == (1, 3, HIDDEN)
                # s1 dialled only where s2 announces itself, never the addresses a route named
                assert dialled and all(where == tuple(rec2.maddrs) for _, where in dialled), dialled
            finally:
                source.close()
                target.close()

        dialled = []
        first = swarm.servers[0].peer
        dial = first.open_stream

        async def spy(peer_id, protocol, maddrs=None):
            dialled.append((peer_id, tuple(maddrs or ())))
            return await dial(peer_id, protocol, maddrs)

        first.open_stream = spy
        client.run(scenario(), 60)
        ids = torch.tensor([[1, 2, 3]])
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)  # still serving
    finally:
        model.close()


def test_long_steps_are_answered_by_every_server_and_short_ones_by_the_last(swarm, local6):
    ids = torch.arange(3, 3 + TRAIL_MAX_ROWS + 8).unsqueeze(0)  # a prefill over the trail's limit
    model = swarm.client()
    try:
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert got.tolist() == local6.generate(ids, max_new_tokens=4, do_sample=False).tolist()
    finally:
        model.close()
    first, second, third = _counts(swarm)
    assert first["client_steps"] >= 4
    assert first["answered"] == second["answered"] == 1  # the prefill: its bytes would cross every later link
    assert third["answered"] == first["client_steps"]


def test_a_trail_altered_on_the_way_is_caught_and_every_server_answers_from_then_on(swarm, local6, monkeypatch):
    from corolla.server import relay as relay_module

    forger = swarm.servers[1]
    forward = relay_module.Relays.forward

    async def altering(self, step, outputs, route, trail=None, tags=None, trail_key=None, pending=None):
        if self.transport is forger.handler.transport and trail:  # change the first server's outputs it carries
            trail = {name: tensor + 0.5 for name, tensor in trail.items()}
        return await forward(self, step, outputs, route, trail, tags, trail_key, pending)

    monkeypatch.setattr(relay_module.Relays, "forward", altering)
    model = swarm.client()
    try:
        with model.inference_session(max_length=32) as session:
            got = model.generate(IDS, max_new_tokens=8, do_sample=False)
            assert session._trails is False  # caught at the first step: each server answers for itself now
            assert session.failovers == 0  # nobody can tell which server altered it: no one is banned for it
        assert got.tolist() == local6.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
    finally:
        model.close()
    first, _, third = _counts(swarm)
    assert third["answered"] == first["client_steps"] and first["answered"] == first["client_steps"] - 1


def test_a_route_that_loops_is_refused_before_any_compute(swarm):
    """A route naming the server that reads it, or another server twice, is refused naming the server: one step
    along B, A, B, A, ... (64 hops, each rewinding to the start) had the two servers compute it 65 times."""
    first, second, third = swarm.servers
    model = swarm.client()
    client = model.swarm
    try:
        rec1, rec2 = _first_two_records(swarm, client)
        token = "t" * 32

        def hop(server, session_id):
            return NextHop(server.peer.peer_id, session_id, token, "float32")

        async def scenario():
            source = await SessionStream.open(client.transport, rec1, OpenSession("s1", SPANS[0], 16, 1,
                                                                                  relay_token=token), 10)
            target = await SessionStream.open(client.transport, rec2, OpenSession("s2", SPANS[1], 16, 1,
                                                                                  relay_token=token), 10)
            try:
                ran = first.handler.compute.tokens_run
                loops = {f"name this server ({first.peer.peer_id}) again": [hop(second, "s2"), hop(first, "s1")],
                         f"name server {second.peer.peer_id} 2 times": [hop(second, "s2"), hop(third, "s3"),
                                                                         hop(second, "s2")]}
                for message, route in loops.items():
                    with pytest.raises(RemoteError, match=re.escape(message)):
                        await source.step(SessionStep("s1", torch.randn(1, 4, HIDDEN), start_from_position=0,
                                                      next_hops=encode_route(route)), 10)
                assert first.handler.compute.tokens_run == ran and second.handler.compute.tokens_run == 0
                reply = await source.step(SessionStep("s1", torch.randn(1, 2, HIDDEN), step_index=3, attempt=1,
                                                      next_hops=encode_route([hop(second, "s2")])), 10)
                assert reply.relay_error is None and (await target.receive(10, 3, 1)).position == 2
            finally:
                source.close()
                target.close()

        client.run(scenario(), 60)
    finally:
        model.close()


def test_relay_streams_without_an_open_session_are_closed_once_idle(tiny_llama6_dir):
    """A relay stream serves on while a session that joined it is open, however long it carries nothing (the
    session may step on its own stream meanwhile); once none is, and nothing came for the idle timeout, its receiver
    closes it, saying why. Relay streams never timed out: one peer's 250, opened and left, held 250 streams and
    descriptors of the server's for good."""
    with InProcessSwarm(str(tiny_llama6_dir), dht_prefix="relay-idle") as swarm:
        server = swarm.start_server(SPANS[1], session_idle_timeout_s=1.0)
        sender = swarm.loop.run(swarm.network.create_transport("sender"))
        token = "t" * 32

        async def scenario():
            session = await SessionStream.open(sender, server.record(), OpenSession("s2", SPANS[1], 16, 1,
                                                                                    relay_token=token), 10)
            streams = [await open_exchange(sender, server.peer.peer_id, [], RelayOpen("s2", token), 10)
                       for _ in range(3)]
            reads = [asyncio.ensure_future(read_message(reader)) for _, reader, _, _ in streams]
            try:
                for position in range(1, 7):  # 2.4 s of steps on the session's own stream, none relayed
                    await session.step(SessionStep("s2", torch.randn(1, 1, HIDDEN)), 10)
                    await asyncio.sleep(0.4)
                assert not any(read.done() for read in reads)  # the session is open: its relay streams stay
                assert server.dispatcher.streams_by_peer[sender.peer_id] == 4
                session.close()  # the session ends; its relay streams carry nothing for the idle timeout
                errors = await asyncio.wait_for(asyncio.gather(*reads), 5)
                assert all(isinstance(e, ErrorReply) and "push stream idle for 1 s: closed" in e.message
                           for e in errors)
                assert [await read_message(reader) for _, reader, _, _ in streams] == [None] * 3  # ended
                for _ in range(50):
                    if sender.peer_id not in server.dispatcher.streams_by_peer:
                        break
                    await asyncio.sleep(0.1)
                assert sender.peer_id not in server.dispatcher.streams_by_peer  # every stream of the peer's is gone
            finally:
                session.close()
                for read, (_, _, writer, _) in zip(reads, streams):
                    read.cancel()
                    writer.close()

        swarm.loop.run(scenario(), 60)
        swarm.loop.run(sender.shutdown(), 5)


def test_malformed_trails_are_refused_and_the_server_keeps_serving(swarm):
    model = swarm.client()
    client = model.swarm
    try:
        rec1, rec2 = _first_two_records(swarm, client)
        token = "t" * 32

        async def scenario():
            keyless, target = await _open_pair(client, rec1, rec2, token, trail_key="k" * 32)
            try:
                one = torch.randn(1, 1, HIDDEN)
                with pytest.raises(RemoteError, match="a step from the client starts a trail"):
                    await target.step(SessionStep("s2", one, answer_last=True, trail={"0": one}, trail_tags=["a"]), 10)
                with pytest.raises(RemoteError, match="come only with answer_last"):
                    await target.step(SessionStep("s2", one, trail={"0": one}, trail_tags=["a", "b"]), 10)
                hop = NextHop(rec2.peer_id, "s2", token, "float32", tuple(rec2.maddrs))
                with pytest.raises(RemoteError, match="answer_last needs a session opened with a trail_key"):
                    await keyless.step(SessionStep("s1", one, next_hops=encode_route([hop]), answer_last=True), 10)
                _, reader, writer, _ = await open_exchange(client.transport, rec2.peer_id, rec2.maddrs,
                                                           RelayOpen("s2", token), 10)
                cases = [  # pushed by a (forged) previous server: refused on the session's stream, naming the cause
                    ({"0": torch.randn(1, 2, HIDDEN)}, ["a", "b"], r"trail entry 0 must be .* shape \[1, 1, 64\]"),
                    ({"5": one}, ["a", "b"], "trail entries must be named 0..0"),
                    (None, ["a", "b"], "one more tag than its trail"),
                    (None, ["x" * 65], "each trail tag must be a string of 1..64 characters"),
                    (None, None, "one more tag than its trail"),
                ]
                for index, (trail, tags, message) in enumerate(cases, 1):
                    await write_message(writer, SessionStep("s2", one, answer_last=True, trail=trail, trail_tags=tags,
                                                            step_index=index, attempt=1, relay_token=token))
                    with pytest.raises(RemoteError, match=message):
                        await target.receive(10, index, 1)
                # a well-formed one runs; the last server answers with the trail, its own input added
                await write_message(writer, SessionStep("s2", one, answer_last=True, trail_tags=["a"], step_index=9,
                                                        attempt=1, relay_token=token))
                reply = await target.receive(10, 9, 1)
                assert reply.position == 1 and torch.equal(reply.trail["0"], one) and reply.trail_tags == ["a"]
                writer.close()
            finally:
                target.close()
                keyless.close()

        client.run(scenario(), 60)
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    finally:
        model.close()


def test_sessions_relayed_to_one_server_share_one_stream_and_steps_of_a_turn_go_in_one_write(swarm):
    async def scenario(links, targets, hop):  # the client stands in for the first server of both chains
        relays = {name: Relays(links) for name in targets}
        route = {name: hop(name) for name in targets}

        def step(index, new=1):
            return SessionStep("s1", torch.randn(1, new, HIDDEN), step_index=index, attempt=1)

        first = step(1)  # opens the stream for s2a
        assert await relays["a"].forward(first, first.hidden_states, route["a"]) is None
        second = step(1, new=2)  # s2b joins the same stream
        assert await relays["b"].forward(second, second.hidden_states, route["b"]) is None
        assert links.open_links == 1 and links.totals() == (3, 2)  # (writes, steps): s2b's join was a write
        # two sessions' steps of one turn of the loop (one batched call's outputs): one write, two frames
        a, b = step(2), step(2)
        assert await asyncio.gather(relays["a"].forward(a, a.hidden_states, route["a"]),
                                    relays["b"].forward(b, b.hidden_states, route["b"])) == [None, None]
        assert links.totals() == (4, 4)
        for name, positions in (("a", (1, 2)), ("b", (2, 3))):  # each ran in its own session, in order
            for index, position in zip((1, 2), positions):
                reply = await targets[name].receive(10, index, 1)
                assert reply.position == position
        relays["a"].close()
        assert links.open_links == 1  # s2b still relays on it
        relays["b"].close()
        assert links.open_links == 0  # the last session left: the stream is closed

    _relay_to_targets(swarm, scenario)


def test_a_relay_stream_refused_at_its_opening_is_closed_at_once_by_its_sender(swarm):
    """The receiver of a refused opening waits for the sender to end the exchange (``requester_closed``): the sending
    server closes the link as soon as it reads the refusal, and the joins sent behind the opening hear of it then,
    not after the relay timeout."""
    server = swarm.servers[1]

    async def scenario(links, targets, hop):
        nowhere = NextHop(hop("a")[0].peer_id, "nope", "n" * 32, "float32", hop("a")[0].maddrs)
        link, opening = await links.link(nowhere, wait=False)
        _, behind = await links.link(hop("a")[0], wait=False)  # a join sent behind the refused opening
        started = asyncio.get_running_loop().time()
        refusal = await asyncio.wait_for(opening, 5)
        assert isinstance(refusal, RemoteError) and "no session 'nope' here accepts relays" in str(refusal)
        closed = await asyncio.wait_for(behind, 5)
        assert isinstance(closed, RemoteError) and "the relay stream closed" in str(closed)
        assert asyncio.get_running_loop().time() - started < 2.0
        assert link.closed
        await asyncio.sleep(0.3)  # the receiver saw the end: only the two target sessions' streams are left
        assert sum(server.dispatcher.streams_by_peer.values()) == 2

    _relay_to_targets(swarm, scenario)


def test_a_shared_relay_stream_refuses_what_is_not_its_own_and_keeps_serving(swarm):
    """On a relay stream opened for s2a: a join with a wrong token is refused (and the stream serves on), a step of a
    session that has not joined is refused, a session that joins with its token is served, a step that names a
    joined session with another token (behind a refused join of its own, as a sender's other client would send it)
    is refused and leaves the session alone, and a session's fifth waiting step is dropped rather than holding up
    the stream."""
    model = swarm.client()
    client = model.swarm
    try:
        _, rec2 = _first_two_records(swarm, client)

        async def scenario():
            targets = await _open_targets(client, rec2)
            _, reader, writer, _ = await open_exchange(client.transport, rec2.peer_id, rec2.maddrs,
                                                       RelayOpen("s2a", "a" * 32), 10)
            try:
                one = torch.randn(1, 1, HIDDEN)
                await write_message(writer, RelayOpen("s2b", "a" * 32))  # s2a's token is not s2b's
                refused = await read_message(reader)
                assert isinstance(refused, RelayOpened) and refused.session_id == "s2b"
                assert "no session 's2b' here accepts relays with that token" in refused.refused
                await write_message(writer, SessionStep("s2b", one, step_index=1, attempt=1, relay_token="a" * 32))
                error = await read_message(reader)
                assert isinstance(error, ErrorReply) and "'s2b' has not joined this relay stream" in error.message
                await write_message(writer, SessionStep("s2a", one, step_index=1, attempt=1, relay_token="a" * 32))
                assert (await targets["a"].receive(10, 1, 1)).position == 1  # s2a is served all along
                await write_message(writer, RelayOpen("s2b", "b" * 32))
                joined = await read_message(reader)
                assert isinstance(joined, RelayOpened) and joined.session_id == "s2b" and joined.refused is None
                await write_message(writer, SessionStep("s2b", one, step_index=1, attempt=1, relay_token="b" * 32))
                assert (await targets["b"].receive(10, 1, 1)).position == 1
                # s2a joined: another token's join is refused, and the steps with that token (or none) behind it too
                await write_message(writer, RelayOpen("s2a", "f" * 32))
                refused = await read_message(reader)
                assert isinstance(refused, RelayOpened) and refused.refused is not None
                for token in ("f" * 32, None):
                    await write_message(writer, SessionStep("s2a", torch.randn(1, 5, HIDDEN), start_from_position=0,
                                                            step_index=99, attempt=1, relay_token=token))
                    error = await read_message(reader)
                    assert isinstance(error, ErrorReply) and \
                        "'s2a' did not join this relay stream with the token of step 99" in error.message
                # six steps of s2a in one write: its inbox holds four, the rest are refused at once
                writer.write(b"".join(encode_message(SessionStep("s2a", one, step_index=i, attempt=1,
                                                                 relay_token="a" * 32)) for i in range(2, 8)))
                dropped = [await read_message(reader) for _ in range(2)]
                assert all(isinstance(e, ErrorReply) and "steps waiting already" in e.message for e in dropped)
                assert [(await targets["a"].receive(10, i, 1)).position for i in range(2, 6)] == [2, 3, 4, 5]
            finally:
                writer.close()
                for target in targets.values():
                    target.close()

        client.run(scenario(), 60)
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    finally:
        model.close()


def test_another_client_of_the_relaying_server_cannot_step_in_a_session_it_names_without_its_token(swarm, local6):
    """A client of the first server names, in its route, a victim's session on the second (its id leaked, its token
    not). The first server pushes the step over the relay stream the victim's session joined, behind a join with the
    wrong token: the join is refused and so is the step, which ran in the victim's session (its cache overwritten,
    its next tokens wrong) when the stream matched steps by session id alone. The victim's tokens equal local ones."""
    first, second, _ = swarm.servers
    expected = local6.generate(IDS, max_new_tokens=8, do_sample=False)
    model = swarm.client(client_config=ClientConfig(step_timeout_s=3.0))
    attacker = swarm.client()
    try:
        with model.inference_session(max_length=32) as session:
            model.generate(IDS, max_new_tokens=4, do_sample=False)
            victim = next(iter(second.handler.sessions.sessions.values()))
            position = victim.position

            async def inject():
                stream = await SessionStream.open(attacker.swarm.transport, first.record(), OpenSession(
                    "attacker", SPANS[0], 32, 1, relay_token="r" * 32, trail_key="k" * 32), 10)
                try:
                    hop = NextHop(second.peer.peer_id, victim.session_id, "f" * 32, "float32")
                    return await stream.step(SessionStep(
                        "attacker", torch.randn(1, position, HIDDEN) * 5, start_from_position=0, step_index=999,
                        attempt=1, answer_last=True, next_hops=encode_route([hop])), 10)
                finally:
                    stream.close()

            reply = attacker.swarm.run(inject(), 30)
            assert "accepts relays with that token" in reply.relay_error  # the first server tells its client why
            more = model.generate(None, max_new_tokens=4, do_sample=False)  # (the session goes on: new tokens)
            assert session.failovers == 0
        assert more.tolist() == expected[:, -4:].tolist()
    finally:
        attacker.close()
        model.close()


def test_sessions_stepping_together_are_relayed_in_shared_writes_and_equal_local(tiny_llama6_dir, local6):
    """Six clients at once through servers that allow each peer three streams: every step is relayed (a stream per
    relayed session would pass that cap), batched steps leave in shared writes, relayed steps never wait for company,
    and every client gets local's tokens."""
    prompts = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 3, 7]]), torch.tensor([[2, 9, 4, 4, 8, 1]]),
               torch.tensor([[30, 31]]), torch.tensor([[17, 2, 40]]), torch.tensor([[8, 8, 1, 50]])]
    results: dict[int, object] = {}
    with InProcessSwarm(str(tiny_llama6_dir), SPANS, dht_prefix="relay-cap", max_streams_per_peer=3) as swarm:
        models = [swarm.client() for _ in prompts]

        def run(index):
            try:
                results[index] = models[index].generate(prompts[index], max_new_tokens=12, do_sample=False)
            except Exception as exc:  # noqa: BLE001 - reported below
                results[index] = exc

        try:
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            for index, ids in enumerate(prompts):
                assert results[index].tolist() == local6.generate(ids, max_new_tokens=12, do_sample=False).tolist()
        finally:
            for model in models:
                model.close()
        first, second, third = _counts(swarm)
        assert second["client_steps"] == third["client_steps"] == 0  # no link fell back to the client
        assert second["relayed_in"] == third["relayed_in"] == first["client_steps"]
        # groups form at the first server; the others run what is relayed to them without waiting for company
        assert swarm.servers[1].scheduler.gather_s == swarm.servers[2].scheduler.gather_s == 0
        for server in swarm.servers[:2]:
            writes, frames = server.handler.relay_links.totals()
            assert frames == server.handler.counts["relayed_out"]
            assert server.scheduler.largest_batch > 1 and writes < frames  # batched steps left together
            assert server.handler.relay_links.open_links == 0  # every session closed: so did the streams


def test_a_first_relayed_step_goes_right_behind_its_join(swarm):
    """A session's first step to a server goes in the same write as its join, without waiting for the answer; the
    receiver judges the join first, runs the step, and the join's answer arrives after."""
    async def scenario(links, targets, hop):
        joins: list = []
        for name in ("a", "b"):
            step = SessionStep("s1", torch.randn(1, 1, HIDDEN), step_index=1, attempt=1)
            assert await Relays(links).forward(step, step.hidden_states, hop(name), pending=joins) is None
        # a's step opened the stream (its join is the stream's opening request); b's join and step: one write
        assert links.totals() == (2, 2) and [peer for peer, _ in joins] == [hop("a")[0].peer_id] * 2
        for name in ("a", "b"):
            assert (await targets[name].receive(10, 1, 1)).position == 1  # each ran in its own session
        assert [await join for _, join in joins] == [None, None]  # both joins accepted

    _relay_to_targets(swarm, scenario)


def test_a_refused_join_is_answered_by_the_relaying_server_and_the_client_carries_that_link(swarm, local6):
    """The second server refuses the first's relay stream (as a server that lost the session would): the first
    server hears it after its step went, and answers the client itself with its outputs and the relay error, at
    once; the client carries that link and its tokens equal local ones, with no failover and trails still on."""
    first, second, _ = swarm.servers

    def refuse(request):
        raise BadRequestError(f"no session {request.session_id!r} here accepts relays with that token")

    second.handler._relay_target = refuse
    model = swarm.client(client_config=ClientConfig(step_timeout_s=3.0))  # a silent step would show within 3 s
    try:
        with model.inference_session(max_length=32) as session:
            got = model.generate(IDS, max_new_tokens=6, do_sample=False)
            assert [hop.relay_ok for hop in session._hops] == [False, True, True]
            assert session.failovers == 0 and session._trails  # answered, not silent: nothing timed out
        assert got.tolist() == local6.generate(IDS, max_new_tokens=6, do_sample=False).tolist()
    finally:
        model.close()
    counts = _counts(swarm)
    assert counts[0]["relayed_out"] == 0 and counts[1]["relayed_in"] == 0  # the refused step did not count
    assert counts[1]["client_steps"] == counts[0]["client_steps"]  # the client sent each step to the second itself


def test_where_to_relay_is_known_beforehand_and_a_slow_read_does_not_stall_a_step(swarm):
    """A server knows where the model's servers can be dialled before it relays to them (read in the background);
    for one it does not know it reads the records again, but waits at most LOCATE_WAIT_S for that read (after a
    failover the DHT waited out dead peers for 3 s, and the step with it), then relays over the connections its
    daemon has."""
    from corolla.server import server as server_module

    first, second, _ = swarm.servers
    assert swarm.loop.run(first._locate(second.peer.peer_id)) == tuple(second.record().maddrs)

    async def slow_read():
        await asyncio.sleep(5)

    first._read_locations = slow_read
    first._missed_at = float("-inf")
    started = time.monotonic()
    assert swarm.loop.run(first._locate("QmNotKnownYet")) == ()
    assert time.monotonic() - started < server_module.LOCATE_WAIT_S + 1.0
