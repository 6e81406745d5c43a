"""BlockStack against the full HF model, on tiny random-weight Llama and BLOOM checkpoints split in shards."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, CorollaError
from corolla.models import checkpoint
from corolla.models.checkpoint import load_config, read_tensors
from corolla.models.family import family_for
from corolla.models.stack import BlockStack, load_block_stack

TOLERANCE = 1e-5
NUM_LAYERS = 4
HIDDEN = 64
VOCAB = 128


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        initializer_range=0.1,
    )


def _bloom_config() -> BloomConfig:
    return BloomConfig(hidden_size=HIDDEN, n_layer=NUM_LAYERS, n_head=4, vocab_size=VOCAB, initializer_range=0.1)


@dataclass(frozen=True)
class TinyModel:
    kind: str
    path: Path
    model: transformers.PreTrainedModel  # float32 reference, eval mode
    layers_path: str
    norm_path: str


def _module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return functools.reduce(getattr, dotted.split("."), model)


def _build_tiny(kind: str, directory: Path) -> TinyModel:
    torch.manual_seed(0)
    if kind == "llama":
        model, layers_path, norm_path = LlamaForCausalLM(_llama_config()), "model.layers", "model.norm"
    else:
        model, layers_path, norm_path = BloomForCausalLM(_bloom_config()), "transformer.h", "transformer.ln_f"
    model.eval()
    model.save_pretrained(str(directory), max_shard_size="40KB")
    return TinyModel(kind, directory, model, layers_path, norm_path)


@pytest.fixture(scope="module", params=["llama", "bloom"])
def tiny(request, tmp_path_factory) -> TinyModel:
    return _build_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="module")
def stacks(tiny) -> list[BlockStack]:
    config = load_config(tiny.path)
    return [
        load_block_stack(tiny.path, config, blocks, torch.float32, "cpu")
        for blocks in (BlockRange(0, 2), BlockRange(2, NUM_LAYERS))
    ]


def _full_model_hidden(tiny: TinyModel, input_ids, attention_mask=None, position_ids=None, block0_input=None):
    """(input of block 0, hidden states before the final norm) of the full HF model."""
    captured = {}

    def grab_or_replace_block0_input(module, args, kwargs):
        if block0_input is None:
            captured["block0"] = args[0]
            return None
        captured["block0"] = block0_input
        return (block0_input, *args[1:]), kwargs

    def grab_prenorm(module, args):
        captured["prenorm"] = args[0]

    first_layer = _module(tiny.model, tiny.layers_path)[0]
    hooks = [
        first_layer.register_forward_pre_hook(grab_or_replace_block0_input, with_kwargs=True),
        _module(tiny.model, tiny.norm_path).register_forward_pre_hook(grab_prenorm),
    ]
    try:
        kwargs = {"attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        tiny.model(input_ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["block0"], captured["prenorm"]


def _chain(stacks, hidden_states, attention_mask=None, position_ids=None, caches=None):
    caches = caches or [None] * len(stacks)
    for stack, cache in zip(stacks, caches):
        hidden_states = stack(hidden_states, attention_mask, position_ids, cache)
    return hidden_states


def _left_padded(batch_size: int, length: int, pads: list[int], seed: int = 1):
    """Random ids, a left-padding mask and the position_ids generate computes from it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)  # [batch, seq]
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)  # [batch, seq]
    for row, pad in enumerate(pads):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # [batch, seq]
    return input_ids, attention_mask, position_ids


