"""Lossless packing of float32 weights on a grid (corolla.models.packing): it finds GGUF Q4_1 and Q8_0 grids and
bfloat16 values exactly as a GGUF round trip (the ``gguf`` package, as transformers loads such files) leaves them,
refuses anything off its grid by one bit, rebuilds the weights bit for bit, and the kernels' products on packed
weights are the same bits as on the float32 weights; stacks, LM heads and the embedded model pack and compute the
same outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from corolla.core.blocks import BlockRange
from corolla.models import cpu_kernels
from corolla.models.checkpoint import load_config
from corolla.models.packing import PackedLinear, pack, pack_layer
from corolla.models.stack import load_block_stack
from corolla.testing.tiny import on_grid, save_tiny_model

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler here: the kernels are not built")

GRIDS = {"Q4_1": "q4a", "Q8_0": "q8s", "bf16": "bf16"}


def _weight(out: int, features: int, seed: int) -> torch.Tensor:
    return torch.randn(out, features, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("features", [64, 96, 576])  # 96: a last block of 32 after whole runs of 64
def test_grids_are_found_and_rebuilt_bit_for_bit(grid, features):
    weight = on_grid(_weight(40, features, seed=features), grid)
    packed = pack(weight)
    assert packed is not None and packed.kind == GRIDS[grid]
    assert torch.equal(packed.unpack(), weight)
    assert packed.nbytes() < weight.numel() * 4 * (0.6 if grid == "bf16" else 0.3)


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 32])
def test_packed_products_are_the_float32_products(grid, rows):
    """The same bits as the float32 kernel on the unpacked weights: a group of three with biases, strided rows."""
    features = 96
    weights = [on_grid(_weight(out, features, seed=out), grid) for out in (16, 48, 33)]
    biases = [torch.randn(16), None, torch.randn(33)]
    packed = [pack(w) for w in weights]
    assert all(p is not None for p in packed)
    wide = torch.randn(rows, features + 7)
    x = wide[:, 2 : 2 + features]
    dense = cpu_kernels.LinearGroup(weights, None, biases)(x)
    assert torch.equal(cpu_kernels.LinearGroup(packed, None, biases)(x), dense)
    reference = torch.cat([x.double() @ w.double().t() + (0 if b is None else b.double())
                           for w, b in zip(weights, biases)], dim=1)
    torch.testing.assert_close(dense.double(), reference, rtol=1e-5, atol=1e-5)


def test_anything_off_the_grid_stays_unpacked():
    weight = on_grid(_weight(8, 64, seed=1), "Q4_1")
    assert pack(weight).kind == "q4a"
    nudged = weight.clone()
    nudged[3, 17] = torch.nextafter(nudged[3, 17], torch.tensor(1.0))  # one bit off in one weight
    assert pack(nudged, ("q4a",)) is None
    assert pack(_weight(8, 64, seed=2)) is None  # plain float32 values
    assert pack(_weight(8, 70, seed=3).bfloat16().float()) is None  # rows not whole blocks of 32
    infinite = weight.clone()
    infinite[0, 0] = float("inf")
    assert pack(infinite) is None
    assert pack(weight.double()) is None and pack(weight.to(torch.bfloat16)) is None
    zeros = torch.zeros(4, 32)
    assert pack(zeros) is not None and torch.equal(pack(zeros).unpack(), zeros)
    with pytest.raises(ValueError, match="unknown packing"):
        pack(weight, ("q5",))


def test_bad_packed_weights_are_named():
    codes = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs d"):
        cpu_kernels.PackedWeight("q4a", codes)
    with pytest.raises(ValueError, match="must be a contiguous float32"):
        cpu_kernels.PackedWeight("q4a", codes, torch.zeros(4, 2), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="in % 32"):
        cpu_kernels.PackedWeight("bf16", torch.zeros(4, 40, dtype=torch.int16))
    weight = on_grid(_weight(8, 64, seed=1), "Q4_1")
    with pytest.raises(ValueError, match="one kind"):
        cpu_kernels.LinearGroup([pack(weight), pack(weight.bfloat16().float())])


def test_packed_linear_computes_what_the_linear_computes():
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight.copy_(on_grid(linear.weight, "Q4_1"))
    packed = PackedLinear(linear, pack(linear.weight))
    for rows in (1, 7, 40):  # 40: more rows than the kernels take, the unpacked weights' product
        x = torch.randn(rows, 64)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 64, requires_grad=True)
    packed(x).square().sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    linear(expected).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid", ["Q4_1", "bf16"])
def test_a_stack_on_a_grid_packs_and_computes_the_same(tmp_path, grid):
    save_tiny_model("llama", tmp_path, num_layers=3, grid=grid)
    config = load_config(tmp_path)
    blocks = BlockRange(0, 3)
    packed = load_block_stack(tmp_path, config, blocks, torch.float32, "cpu")
    dense = load_block_stack(tmp_path, config, blocks, torch.float32, "cpu", pack_weights=False)
    slow = load_block_stack(tmp_path, config, blocks, torch.float32, "cpu", fast_path=False)
    assert packed.packed == {GRIDS[grid]: 7 * 3} and dense.packed == {} and slow.packed == {}
    assert packed.weight_bytes() < dense.weight_bytes() * (0.6 if grid == "bf16" else 0.35)
    generator = torch.Generator().manual_seed(0)
    caches = [stack.new_cache() for stack in (packed, dense, slow)]
    with torch.inference_mode():
        prompt = torch.randn(1, 5, config.hidden_size, generator=generator)
        outs = [stack(prompt, None, None, cache) for stack, cache in zip((packed, dense, slow), caches)]
        for _ in range(6):
            step = torch.randn(1, 1, config.hidden_size, generator=generator)
            outs = [stack(step, None, None, cache) for stack, cache in zip((packed, dense, slow), caches)]
            assert torch.equal(outs[0], outs[1])  # packed and dense fast path: the same bits
            torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)
    # a training pass (autograd, 2 x 6 rows: within the kernels' reach): the same bits as the unpacked layers, outputs
    # and gradients, as PyTorch's products compute them (the kernels' sums would differ in their last bits)
    x = torch.randn(2, 6, config.hidden_size, generator=generator)
    weights = torch.randn(2, 6, config.hidden_size, generator=generator)
    results = []
    for stack in (packed, dense):
        leaf = x.clone().requires_grad_(True)
        out = stack(leaf, None, None, None)
        (out * weights).sum().backward()
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_off_grid_checkpoints_are_not_packed(tmp_path):
    save_tiny_model("llama", tmp_path, num_layers=2)
    stack = load_block_stack(tmp_path, load_config(tmp_path), BlockRange(0, 2), torch.float32, "cpu")
    assert stack.packed == {}
    assert not any(isinstance(module, PackedLinear) for module in stack.modules())


def test_where_the_kernels_rebuild_packed_weights_one_by_one_weights_stay_float32(tmp_path, monkeypatch):
    """The portable build (no AVX2, no AVX-512: ``rows_per_pass`` None) rebuilds each packed weight on its own, ~16x
    slower than its float32 loop: stacks and LM heads then keep float32 weights, and compute the same."""
    save_tiny_model("llama", tmp_path, num_layers=2, grid="Q4_1")
    config = load_config(tmp_path)
    assert cpu_kernels.packing_pays()  # this build (AVX-512 or AVX2) packs
    monkeypatch.setattr(cpu_kernels, "rows_per_pass", lambda: None)  # as the portable build answers
    assert not cpu_kernels.packing_pays()
    stack = load_block_stack(tmp_path, config, BlockRange(0, 2), torch.float32, "cpu")
    assert stack.packed == {} and not any(isinstance(module, PackedLinear) for module in stack.modules())
    head = cpu_kernels.KernelLinear(64, 100, bias=False)
    with torch.no_grad():
        head.weight.copy_(on_grid(head.weight, "Q8_0"))
    head.prepare()
    assert head._group.packing is None


def test_kernel_linear_packs_its_weights_as_loaded_and_follows_changes():
    head = cpu_kernels.KernelLinear(64, 100, bias=False)
    with torch.no_grad():
        head.weight.copy_(on_grid(head.weight, "Q8_0"))
    head.prepare()
    assert head._group.packing == "q8s"
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(head(x), cpu_kernels.LinearGroup([head.weight.detach()])(x))
        head.weight.add_(0.001)  # trained in place: off the grid now
        torch.testing.assert_close(head(x), x @ head.weight.t(), rtol=1e-5, atol=1e-5)
    assert head._group.packing is None


def test_kernel_linear_told_of_writes_through_data():
    """Writes through ``.data`` change no version PyTorch keeps, so the packed copy cannot see them; after
    ``weights_changed()`` the head reads its weights as they are."""
    head = cpu_kernels.KernelLinear(64, 100, bias=False)
    with torch.no_grad():
        head.weight.copy_(on_grid(head.weight, "Q8_0"))
    head.prepare()
    x = torch.randn(1, 64)
    head.weight.data[7] = 0
    with torch.no_grad():
        assert head(x)[0, 7].item() != 0  # the packed copy, as loaded
        head.weights_changed()
        assert head(x)[0, 7].item() == 0
        torch.testing.assert_close(head(x), x @ head.weight.t(), rtol=1e-5, atol=1e-5)


def test_the_embedded_model_is_on_q4_1_and_q8_0_grids():
    """SmolLM2's GGUF file holds its blocks as Q4_1 and its embeddings as Q8_0: converted to float32 they lie exactly
    on those grids, so a layer packs whole and the tied head packs as Q8_0."""
    from corolla.models.checkpoint import read_tensors, resolve_model

    path = resolve_model(None)
    tensors = read_tensors(path, lambda name: name.startswith("model.layers.0.mlp.") or name.endswith("embed_tokens.weight"))
    gate = tensors["model.layers.0.mlp.gate_proj.weight"]
    assert pack(gate).kind == "q4a" and torch.equal(pack(gate).unpack(), gate)
    embeddings = tensors["model.embed_tokens.weight"]
    assert pack(embeddings).kind == "q8s"
    layer = nn.Module()
    layer.proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
    with torch.no_grad():
        layer.proj.weight.copy_(gate)
    assert pack_layer(layer) == {"proj": "q4a"} and isinstance(layer.proj, PackedLinear)


def test_packed_products_split_among_threads_are_the_same():
    """Large enough to be split among OpenMP threads: the same bits with 1 and 2 threads, as the float32 kernel."""
    weight = on_grid(_weight(1024, 576, seed=9), "Q4_1")
    packed, x = cpu_kernels.LinearGroup([pack(weight)]), torch.randn(3, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = packed(x)
        torch.set_num_threads(2)
        assert torch.equal(packed(x), alone)
        assert torch.equal(cpu_kernels.LinearGroup([weight])(x), alone)
    finally:
        torch.set_num_threads(threads)
