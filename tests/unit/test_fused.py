"""The fast path (corolla.models.fused) computes what transformers' layers compute: for every family it serves
(Llama, Mistral, Qwen2, Qwen3), a
stack with the fast path equals the same stack without it in sessions (prefill with padding, decode steps past the
sliding window, beam reordering), in several sessions batched together, with int8 weights, and it steps aside for
LoRA weights and autograd."""
from __future__ import annotations

import pytest
import torch

from corolla.core.blocks import BlockRange
from corolla.models import cpu_kernels
from corolla.models.checkpoint import load_config
from corolla.models.fused import FusedLayer
from corolla.models.lora import LoraSet, lora_applied
from corolla.models.stack import load_block_stack
from corolla.testing.tiny import save_tiny_model

FAST_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
BLOCKS = BlockRange(0, 4)


@pytest.fixture(scope="module", params=FAST_FAMILIES)
def tiny_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, path, num_layers=4)
    return path


def _stacks(path, quant="none"):
    config = load_config(path)
    fast = load_block_stack(path, config, BLOCKS, torch.float32, "cpu", quant, fast_path=True)
    slow = load_block_stack(path, config, BLOCKS, torch.float32, "cpu", quant, fast_path=False)
    assert fast.fast_path and not slow.fast_path
    return fast, slow


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused layers' calls and the tokens of each (a spy around the real method, which both a layer's
    own call and the batched stack's run)."""
    calls = []
    original = FusedLayer.run_flat

    def spy(self, flat, *args, **kwargs):
        calls.append(flat.shape[0])
        return original(self, flat, *args, **kwargs)

    monkeypatch.setattr(FusedLayer, "run_flat", spy)
    return calls


def _session(stack, hidden_size, seed):
    """A prefill with a padded row, then 12 decode steps (past the tiny Mistral's window of 8), a beam reorder."""
    generator = torch.Generator().manual_seed(seed)
    cache = stack.new_cache()
    outputs = []
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding in row 1
    with torch.inference_mode():
        outputs.append(stack(torch.randn(2, 5, hidden_size, generator=generator), mask, None, cache))
        for step in range(12):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            if step == 6:
                stack.reorder_cache(cache, torch.tensor([1, 1]))
                mask = mask[[1, 1]]
            outputs.append(stack(torch.randn(2, 1, hidden_size, generator=generator), mask, None, cache))
    return outputs


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_fast_path_equals_the_layers(tiny_path, quant, fused_calls):
    fast, slow = _stacks(tiny_path, quant)
    # the scheduler batches sessions up to the kernels' rows per pass; PyTorch's products have no such size
    assert fast.rows_per_pass == cpu_kernels.rows_per_pass() and slow.rows_per_pass is None
    if cpu_kernels._cpu_signature().startswith("x86_64") and "avx512f" in open("/proc/cpuinfo").read():
        assert fast.rows_per_pass == 4
    if quant == "int8":  # without the fast path, quantized layers use PyTorch's kernels only
        kernels = {m.kernels for stack in (fast, slow) for m in stack.modules() if hasattr(m, "kernels")}
        assert kernels == {True, False}
    hidden_size = fast.hidden_size
    got = _session(fast, hidden_size, seed=1)
    assert fused_calls, "the fast path did not run"
    calls = len(fused_calls)
    expected = _session(slow, hidden_size, seed=1)
    assert len(fused_calls) == calls  # the slow stack never calls it
    for a, b in zip(got, expected):
        if quant == "none":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # PyTorch's int8 kernel rounds activations to bfloat16; Corolla's keeps float32
            torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


