"""The distributed model where Hugging Face users expect local transformers' behaviour, in one process (the embedded
model's real weights and two real servers on the in-memory network): sessions belong to the thread that entered
them, transformers' manual decoding loop, the checkpoint's generation defaults, default lengths, generation from
embeddings, hidden states in transformers' shape, and sessions that stay usable after a failed or beam-search call."""
from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from corolla.client.model import AutoDistributedModelForCausalLM
from corolla.core.blocks import BlockRange
from corolla.client.session import SessionLengthError
from corolla.testing.inprocess import InProcessSwarm


@pytest.fixture(scope="module")
def swarm(embedded_dir):
    with InProcessSwarm(str(embedded_dir), [BlockRange(0, 15), BlockRange(15, 30)], dht_prefix="hf") as swarm:
        yield swarm


@pytest.fixture(scope="module")
def remote(swarm):
    model = swarm.client(torch_dtype=torch.float32)
    try:
        yield model
    finally:
        model.close()


def _ids(tokenizer, text="The capital of France is"):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def test_a_session_belongs_to_the_thread_that_entered_it(remote, llama_local, tokenizer):
    """A session entered in one thread does not take over another thread's calls (as Petals keeps it, per context):
    the other thread's forward and generate() are stateless and equal local; the session's position is untouched."""
    a, b = _ids(tokenizer), _ids(tokenizer, "def fibonacci(n):")
    seen = {}

    def other_thread():
        with torch.no_grad():
            seen["logits"] = remote(b).logits
            seen["tokens"] = remote.generate(b, max_new_tokens=5, do_sample=False)

    with remote.inference_session(max_length=64) as session:
        remote.generate(a, max_new_tokens=3, do_sample=False)
        position = session.position
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert session.position == position and remote.active_session is session
    with torch.no_grad():
        assert (seen["logits"] - llama_local(b).logits).abs().max().item() < 1e-3
        assert torch.equal(seen["tokens"], llama_local.generate(b, max_new_tokens=5, do_sample=False))


def test_manual_decoding_loop_outside_a_session(remote, llama_local, tokenizer):
    """transformers' loop ``out = model(ids); out = model(next, cache=out.cache, attention_mask=...)``: outside a
    session the servers keep nothing, so the returned cache replays the sequence; the tokens equal local's loop
    (before, the second call ran its token with no context)."""
    ids = _ids(tokenizer)
    got, expected, logits = [], [], []
    with torch.no_grad():
        for model, tokens in ((remote, got), (llama_local, expected)):
            out = model(ids, use_cache=True)
            mask = torch.ones_like(ids)
            for _ in range(5):
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token.item())
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(token, cache=out.cache, attention_mask=mask)
            logits.append(out.logits)
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
    assert logits[0].shape == logits[1].shape == (1, 1, remote.config.vocab_size)
    assert (logits[0] - logits[1]).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="attention_mask must cover all"):
        with torch.no_grad():
            first = remote(ids, use_cache=True)
            remote(ids[:, :1], cache=first.cache, attention_mask=torch.ones(1, 1, dtype=torch.long))


def test_checkpoint_generation_defaults_and_default_length(swarm, remote, llama_local, tokenizer, embedded_dir,
                                                           tmp_path):
    """The checkpoint's generation_config.json (end-of-turn ids, lengths) is loaded as transformers loads it; with
    no length anywhere, generate() makes transformers' default 20 new tokens (it failed after one)."""
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(remote.generate(ids, do_sample=False), llama_local.generate(ids, do_sample=False))
    copy = tmp_path / "model"
    shutil.copytree(embedded_dir, copy)
    settings = json.loads((copy / "generation_config.json").read_text())
    period = tokenizer.convert_tokens_to_ids(".")
    settings.update(eos_token_id=[2, period], max_new_tokens=12)
    (copy / "generation_config.json").write_text(json.dumps(settings))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(copy), dht_prefix="hf", transport_factory=swarm.network.factory("defaults"), torch_dtype=torch.float32)
    try:
        local = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()
        assert model.generation_config.eos_token_id == [2, period] and model.generation_config.max_new_tokens == 12
        with torch.no_grad():
            got, expected = model.generate(ids, do_sample=False), local.generate(ids, do_sample=False)
        assert torch.equal(got, expected) and got[0, -1].item() == period, tokenizer.decode(got[0])
    finally:
        model.close()


def test_generate_from_embeddings(remote, llama_local, tokenizer):
    """generate(inputs_embeds=...) without ids returns only the new tokens, as local (it said no session held
    tokens); inside a session that holds tokens it is refused with the reason."""
    ids = _ids(tokenizer)
    with torch.no_grad():
        embeds = llama_local.get_input_embeddings()(ids)
        got = remote.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, llama_local.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False))
        with remote.inference_session(max_length=32):
            remote.generate(ids, max_new_tokens=2, do_sample=False)
            with pytest.raises(ValueError, match="starts a sequence"):
                remote.generate(inputs_embeds=embeds, max_new_tokens=2)


def test_hidden_states_in_transformers_shape_and_attentions_refused(remote, llama_local, tokenizer):
    """output_hidden_states gives transformers' tuple (one entry per block and one more): the first is what enters
    block 0, the last the final normed state, and the blocks between, which the servers never send, are None rather
    than another block's outputs. output_attentions is refused naming why (it was ignored)."""
    ids = _ids(tokenizer)
    with torch.no_grad():
        got = remote(ids, output_hidden_states=True).hidden_states
        expected = llama_local(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 31
    assert torch.equal(got[0], expected[0]) and (got[-1] - expected[-1]).abs().max().item() < 1e-3
    assert all(entry is None for entry in got[1:-1])
    mask = torch.ones_like(ids, dtype=torch.float32)
    mask[0, 0] = 0
    with torch.no_grad():  # a 0./1. mask, as transformers takes it
        assert (remote(ids, attention_mask=mask).logits - llama_local(ids, attention_mask=mask).logits).abs().max() < 1e-3
    with pytest.raises(ValueError, match="only 0 and 1"):
        remote(ids, attention_mask=mask * 0.5)
    with pytest.raises(ValueError, match="output_attentions"):
        remote(ids, output_attentions=True)


class _Collect(BaseStreamer):
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        pass


def test_sessions_stay_usable_after_a_failed_call_and_streamers_see_this_call(remote, llama_local, tokenizer):
    """A generate() that fails in a session (here: past its max_length) leaves the session as it was, so the next
    call continues it (it said the tokens 'were sent as embeddings'); a streamer hears this call's inputs, not the
    session's history; after beam search the session refuses to continue, naming the beams."""
    ids, more = _ids(tokenizer), _ids(tokenizer, " It is")
    with torch.no_grad():
        with remote.inference_session(max_length=24) as session:
            first = remote.generate(ids, max_new_tokens=3, do_sample=False)
            position = session.position
            with pytest.raises(SessionLengthError):
                remote.generate(more, max_new_tokens=40, do_sample=False)
            assert session.position == position
            streamer = _Collect()
            second = remote.generate(more, max_new_tokens=4, do_sample=False, streamer=streamer)
        assert torch.equal(streamer.values[0], more)
        whole = torch.cat([first, second], dim=1)
        expected = llama_local.generate(torch.cat([first, more], dim=1), max_new_tokens=4, do_sample=False)
        assert torch.equal(whole, expected)
        with remote.inference_session(max_length=32):
            remote.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
            with pytest.raises(ValueError, match="ran 2 rows in it for 1 input"):
                remote.generate(more, max_new_tokens=2)
