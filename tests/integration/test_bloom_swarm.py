"""A tiny random-weight BLOOM (ALiBi positions, its own cache layout) through three servers equals local."""
from __future__ import annotations

import torch


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 256, (batch, length), generator=generator)


def test_bloom_layout(bloom_remote):
    assert len(bloom_remote.transformer.h) == 6


def test_bloom_greedy_equals_local(bloom_remote, bloom_local):
    ids = _ids(0, 7)
    expected = bloom_local.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=3)
    got = bloom_remote.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=3)
    assert got.tolist() == expected.tolist()


def test_bloom_left_padded_batch_equals_local(bloom_remote, bloom_local):
    ids = _ids(1, 9, batch=2)
    mask = torch.ones_like(ids)
    ids[0, :4] = 3
    mask[0, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=3)
    expected = bloom_local.generate(ids, **kwargs)
    got = bloom_remote.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_bloom_sampling_with_seed_equals_local(bloom_remote, bloom_local):
    ids = _ids(2, 5)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, pad_token_id=3)
    torch.manual_seed(7)
    expected = bloom_local.generate(ids, **kwargs)
    torch.manual_seed(7)
    got = bloom_remote.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_bloom_logits_match_local(bloom_remote, bloom_local):
    ids = _ids(3, 11, batch=2)
    with torch.no_grad():
        expected = bloom_local(ids).logits
        got = bloom_remote(ids).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_bloom_session_in_chunks_equals_one_pass(bloom_remote):
    ids = _ids(4, 12)
    h = bloom_remote.transformer.h
    with torch.no_grad():
        embeds = bloom_remote.transformer.word_embeddings_layernorm(bloom_remote.transformer.word_embeddings(ids))
        expected = h(embeds)
        outputs, position = [], 0
        with h.inference_session(max_length=12) as session:
            for size in (1, 5, 0, 6):
                outputs.append(session.step(embeds[:, position : position + size]))
                position += size
    got = torch.cat(outputs, dim=1)
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())
