"""Corolla's CPU kernels (corolla.models.cpu_kernels) against PyTorch's products: every shape case of the C code
(row blocks of 4, 3, 2, 1; inputs not a multiple of 64 or 16; strided rows; several matrices with and without
biases), int8 weights with scales, the RMS norm, the LM head's ``KernelLinear``, bad inputs, and the fallback when
the kernels cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from corolla.models import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler here: the kernels are not built")


def _reference(x, weights, scales, biases):
    outputs = []
    for index, weight in enumerate(weights):
        w = weight.double() if scales is None else weight.double() * scales[index].double()[:, None]
        out = x.double() @ w.t()
        if biases is not None and biases[index] is not None:
            out = out + biases[index].double()
        outputs.append(out)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13])
@pytest.mark.parametrize("features", [576, 100, 16, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_linear_group_matches_pytorch(rows, features, dtype):
    generator = torch.Generator().manual_seed(rows * 1000 + features)
    outs = [5, 64, 33]
    if dtype == torch.float32:
        weights = [torch.randn(out, features, generator=generator) for out in outs]
        scales = None
    else:
        weights = [torch.randint(-127, 128, (out, features), generator=generator, dtype=torch.int8) for out in outs]
        scales = [torch.rand(out, generator=generator) / 100 for out in outs]
    biases = [torch.randn(outs[0], generator=generator), None, torch.randn(outs[2], generator=generator)]
    wide = torch.randn(rows, features + 9, generator=generator)
    x = wide[:, 3 : 3 + features]  # rows apart by features + 9: a strided input
    group = cpu_kernels.LinearGroup(weights, scales, biases)
    assert cpu_kernels.usable(x, max_rows=rows)
    got = group(x)
    expected = _reference(x, weights, scales, biases)
    assert got.shape == (rows, sum(outs)) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_rows_are_independent_of_their_company():
    """A row's outputs are bitwise the same computed alone or among others (no dependence on the batch)."""
    weight = torch.randn(96, 200)
    group = cpu_kernels.LinearGroup([weight])
    x = torch.randn(7, 200)
    together = group(x)
    for row in range(7):
        assert torch.equal(group(x[row : row + 1]), together[row : row + 1])


def test_rms_norm_matches_transformers_formula():
    x = torch.randn(5, 576) * 30
    weight = torch.randn(576)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-5)


