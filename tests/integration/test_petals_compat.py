"""Code written for Petals 2.x works unchanged: generate() results in sessions, rewinding sessions, names, errors,
and speculative decoding, all checked against local transformers through three server processes."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from corolla.core.errors import CorollaError

PROMPT = "The capital of France is"
FLOAT32_LOGITS = 3e-4  # the embedded model's logits, two float32 computations apart (see its use)


def _ids(tokenizer, text=PROMPT):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _local_block_outputs(local, embeds: torch.Tensor) -> torch.Tensor:
    """The outputs of the last decoder block of the local model for ``embeds`` [1, seq, hidden]."""
    positions = torch.arange(embeds.shape[1]).unsqueeze(0)
    mask = create_causal_mask(config=local.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=positions)
    rotary = local.model.rotary_emb(embeds, positions)
    hidden = embeds
    with torch.no_grad():
        for layer in local.model.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    return hidden


def _close(got, expected, rel=1e-5):
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    assert error < rel, f"relative error {error:.2e}"


def test_generate_in_a_session_returns_what_petals_returns(llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer)
    more = _ids(tokenizer, " and the capital of Italy is")[:, 1:] if tokenizer.bos_token_id is not None else \
        _ids(tokenizer, " and the capital of Italy is")
    first = llama_local.generate(ids, max_new_tokens=6, do_sample=False)
    second = llama_local.generate(first, max_new_tokens=4, do_sample=False)
    third = llama_local.generate(torch.cat([second, more], 1), max_new_tokens=5, do_sample=False)
    with llama_remote.inference_session(max_length=64):
        got_first = llama_remote.generate(ids, max_new_tokens=6, do_sample=False)  # inputs + new tokens
        got_second = llama_remote.generate(None, max_new_tokens=4, do_sample=False)  # only the new tokens
        got_third = llama_remote.generate(more, max_new_tokens=5, do_sample=False)  # the new inputs + new tokens
    assert got_first.tolist() == first.tolist()
    assert got_second.tolist() == second[:, first.shape[1]:].tolist()
    assert got_third.tolist() == third[:, second.shape[1]:].tolist()
    # without a session, the whole sequence comes back, as from transformers
    assert llama_remote.generate(ids, max_new_tokens=6, do_sample=False).tolist() == first.tolist()


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_rewinding_a_model_session_continues_like_local(where, llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer)
    with llama_remote.inference_session(max_length=64) as session:
        generated = llama_remote.generate(ids, max_new_tokens=8, do_sample=False)  # [1, prompt + 8]
        held = session.position
        assert held == generated.shape[1] - 1
        target = {"start": 0, "middle": ids.shape[1] + 3, "end": held}[where]
        session.position = target
        assert session.position == target
        if where == "start":  # everything forgotten: a new prompt starts from nothing
            other = _ids(tokenizer, "Paris is a city in")
            got = llama_remote.generate(other, max_new_tokens=6, do_sample=False)
            expected = llama_local.generate(other, max_new_tokens=6, do_sample=False)
        elif where == "middle":  # regenerate from the middle, with other words appended there
            other = _ids(tokenizer, " truly")[:, -1:]
            got = llama_remote.generate(other, max_new_tokens=6, do_sample=False)
            context = torch.cat([generated[:, :target], other], dim=1)
            expected = llama_local.generate(context, max_new_tokens=6, do_sample=False)[:, target:]
        else:  # rewinding to the end changes nothing
            got = llama_remote.generate(None, max_new_tokens=6, do_sample=False)
            expected = llama_local.generate(generated, max_new_tokens=6, do_sample=False)[:, generated.shape[1]:]
    assert got.tolist() == expected.tolist()


def test_rewind_then_regenerate_from_a_position(llama_remote, llama_local, tokenizer):
    """generate(None) after a rewind regenerates the tokens from there (the last kept token is sent again)."""
    ids = _ids(tokenizer)
    expected = llama_local.generate(ids, max_new_tokens=10, do_sample=False)
    with llama_remote.inference_session(max_length=64) as session:
        llama_remote.generate(ids, max_new_tokens=10, do_sample=False)
        session.position = ids.shape[1] + 2
        again = llama_remote.generate(None, max_new_tokens=8, do_sample=False)
    assert again.tolist() == expected[:, ids.shape[1] + 2:].tolist()


def test_rewinding_a_remote_sequential_session_equals_local_blocks(llama_remote, llama_local, tokenizer):
    layers = llama_remote.model.layers
    first = llama_local.model.embed_tokens(_ids(tokenizer, "One two three four five six seven eight")).detach()
    second = llama_local.model.embed_tokens(_ids(tokenizer, "nine ten eleven twelve")).detach()
    n = first.shape[1]
    with torch.no_grad(), layers.inference_session(max_length=32) as session:
        session.step(first)
        session.position = n  # the end: changes nothing
        got_end = session.step(second)
        session.position = 4  # the middle
        got_middle = session.step(second)
        session.position = 0  # the start
        got_start = session.step(second)
        assert session.position == second.shape[1]
        with pytest.raises(ValueError, match="can only rewind"):
            session.position = second.shape[1] + 1
    _close(got_end, _local_block_outputs(llama_local, torch.cat([first, second], dim=1))[:, n:])
    _close(got_middle, _local_block_outputs(llama_local, torch.cat([first[:, :4], second], dim=1))[:, 4:])
    _close(got_start, _local_block_outputs(llama_local, second))


def test_model_call_inside_a_session_is_a_step(llama_remote, llama_local, tokenizer):
    """As in Petals, ``model(ids)`` inside ``with model.inference_session()`` continues the session."""
    ids = _ids(tokenizer, "Speculative decoding checks many tokens at once")
    with torch.no_grad():
        expected = llama_local(ids).logits
        with llama_remote.inference_session(max_length=32) as session:
            assert llama_remote.active_session is session
            head = llama_remote(ids[:, :4]).logits
            tail = llama_remote(ids[:, 4:]).logits
            assert session.position == ids.shape[1] == llama_remote.transformer.h.position  # Petals' name too
            session.position = 4
            tail_again = llama_remote(ids[:, 4:]).logits
            assert session.output_ids.tolist() == ids.tolist()
        assert llama_remote.active_session is None and llama_remote.model.layers.position == 0
        with llama_remote.inference_session(max_length=32) as outer:
            llama_remote(ids[:, :3])
            with llama_remote.model.layers.inference_session(max_length=32) as inner:
                with llama_remote.model.layers.use_session(outer):  # Petals' RemoteSequential.use_session
                    assert llama_remote(ids[:, 3:5]).logits.shape[1] == 2 and outer.position == 5
                assert llama_remote.active_session is inner and inner.position == 0
    # two float32 computations of the embedded model: each lies ~7e-5 from float64 on logits up to ~40 (measured by
    # benchmarks/bench_fastpath.py for transformers and for the servers' fast path), so they differ by up to ~1.5e-4
    assert (torch.cat([head, tail], 1) - expected).abs().max().item() < FLOAT32_LOGITS
    assert (tail_again - expected[:, 4:]).abs().max().item() < FLOAT32_LOGITS


def test_generate_without_a_cache_equals_local(llama_remote, llama_local, tokenizer):
    """``use_cache=False`` sends the whole sequence at every step: stateless passes, the same tokens as local (a
    session would have appended each resent sequence to what it held); inside a session it is refused."""
    ids = _ids(tokenizer)
    expected = llama_local.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert llama_remote.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False).tolist() == expected.tolist()
    with llama_remote.inference_session(max_length=64) as session:
        with pytest.raises(ValueError, match="use_cache=False"):
            llama_remote.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert session.position == 0


def test_petals_names_are_the_same_modules(llama_remote, bloom_remote):
    for model in (llama_remote, bloom_remote):
        base = model.transformer
        assert model.model is base
        assert base.word_embeddings is base.embed_tokens is model.get_input_embeddings()
        assert base.h is base.layers and len(base.h) == model.config.num_hidden_layers
        assert base.ln_f is base.norm
        assert isinstance(base.word_embeddings_layernorm, torch.nn.Module)
    # aliases are not extra submodules: checkpoints keep the family's own names
    assert not any(key.startswith("transformer.") for key in llama_remote.state_dict())
    assert not any(key.startswith("model.") for key in bloom_remote.state_dict())
    assert isinstance(llama_remote.transformer.word_embeddings_layernorm, torch.nn.Identity)
    assert isinstance(bloom_remote.transformer.word_embeddings_layernorm, torch.nn.LayerNorm)


def test_caller_mistakes_are_value_errors(llama_remote, tokenizer):
    ids = _ids(tokenizer)
    with llama_remote.inference_session(max_length=ids.shape[1] + 2) as session:
        with pytest.raises(ValueError, match="past its max_length"):
            llama_remote.generate(ids, max_new_tokens=10, do_sample=False)
        with pytest.raises(ValueError, match="can only rewind"):
            session.position = -1
    with llama_remote.inference_session(max_length=8):
        with pytest.raises(ValueError, match="none holds tokens"):
            llama_remote.generate(None, max_new_tokens=2)
    with llama_remote.inference_session(max_length=ids.shape[1] + 8):
        llama_remote.generate(ids, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        with pytest.raises(ValueError, match="ran 2 rows in it for 1 input"):  # says why, not "embeddings"
            llama_remote.generate(None, max_new_tokens=2)
    layers = llama_remote.model.layers
    with pytest.raises(ValueError) as refused:  # refused by the server as a bad request
        layers(torch.randn(1, 3, llama_remote.config.hidden_size + 1))
    assert isinstance(refused.value, CorollaError) and "hidden" in str(refused.value)


# ---------------------------------------------------------------- speculative decoding


@pytest.fixture(scope="module")
def random_draft(llama_local):
    """A tiny random Llama with the embedded model's vocabulary: a draft that rarely agrees."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=llama_local.config.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def _speculative(embedded_dir, swarm, draft, **kwargs):
    from corolla import AutoDistributedSpeculativeModel

    return AutoDistributedSpeculativeModel.from_pretrained(
        str(embedded_dir), initial_peers=swarm.initial_peers, small_model=draft, torch_dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("draft_kind", ["random", "same"])
def test_speculative_greedy_equals_plain_greedy(draft_kind, embedded_dir, llama_swarm, llama_local, random_draft,
                                                tokenizer):
    draft = random_draft if draft_kind == "random" else llama_local
    model = _speculative(embedded_dir, llama_swarm, draft)
    try:
        ids = _ids(tokenizer, "The three primary colors are")
        expected = llama_local.generate(ids, max_new_tokens=30, do_sample=False)
        # five drafts a round (the adaptive choice depends on this machine's timings; its logic has unit tests)
        got = model.generate(ids, max_new_tokens=30, do_sample=False, num_draft_tokens=5)
        assert got.tolist() == expected.tolist()
        stats = model.last_speculation
        if draft_kind == "same":  # the draft always agrees: every draft is accepted, a sixth of the rounds
            assert stats["accepted"] == stats["drafted"] >= 24 and stats["rounds"] <= 6, stats
        else:  # it rarely does: about one round per token
            assert stats["accepted"] <= 3 and stats["rounds"] >= 27, stats
        assert model.generate(ids, max_new_tokens=30, do_sample=False).tolist() == expected.tolist()  # adaptive
        # with a repetition penalty and inside a session, continued twice (Petals' return convention)
        expected = llama_local.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.3)
        with model.inference_session(max_length=64):
            head = model.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.3)
            tail = model.generate(None, max_new_tokens=8, do_sample=False, repetition_penalty=1.3)
        assert torch.cat([head, tail], 1).tolist() == expected.tolist()
    finally:
        model.close()


