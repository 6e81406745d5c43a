"""Wire codecs for activations: how hidden states and their gradients travel in a frame's body.

- ``none``: the tensor's own bytes (exact; what exact-match tests use);
- ``float16`` / ``bfloat16``: a 16-bit float copy (half the bytes of float32), decoded back to the tensor's dtype;
- ``int8-block64``: blockwise 8-bit quantization (the Petals paper's idea): the values in blocks of 64, each block
  stored as one float32 scale and 64 linear int8 codes ``round(127 * x / scale)``, about 1.06 bytes a value
  instead of 4. Hidden states have outliers (the first token's can be 10,000 times the others): a value above 4
  times its block's root mean square travels exactly, as an (index, float32) pair, and the block's scale is the
  largest of the other values. On the embedded model 0.6% of values were outliers, and they cut the largest
  logit error from 0.61 (plain absmax blocks) to 0.26; benchmarks/bench_codecs.py measures each codec end to end.

Only floating-point activations are compressed (the fields a message lists in ``COMPRESSIBLE``, and in
``RECOMPRESSIBLE`` with the 16-bit codecs only); masks, ids and weights always travel exactly. A decoded tensor is
a new tensor of the dtype the sender declared.
"""
from __future__ import annotations

import enum

import torch

from corolla.core.errors import BadRequestError

BLOCK = 64  # values per int8 block


class WireCodec(str, enum.Enum):
    NONE = "none"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8-block64"


SUPPORTED_CODECS: tuple[str, ...] = tuple(codec.value for codec in WireCodec)
_HALF = {WireCodec.FLOAT16: torch.float16, WireCodec.BFLOAT16: torch.bfloat16}


def parse_codec(name) -> WireCodec:
    """``name`` (a string, a ``WireCodec`` or None for none) as a ``WireCodec``; ``BadRequestError`` if unknown."""
    if name is None:
        return WireCodec.NONE
    try:
        return WireCodec(name)
    except ValueError:
        shown = repr(name)
        shown = shown if len(shown) <= 100 else shown[:100] + "..."  # (a peer's value: never a page of it)
        raise BadRequestError(f"unknown wire codec {shown}; supported: {', '.join(SUPPORTED_CODECS)}") from None


def recodes_exactly(codec) -> bool:
    """Whether encoding what ``codec`` decoded gives the same values again (none and the 16-bit casts; not int8
    blocks, whose scales and outliers may shift): only then may a value be decoded and encoded again on its way
    (a trail)."""
    codec = parse_codec(codec)
    return codec is WireCodec.NONE or codec in _HALF


def encoded_size(codec: WireCodec, numel: int, dtype: torch.dtype, outliers: int = 0) -> int:
    """Bytes the body of a tensor of ``numel`` values (``outliers`` of them sent exactly) takes with ``codec``."""
    if codec is WireCodec.NONE:
        return numel * dtype.itemsize
    if codec in _HALF:
        return 2 * numel
    return 4 * _blocks(numel) + numel + 8 * outliers


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK)


OUTLIER_RMS = 4.0  # a value above this many times its block's root mean square travels exactly


def compress(tensor: torch.Tensor, codec: WireCodec) -> tuple[bytes, dict]:
    """The body bytes of a contiguous CPU floating-point ``tensor`` under ``codec`` (not ``none``), and the
    descriptor fields decoding needs (the outlier count, for int8)."""
    flat = tensor.reshape(-1)
    if codec in _HALF:
        half = _HALF[codec]
        limit = torch.finfo(half).max
        flat = flat.float().clamp(-limit, limit).to(half) if half is torch.float16 else flat.to(half)
        return flat.contiguous().view(torch.uint8).numpy().tobytes(), {}
    numel = flat.numel()
    padded = torch.zeros(_blocks(numel) * BLOCK, dtype=torch.float32)
    padded[:numel] = flat.float()
    blocks = padded.view(-1, BLOCK)  # [n_blocks, 64]
    rms = blocks.pow(2).mean(dim=1, keepdim=True).sqrt()
    outlier = blocks.abs() > OUTLIER_RMS * rms  # [n_blocks, 64]
    rest = torch.where(outlier, torch.zeros_like(blocks), blocks)
    scales = rest.abs().amax(dim=1, keepdim=True)  # [n_blocks, 1]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(rest / safe * 127).clamp(-127, 127).to(torch.int8).reshape(-1)[:numel]
    indices = outlier.reshape(-1).nonzero().reshape(-1).to(torch.int32)  # all < numel: padding is 0
    values = padded[indices.long()]
    body = scales.reshape(-1).numpy().tobytes() + codes.numpy().tobytes() + indices.numpy().tobytes() \
        + values.numpy().tobytes()
    return body, {"outliers": int(indices.numel())}


def decompress(buffer, offset: int, numel: int, dtype: torch.dtype, codec: WireCodec, name: str,
               outliers: int = 0) -> torch.Tensor:
    """The flat tensor (``dtype``, ``numel`` values) a body encoded with ``codec`` holds at ``offset``."""
    if codec in _HALF:
        raw = torch.frombuffer(buffer, dtype=_HALF[codec], count=numel, offset=offset)
        return raw.to(dtype)
    blocks = _blocks(numel)
    scales = torch.frombuffer(buffer, dtype=torch.float32, count=blocks, offset=offset).reshape(-1, 1)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise BadRequestError(f"tensor {name!r} holds a corrupted 8-bit block: its scales must be finite and >= 0")
    codes = torch.zeros(blocks * BLOCK, dtype=torch.float32)
    codes[:numel] = torch.frombuffer(buffer, dtype=torch.int8, count=numel, offset=offset + 4 * blocks).float()
    restored = (codes.view(-1, BLOCK) * (scales / 127)).reshape(-1)[:numel]
    if outliers:
        start = offset + 4 * blocks + numel
        indices = torch.frombuffer(buffer, dtype=torch.int32, count=outliers, offset=start).long()
        values = torch.frombuffer(buffer, dtype=torch.float32, count=outliers, offset=start + 4 * outliers)
        if bool((indices < 0).any()) or bool((indices >= numel).any()) or not bool(torch.isfinite(values).all()):
            raise BadRequestError(f"tensor {name!r} holds a corrupted 8-bit block: an outlier's index or value")
        restored[indices] = values
    return restored.to(dtype)


def roundtrip(tensor: torch.Tensor, codec) -> torch.Tensor:
    """What a receiver decodes of ``tensor`` sent under ``codec`` (the tensor itself for ``none``)."""
    codec = parse_codec(codec)
    if codec is WireCodec.NONE or not tensor.is_floating_point() or not tensor.numel():
        return tensor
    flat = tensor.detach().cpu().contiguous()
    body, fields = compress(flat, codec)
    return decompress(bytearray(body), 0, flat.numel(), flat.dtype, codec, "", fields.get("outliers", 0)
                      ).reshape(flat.shape)
