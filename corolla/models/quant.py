"""Quantized weights for a server's blocks: ``none``, ``int8``, ``int4`` (CPU) and ``nf4`` (CUDA).

On CPU:

- ``int8``: each linear layer's weight as int8 with one absmax scale per output channel. Float32 activations stay
  float32: a few rows (decode steps) go through Corolla's own kernel (``corolla.models.cpu_kernels``: it converts
  each weight to float32 as it streams it from memory, about 2x faster than PyTorch's ``torch._weight_int8pack_mm``,
  which also rounds activations to bfloat16), many rows (a prefill) through a float32 product with the dequantized
  weights; 16-bit activations use ``torch._weight_int8pack_mm``. A quarter of the bytes of float32.
- ``int4``: 4-bit values in groups of ``INT4_GROUP`` along the input with a scale and an offset per group (asymmetric),
  packed for PyTorch's ``torch._weight_int4pack_mm_for_cpu`` (bfloat16 activations); an eighth of the bytes.

PyTorch's dynamic int8 quantization (fbgemm) was also measured, but it quantizes activations per tensor: the embedded
model's first-token activations (values of 10^4 beside values near 1) ruin the other tokens' resolution in a prefill.

Mixture-of-experts layers whose experts transformers 5 fuses into 3-D parameters (Mixtral's) get one quantized
linear layer per expert and projection (``QuantizedExperts``).

On CUDA, ``int8`` and ``nf4`` are bitsandbytes' LLM.int8() (outliers in 16-bit) and NF4, as Petals offers; they need
the ``bitsandbytes`` package.

A quantized layer keeps gradients flowing to its input (its weights stay frozen), so training through a quantized
server works, with the quantized weights' outputs.
"""
from __future__ import annotations

import abc
from collections.abc import Collection

import torch
from torch import nn

from corolla.core.errors import CorollaError
from corolla.core.records import QUANT_BITS
from corolla.models import cpu_kernels

QUANT_MODES = tuple(QUANT_BITS)  # none, int8, int4, nf4
INT4_GROUP = 32


def check_quant(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}: choose among {', '.join(QUANT_MODES)} (or auto)")
    return mode