def test_speculative_refuses_what_it_cannot_do(embedded_dir, llama_swarm, random_draft, tokenizer):
    model = _speculative(embedded_dir, llama_swarm, random_draft)
    try:
        ids = _ids(tokenizer)
        with pytest.raises(ValueError, match="num_beams"):
            model.generate(ids, max_new_tokens=4, num_beams=2)
        with pytest.raises(ValueError, match="one unpadded sequence"):
            model.generate(torch.cat([ids, ids]), max_new_tokens=4)
    finally:
        model.close()
    wrong_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabulary"):
        _speculative(embedded_dir, llama_swarm, wrong_vocab)


@pytest.fixture(scope="module")
def tiny_swarm(tiny_llama_dir):
    from corolla.testing.local_swarm import LocalSwarm

    with LocalSwarm(model=str(tiny_llama_dir), num_servers=2, dht_prefix="tiny-speculative") as swarm:
        yield swarm


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the counts under ``probs`` (Pearson's test; bins expecting < 5 merged into one)."""
    total = counts.sum()
    expected = probs.double() * total
    small = expected < 5
    counts = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    statistic = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def test_speculative_sampling_follows_the_target_distribution(tiny_llama_dir, tiny_swarm):
    """Seeded: 400 two-token samples drawn speculatively (with a draft whose distribution is far from the target's)
    follow the target's exact distribution, computed locally with the same temperature and top-k."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    from corolla import AutoDistributedSpeculativeModel

    local = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    torch.manual_seed(7)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=local.config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    temperature, top_k, vocab = 0.1, 50, local.config.vocab_size

    def processed(model, context):  # [n, len] -> [n, vocab] probabilities of the next token
        with torch.no_grad():
            logits = model(context).logits[:, -1].float()
        scores = TopKLogitsWarper(top_k)(context, TemperatureLogitsWarper(temperature)(context, logits))
        return torch.softmax(scores, dim=-1)

    first = processed(local, ids)[0]  # [vocab]
    continuations = torch.cat([ids.expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
    second = first @ processed(local, continuations)  # [vocab]: marginal of the second token
    draft_first = processed(draft, ids)[0]
    assert 0.5 * (first - draft_first).abs().sum() > 0.5  # the draft alone would be far off

    model = AutoDistributedSpeculativeModel.from_pretrained(
        str(tiny_llama_dir), initial_peers=tiny_swarm.initial_peers, dht_prefix="tiny-speculative", small_model=draft)
    counts = torch.zeros(2, vocab)
    try:
        torch.manual_seed(2024)
        with model.inference_session(max_length=16) as session:
            for _ in range(400):
                session.position = 0
                out = model.generate(ids, max_new_tokens=2, do_sample=True, temperature=temperature, top_k=top_k,
                                     num_draft_tokens=1 + _ % 3)
                counts[0, out[0, -2]] += 1
                counts[1, out[0, -1]] += 1
    finally:
        model.close()
    assert _chi_square_p_value(counts[0], first) > 1e-3
    assert _chi_square_p_value(counts[1], second) > 1e-3
    assert _chi_square_p_value(counts[0], draft_first) < 1e-6  # the test tells the two distributions apart
