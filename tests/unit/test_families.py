"""Every supported family: a model split into block stacks equals the full transformers model (tiny random
weights), in one pass, with padding, in a cached session longer than the sliding window, and in gradients."""
from __future__ import annotations

import contextlib

import pytest
import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import CorollaError
from corolla.models.checkpoint import load_config, read_tensors
from corolla.models.family import all_families, family_for
from corolla.models.stack import load_block_stack
from corolla.testing.tiny import TINY_CONFIGS, save_tiny_model

SPLIT = (BlockRange(0, 2), BlockRange(2, 5), BlockRange(5, 6))
FAMILIES = sorted(TINY_CONFIGS)


def test_every_family_has_a_tiny_model():
    tiny_types = {TINY_CONFIGS[name](1).model_type for name in FAMILIES}
    assert sorted(f.model_type for f in all_families()) == sorted(tiny_types)


@pytest.fixture(scope="module", params=FAMILIES)
def split(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny_model(request.param, path, max_shard_size="60KB")  # several shards: partial reads
    config = load_config(path)
    stacks = [load_block_stack(path, config, blocks, torch.float32, "cpu") for blocks in SPLIT]
    return model, stacks


def _embeddings(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[0]  # what enters block 0


@contextlib.contextmanager
def last_layer_output(model):
    """Captures what the full model's last decoder layer outputs (before the final norm)."""
    layers = model
    for name in family_for(model.config).layers_path.split("."):
        layers = getattr(layers, name)
    captured = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output  # returns None: the output stays

    handle = layers[-1].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _run(stacks, hidden, mask, caches=None):
    for index, stack in enumerate(stacks):
        hidden = stack(hidden, mask, cache=None if caches is None else caches[index])
    return hidden


def test_split_equals_full_model_with_padding(split):
    model, stacks = split
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 21), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        with last_layer_output(model) as hooked:
            full = model(ids, attention_mask=mask, output_hidden_states=True)
        got = _run(stacks, full.hidden_states[0], mask)
    real = mask.bool()
    assert (got - hooked["h"])[real].abs().max().item() < 1e-5


def test_session_longer_than_the_window_equals_one_pass(split):
    """21 tokens in chunks of 5, 1, 1, 8 and 6 through cached stacks (the sliding windows are 8 tokens)."""
    model, stacks = split
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(1))
    embeds = _embeddings(model, ids)
    with torch.no_grad():
        expected = _run(stacks, embeds, None)
        caches = [stack.new_cache() for stack in stacks]
        outputs, position = [], 0
        for size in (5, 1, 1, 8, 6):
            outputs.append(_run(stacks, embeds[:, position:position + size], None, caches))
            position += size
        got = torch.cat(outputs, dim=1)
        # rewind to 9 tokens and replay the rest: the same outputs (sliding layers keep what a rewind needs)
        for stack, cache in zip(stacks, caches):
            stack.crop_cache(cache, 9)
        replayed = _run(stacks, embeds[:, 9:], None, caches)
    assert (got - expected).abs().max().item() < 1e-4
    assert (replayed - expected[:, 9:]).abs().max().item() < 1e-4


def test_gradients_through_the_split_equal_the_full_model(split):
    model, stacks = split
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    embeds = _embeddings(model, ids).detach().requires_grad_(True)
    weights = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(3))
    (_run(stacks, embeds, None) * weights).sum().backward()
    got = embeds.grad.clone()
    embeds.grad = None
    layers = model
    for name in family_for(model.config).layers_path.split("."):
        layers = getattr(layers, name)

    def feed(module, args, kwargs):  # block 0 of the full model receives our leaf tensor
        if args:
            return (embeds, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": embeds}

    handle = layers[0].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        with last_layer_output(model) as captured:
            model(ids)
    finally:
        handle.remove()
    (captured["h"] * weights).sum().backward()
    assert torch.allclose(got, embeds.grad, rtol=1e-4, atol=1e-5)


def test_unsupported_family_error_lists_supported():
    import transformers

    with pytest.raises(CorollaError, match="gpt2.*mistral, mixtral"):
        family_for(transformers.GPT2Config())


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_saved_from_the_base_model(name, tmp_path):
    """The hub's BLOOM and OPT originals were saved from the base model: no "transformer."/"model." prefix
    ("h.0.…", "decoder.layers.0.…"). transformers loads them into the causal LM; so must servers and clients."""
    model = save_tiny_model(name, tmp_path / "full", num_layers=2)
    family = family_for(model.config)
    getattr(model, family.base_attr).save_pretrained(str(tmp_path / "base"))
    base_names = read_tensors(tmp_path / "base", lambda name: True)
    assert not any(name.startswith(family.base_attr + ".") for name in base_names)
    config = load_config(tmp_path / "base")
    full_stack = load_block_stack(tmp_path / "full", config, BlockRange(0, 2), torch.float32, "cpu")
    base_stack = load_block_stack(tmp_path / "base", config, BlockRange(0, 2), torch.float32, "cpu")
    expected, got = full_stack.state_dict(), base_stack.state_dict()
    assert sorted(got) == sorted(expected) and all(torch.equal(got[key], expected[key]) for key in expected)
    # the client's tensors, by the causal LM's names (the base model holds no head)
    own = model.state_dict().keys()
    client = lambda path: family.client_tensors(read_tensors(path, lambda n: family.is_block_tensor(n) is None), own)
    from_full, from_base = client(tmp_path / "full"), client(tmp_path / "base")
    head = {key for key in from_full if not key.startswith(family.base_attr + ".")}
    assert set(from_base) == set(from_full) - head  # (no head at all where it is tied to the embeddings)
    assert all(torch.equal(from_base[key], from_full[key]) for key in from_base)
