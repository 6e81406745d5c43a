"""Every family through a 3-server swarm (real servers, real protocol, the in-memory network), tiny random weights:
greedy and beam-search tokens equal local transformers, logits within 1e-4, a session in chunks longer than the
sliding window, backward through the swarm equal to local autograd, and the Auto classes picking the family."""
from __future__ import annotations

import contextlib

import pytest
import torch

from corolla.client.model import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from corolla.core.blocks import BlockRange
from corolla.testing.inprocess import InProcessSwarm
from corolla.testing.tiny import TINY_CONFIGS, save_tiny_model

SPANS = [BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)]
FAMILIES = sorted(set(TINY_CONFIGS) - {"llama", "bloom"})  # those two have their own suites (tests/integration)


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    local = save_tiny_model(request.param, path, seed=5)
    # (transformers saves GPT-NeoX's head as "embed_out" and Mixtral's experts one by one, as the hub's
    # checkpoints have them: the families' renames and conversions are exercised here)
    with InProcessSwarm(str(path), SPANS, dht_prefix=request.param) as swarm:
        remote = swarm.client()
        try:
            yield request.param, local, remote, swarm
        finally:
            remote.close()


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_auto_class_picks_the_family(family_swarm):
    model_type, local, remote, _ = family_swarm
    assert type(remote).__name__ == "Distributed" + type(local).__name__
    assert isinstance(remote, type(local))  # the family's Hugging Face class: its forward, head and generate()
    assert len(remote.remote_layers) == 6 and remote.transformer is remote.model


def test_greedy_and_beam_equal_local(family_swarm):
    _, local, remote, _ = family_swarm
    ids = _ids(0, 6)
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        kwargs.update(max_new_tokens=14, pad_token_id=0)  # 20 tokens: past the 8-token sliding windows
        expected = local.generate(ids, **kwargs)
        got = remote.generate(ids, **kwargs)
        assert got.tolist() == expected.tolist(), kwargs


def test_logits_equal_local(family_swarm):
    _, local, remote, _ = family_swarm
    ids = _ids(1, 19, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        expected = local(ids, attention_mask=mask).logits
        got = remote(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() < 1e-4


def test_session_in_chunks_equals_one_pass(family_swarm):
    _, local, remote, _ = family_swarm
    ids = _ids(2, 20)
    with torch.no_grad():
        expected = local(ids).logits
        outputs, position = [], 0
        with remote.inference_session(max_length=20) as session:
            for size in (6, 1, 0, 9, 4):
                outputs.append(remote(ids[:, position:position + size]).logits)
                position += size
            assert session.position == 20
    assert (torch.cat(outputs, dim=1) - expected).abs().max().item() < 1e-4


def test_backward_through_the_swarm_equals_local(family_swarm):
    _, local, remote, _ = family_swarm
    ids = _ids(3, 10, batch=2)
    embeddings = local.get_input_embeddings()
    remote_embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
    local_embeds = embeddings(ids).detach().requires_grad_(True)
    weights = torch.randn(2, 10, local.config.vocab_size, generator=torch.Generator().manual_seed(4))
    (remote(inputs_embeds=remote_embeds).logits * weights).sum().backward()
    (local(inputs_embeds=local_embeds).logits * weights).sum().backward()
    error = (remote_embeds.grad - local_embeds.grad).abs().max().item()
    assert error <= 1e-4 * local_embeds.grad.abs().max().item(), error


def test_sequence_classification_head(family_swarm):
    model_type, _, _, swarm = family_swarm
    classifier = swarm.client(AutoDistributedModelForSequenceClassification, num_labels=3, pad_token_id=0)
    try:
        logits = classifier(_ids(5, 7, batch=2)).logits
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()
        assert type(classifier).__name__.startswith("Distributed") and "SequenceClassification" in type(classifier).__name__
    finally:
        classifier.close()


def test_unsupported_model_type_is_named(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*mistral, mixtral"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tmp_path), initial_peers=["/ip4/127.0.0.1/tcp/1"])


@contextlib.contextmanager
def _local_and_remote(config, path, prefix: str, seed: int):
    """A model of ``config`` with seeded random weights, saved at ``path``: the local model, and the same through a
    3-server in-process swarm."""
    import transformers

    torch.manual_seed(seed)
    local = transformers.AutoModelForCausalLM.from_config(config).eval()
    local.save_pretrained(path)
    with InProcessSwarm(str(path), SPANS, dht_prefix=prefix) as swarm:
        remote = swarm.client()
        try:
            yield local, remote
        finally:
            remote.close()


def test_a_checkpoint_asking_for_router_logits_by_default_still_runs(tmp_path):
    """A Mixtral checkpoint trained with the experts' balancing loss has output_router_logits in its config: the
    router logits stay on the servers, so the client drops that default (every call was refused); asking for them
    explicitly is still refused, naming why."""
    from corolla.testing.tiny import tiny_config

    config = tiny_config("mixtral")
    config.output_router_logits = True
    ids = _ids(1, 6)
    with _local_and_remote(config, tmp_path, "router", seed=0) as (local, remote), torch.no_grad():
        assert (remote(ids).logits - local(ids).logits).abs().max().item() < 1e-4
        assert torch.equal(remote.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           local.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
        with pytest.raises(ValueError, match="router logits stay on the servers"):
            remote(ids, output_router_logits=True)


def test_phi3_longrope_switches_to_its_long_factors_as_transformers_does(tmp_path):
    """Phi-3 with LongRoPE (Phi-3-mini-128k, Phi-3.5-mini): when a generation passes
    original_max_position_embeddings, transformers computes the whole sequence again with the long factors (the
    cached keys were rotated with the short ones). The session does the same: the tokens after the switch equal
    local's, greedy and with beams (they differed from the switch on)."""
    import transformers

    from corolla.testing.tiny import COMMON

    config = transformers.Phi3Config(
        num_hidden_layers=6, pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=12,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.3 * i for i in range(8)]}, **COMMON)
    ids = _ids(1, 5)
    with _local_and_remote(config, tmp_path, "longrope", seed=1) as (local, remote), torch.no_grad():
        for settings in ({}, {"num_beams": 2}):
            expected = local.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, **settings)
            got = remote.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, **settings)
            assert torch.equal(got, expected), (settings, got.tolist(), expected.tolist())
