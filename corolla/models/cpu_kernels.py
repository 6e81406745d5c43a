"""Corolla's CPU matrix-vector kernels (``cpu_kernels.c``), built once per machine and called through ``ctypes``.

For a decode step (one to a few rows of activations) PyTorch's CPU matrix products read a layer's weights at about
half the speed memory delivers them (measured here: 8-12 GB/s for float32, 7 GB/s for its int8 weight-only kernel,
against 27 GB/s for a plain sum), and a decode step is little more than reading every weight once. These kernels
compute ``x @ w.T`` for float32 or int8 (per-output-channel scale) weights at close to memory speed, with float32
activations and sums.

Float32 weights that lie exactly on a grid (a GGUF file's 4-bit or 8-bit blocks, bfloat16 values) can be held as the
grid's codes (``PackedWeight``, made by ``corolla.models.packing``): the kernels rebuild each weight exactly as they
stream it and sum as for float32, so the outputs are the same bits with a fraction of the memory traffic.

A call splits the output channels among ``torch.get_num_threads()`` OpenMP threads (PyTorch's own OpenMP runtime,
which the library shares) when the weights are large enough to be worth it.

The C file is compiled with the system's C compiler (``cc -O3 -march=native -fopenmp``) into
``<cache_root()>/kernels/<hash of source, flags, CPU>/``, on first use or by ``scripts/setup.sh``; without a compiler,
or with ``COROLLA_CPU_KERNELS=0``, ``available()`` is False and callers use PyTorch's products.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from corolla.models.embedded import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-fopenmp")
LIBRARIES = ("-lm",)
# Up to this many rows the kernels beat PyTorch's products (measured with benchmarks' shapes, one thread: float32
# weights 1.8x faster at 1 row, 2.1x at 4, about even at 8, slower from 16; int8 against PyTorch's weight-only
# kernel 1.4x at 1 row, 2.5x at 4, even at 32): beyond, the work is arithmetic, not reading weights.
MAX_ROWS = 8
INT8_MAX_ROWS = 32
# packed weights: the alternative is rebuilding the float32 weights for PyTorch's product, so the kernels stay ahead
# for longer (measured by benchmarks/bench_fastpath.py --rows)
PACKED_MAX_ROWS = 32
KERNELS_VERSION = 12  # corolla_kernels_version() of the C file

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False
_failure: Optional[str] = None


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), *lines])


def build_dir() -> Path:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(_cpu_signature().encode())
    return cache_root() / "kernels" / digest.hexdigest()[:16]


def build() -> Path:
    """Compile the kernels for this machine (if not already) and return the library's path; raises RuntimeError
    naming what failed."""
    target = build_dir() / "libcorolla_kernels.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as temp:  # several processes may build at once
        built = Path(temp) / target.name
        command = [compiler, *FLAGS, "-o", str(built), str(SOURCE), *LIBRARIES]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:  # a compiler without OpenMP: the kernels then run on the calling thread only
            command.remove("-fopenmp")
            result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def _load() -> Optional[ctypes.CDLL]:
    global _library, _tried, _failure
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("COROLLA_CPU_KERNELS", "1") == "0":
            _failure = "turned off by COROLLA_CPU_KERNELS=0"
            return None
        try:
            library = ctypes.CDLL(str(build()))
            if library.corolla_kernels_version() != KERNELS_VERSION:
                raise RuntimeError("the built library is of another version")
        except (OSError, RuntimeError) as exc:
            _failure = str(exc)
            logger.warning("Corolla's CPU kernels are not available (%s): decode steps use PyTorch's products", exc)
            return None
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        threads = ctypes.c_int
        library.corolla_linear_f32.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, threads]
        library.corolla_linear_i8.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, threads]
        library.corolla_linear_packed.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                                  ptr, i64, threads]
        library.corolla_rms_norm.argtypes = [ptr, i64, i64, i64, ptr, f32, ptr, i64]
        library.corolla_decode_attention.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr,
                                                     ptr, f32, ptr, i64, ptr, threads]
        for function in (library.corolla_linear_f32, library.corolla_linear_i8, library.corolla_linear_packed,
                         library.corolla_rms_norm, library.corolla_decode_attention):
            function.restype = None
        _library = library
        return library


def available() -> bool:
    """True if the kernels are built and loaded (building them on first call)."""
    return _load() is not None


@functools.lru_cache(maxsize=None)  # asked at every session step; the loaded library never changes
def rows_per_pass() -> Optional[int]:
    """Rows of activations one pass over a layer's weights serves (the C file's ``ROWS_PER_PASS``): a call with more
    rows reads the weights again for each further block of rows, so it costs about as much per row as separate calls.
    None without the kernels, or where the build has no such blocks (the portable build)."""
    library = _load()
    rows = library.corolla_rows_per_pass() if library is not None else 0
    return rows or None


def packing_pays() -> bool:
    """True where the kernels rebuild packed weights with vector instructions (AVX-512, or AVX2 with FMA): a packed
    product then costs about what the float32 one does while reading a quarter to half the bytes. The portable build
    rebuilds each weight on its own: on an AVX2 machine, before it had AVX2 kernels, a packed q4a product of the
    embedded model took 2.29 ms against 0.14 ms for float32, so where it runs weights stay float32."""
    return rows_per_pass() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _failure


def usable(x: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """True if the kernels take ``x`` [rows, features]: float32 on CPU, rows contiguous, at most ``max_rows`` rows."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] <= max_rows
            and x.stride(1) == 1 and _load() is not None)


