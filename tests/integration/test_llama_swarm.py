"""The embedded Llama model through a swarm of three server processes equals the local model."""
from __future__ import annotations

import torch

PROMPT = "The capital of France is"


def _assert_same_hidden(got, expected, rel=1e-5):
    """Hidden states between blocks reach magnitudes of ~1000 here: compare relative to their scale."""
    assert got.shape == expected.shape
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    assert error < rel, f"relative error {error:.2e}"


def _ids(tokenizer, text=PROMPT):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def test_greedy_generate_equals_local(llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer)
    expected = llama_local.generate(ids, max_new_tokens=24, do_sample=False)
    got = llama_remote.generate(ids, max_new_tokens=24, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_left_padded_batch_greedy_equals_local(llama_remote, llama_local, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["Hello, my name is", "A long time ago in a galaxy far, far away, there"], return_tensors="pt", padding=True
    )
    assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = llama_local.generate(**batch, **kwargs)
    got = llama_remote.generate(**batch, **kwargs)
    assert got.tolist() == expected.tolist()


def test_sampling_with_seed_equals_local(llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer, "Once upon a time")
    kwargs = dict(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1)
    torch.manual_seed(1234)
    expected = llama_local.generate(ids, **kwargs)
    torch.manual_seed(1234)
    got = llama_remote.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_beam_search_equals_local(llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer, "The best way to learn a language is")
    kwargs = dict(max_new_tokens=10, do_sample=False, num_beams=3)
    expected = llama_local.generate(ids, **kwargs)
    got = llama_remote.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_logits_match_local(llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer, "Corolla splits a model across many machines, and")
    with torch.no_grad():
        expected = llama_local(ids).logits
        got = llama_remote(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_hidden_states_available(llama_remote, tokenizer):
    ids = _ids(tokenizer)
    with torch.no_grad():
        out = llama_remote(ids, output_hidden_states=True)
        direct = llama_remote.model.layers(llama_remote.model.embed_tokens(ids))
    block_inputs, *between, last = out.hidden_states  # transformers' shape: one per block, and one more
    assert len(between) == llama_remote.config.num_hidden_layers - 1 and all(entry is None for entry in between)
    assert block_inputs.shape == last.shape == (1, ids.shape[1], llama_remote.config.hidden_size)
    _assert_same_hidden(last, llama_remote.model.norm(direct))


def test_session_in_chunks_equals_one_pass(llama_remote, tokenizer):
    ids = _ids(tokenizer, "One two three four five six seven eight nine ten eleven")
    layers = llama_remote.model.layers
    with torch.no_grad():
        embeds = llama_remote.model.embed_tokens(ids)  # [1, seq, hidden]
        expected = layers(embeds)
        outputs = []
        with layers.inference_session(max_length=ids.shape[1]) as session:
            position = 0
            for size in [1, 5, 0, 1, 0] + [ids.shape[1]]:
                chunk = embeds[:, position : position + size]
                outputs.append(session.step(chunk))
                position += chunk.shape[1]
                if position >= ids.shape[1]:
                    break
        got = torch.cat(outputs, dim=1)
    _assert_same_hidden(got, expected)


def test_sliced_remote_sequential(llama_remote, tokenizer):
    layers = llama_remote.model.layers
    assert len(layers) == 30
    assert len(layers[10:20]) == 10 and layers[10:20].blocks.start == 10
    ids = _ids(tokenizer)
    with torch.no_grad():
        embeds = llama_remote.model.embed_tokens(ids)
        staged = layers[20:30](layers[10:20](layers[0:10](embeds)))
        misaligned = layers[17:30](layers[5:17](layers[0:5](embeds)))  # parts of the servers' spans
        whole = layers(embeds)
        with layers[5:17].inference_session(max_length=ids.shape[1]) as session:
            stepped = torch.cat([session.step(layers[0:5](embeds)[:, :2]), session.step(layers[0:5](embeds)[:, 2:])], 1)
    _assert_same_hidden(staged, whole)
    _assert_same_hidden(misaligned, whole)
    _assert_same_hidden(stepped, layers[5:17](layers[0:5](embeds)))


def test_generate_continues_session(llama_remote, llama_local, tokenizer):
    ids = _ids(tokenizer)
    expected = llama_local.generate(ids, max_new_tokens=12, do_sample=False)
    with llama_remote.inference_session(max_length=64) as session:
        first = llama_remote.generate(ids, max_new_tokens=5, do_sample=False)
        second = llama_remote.generate(None, max_new_tokens=7, do_sample=False)
        assert session.position == ids.shape[1] + 11  # the last token is sampled, not yet fed
    assert first.tolist() == expected[:, : ids.shape[1] + 5].tolist()
    assert second.tolist() == expected[:, ids.shape[1] + 5 :].tolist()  # only the new tokens, as in Petals


def test_backward_through_swarm_equals_local_autograd(llama_remote, llama_local, tokenizer):
    """Gradients w.r.t. the first block's inputs through three servers (their `backward` RPC) match local autograd."""
    ids = _ids(tokenizer, "Gradients flow back through every remote block")
    embeds = llama_local.model.embed_tokens(ids).detach()
    target = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))

    local_in = embeds.clone().requires_grad_(True)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden = local_in
    rotary = llama_local.model.rotary_emb(hidden, position_ids)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=llama_local.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=position_ids)
    for layer in llama_local.model.layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
    ((hidden * target).sum() / 1000).backward()

    remote_in = embeds.clone().requires_grad_(True)
    out = llama_remote.model.layers(remote_in)
    ((out * target).sum() / 1000).backward()
    _assert_same_hidden(out.detach(), hidden.detach())
    error = (remote_in.grad - local_in.grad).abs().max() / local_in.grad.abs().max()
    assert error < 1e-4, f"relative gradient error {error:.2e}"
