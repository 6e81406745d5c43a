"""Lossless packing of float32 weights that lie exactly on a grid.

Many float32 checkpoints carry less information than 32 bits per weight: a model converted from a GGUF file holds,
in every block of 32 weights of a row, at most 16 distinct values ``d * q + m`` (Q4_1) or 256 values ``d * q`` (Q8_0)
with float16 ``d`` and ``m``; a model published in bfloat16 and loaded in float32 has zero lower halves. The
embedded SmolLM2 is the first kind: its blocks come from a Q4_1 file, its embeddings from a Q8_0 one.

``pack(weight)`` finds such a grid by construction and proof: it derives each block's step and offset from the
block's own minimum and maximum, rebuilds every weight from its code in float32, and packs the matrix only if every
rebuilt weight equals the original bit for bit. ``PackedLinear`` then holds the codes (``cpu_kernels.PackedWeight``):
a sixth of the memory for Q4_1 grids, about a quarter for Q8_0, half for bfloat16. Its products are the float32
products of the original weights: Corolla's CPU kernels rebuild each weight as they stream it and sum exactly as for
float32 weights (same bits); other calls (many rows, backward passes, no kernels) unpack the weights first.

Nothing here changes a model's outputs; it changes how many bytes a decode step reads. A weight that is off its
grid by one bit leaves the whole matrix unpacked.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from corolla.models import cpu_kernels
from corolla.models.cpu_kernels import PACKED_BLOCK, PackedWeight
from corolla.models.quant import QuantizedLinear

# tried in this order: the first that holds every weight exactly wins (the smallest first)
PACKINGS = ("q4a", "q8s", "bf16")


def pack(weight: torch.Tensor, kinds: tuple[str, ...] = PACKINGS) -> Optional[PackedWeight]:
    """``weight`` [out, in] float32 as the first packing of ``kinds`` that rebuilds it bit for bit, or None."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    if weight.shape[1] % PACKED_BLOCK or weight.numel() == 0:  # the kernels take whole blocks of 32 per row
        return None
    weight = weight.detach().contiguous()
    if not torch.isfinite(weight).all():
        return None
    for kind in kinds:
        if kind not in PACKINGS:
            raise ValueError(f"unknown packing {kind!r}: one of {', '.join(PACKINGS)}")
        packed = {"q4a": _pack_q4a, "q8s": _pack_q8s, "bf16": _pack_bf16}[kind](weight)
        if packed is not None:
            return packed
    return None


def _float16_candidates(target: torch.Tensor) -> list[torch.Tensor]:
    """The float16 value nearest each of ``target`` (>= 0) and its two neighbours, as float32."""
    nearest = target.to(torch.float16)
    bits = nearest.view(torch.int16)
    neighbours = [nearest, (bits + 1).view(torch.float16), (bits - 1).clamp(min=0).view(torch.float16)]
    return [c.float() for c in neighbours]