def _pointers(tensors: list[Optional[torch.Tensor]]):
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


# the C file's PACKED_* kinds: name -> (number, codes' dtype, codes per weight row as a function of in, has d, has m)
PACKED_KINDS = {
    "q4a": (1, torch.uint8, lambda features: features // 2, True, True),
    "q8s": (2, torch.int8, lambda features: features, True, False),
    "bf16": (3, torch.int16, lambda features: features, False, False),
}
PACKED_BLOCK = 32  # weights per grid block (the d and m of q4a and q8s)


class PackedWeight:
    """A float32 weight matrix [out, in] held as exact grid codes (see ``cpu_kernels.c``):

    - ``q4a``: ``w = d * q + m`` per block of 32 weights of a row, ``q`` in 0..15 packed two per byte (byte ``j`` of
      a block's 16 holds ``q_j`` low and ``q_{j+16}`` high), ``d`` and ``m`` float32 [out, in/32];
    - ``q8s``: ``w = d * q`` per block of 32, ``q`` int8;
    - ``bf16``: the upper 16 bits of each float32 weight (its lower 16 are zero).

    ``unpack()`` returns the float32 weights, bit for bit."""

    def __init__(self, kind: str, codes: torch.Tensor, d: Optional[torch.Tensor] = None,
                 m: Optional[torch.Tensor] = None):
        if kind not in PACKED_KINDS:
            raise ValueError(f"unknown packing {kind!r}: one of {', '.join(PACKED_KINDS)}")
        _, dtype, row_codes, has_d, has_m = PACKED_KINDS[kind]
        if codes.dim() != 2 or codes.dtype != dtype or not codes.is_contiguous() or codes.device.type != "cpu":
            raise ValueError(f"{kind} codes must be a contiguous {dtype} [out, codes per row] CPU tensor")
        out = codes.shape[0]
        features = codes.shape[1] * (2 if kind == "q4a" else 1)
        if features % PACKED_BLOCK or row_codes(features) != codes.shape[1]:
            raise ValueError(f"packed weights need in % {PACKED_BLOCK} == 0, got in = {features}")
        for name, tensor, needed in (("d", d, has_d), ("m", m, has_m)):
            if (tensor is not None) != needed:
                raise ValueError(f"{kind} packing {'needs' if needed else 'has no'} {name}")
            if tensor is not None and (tensor.dtype != torch.float32 or not tensor.is_contiguous()
                                       or tuple(tensor.shape) != (out, features // PACKED_BLOCK)):
                raise ValueError(f"{name} must be a contiguous float32 [{out}, {features // PACKED_BLOCK}] tensor")
        self.kind, self.codes, self.d, self.m = kind, codes, d, m
        self.shape = (out, features)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.d, self.m) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def unpack(self) -> torch.Tensor:
        out, features = self.shape
        if self.kind == "bf16":
            return (self.codes.to(torch.int32) << 16).view(torch.float32)
        if self.kind == "q8s":
            codes = self.codes.float().view(out, -1, PACKED_BLOCK)
            return (codes * self.d[..., None]).view(out, features)  # exact: 8-bit codes times float16 steps
        low = (self.codes & 15).view(out, -1, 16)
        high = (self.codes >> 4).view(out, -1, 16)
        codes = torch.cat([low, high], dim=-1).float()  # [out, blocks, 32]
        # d * q is exact in float32 (an 11-bit step times a 4-bit code), so this rounds once, as a fused multiply-add
        return (codes * self.d[..., None] + self.m[..., None]).view(out, features)


def _check_biases(tensors: Optional[list[Optional[torch.Tensor]]], outs: list[int], name: str = "biases") -> None:
    for tensor, out in zip(tensors or [], outs):
        if tensor is not None and (tensor.dtype != torch.float32 or not tensor.is_contiguous()
                                   or tuple(tensor.shape) != (out,)):
            raise ValueError(f"{name} must be contiguous float32 [out] tensors")


class LinearGroup:
    """Linear layers that read the same input, computed by one kernel call into one output, side by side.

    Takes float32 weights, or int8 weights with float32 per-output-channel scales, or ``PackedWeight`` of one kind;
    float32 biases or None. The
    group keeps references to the tensors it was built from and reads them in every call: replacing a layer's weight
    tensor afterwards is not seen (its values changed in place are)."""

    def __init__(
        self,
        weights: list,  # each [out_j, in]: all float32 tensors, all int8 tensors, or all PackedWeight of one kind
        scales: Optional[list[torch.Tensor]] = None,  # int8: each [out_j] float32
        biases: Optional[list[Optional[torch.Tensor]]] = None,  # each [out_j] float32 or None
    ):
        if not available():
            raise RuntimeError(f"Corolla's CPU kernels are not available: {unavailable_reason()}")
        self.packing = None
        if any(isinstance(weight, PackedWeight) for weight in weights):
            self._init_packed(weights, scales, biases)
            return
        features = weights[0].shape[1]
        dtype = weights[0].dtype
        for weight in weights:
            if weight.dim() != 2 or weight.shape[1] != features or weight.dtype != dtype or not weight.is_contiguous():
                raise ValueError("a group's weights must be contiguous [out, in] tensors of one dtype and width")
            if weight.device.type != "cpu":
                raise ValueError("the kernels run on CPU tensors")
        if dtype not in (torch.float32, torch.int8):
            raise ValueError(f"the kernels take float32 or int8 weights, not {dtype}")
        if (dtype == torch.int8) != (scales is not None):
            raise ValueError("int8 weights need their per-channel scales (and float32 weights none)")
        outs = [weight.shape[0] for weight in weights]
        _check_biases(scales, outs, "scales")
        _check_biases(biases, outs)
        self.features, self.width, self.dtype = features, sum(outs), dtype
        self._keep = [weights, scales, biases]  # the pointers below stay valid while the group lives
        self._weights = _pointers(weights)
        self._outs = (ctypes.c_int64 * len(outs))(*outs)
        self._scales = None if scales is None else _pointers(scales)
        self._biases = None if biases is None or all(b is None for b in biases) else _pointers(biases)
        self._count = len(weights)

    def _init_packed(self, weights: list, scales, biases) -> None:
        kinds = {weight.kind if isinstance(weight, PackedWeight) else None for weight in weights}
        if len(kinds) != 1 or None in kinds:
            raise ValueError("a group's packed weights must all be PackedWeight of one kind")
        if scales is not None:
            raise ValueError("packed weights take no scales")
        features = weights[0].shape[1]
        if any(weight.shape[1] != features for weight in weights):
            raise ValueError("a group's weights must have one width")
        outs = [weight.shape[0] for weight in weights]
        _check_biases(biases, outs)
        self.packing = weights[0].kind
        self.features, self.width, self.dtype = features, sum(outs), torch.float32
        self._keep = [weights, biases]
        self._weights = _pointers([weight.codes for weight in weights])
        self._d = _pointers([weight.d for weight in weights])
        self._m = _pointers([weight.m for weight in weights])
        self._outs = (ctypes.c_int64 * len(outs))(*outs)
        self._biases = None if biases is None or all(b is None for b in biases) else _pointers(biases)
        self._count = len(weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] float32 (``usable``) -> [rows, width]
        rows = x.shape[0]
        if x.shape[1] != self.features:
            raise ValueError(f"x must be [rows, {self.features}], got {list(x.shape)}")
        y = torch.empty(rows, self.width, dtype=torch.float32)
        if self.packing is not None:
            _library.corolla_linear_packed(PACKED_KINDS[self.packing][0], x.data_ptr(), x.stride(0), self.features,
                                           rows, self._count, self._weights, self._d, self._m, self._outs,
                                           self._biases, y.data_ptr(), self.width, torch.get_num_threads())
        elif self.dtype == torch.float32:
            _library.corolla_linear_f32(x.data_ptr(), x.stride(0), self.features, rows, self._count, self._weights,
                                        self._outs, self._biases, y.data_ptr(), self.width, torch.get_num_threads())
        else:
            _library.corolla_linear_i8(x.data_ptr(), x.stride(0), self.features, rows, self._count, self._weights,
                                       self._outs, self._scales, self._biases, y.data_ptr(), self.width,
                                       torch.get_num_threads())
        return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` per row of ``x`` [rows, n] (``usable(x, max_rows=any)``), float32."""
    rows, features = x.shape
    if weight.dtype != torch.float32 or not weight.is_contiguous() or tuple(weight.shape) != (features,):
        raise ValueError(f"weight must be a contiguous float32 [{features}] tensor")
    y = torch.empty(rows, features, dtype=torch.float32)
    _library.corolla_rms_norm(x.data_ptr(), x.stride(0), rows, features, weight.data_ptr(), eps, y.data_ptr(),
                              features)
    return y


def decode_attention(
    q: torch.Tensor,  # [sessions, heads * d] float32, rows contiguous: each session's new token's queries (rotated)
    k: torch.Tensor,  # [sessions, kv_heads, d] (rows may be strided, each row's heads contiguous): its key (rotated)
    v: torch.Tensor,  # [sessions, kv_heads, d] likewise: its value
    keys: list[torch.Tensor],  # per session: its cache's keys buffer [1, kv_heads, capacity, d], contiguous
    values: list[torch.Tensor],  # per session: the values buffer, same shape
    positions: list[int],  # per session: where the new key and value go (the tokens before it are attended to)
    scale: float,
) -> torch.Tensor:  # [sessions, heads * d]
    """Attention of one new token per session over its whole cache (decode steps without a mask): writes each new
    key and value into its cache at its position, then softmax(scale * q.k) over positions 0..position weights the
    values, per query head (grouped-query: head h reads key/value head h // (heads // kv_heads)); float32."""
    sessions, kv_heads, d = k.shape
    heads = q.shape[1] // d
    if heads % kv_heads or v.shape != k.shape or q.shape[0] != sessions or len(keys) != sessions:
        raise ValueError("decode_attention: mismatched shapes")
    for tensor in (q, k, v):
        if tensor.dtype != torch.float32 or tensor.stride(-1) != 1 or (tensor.dim() == 3 and tensor.stride(1) != d):
            raise ValueError("decode_attention takes float32 tensors with contiguous heads")
    capacities = []
    for key, value, position in zip(keys, values, positions):
        if (key.shape != value.shape or key.dim() != 4 or key.shape[0] != 1 or key.shape[1] != kv_heads
                or key.shape[3] != d or not key.is_contiguous() or not value.is_contiguous()
                or key.dtype != torch.float32 or value.dtype != torch.float32 or not 0 <= position < key.shape[2]):
            raise ValueError("decode_attention: a cache buffer does not fit")
        capacities.append(key.shape[2])
    threads = torch.get_num_threads()
    out = torch.empty(sessions, heads * d, dtype=torch.float32)
    scratch = torch.empty(threads * (heads // kv_heads) * (max(positions) + 1), dtype=torch.float32)  # scores
    _library.corolla_decode_attention(
        sessions, heads, kv_heads, d, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        _pointers(keys), _pointers(values), (ctypes.c_int64 * sessions)(*capacities),
        (ctypes.c_int64 * sessions)(*positions), scale, out.data_ptr(), heads * d, scratch.data_ptr(), threads)
    return out


class KernelLinear(nn.Linear):
    """An ``nn.Linear`` whose calls without autograd on a few float32 rows run on the kernels (the client's LM head:
    one row per sequence per generated token); every other call is ``nn.Linear``'s.

    Weights as loaded that lie exactly on a grid (``corolla.models.packing``: the embedded model's embeddings, tied
    to its head, are Q8_0 blocks) are read packed, with the same results; weights changed after that (trained,
    replaced) are read as they are."""

    _group_key = None
    _group: Optional[LinearGroup] = None
    _packing_tried = False

    def prepare(self) -> None:
        """Build the kernels' call now (packing the weights takes a fraction of a second) rather than at the first
        generated token."""
        if available() and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu":
            self._kernel_group()

    def weights_changed(self) -> None:
        """Say that the weights changed in a way PyTorch does not count (writes through ``.data``): later calls read
        them as they are, not a packed copy of the weights as loaded. (Changes made in place under ``no_grad``, or
        by assigning new tensors, are seen without it.)"""
        self._group_key = None
        self._packing_tried = True

    def _kernel_group(self) -> LinearGroup:
        weight, bias = self.weight, self.bias
        key = (weight.data_ptr(), weight._version, None if bias is None else bias.data_ptr(), tuple(weight.shape))
        if self._group_key != key:  # the weights were replaced or changed (tied, loaded, moved, trained)
            packed = None
            if not self._packing_tried and packing_pays():  # the weights as loaded only: changed ones are off any grid
                self._packing_tried = True
                from corolla.models.packing import pack

                packed = pack(weight.detach())
            self._group = LinearGroup([weight.detach() if packed is None else packed], None,
                                      [None if bias is None else bias.detach()])
            self.max_rows = MAX_ROWS if packed is None else PACKED_MAX_ROWS
            self._group_key = key
        return self._group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        tracked = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        flat = x.reshape(-1, self.in_features) if x.dim() >= 2 else None
        if (tracked or flat is None or weight.dtype != torch.float32 or not weight.is_contiguous()
                or (bias is not None and bias.dtype != torch.float32) or not usable(flat, PACKED_MAX_ROWS)):
            return F.linear(x, weight, bias)
        group = self._kernel_group()
        if flat.shape[0] > self.max_rows:
            return F.linear(x, weight, bias)
        return group(flat).view(*x.shape[:-1], self.out_features)