def test_fast_path_in_bfloat16_stays_within_its_rounding(tiny_path):
    config = load_config(tiny_path)
    fast = load_block_stack(tiny_path, config, BLOCKS, torch.bfloat16, "cpu", fast_path=True)
    slow = load_block_stack(tiny_path, config, BLOCKS, torch.bfloat16, "cpu", fast_path=False)
    assert fast.fast_path
    for a, b in zip(_session(fast, fast.hidden_size, seed=2), _session(slow, slow.hidden_size, seed=2)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_batched_sessions_equal_each_alone(tiny_path, fused_calls):
    fast, slow = _stacks(tiny_path)
    generator = torch.Generator().manual_seed(3)
    lengths = [3, 7, 1]
    caches = [fast.new_cache() for _ in lengths]
    reference = [slow.new_cache() for _ in lengths]
    with torch.inference_mode():
        for length, cache, ref in zip(lengths, caches, reference):  # each session's own prompt first
            prompt = torch.randn(1, length, fast.hidden_size, generator=generator)
            torch.testing.assert_close(fast(prompt, None, None, cache), slow(prompt, None, None, ref), rtol=1e-5,
                                       atol=1e-5)
        for _ in range(3):  # then steps of all three together
            steps = [torch.randn(1, 1, fast.hidden_size, generator=generator) for _ in lengths]
            parts = [(h, torch.ones(1, c.get_seq_length() + 1, dtype=torch.long), None, c)
                     for h, c in zip(steps, caches)]
            fused_calls.clear()
            together = fast.forward_batch(parts)
            assert fused_calls and fused_calls[0] == 3  # the three sessions' tokens in one fused call per layer
            for h, ref, out in zip(steps, reference, together):
                torch.testing.assert_close(out, slow(h, None, None, ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode", [True, False])
def test_batched_stack_holds_the_tokens_as_one_matrix_with_the_same_bits(tiny_path, decode):
    """``forward_batch`` passes the sessions' tokens from layer to layer as one matrix (rotary tables joined once):
    the same bits as each layer's own batched call, which concatenates and splits them at every layer; in decode
    steps (the kernels' attention) and in steps of several tokens (PyTorch's)."""
    fast, _ = _stacks(tiny_path)
    generator = torch.Generator().manual_seed(5)
    lengths = [4, 2, 6]
    new = 1 if decode else 3
    flat_caches = [fast.new_cache() for _ in lengths]
    layer_caches = [fast.new_cache() for _ in lengths]
    with torch.inference_mode():
        for length, a, b in zip(lengths, flat_caches, layer_caches):
            prompt = torch.randn(1, length, fast.hidden_size, generator=generator)
            fast(prompt, None, None, a)
            fast(prompt, None, None, b)
        for _ in range(3):
            steps = [torch.randn(1, new, fast.hidden_size, generator=generator) for _ in lengths]
            together = fast.forward_batch([(h, None, None, c) for h, c in zip(steps, flat_caches)])
            prepared = [fast.runner.prepare(h, torch.ones(1, c.get_seq_length() + new, dtype=torch.long),
                                            torch.arange(c.get_seq_length(), c.get_seq_length() + new).unsqueeze(0), c)
                        for h, c in zip(steps, layer_caches)]
            hiddens = steps
            for index, layer in enumerate(fast.layers):
                hiddens = fast.runner.run_layer_batched(layer, hiddens, prepared, [c.layers[index] for c in layer_caches])
            for a, b in zip(together, hiddens):
                assert torch.equal(a, b)


def test_lora_and_autograd_take_the_layers_path(tiny_path, fused_calls):
    fast, slow = _stacks(tiny_path)
    generator = torch.Generator().manual_seed(5)
    rank, width = 2, fast.hidden_size
    pairs = {f"{block}.self_attn.q_proj": (torch.randn(rank, width, generator=generator),
                                          torch.randn(width, rank, generator=generator)) for block in BLOCKS}
    lora = LoraSet(0.5, pairs)
    x = torch.randn(1, 4, width, generator=generator)
    with torch.inference_mode():
        with lora_applied(fast, lora):
            adapted = fast(x)
        with lora_applied(slow, lora):
            expected = slow(x)
        plain = fast(x)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter did act
    assert len(fused_calls) == len(BLOCKS)  # only the plain pass ran fused
    inputs = x.clone().requires_grad_(True)
    fast(inputs).sum().backward()  # autograd: the layers' own modules
    assert inputs.grad is not None and len(fused_calls) == len(BLOCKS)


@pytest.mark.parametrize("name", ["phi3", "gemma2", "mixtral"])
def test_families_outside_the_fast_path_keep_their_layers(tmp_path, name):
    save_tiny_model(name, tmp_path, num_layers=2)  # fused q/k/v, Gemma's norms, experts: not this path's layers
    stack = load_block_stack(tmp_path, load_config(tmp_path), BlockRange(0, 2), torch.float32, "cpu")
    assert not stack.fast_path


def test_decode_steps_of_one_row_sessions_use_the_kernels_attention(tiny_path, monkeypatch):
    """Sessions of one row stepping one token at a time (chat): attention runs in Corolla's kernel (keys and values
    written into the paged caches there), past page boundaries and past the tiny Mistral's window of 8 (where a
    mask makes the other path run), equal to transformers' layers."""
    from corolla.models import cpu_kernels

    calls = []
    original = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast, slow = _stacks(tiny_path)
    generator = torch.Generator().manual_seed(8)
    lengths = [1, 6]
    caches = [fast.new_cache(page_tokens=4) for _ in lengths]
    reference = [slow.new_cache() for _ in lengths]
    with torch.inference_mode():
        for length, cache, ref in zip(lengths, caches, reference):
            prompt = torch.randn(1, length, fast.hidden_size, generator=generator)
            torch.testing.assert_close(fast(prompt, None, None, cache), slow(prompt, None, None, ref), rtol=1e-5,
                                       atol=1e-5)
        for _ in range(10):
            steps = [torch.randn(1, 1, fast.hidden_size, generator=generator) for _ in lengths]
            together = fast.forward_batch([(h, None, None, c) for h, c in zip(steps, caches)])
            for h, ref, out in zip(steps, reference, together):
                torch.testing.assert_close(out, slow(h, None, None, ref), rtol=1e-5, atol=1e-5)
    assert calls, "the kernels' decode attention never ran"
    assert all(cache.get_seq_length() == ref.get_seq_length() for cache, ref in zip(caches, reference))


def _check_prepared_masks(fast, monkeypatch) -> int:
    """Checks ``fast.runner.prepare``'s masks against transformers' own over padded, prefill, beam and decode steps;
    returns how many unpadded decode steps went without a full-attention mask."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from corolla.models import rotary

    built = []  # (new, kind) of each mask prepare asked transformers for (a spy around the real functions)
    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        original = getattr(rotary, name)
        monkeypatch.setattr(rotary, name, lambda *a, _o=original, _n=name, **k: built.append(
            (k["inputs_embeds"].shape[1], _n)) or _o(*a, **k))
    runner = fast.runner
    generator = torch.Generator().manual_seed(3)
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :3] = 0
    cases = [(1, 1, torch.ones(1, 12, dtype=torch.long)), (2, 1, torch.ones(2, 12, dtype=torch.long)),
             (2, 1, padded), (1, 3, torch.ones(1, 12, dtype=torch.long)), (1, 1, torch.ones(1, 4, dtype=torch.long))]
    unmasked = 0
    for batch, new, mask in cases:
        cache = fast.new_cache()
        past = mask.shape[1] - new
        with torch.inference_mode():
            if past:
                fast(torch.randn(batch, past, fast.hidden_size, generator=generator), mask[:, :past], None, cache)
            hidden = torch.randn(batch, new, fast.hidden_size, generator=generator)
            positions = torch.arange(past, past + new).expand(batch, new)
            built.clear()
            prepared = runner.prepare(hidden, mask, positions, cache)
            assert set(prepared.masks) == set(prepared.position_embeddings) == set(runner.attention_types)
            if new == 1 and bool(mask.all()) and runner.config._attn_implementation == "sdpa":
                assert "create_causal_mask" not in [name for _, name in built], "an unpadded decode step built a mask"
            for kind in runner.attention_types:
                make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                expected = make(config=runner.config, inputs_embeds=hidden, attention_mask=mask, cache=cache,
                                position_ids=positions)
                got = prepared.masks[kind]
                assert (got is None) == (expected is None), (batch, new, kind)
                if expected is not None:
                    assert torch.equal(got, expected)
                unmasked += got is None and new == 1 and kind == "full_attention"
    return unmasked


def test_prepared_masks_are_transformers_own(tiny_path, monkeypatch):
    """``RotaryRunner.prepare`` answers an unpadded decode step's full-attention mask itself (None, as SDPA needs no
    mask there); in every case its masks are the ones transformers' mask functions build (padding, prefill, beams,
    the tiny Mistral's sliding window past its 8 tokens)."""
    fast, _ = _stacks(tiny_path)
    unmasked = _check_prepared_masks(fast, monkeypatch)
    # the unpadded decode steps went without a full-attention mask (the tiny Mistral's layers all slide)
    assert unmasked >= 3 or "full_attention" not in fast.runner.attention_types


@pytest.mark.parametrize("name", ["gemma3_text", "gemma2", "phi3", "mixtral"])
def test_prepared_masks_of_other_rotary_families(tmp_path, monkeypatch, name):
    """The same for rotary families off the fast path: Gemma 3 (sliding and full layers, a rotary embedding per
    kind), Gemma 2 (eager attention: its masks are always built), Phi-3 and Mixtral."""
    layers = 6 if name == "gemma3_text" else 2  # Gemma 3's sixth layer is its first full-attention one
    save_tiny_model(name, tmp_path, num_layers=layers)
    stack = load_block_stack(tmp_path, load_config(tmp_path), BlockRange(0, layers), torch.float32, "cpu")
    unmasked = _check_prepared_masks(stack, monkeypatch)
    sdpa_full = "full_attention" in stack.runner.attention_types and stack.runner.config._attn_implementation == "sdpa"
    assert (unmasked >= 3) == sdpa_full


def test_a_load_abandoned_stops_before_its_next_block(tmp_path, monkeypatch):
    """A server told to stop while loading (``abandon`` set) ends the load before the next block, whatever the
    loading path (read at once, or block by block when packing)."""
    import threading

    from corolla.models import stack as stack_module
    from corolla.models.stack import LoadAbandoned

    save_tiny_model("llama", tmp_path, num_layers=4)
    config = load_config(tmp_path)
    built = []
    real_renumber = stack_module._renumber_layer
    abandon = threading.Event()

    def built_then_stop(layer, local_index):  # the signal comes while block 1 loads
        built.append(local_index)
        if local_index == 1:
            abandon.set()
        return real_renumber(layer, local_index)

    monkeypatch.setattr(stack_module, "_renumber_layer", built_then_stop)
    for pack in (True, False):
        built.clear()
        abandon.clear()
        with pytest.raises(LoadAbandoned, match="stopped before block 2"):
            load_block_stack(tmp_path, config, BLOCKS, torch.float32, "cpu", pack_weights=pack, abandon=abandon)
        assert built == [0, 1]