def test_kernel_linear_is_nn_linear_with_and_without_autograd():
    torch.manual_seed(0)
    layer = cpu_kernels.KernelLinear(48, 300)
    reference = torch.nn.Linear(48, 300)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[:, -1:]), reference(x[:, -1:]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)  # 6 rows
    out = layer(x)  # autograd records: nn.Linear's own path, gradients flow
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():  # tied or replaced weights are taken up
        layer.weight = torch.nn.Parameter(torch.randn(300, 48))
        torch.testing.assert_close(layer(x[:, -1:]), torch.nn.functional.linear(x[:, -1:], layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one dtype and width"):
        cpu_kernels.LinearGroup([torch.randn(4, 8), torch.randn(4, 9)])
    with pytest.raises(ValueError, match="float32 or int8"):
        cpu_kernels.LinearGroup([torch.randn(4, 8).double()])
    with pytest.raises(ValueError, match="scales"):
        cpu_kernels.LinearGroup([torch.zeros(4, 8, dtype=torch.int8)])
    with pytest.raises(ValueError, match="biases"):
        cpu_kernels.LinearGroup([torch.randn(4, 8)], None, [torch.randn(5)])
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.LinearGroup([torch.randn(8, 4).t()])
    with pytest.raises(ValueError, match=r"x must be \[rows, 8\]"):
        cpu_kernels.LinearGroup([torch.randn(4, 8)])(torch.randn(1, 9))
    assert not cpu_kernels.usable(torch.randn(1, 8).double())
    assert not cpu_kernels.usable(torch.randn(cpu_kernels.MAX_ROWS + 1, 8))
    assert not cpu_kernels.usable(torch.randn(8, 2).t())  # columns not contiguous


def test_without_a_compiler_the_kernels_are_off_and_layers_still_run(tmp_path):
    """No C compiler (CC points at a missing program, an empty cache): available() is False with the reason, and a
    fast-path stack falls back to PyTorch's products."""
    code = (
        "import torch\n"
        "from corolla.models import cpu_kernels\n"
        "assert not cpu_kernels.available()\n"
        "print(cpu_kernels.unavailable_reason())\n"
        "group_layer = cpu_kernels.KernelLinear(8, 4)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(group_layer(torch.ones(1, 8)), torch.nn.functional.linear(torch.ones(1, 8),"
        " group_layer.weight, group_layer.bias))\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "COROLLA_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no-such-compiler" in result.stdout


@pytest.mark.parametrize("march,rows_per_pass", [("x86-64", 0), ("x86-64-v3", 4)])
def test_each_instruction_set_computes_the_same(tmp_path, march, rows_per_pass):
    """Each of the C file's paths gives the same products, built here for an instruction set and called directly:
    ``x86-64``, the plain loops (what a CPU without AVX2 builds); ``x86-64-v3``, the AVX2 and FMA kernels (what a CPU
    without AVX-512 builds). Seven rows: a block of four and one of three; 90 features: whole runs of 32, three of
    eight, then two one by one."""
    import ctypes
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not cpu_kernels._cpu_signature().startswith("x86_64"):
        pytest.skip("needs an x86-64 C compiler")
    flags = cpu_kernels._cpu_signature().split()
    if march == "x86-64-v3" and not {"avx2", "fma"} <= set(flags):
        pytest.skip("this CPU cannot run AVX2 code")
    library_path = tmp_path / f"{march}.so"
    subprocess.run([compiler, "-O2", f"-march={march}", "-shared", "-fPIC", "-std=gnu11", "-o", str(library_path),
                    str(cpu_kernels.SOURCE), "-lm"], check=True, capture_output=True)
    library = ctypes.CDLL(str(library_path))
    generator = torch.Generator().manual_seed(7)
    rows, features = 7, 90
    x = torch.randn(rows, features, generator=generator)
    weights = [torch.randn(5, features, generator=generator), torch.randn(9, features, generator=generator)]
    quantized = [torch.randint(-127, 128, (5, features), generator=generator, dtype=torch.int8)]
    scales = [torch.rand(5, generator=generator)]
    bias = torch.randn(9, generator=generator)

    def pointers(tensors):
        return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])

    y = torch.empty(rows, 14)
    library.corolla_linear_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(features), ctypes.c_int64(features),
                               ctypes.c_int64(rows), ctypes.c_int64(2), pointers(weights),
                               (ctypes.c_int64 * 2)(5, 9), pointers([None, bias]), ctypes.c_void_p(y.data_ptr()),
                               ctypes.c_int64(14), ctypes.c_int(1))
    expected = torch.cat([x @ weights[0].t(), x @ weights[1].t() + bias], dim=1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    y8 = torch.empty(rows, 5)
    library.corolla_linear_i8(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(features), ctypes.c_int64(features),
                              ctypes.c_int64(rows), ctypes.c_int64(1), pointers(quantized), (ctypes.c_int64 * 1)(5),
                              pointers(scales), None, ctypes.c_void_p(y8.data_ptr()), ctypes.c_int64(5),
                              ctypes.c_int(1))
    torch.testing.assert_close(y8, x @ (quantized[0].float() * scales[0][:, None]).t(), rtol=1e-5, atol=1e-4)
    # packed weights: the same bits as this build's float32 kernel on the unpacked weights
    from corolla.models.packing import pack
    from corolla.testing.tiny import on_grid

    x96 = torch.randn(rows, 96, generator=generator)
    for grid in ("Q4_1", "Q8_0", "bf16"):
        weight = on_grid(torch.randn(6, 96, generator=generator), grid)
        packed = pack(weight)
        dense, got = torch.empty(rows, 6), torch.empty(rows, 6)
        library.corolla_linear_f32(ctypes.c_void_p(x96.data_ptr()), ctypes.c_int64(96), ctypes.c_int64(96),
                                   ctypes.c_int64(rows), ctypes.c_int64(1), pointers([weight]),
                                   (ctypes.c_int64 * 1)(6), None, ctypes.c_void_p(dense.data_ptr()),
                                   ctypes.c_int64(6), ctypes.c_int(1))
        library.corolla_linear_packed(ctypes.c_int(cpu_kernels.PACKED_KINDS[packed.kind][0]),
                                      ctypes.c_void_p(x96.data_ptr()), ctypes.c_int64(96), ctypes.c_int64(96),
                                      ctypes.c_int64(rows), ctypes.c_int64(1), pointers([packed.codes]),
                                      pointers([packed.d]), pointers([packed.m]), (ctypes.c_int64 * 1)(6), None,
                                      ctypes.c_void_p(got.data_ptr()), ctypes.c_int64(6), ctypes.c_int(1))
        assert torch.equal(got, dense), grid
        torch.testing.assert_close(dense, x96 @ weight.t(), rtol=1e-5, atol=1e-4)
        for row in range(rows):  # a row alone: the same bits as among the others
            alone = torch.empty(1, 6)
            library.corolla_linear_f32(ctypes.c_void_p(x96[row].data_ptr()), ctypes.c_int64(96),
                                       ctypes.c_int64(96), ctypes.c_int64(1), ctypes.c_int64(1), pointers([weight]),
                                       (ctypes.c_int64 * 1)(6), None, ctypes.c_void_p(alone.data_ptr()),
                                       ctypes.c_int64(6), ctypes.c_int(1))
            assert torch.equal(alone[0], dense[row]), (grid, row)
    # decode attention: this build's loops against PyTorch's attention
    heads, kv_heads, d, length = 4, 2, 16, 9
    q = torch.randn(1, heads * d, generator=generator)
    new = torch.randn(2, 1, kv_heads, d, generator=generator)  # the new key and value
    caches = [torch.randn(1, kv_heads, length + 3, d, generator=generator) for _ in range(2)]
    out = torch.empty(1, heads * d)
    scratch = torch.empty(heads // kv_heads * (length + 1))  # one group of heads' scores
    library.corolla_decode_attention(
        ctypes.c_int64(1), ctypes.c_int64(heads), ctypes.c_int64(kv_heads), ctypes.c_int64(d),
        ctypes.c_void_p(q.data_ptr()), ctypes.c_int64(heads * d), ctypes.c_void_p(new[0].data_ptr()),
        ctypes.c_int64(kv_heads * d), ctypes.c_void_p(new[1].data_ptr()), ctypes.c_int64(kv_heads * d),
        pointers([caches[0]]), pointers([caches[1]]), (ctypes.c_int64 * 1)(length + 3), (ctypes.c_int64 * 1)(length),
        ctypes.c_float(0.25), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(heads * d),
        ctypes.c_void_p(scratch.data_ptr()), ctypes.c_int(1))
    assert torch.equal(caches[0][0, :, length], new[0, 0]) and torch.equal(caches[1][0, :, length], new[1, 0])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, heads, 1, d), caches[0][:, :, : length + 1], caches[1][:, :, : length + 1], scale=0.25,
        enable_gqa=True)
    torch.testing.assert_close(out, expected.reshape(1, heads * d), rtol=1e-5, atol=1e-5)
    # the plain loops: one row per pass, no batch size is best (the scheduler's knee); the AVX2 kernels: four
    assert library.corolla_rows_per_pass() == rows_per_pass


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [64, 96, 20])
def test_decode_attention_matches_pytorch(threads, d):
    """Several sessions, one new token each, caches of different lengths and capacities, grouped-query heads, keys
    and values read from strided rows: the new keys/values land in the caches and each head's attention equals
    PyTorch's scaled_dot_product_attention over the cache. Head sizes: 64 (the AVX2 loops' blocks of 64 columns),
    96 (a block of 64, then of 8) and 20 (blocks of 8, then single columns; scores one position at a time)."""
    generator = torch.Generator().manual_seed(11)
    heads, kv_heads = 6, 2
    lengths = [0, 5, 63, 64, 200]  # tokens already cached
    sessions = len(lengths)
    keys = [torch.randn(1, kv_heads, n + 1 + extra, d, generator=generator) for n, extra in zip(lengths, [0, 3, 1, 60, 7])]
    values = [torch.randn(k.shape, generator=generator) for k in keys]
    before = [(k.clone(), v.clone()) for k, v in zip(keys, values)]
    qkv = torch.randn(sessions, (heads + 2 * kv_heads) * d + 5, generator=generator)  # rows wider than their parts
    q = qkv[:, : heads * d]
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(sessions, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d : (heads + 2 * kv_heads) * d].view(sessions, kv_heads, d)
    scale = 0.125
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernels.decode_attention(q, k, v, keys, values, lengths, scale)
    finally:
        torch.set_num_threads(previous)
    assert out.shape == (sessions, heads * d)
    for s, n in enumerate(lengths):
        assert torch.equal(keys[s][0, :, n], k[s]) and torch.equal(values[s][0, :, n], v[s])
        assert torch.equal(keys[s][0, :, :n], before[s][0][0, :, :n])  # the cached tokens are untouched
        assert torch.equal(keys[s][0, :, n + 1 :], before[s][0][0, :, n + 1 :])
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[s].view(1, heads, 1, d), keys[s][:, :, : n + 1], values[s][:, :, : n + 1], scale=scale, enable_gqa=True)
        torch.testing.assert_close(out[s], expected.reshape(heads * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [64, 20])
def test_grouped_heads_give_the_bits_of_heads_alone(d):
    """Heads that share a key/value head go through its positions together (16 at a time): each head's output must
    be the bits it gets when it has the key/value head to itself (the same cache repeated once per query head), at
    lengths on and off the 16- and 4-position boundaries."""
    generator = torch.Generator().manual_seed(12)
    heads, kv_heads = 6, 2
    lengths = [0, 3, 15, 16, 17, 47, 300]
    keys = [torch.randn(1, kv_heads, n + 2, d, generator=generator) for n in lengths]
    values = [torch.randn(k.shape, generator=generator) for k in keys]
    q = torch.randn(len(lengths), heads * d, generator=generator)
    k = torch.randn(len(lengths), kv_heads, d, generator=generator)
    v = torch.randn(len(lengths), kv_heads, d, generator=generator)
    group = heads // kv_heads
    alone_keys = [key.repeat_interleave(group, dim=1).contiguous() for key in keys]  # [1, heads, capacity, d]
    alone_values = [value.repeat_interleave(group, dim=1).contiguous() for value in values]
    grouped = cpu_kernels.decode_attention(q, k, v, keys, values, lengths, 0.2)
    alone = cpu_kernels.decode_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                         alone_keys, alone_values, lengths, 0.2)
    assert torch.equal(grouped, alone)