def _find_steps(blocks: torch.Tensor, base: torch.Tensor, span: torch.Tensor, low: int, high: int,
                offset: Optional[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per block of ``blocks`` [n, 32]: a float16 step ``d`` near ``span / high`` with which every weight is
    ``d * q (+ offset)`` for an integer ``q`` in [low, high], rebuilt exactly in float32; (d, q) or None."""
    steps = torch.zeros_like(base)
    codes = torch.zeros(blocks.shape, dtype=torch.float32)
    found = torch.zeros(blocks.shape[0], dtype=torch.bool)
    shifted = blocks if offset is None else blocks - offset[:, None]
    for candidate in _float16_candidates(span / high):
        safe = torch.where(candidate == 0, torch.ones_like(candidate), candidate)
        q = torch.round(shifted / safe[:, None]).clamp(low, high)
        q = torch.where(candidate[:, None] == 0, torch.zeros_like(q), q)
        rebuilt = candidate[:, None] * q  # exact: a float16 step times a code of at most 8 bits
        if offset is not None:
            rebuilt = rebuilt + offset[:, None]  # one rounding, as the kernel's fused multiply-add
        good = (rebuilt == blocks).all(dim=1) & ~found
        steps = torch.where(good, candidate, steps)
        codes = torch.where(good[:, None], q, codes)
        found |= good
        if bool(found.all()):
            return steps, codes
    return None


def _pack_q4a(weight: torch.Tensor) -> Optional[PackedWeight]:
    out, features = weight.shape
    blocks = weight.view(-1, PACKED_BLOCK)
    low, high = blocks.amin(dim=1), blocks.amax(dim=1)
    if not torch.equal(low.to(torch.float16).float(), low):  # the offset is a float16 value: code 0 is the minimum
        return None
    found = _find_steps(blocks, low, high - low, 0, 15, offset=low)
    if found is None:
        return None
    steps, codes = found
    codes = codes.to(torch.uint8).view(-1, 2, 16)
    packed = (codes[:, 0] | (codes[:, 1] << 4)).reshape(out, features // 2).contiguous()
    return PackedWeight("q4a", packed, steps.view(out, -1).contiguous(), low.view(out, -1).contiguous())


def _pack_q8s(weight: torch.Tensor) -> Optional[PackedWeight]:
    out, features = weight.shape
    blocks = weight.view(-1, PACKED_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    found = _find_steps(blocks, absmax, absmax, -128, 127, offset=None)
    if found is None:
        return None
    steps, codes = found
    return PackedWeight("q8s", codes.to(torch.int8).view(out, features).contiguous(), steps.view(out, -1).contiguous())


def _pack_bf16(weight: torch.Tensor) -> Optional[PackedWeight]:
    bits = weight.view(torch.int32)
    if bool((bits & 0xFFFF).any()):
        return None
    return PackedWeight("bf16", (bits >> 16).to(torch.int16).contiguous())


class PackedLinear(QuantizedLinear):
    """A frozen float32 linear layer whose weights are held packed (``pack``): it computes what the original
    ``nn.Linear`` computes. Calls of up to ``cpu_kernels.PACKED_MAX_ROWS`` rows run on the kernels (the same bits as
    the float32 kernels on the original weights); larger calls and training passes (with autograd) unpack the weights
    for PyTorch's products."""

    def __init__(self, linear: nn.Linear, packed: PackedWeight):
        super().__init__(linear)
        self.packing = packed.kind
        self.register_buffer("packed_codes", packed.codes)
        self.register_buffer("packed_d", packed.d)
        self.register_buffer("packed_m", packed.m)
        self._group: Optional[cpu_kernels.LinearGroup] = None
        self._group_key: Optional[int] = None  # where the codes were when the group was made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # a training pass: nn.Linear's own product on the unpacked weights, so it gets the same bits (and
            # gradients) as the unpacked layer. The decode kernels' sums run over fewer lanes than PyTorch's products,
            # which a training pass through this model's attention-sink positions amplified tenfold (inputs'
            # gradients 2.0e-4 from float64 against 2.2e-5 on an AVX2 machine)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        return super().forward(x)

    @property
    def packed(self) -> PackedWeight:
        """The weights as the kernels take them (the module's buffers, wherever they are now)."""
        return PackedWeight(self.packing, self.packed_codes, self.packed_d, self.packed_m)

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.dtype == torch.float32 and cpu_kernels.usable(flat, max_rows=cpu_kernels.PACKED_MAX_ROWS):
            if self._group_key != self.packed_codes.data_ptr():  # first call, or the buffers moved
                self._group = cpu_kernels.LinearGroup([self.packed])
                self._group_key = self.packed_codes.data_ptr()
            return self._group(flat)
        return F.linear(flat, self.dequantized_weight().to(flat.dtype))

    def dequantized_weight(self) -> torch.Tensor:
        return self.packed.unpack()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packing={self.packing}"


def pack_layer(layer: nn.Module, kinds: tuple[str, ...] = PACKINGS, keep: Collection[str] = ()) -> dict[str, str]:
    """Replace each float32 ``nn.Linear`` of ``layer`` whose weights ``pack`` holds exactly by a ``PackedLinear``, in
    place, but those named in ``keep`` (``ModelFamily.linears_kept_float``); returns {module name: packing} of those
    replaced."""
    replaced = {}
    targets = [(name, module) for name, module in layer.named_modules()
               if type(module) is nn.Linear and name not in keep]
    for name, linear in targets:
        packed = pack(linear.weight, kinds)
        if packed is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, PackedLinear(linear, packed))
        replaced[name] = packed.kind
    return replaced