def _assert_close_where(actual, expected, keep):
    """Compare [batch, seq, hidden] tensors at the positions where ``keep`` [batch, seq] is true."""
    keep = keep.bool()
    assert torch.isfinite(actual[keep]).all()
    torch.testing.assert_close(actual[keep], expected[keep], atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_plain_batch_matches_full_model(tiny, stacks):
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    block0_input, expected = _full_model_hidden(tiny, input_ids)
    assert block0_input.shape == (2, 7, HIDDEN)
    torch.testing.assert_close(_chain(stacks, block0_input), expected, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_left_padded_batch_matches_full_model(tiny, stacks):
    input_ids, attention_mask, position_ids = _left_padded(3, 8, pads=[0, 2, 5])
    block0_input, expected = _full_model_hidden(tiny, input_ids, attention_mask, position_ids)
    actual = _chain(stacks, block0_input, attention_mask, position_ids)
    _assert_close_where(actual, expected, attention_mask)
    actual_with_bool_mask = _chain(stacks, block0_input, attention_mask.bool(), position_ids)
    _assert_close_where(actual_with_bool_mask, expected, attention_mask)


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_incremental_cache_matches_one_shot(tiny, stacks, padded):
    length = 12
    input_ids, attention_mask, position_ids = _left_padded(2, length, pads=[0, 3] if padded else [0, 0])
    block0_input, _ = _full_model_hidden(tiny, input_ids, attention_mask, position_ids)
    explicit_positions = position_ids if padded else None
    one_shot = _chain(stacks, block0_input, attention_mask, explicit_positions)

    caches = [stack.new_cache() for stack in stacks]
    outputs, start = [], 0
    for chunk in (1, 5, 0, length - 6):
        end = start + chunk
        chunk_positions = position_ids[:, start:end] if padded else None
        output = _chain(stacks, block0_input[:, start:end], attention_mask[:, :end], chunk_positions, caches)
        assert output.shape == (2, chunk, HIDDEN)
        assert all(stack.cache_length(cache) == end for stack, cache in zip(stacks, caches))
        outputs.append(output)
        start = end
    _assert_close_where(torch.cat(outputs, dim=1), one_shot, attention_mask)


@torch.no_grad()
def test_reorder_cache_then_step_equals_reordered_rows_from_scratch(stacks):
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randn(3, 6, HIDDEN, generator=generator)  # [batch, past, hidden]
    step = torch.randn(3, 1, HIDDEN, generator=generator)  # [batch, 1, hidden]
    _, prefix_mask, _ = _left_padded(3, 6, pads=[0, 1, 3])
    hypo_ids = torch.tensor([2, 0, 0])

    caches = [stack.new_cache() for stack in stacks]
    prefix_positions = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 1)
    _chain(stacks, prefix, prefix_mask, prefix_positions, caches)
    for stack, cache in zip(stacks, caches):
        stack.reorder_cache(cache, hypo_ids)
    mask = torch.cat([prefix_mask[hypo_ids], torch.ones(3, 1, dtype=torch.long)], dim=1)  # [batch, past+1]
    positions = mask.sum(-1, keepdim=True) - 1  # [batch, 1]
    stepped = _chain(stacks, step, mask, positions, caches)

    full_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    from_scratch = _chain(stacks, torch.cat([prefix[hypo_ids], step], dim=1), mask, full_positions)
    torch.testing.assert_close(stepped, from_scratch[:, -1:], atol=TOLERANCE, rtol=0)


def test_gradient_matches_full_model(tiny, stacks):
    input_ids, attention_mask, position_ids = _left_padded(2, 6, pads=[0, 2], seed=3)
    with torch.no_grad():
        block0_input, _ = _full_model_hidden(tiny, input_ids, attention_mask, position_ids)
    weights = torch.randn(block0_input.shape, generator=torch.Generator().manual_seed(4))
    keep = attention_mask.bool().unsqueeze(-1)  # [batch, seq, 1]

    full_input = block0_input.detach().clone().requires_grad_(True)
    _, full_output = _full_model_hidden(tiny, input_ids, attention_mask, position_ids, block0_input=full_input)
    (full_output * weights * keep).sum().backward()

    stack_input = block0_input.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        stack_output = _chain(stacks, stack_input, attention_mask, position_ids)
    (stack_output * weights * keep).sum().backward()

    assert full_input.grad.abs().sum() > 0
    torch.testing.assert_close(stack_input.grad, full_input.grad, atol=TOLERANCE, rtol=0)
    assert all(not p.requires_grad for stack in stacks for p in stack.parameters())


@torch.no_grad()
def test_empty_step_leaves_cache_unchanged(stacks):
    stack = stacks[0]
    cache = stack.new_cache()
    stack(torch.randn(2, 3, HIDDEN), torch.ones(2, 3, dtype=torch.long), None, cache)
    empty = stack(torch.randn(2, 0, HIDDEN), torch.ones(2, 3, dtype=torch.long), None, cache)
    assert empty.shape == (2, 0, HIDDEN)
    assert stack.cache_length(cache) == 3


def test_bad_inputs_are_bad_requests(stacks):
    stack = stacks[0]
    with pytest.raises(BadRequestError, match="attention_mask"):
        stack(torch.randn(2, 3, HIDDEN), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(BadRequestError, match="hidden_states"):
        stack(torch.randn(2, 3, HIDDEN + 1))
    with pytest.raises(BadRequestError, match="position_ids"):
        stack(torch.randn(2, 3, HIDDEN), None, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(BadRequestError, match="hypo_ids"):
        cache = stack.new_cache()
        stack(torch.randn(2, 3, HIDDEN), None, None, cache)
        stack.reorder_cache(cache, torch.tensor([0, 5]))


def test_stack_attributes_and_accounting(tiny, stacks):
    stack = stacks[1]
    assert stack.blocks == BlockRange(2, NUM_LAYERS)
    assert (stack.dtype, stack.device, stack.hidden_size) == (torch.float32, torch.device("cpu"), HIDDEN)
    assert stack.config.model_type == tiny.kind
    kv_heads = 2 if tiny.kind == "llama" else 4
    assert stack.cache_bytes_per_token() == 2 * kv_heads * (HIDDEN // 4) * 4 * 2
    full_layers = _module(tiny.model, tiny.layers_path)[2:4]
    assert stack.weight_bytes() == sum(p.numel() * 4 for p in full_layers.parameters())
    assert [module.layer_idx for module in stack.modules() if hasattr(module, "layer_idx")] == [0, 1]


def test_stack_in_other_dtype(tiny):
    stack = load_block_stack(tiny.path, load_config(tiny.path), BlockRange(1, 3), torch.bfloat16, "cpu")
    assert {p.dtype for p in stack.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        output = stack(torch.randn(1, 4, HIDDEN), torch.ones(1, 4, dtype=torch.long))
    assert output.dtype == torch.bfloat16 and output.shape == (1, 4, HIDDEN)


def test_blocks_out_of_range(tiny):
    with pytest.raises(CorollaError, match="the model has 4 blocks"):
        load_block_stack(tiny.path, load_config(tiny.path), BlockRange(2, 5), torch.float32, "cpu")


def test_bloom_checkpoint_saved_from_base_model(tmp_path):
    tiny = _build_tiny("bloom", tmp_path / "full")
    tiny.model.transformer.save_pretrained(str(tmp_path / "base"))
    names = read_tensors(tmp_path / "base", lambda name: True)
    assert any(name.startswith("h.0.") for name in names)
    assert not any(name.startswith("transformer.") for name in names)
    stack = load_block_stack(tmp_path / "base", load_config(tmp_path / "base"), BlockRange(0, 4), torch.float32, "cpu")
    input_ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        block0_input, expected = _full_model_hidden(tiny, input_ids)
        torch.testing.assert_close(stack(block0_input), expected, atol=TOLERANCE, rtol=0)


def test_read_tensors_opens_only_needed_shards(tiny, monkeypatch):
    weight_map = json.loads((tiny.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3
    prefix = family_for(tiny.model.config).block_prefix(1)
    wanted_names = {name for name in weight_map if name.startswith(prefix)}
    opened = []
    real_safe_open = checkpoint.safe_open

    def spy_safe_open(filename, *args, **kwargs):
        opened.append(Path(filename).name)
        return real_safe_open(filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy_safe_open)
    tensors = read_tensors(tiny.path, lambda name: name.startswith(prefix), dtype=torch.float16)
    assert set(tensors) == wanted_names
    assert set(opened) == {weight_map[name] for name in wanted_names}
    assert len(opened) < len(set(weight_map.values()))
    assert all(tensor.dtype == torch.float16 for tensor in tensors.values())


def test_read_tensors_single_file(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    tensors = read_tensors(tmp_path, lambda name: name == "model.norm.weight")
    assert list(tensors) == ["model.norm.weight"] and tensors["model.norm.weight"].shape == (HIDDEN,)


def test_read_tensors_without_checkpoint(tmp_path):
    with pytest.raises(CorollaError, match="only safetensors checkpoints are supported"):
        read_tensors(tmp_path, lambda name: True)


def test_family_naming():
    llama = family_for(_llama_config())
    bloom = family_for(_bloom_config())
    assert (llama.layers_path, bloom.layers_path) == ("model.layers", "transformer.h")
    assert (llama.block_prefix(3), bloom.block_prefix(3)) == ("model.layers.3.", "transformer.h.3.")
    assert llama.is_block_tensor("model.layers.3.mlp.up_proj.weight") == 3
    assert llama.is_block_tensor("layers.12.self_attn.q_proj.weight") == 12
    assert llama.is_block_tensor("model.embed_tokens.weight") is None
    assert llama.is_block_tensor("model.norm.weight") is None
    assert bloom.is_block_tensor("transformer.h.2.self_attention.dense.bias") == 2
    assert bloom.is_block_tensor("h.2.input_layernorm.weight") == 2
    assert bloom.is_block_tensor("transformer.ln_f.weight") is None
    assert bloom.split_block_tensor("h.2.mlp.dense_4h_to_h.weight") == (2, "mlp.dense_4h_to_h.weight")


def test_unsupported_model_type_lists_supported_ones():
    config = transformers.GPT2Config()
    with pytest.raises(CorollaError, match=r"unsupported model_type 'gpt2'.*bloom, falcon, gemma2, gemma3_text, gpt_neox, llama, mistral, mixtral, opt, phi3, qwen2, qwen3"):
        family_for(config)


def test_model_dht_prefix(tmp_path):
    assert checkpoint.model_dht_prefix(None) == "smollm2-135m-instruct"
    assert checkpoint.model_dht_prefix("smollm2") == "smollm2-135m-instruct"
    assert checkpoint.model_dht_prefix("bigscience/bloom-560m") == "bloom-560m"
    local = tmp_path / "My Model_v1.5"
    local.mkdir()
    assert checkpoint.model_dht_prefix(local) == "my-model_v1.5"
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert checkpoint.model_dht_prefix(str(snapshot)) == "smollm2-360m"


def test_family_dht_name_rules():
    """Names that denote the same weights name one swarm, by the family's rule; other families keep the name."""
    llama, bloom = transformers.LlamaConfig(), transformers.BloomConfig()
    assert checkpoint.model_dht_prefix("meta-llama/Llama-2-7b-hf", llama) == "llama-2-7b"
    assert checkpoint.model_dht_prefix("meta-llama/Llama-2-7b", llama) == "llama-2-7b"
    assert checkpoint.model_dht_prefix("someone/hf", llama) == "hf"  # nothing left to drop
    assert checkpoint.model_dht_prefix("bigscience/bloom-petals", bloom) == "bloom"
    assert checkpoint.model_dht_prefix("bigscience/bloom-560m", bloom) == "bloom-560m"
    assert checkpoint.model_dht_prefix("mistralai/Mistral-7B-hf", transformers.MistralConfig()) == "mistral-7b-hf"
    assert checkpoint.model_dht_prefix("meta-llama/Llama-2-7b-hf") == "llama-2-7b-hf"  # no config: no rule
    assert checkpoint.model_dht_prefix(None, llama) == "smollm2-135m-instruct"  # the embedded model's own name


def test_resolve_model_local_and_hub(tmp_path, monkeypatch):
    assert checkpoint.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(CorollaError, match="does not exist"):
        checkpoint.resolve_model(str(tmp_path / "missing"))

    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, allow_patterns=None, **kwargs):
        calls.append(local_files_only)
        assert "*.safetensors" in allow_patterns and "*.bin" not in allow_patterns
        if local_files_only:
            raise FileNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert checkpoint.resolve_model("someone/some-model") == tmp_path
    assert calls == [True, False]

    def failing_snapshot_download(repo_id, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_snapshot_download)
    with pytest.raises(CorollaError, match="cannot find model 'someone/other'.*offline"):
        checkpoint.resolve_model("someone/other")


def test_hub_id_resolves_from_a_real_offline_hub_cache(tiny, tmp_path, monkeypatch):
    """The real huggingface_hub lookup (no mock): a model in the hub cache's layout is found offline."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / "0123abc"
    source = tiny.path
    shutil.copytree(source, snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abc")  # what the hub cache records
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = checkpoint.resolve_model("someone/tiny-llama")
    assert resolved == snapshot
    assert checkpoint.load_config(resolved).model_type == checkpoint.load_config(source).model_type