def test_decode_attention_softmax_over_wide_score_ranges():
    """The softmax's vector exponentials: scores that span far more than float32's exponent range (weights that
    underflow to zero) still match PyTorch; a NaN query gives NaN outputs for its session, not numbers."""
    generator = torch.Generator().manual_seed(13)
    heads, kv_heads, d, length = 4, 2, 64, 100
    keys = [torch.randn(1, kv_heads, length + 1, d, generator=generator) * 30 for _ in range(2)]
    values = [torch.randn(key.shape, generator=generator) for key in keys]
    q = torch.randn(2, heads * d, generator=generator) * 30  # scores of magnitude ~10^4
    k = torch.randn(2, kv_heads, d, generator=generator)
    v = torch.randn(2, kv_heads, d, generator=generator)
    out = cpu_kernels.decode_attention(q, k, v, keys, values, [length, length], 0.125)
    for s in range(2):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[s].view(1, heads, 1, d), keys[s][:, :, : length + 1], values[s][:, :, : length + 1], scale=0.125,
            enable_gqa=True)
        torch.testing.assert_close(out[s], expected.reshape(heads * d), rtol=1e-5, atol=1e-5)
    q[0, :d] = float("nan")
    out = cpu_kernels.decode_attention(q, k, v, keys, values, [length, length], 0.125)
    assert out[0, :d].isnan().all() and out[1].isfinite().all()


def test_decode_attention_refuses_what_does_not_fit():
    k = torch.randn(1, 2, 64)
    cache = torch.zeros(1, 2, 4, 64)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_kernels.decode_attention(torch.randn(1, 256), k, k, [cache], [cache.clone()], [4], 0.1)  # no room at 4
    with pytest.raises(ValueError, match="does not fit"):
        cpu_kernels.decode_attention(torch.randn(1, 256), k, k, [torch.zeros(2, 2, 4, 64)], [torch.zeros(2, 2, 4, 64)],
                                     [0], 0.1)  # two rows
    with pytest.raises(ValueError, match="mismatched"):
        cpu_kernels.decode_attention(torch.randn(1, 192), k, k, [cache], [cache.clone()], [0], 0.1)  # 3 heads, 2 kv
