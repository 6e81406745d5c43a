"""Compressed activations on the wire: each codec through real servers (forward, sessions, relays), the bytes it
saves, and the error it costs; exact-match paths keep ``none``."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from corolla.client.config import ClientConfig
from corolla.client.session import TRAIL_MAX_ROWS
from corolla.core.blocks import BlockRange
from corolla.testing.inprocess import InProcessSwarm

SPANS = [BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)]
IDS = torch.tensor([list(range(3, 67))])  # 64 tokens


@pytest.fixture(scope="module")
def local6(tiny_llama6_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama6_dir).eval()


@pytest.fixture(scope="module")
def swarm(tiny_llama6_dir):
    with InProcessSwarm(str(tiny_llama6_dir), SPANS, dht_prefix="codecs") as swarm:
        yield swarm


def _bytes_between(swarm, client_id):
    """Bytes the client sent to the first server, and the first server to the second."""
    first, second = swarm.servers[0].peer.peer_id, swarm.servers[1].peer.peer_id
    sent = swarm.network.bytes_sent
    return sent[client_id, first], sent[first, second]


@pytest.mark.parametrize("codec, ratio, logit_error", [
    ("none", 1.0, 1e-5), ("float16", 0.5, 1e-2), ("bfloat16", 0.5, 5e-2), ("int8-block64", 0.27, 5e-2)])
def test_codecs_shrink_what_travels_and_keep_outputs_close(codec, ratio, logit_error, swarm, local6):
    model = swarm.client(client_config=ClientConfig(wire_codec=codec))
    try:
        client_id = model.swarm.transport.peer_id
        with torch.no_grad():
            expected = local6(IDS).logits
            with model.inference_session(max_length=80) as session:  # one prefill step of 64 tokens, relayed
                session.step(torch.zeros(1, 0, local6.config.hidden_size))  # opens the streams
                before = _bytes_between(swarm, client_id)
                got = model(IDS).logits
                after = _bytes_between(swarm, client_id)
        to_first, first_to_second = (b - a for a, b in zip(before, after))
        error = (got - expected).abs().max().item() / expected.abs().max().item()
        assert error <= logit_error, error
        if codec != "none":
            assert error > 0  # it really went through the codec
        hidden_bytes = IDS.numel() * local6.config.hidden_size * 4  # the step's float32 hidden states
        for sent in (to_first, first_to_second):  # the client's step and the first server's relay
            assert hidden_bytes * ratio <= sent <= hidden_bytes * ratio + 2500  # + header, mask, positions
        tokens = model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False)
        assert tokens.shape == (1, 14)
        # a step small enough for a trail: the last server answers with the two others' outputs too, compressed
        # by the 16-bit codecs (which encode their own output exactly); under int8 blocks (which do not) every
        # server answers for itself, each answer compressed
        third = swarm.servers[2].peer.peer_id
        with torch.no_grad(), model.inference_session(max_length=40) as session:
            session.step(torch.zeros(1, 0, local6.config.hidden_size))
            before = swarm.network.bytes_sent[third, client_id]
            model(IDS[:, :TRAIL_MAX_ROWS])
            answered = swarm.network.bytes_sent[third, client_id] - before
            assert session._trails  # every output in every trail was the one its server signed
        step_bytes = TRAIL_MAX_ROWS * local6.config.hidden_size * 4
        carried = 0 if codec == "int8-block64" else 2 * ratio
        assert (carried + ratio) * step_bytes <= answered <= (carried + ratio) * step_bytes + 3000, answered
    finally:
        model.close()


def test_unknown_codecs_are_refused(swarm):
    with pytest.raises(ValueError, match="unknown wire codec 'zip'"):
        swarm.client(client_config=ClientConfig(wire_codec="zip"))