def resolve_quant(mode: str, device: torch.device) -> str:
    """``auto``: int8 on CPU (faster than float32 there, a quarter of the memory), nf4 on CUDA when bitsandbytes is
    installed, else none. Other modes are checked against the device."""
    device = torch.device(device)
    if mode == "auto":
        if device.type == "cpu":
            return "int8"
        return "nf4" if _has_bitsandbytes() else "none"
    check_quant(mode)
    if device.type == "cpu" and mode == "nf4":
        raise CorollaError("nf4 is bitsandbytes' 4-bit type and needs CUDA; on CPU use --quant int4")
    if device.type == "cuda" and mode == "int4":
        raise CorollaError("int4 is the CPU kernel's 4-bit layout; on CUDA use --quant nf4")
    if device.type == "cuda" and mode in ("int8", "nf4") and not _has_bitsandbytes():
        raise CorollaError(f"--quant {mode} on CUDA needs bitsandbytes: pip install bitsandbytes")
    return mode


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` with a quantized W: the kernel forward; backward gives the input's gradient (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x).to(x.dtype)  # so the gradient arrives in the input's dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dequantized_weight().to(grad.dtype)  # [out, in]
        return grad @ weight, None


class QuantizedLinear(nn.Module, abc.ABC):
    """A frozen linear layer with quantized weights; LoRA and server adapters hook it as they hook ``nn.Linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.requires_grad and torch.is_grad_enabled():
            out = _QuantizedMatmul.apply(flat, self)
        else:
            out = self.matmul(flat)  # a decode step calls this some 200 times: as few operations as can be
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @abc.abstractmethod
    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times the weights: [rows, out]."""

    @abc.abstractmethod
    def dequantized_weight(self) -> torch.Tensor:
        """The weights the layer computes with, as a float32 [out, in] tensor."""


class Int8Linear(QuantizedLinear):
    """int8 weights, one float scale per output channel (symmetric absmax)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()  # [out, in]
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        # the kernel takes scales in the activations' dtype (bfloat16); rounded there, each would shift its whole
        # output channel by up to 0.4%: the kernel gets ones and the float32 scales apply to its output
        self.register_buffer("scales", scales)
        self.register_buffer("unit_scales", torch.ones_like(scales, dtype=torch.bfloat16), persistent=False)
        self._group = None  # the CPU kernels' call for this layer, made on first use
        self.kernels = True  # False: PyTorch's kernels only (a stack loaded without the fast path)

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return int8_matmul(self, flat)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]


def int8_matmul(layer: "Int8Linear", flat: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out] float32
    """``flat @ (qweight * scales).T``. Float32 activations stay float32 where Corolla's CPU kernels run
    (``corolla.models.cpu_kernels``): up to ``INT8_MAX_ROWS`` rows (decode steps) through the kernel, more rows as a
    float32 product with the dequantized weights (a prefill: the dequantization is shared by many rows); so a token's
    outputs do not depend on how many tokens it was computed with beyond float32 rounding. Otherwise (16-bit
    activations, kernels not built, ``layer.kernels`` off) PyTorch's weight-only kernel, with bfloat16 activations."""
    if layer.kernels and cpu_kernels.usable(flat, max_rows=cpu_kernels.INT8_MAX_ROWS):
        if layer._group is None:
            layer._group = cpu_kernels.LinearGroup([layer.qweight], [layer.scales])
        return layer._group(flat)
    if layer.kernels and flat.dtype == torch.float32 and cpu_kernels.usable(flat, max_rows=flat.shape[0]):
        return flat @ layer.dequantized_weight().t()
    out = torch._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), layer.qweight, layer.unit_scales)
    return torch.mul(out, layer.scales)  # bfloat16 x float32 scales: float32, in one operation


class Int4Linear(QuantizedLinear):
    """4-bit weights in groups of ``INT4_GROUP`` input features, each group with its scale and offset."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__(linear)
        self.group = group
        weight = linear.weight.detach().float()  # [out, in]
        out, inp = weight.shape
        grouped = weight.reshape(out, inp // group, group)
        low, high = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-12)  # [out, groups, 1]
        values = torch.round((grouped - low) / scales).clamp(0, 15).to(torch.int32).reshape(out, inp)
        # the kernel reads a weight as (value - 8) * scale + zero: the zero is the group's value at code 8
        zeros = low + 8 * scales
        packed_meta = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1))
        self.register_buffer("scales_and_zeros", packed_meta.to(torch.bfloat16))

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16).contiguous(), self.qweight,
                                                          self.group, self.scales_and_zeros)

    def dequantized_weight(self) -> torch.Tensor:
        identity = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self.matmul(identity).float().t()  # [in, out] -> [out, in]: the weights the kernel computes with


def quantizable(linear: nn.Linear, mode: str) -> bool:
    # the int4 kernel packs whole groups of input features and output features in sixteens
    return mode != "int4" or (linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0)


class QuantizedExperts(nn.Module):
    """A mixture-of-experts layer's experts with each expert's projections as quantized linear layers.

    transformers 5 holds all experts of a layer (Mixtral's ``MixtralExperts``) in two 3-D parameters, not in
    ``nn.Linear`` modules: ``gate_up_proj`` [experts, 2 * intermediate, hidden] (gate and up projections stacked)
    and ``down_proj`` [experts, hidden, intermediate]. Nearly all of a Mixtral's weights are there, so they are
    quantized as any linear layer is (int8: a scale per output channel of each expert; int4: groups along its
    input), one ``QuantizedLinear`` per expert and projection, and this module computes what the experts' eager
    forward does (the routing loop of transformers' ``MixtralExperts.forward``) with them."""

    def __init__(self, experts: nn.Module, mode: str, device: torch.device):
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_fn = experts.act_fn

        def projection(weight: torch.Tensor) -> nn.Module:  # weight [out, in] of one expert
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            return _quantized(linear, mode, device) if quantizable(linear, mode) else linear

        self.gate_up = nn.ModuleList(projection(weight) for weight in experts.gate_up_proj)
        self.down = nn.ModuleList(projection(weight) for weight in experts.down_proj)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [tokens, hidden]
        top_k_index: torch.Tensor,  # [tokens, top_k]: the experts each token is routed to
        top_k_weights: torch.Tensor,  # [tokens, top_k]: their weights
    ) -> torch.Tensor:  # [tokens, hidden]
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # (index num_experts: a token routed to no local expert, as transformers allows)
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()  # [experts hit, 1]
        for expert in hit[:, 0].tolist():
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            out = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds experts as transformers 5's ``MixtralExperts`` does (see ``QuantizedExperts``):
    3-D ``gate_up_proj`` and ``down_proj``, gate and up concatenated, not transposed, no biases."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3
            and getattr(module, "has_gate", True) and getattr(module, "is_concatenated", True)
            and not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
            and not getattr(module, "has_post_expert_norm", False) and hasattr(module, "act_fn"))


def quantize_layer(layer: nn.Module, mode: str, device: torch.device, keep: Collection[str] = ()) -> nn.Module:
    """Replace the linear layers of ``layer`` (loaded, on ``device``) by quantized ones, in place, but those named in
    ``keep`` (``ModelFamily.linears_kept_float``); experts held in fused parameters (Mixtral's) become
    ``QuantizedExperts``."""
    if mode == "none":
        return layer
    # (the linear layers are listed before the experts' own are made: bitsandbytes' layers are nn.Linear too)
    targets = [(name, module) for name, module in layer.named_modules()
               if isinstance(module, nn.Linear) and name not in keep]
    experts = [(name, module) for name, module in layer.named_modules() if fused_experts(module)]
    for name, module in experts:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, QuantizedExperts(module, mode, torch.device(device)))
    for name, linear in targets:
        if not quantizable(linear, mode):
            continue  # stays in full precision
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, _quantized(linear, mode, torch.device(device)))
    return layer


def _quantized(linear: nn.Linear, mode: str, device: torch.device) -> nn.Module:
    if device.type == "cpu":
        return Int8Linear(linear) if mode == "int8" else Int4Linear(linear)
    return _bitsandbytes_linear(linear, mode, device)


def _bitsandbytes_linear(linear: nn.Linear, mode: str, device: torch.device) -> nn.Module:
    """bitsandbytes' LLM.int8() (threshold 6: outlier features stay 16-bit) or NF4 (compute in the weights' dtype)."""
    import bitsandbytes as bnb

    weight = linear.weight.detach().to("cpu")
    bias = linear.bias is not None
    if mode == "int8":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                     threshold=6.0)
        module.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=weight.dtype,
                                   quant_type="nf4")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias:
        module.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return module.to(device)  # bitsandbytes quantizes as the weights move to the GPU
