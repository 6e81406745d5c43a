"""Quantized weights: int8 and int4 layers against their float originals, gradients through them, stacks loading
quantized blocks, the choice of a mode per device, records announcing it, and clients choosing by it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from corolla.core.blocks import BlockRange
from corolla.core.errors import CorollaError
from corolla.core.records import ServerRecord, ServerState
from corolla.core.spans import one_quantization
from corolla.models.checkpoint import load_config
from corolla.models.lora import LoraSet, linear_targets, lora_applied
from corolla.models.quant import Int4Linear, Int8Linear, quantize_layer, resolve_quant
from corolla.models.stack import load_block_stack
from corolla.testing.tiny import save_tiny_model
from corolla.wire.records import decode_record, encode_record


def _linear(inp=256, out=192, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out)
    nn.init.normal_(linear.weight, std=0.02)  # as trained weights are distributed, roughly
    return linear


@pytest.mark.parametrize("kind, bound", [(Int8Linear, 0.01), (Int4Linear, 0.12)])
def test_quantized_linear_is_close_to_the_float_one(kind, bound):
    linear = _linear()
    quantized = kind(linear)
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        expected, got = linear(x), quantized(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() < bound
    # the weights it computes with are what dequantized_weight says
    with torch.no_grad():
        again = x @ quantized.dequantized_weight().t() + linear.bias
    assert ((got - again).norm() / again.norm()).item() < 0.01


def test_int8_rows_do_not_depend_on_their_company():
    """A token's int8 outputs are the same (to float32 rounding) in a decode step, a small batch (the kernel) and a
    prefill of many rows (float32 product with the dequantized weights): activations stay float32 throughout."""
    quantized = Int8Linear(_linear())
    x = torch.randn(100, 256)
    with torch.no_grad():
        prefill = quantized(x)  # 100 rows
        small = quantized(x[:5])  # the kernel, several rows
        single = torch.cat([quantized(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(small, single, rtol=0, atol=0)  # rows are computed independently
    torch.testing.assert_close(prefill[:5], small, rtol=1e-5, atol=1e-6)


def test_bitsandbytes_layers_built_for_cuda_run_on_its_cpu_backend():
    """The bitsandbytes layers a CUDA server builds (LLM.int8() and NF4), built by the same function and run on
    bitsandbytes' CPU backend, as no GPU is here: quantized weights, outputs near the float layer's, gradients flow
    to the input, and the fast path leaves them to their own modules."""
    pytest.importorskip("bitsandbytes")
    from corolla.models.fused import fusable
    from corolla.models.quant import _bitsandbytes_linear

    linear = _linear(256, 192)
    x = torch.randn(3, 256)
    for mode, bound in (("int8", 0.02), ("nf4", 0.15)):
        layer = _bitsandbytes_linear(linear, mode, torch.device("cpu"))
        assert type(layer).__name__ == ("Linear8bitLt" if mode == "int8" else "Linear4bit")
        with torch.no_grad():
            expected, got = linear(x), layer(x)
        error = ((got.float() - expected).norm() / expected.norm()).item()
        assert 0 < error < bound, (mode, error)  # quantized (not the float weights), and close
        inputs = x.clone().requires_grad_(True)
        layer(inputs).sum().backward()
        assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    block = LlamaDecoderLayer(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2), layer_idx=0)
    assert fusable(block)
    block.mlp.up_proj = _bitsandbytes_linear(block.mlp.up_proj, "nf4", torch.device("cpu"))
    assert not fusable(block)


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_gradients_flow_through_quantized_layers(kind):
    quantized = kind(_linear())
    x = torch.randn(4, 256, requires_grad=True)
    weights = torch.randn(4, 192)
    (quantized(x) * weights).sum().backward()
    expected = weights @ quantized.dequantized_weight()
    assert torch.allclose(x.grad, expected, rtol=1e-3, atol=1e-3)
    assert not any(p.requires_grad for p in quantized.parameters())


def test_stack_with_quantized_weights(tmp_path):
    model = save_tiny_model("llama", tmp_path, num_layers=4)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
    model.save_pretrained(tmp_path)
    config = load_config(tmp_path)
    stacks = {q: load_block_stack(tmp_path, config, BlockRange(0, 4), torch.float32, "cpu", q)
              for q in ("none", "int8", "int4")}
    hidden = torch.randn(2, 9, 64)
    with torch.no_grad():
        outputs = {q: stack(hidden) for q, stack in stacks.items()}
    for q, bound in (("int8", 0.01), ("int4", 0.1)):
        error = ((outputs[q] - outputs["none"]).norm() / outputs["none"].norm()).item()
        assert error < bound, (q, error)
        assert stacks[q].quant == q
        assert len(linear_targets(stacks[q].layer(0))) == 7  # LoRA still finds every linear layer
    full = stacks["none"].weight_bytes()
    assert stacks["int8"].weight_bytes() < 0.3 * full and stacks["int4"].weight_bytes() < 0.2 * full
    # a session through a quantized stack equals one pass through it
    cache = stacks["int8"].new_cache()
    with torch.no_grad():
        parts = [stacks["int8"](hidden[:, :4], cache=cache), stacks["int8"](hidden[:, 4:], cache=cache)]
    assert torch.allclose(torch.cat(parts, 1), outputs["int8"], atol=1e-3)
    # LoRA on a quantized layer adds its update
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    lora = LoraSet(0.5, {"0.self_attn.q_proj": (a, b)})
    with torch.no_grad(), lora_applied(stacks["int8"], lora):
        adapted = stacks["int8"](hidden)
    assert not torch.allclose(adapted, outputs["int8"])


@pytest.mark.parametrize("mode, bound", [("int8", 0.01), ("int4", 0.15)])  # (4 bits of weights std 0.1)
def test_mixtral_experts_are_quantized(tmp_path, mode, bound):
    """transformers 5 holds Mixtral's experts (nearly all its weights) in two fused 3-D parameters, not nn.Linear
    modules: they are quantized too (they stayed float32, at 92% of the float stack's bytes under int8), and the
    quantized experts compute what transformers' experts compute with the weights they hold."""
    model = save_tiny_model("mixtral", tmp_path, num_layers=2)
    config = load_config(tmp_path)
    stacks = {q: load_block_stack(tmp_path, config, BlockRange(0, 2), torch.float32, "cpu", q) for q in ("none", mode)}
    full, quantized = stacks["none"].weight_bytes(), stacks[mode].weight_bytes()
    assert quantized < (0.3 if mode == "int8" else 0.2) * full, quantized / full
    float_weights = [name for name, p in stacks[mode].named_parameters() if p.numel() > 4 * 64]
    assert float_weights == []  # what stays float: norms and the small router
    assert linear_targets(stacks[mode].layer(0)).keys() == linear_targets(stacks["none"].layer(0)).keys()  # LoRA's
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = stacks["none"](hidden), stacks[mode](hidden)
    assert ((got - expected).norm() / expected.norm()).item() < bound
    # against transformers' own experts holding the dequantized weights: the same computation
    from corolla.models.quant import QuantizedExperts

    experts = model.model.layers[0].mlp.experts
    replaced = QuantizedExperts(experts, mode, torch.device("cpu"))
    assert isinstance(replaced.gate_up[0], Int8Linear if mode == "int8" else Int4Linear)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.stack([linear.dequantized_weight() for linear in replaced.gate_up]))
        experts.down_proj.copy_(torch.stack([linear.dequantized_weight() for linear in replaced.down]))
    tokens = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0], [1, 2], [2, 1]])
    weights = torch.rand(7, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, ours = experts(tokens, index, weights), replaced(tokens, index, weights)
    # int8 keeps float32 activations; int4's kernel rounds them to bfloat16
    assert ((ours - reference).norm() / reference.norm()).item() < (1e-5 if mode == "int8" else 1e-2)
    # gradients reach the input through the quantized experts, as through transformers' with those weights
    inputs = [tokens.clone().requires_grad_(True) for _ in range(2)]
    (experts(inputs[0], index, weights) * reference).sum().backward()
    (replaced(inputs[1], index, weights) * reference).sum().backward()
    assert ((inputs[1].grad - inputs[0].grad).norm() / inputs[0].grad.norm()).item() < 1e-2


def test_bloom_slow_but_exact_keeps_the_linear_layers_it_reads_as_tensors(tmp_path):
    """BLOOM with pretraining_tp > 1 and slow_but_exact: transformers' attention and MLP read ``dense.weight`` and
    ``dense_4h_to_h.weight`` themselves (slices of them, without their biases), which quantized and packed layers
    lack (every forward raised AttributeError): those two stay float, the others are quantized or packed, and the
    outputs are the float layers' (packed: exactly; int8/int4: as close as their other layers allow)."""
    import transformers

    from corolla.models.packing import PackedLinear
    from corolla.testing.tiny import on_grid

    config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128, initializer_range=0.1,
                                      pretraining_tp=2, slow_but_exact=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # bfloat16 values, as a bf16-published checkpoint read in float32
                module.weight.copy_(on_grid(module.weight, "bf16"))
    model.save_pretrained(tmp_path)
    config = load_config(tmp_path)
    load = lambda quant, **kwargs: load_block_stack(tmp_path, config, BlockRange(0, 2), torch.float32, "cpu", quant,
                                                    **kwargs)
    reference = load("none", pack_weights=False)
    stacks = {"packed": load("none"), "int8": load("int8"), "int4": load("int4")}
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(hidden)
        outputs = {name: stack(hidden) for name, stack in stacks.items()}
    kinds = {"packed": PackedLinear, "int8": Int8Linear, "int4": Int4Linear}
    for name, stack in stacks.items():
        layer = stack.layer(0)
        assert type(layer.self_attention.dense) is nn.Linear and type(layer.mlp.dense_4h_to_h) is nn.Linear
        if name != "packed" or stack.packed:  # (packed only where the kernels rebuild packed weights fast)
            assert isinstance(layer.self_attention.query_key_value, kinds[name]), name
            assert isinstance(layer.mlp.dense_h_to_4h, kinds[name]), name
    assert (outputs["packed"] - expected).abs().max().item() < 1e-5
    for name, bound in (("int8", 0.01), ("int4", 0.15)):
        assert ((outputs[name] - expected).norm() / expected.norm()).item() < bound, name


def test_quant_modes_per_device():
    assert resolve_quant("auto", torch.device("cpu")) == "int8"
    assert resolve_quant("int4", torch.device("cpu")) == "int4"
    with pytest.raises(CorollaError, match="nf4 .* needs CUDA; on CPU use --quant int4"):
        resolve_quant("nf4", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        resolve_quant("int3", torch.device("cpu"))
    layer = nn.Sequential(nn.Linear(48, 16), nn.Linear(64, 8), nn.Linear(64, 16))
    quantize_layer(layer, "int4", torch.device("cpu"))  # whole groups of 32 inputs and of 16 outputs, or float
    assert [type(m) for m in layer] == [nn.Linear, nn.Linear, Int4Linear]


def _record(peer, start, end, quant):
    return ServerRecord(peer, BlockRange(start, end), ServerState.ONLINE, 100.0, "float32", 1, 1000, quant=quant)


def test_records_announce_quantization():
    from corolla.wire.identity import Identity

    identity = Identity.generate()
    record = _record(identity.peer_id, 0, 4, "int8")
    value = encode_record(record, identity, "m", 10**10)
    assert decode_record(value, 4, "m", 0.0).quant == "int8"
    forged = dict(value, quant="int2")  # an unknown quantization (and a broken signature): dropped
    assert decode_record(forged, 4, "m", 0.0) is None


def test_one_quantization_picks_the_most_precise_that_covers():
    records = [_record("a", 0, 4, "int8"), _record("b", 0, 2, "none"), _record("c", 2, 4, "int4"),
               _record("d", 0, 4, "int4")]
    assert [r.peer_id for r in one_quantization(records, BlockRange(0, 4))] == ["a"]
    records.append(_record("e", 2, 4, "none"))
    assert [r.peer_id for r in one_quantization(records, BlockRange(0, 4))] == ["b", "e"]
    assert one_quantization([], BlockRange(0, 4)) == []
