"""Corolla's CPU matrix-vector kernels (``cpu_kernels.c``), built once per machine and called through ``ctypes``.

For a decode step (one to a few rows of activations) PyTorch's CPU matrix products read a layer's weights at about
half the speed memory delivers them (measured here: 8-12 GB/s for float32, 7 GB/s for its int8 weight-only kernel,
against 27 GB/s for a plain sum), and a decode step is little more than reading every weight once. These kernels
compute ``x @ w.T`` for float32 or int8 (per-output-channel scale) weights at close to memory speed, with float32
activations and sums.

A call splits the output channels among ``torch.get_num_threads()`` OpenMP threads (PyTorch's own OpenMP runtime,
which the library shares) when the weights are large enough to be worth it.

The C file is compiled with the system's C compiler (``cc -O3 -march=native -fopenmp``) into
``<cache_root()>/kernels/<hash of source, flags, CPU>/``, on first use or by ``scripts/setup.sh``; without a compiler,
or with ``COROLLA_CPU_KERNELS=0``, ``available()`` is False and callers use PyTorch's products.
"""
from __future__ import annotations

import ctypes
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
KERNELS_VERSION = 4  # corolla_kernels_version() of the C file

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
        library.corolla_rms_norm.argtypes = [ptr, i64, i64, i64, ptr, f32, ptr, i64]
        for function in (library.corolla_linear_f32, library.corolla_linear_i8, library.corolla_rms_norm):
            function.restype = None
        _library = library
        return library


def available() -> bool:
    """True if the kernels are built and loaded (building them on first call)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _failure


def usable(x: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """True if the kernels take ``x`` [rows, features]: float32 on CPU, rows contiguous, at most ``max_rows`` rows."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] <= max_rows
            and x.stride(1) == 1 and _load() is not None)


def _pointers(tensors: list[Optional[torch.Tensor]]):
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


class LinearGroup:
    """Linear layers that read the same input, computed by one kernel call into one output, side by side.

    Takes float32 weights, or int8 weights with float32 per-output-channel scales; float32 biases or None. The
    group keeps references to the tensors it was built from and reads them in every call: replacing a layer's weight
    tensor afterwards is not seen (its values changed in place are)."""

    def __init__(
        self,
        weights: list[torch.Tensor],  # each [out_j, in], all float32 or all int8
        scales: Optional[list[torch.Tensor]] = None,  # int8: each [out_j] float32
        biases: Optional[list[Optional[torch.Tensor]]] = None,  # each [out_j] float32 or None
    ):
        if not available():
            raise RuntimeError(f"Corolla's CPU kernels are not available: {unavailable_reason()}")
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
        for name, tensors in (("scales", scales), ("biases", biases)):
            for tensor, out in zip(tensors or [], outs):
                if tensor is not None and (tensor.dtype != torch.float32 or not tensor.is_contiguous()
                                           or tuple(tensor.shape) != (out,)):
                    raise ValueError(f"{name} must be contiguous float32 [out] tensors")
        self.features, self.width, self.dtype = features, sum(outs), dtype
        self._keep = [weights, scales, biases]  # the pointers below stay valid while the group lives
        self._weights = _pointers(weights)
        self._outs = (ctypes.c_int64 * len(outs))(*outs)
        self._scales = None if scales is None else _pointers(scales)
        self._biases = None if biases is None or all(b is None for b in biases) else _pointers(biases)
        self._count = len(weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] float32 (``usable``) -> [rows, width]
        rows = x.shape[0]
        if x.shape[1] != self.features:
            raise ValueError(f"x must be [rows, {self.features}], got {list(x.shape)}")
        y = torch.empty(rows, self.width, dtype=torch.float32)
        if self.dtype == torch.float32:
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


class KernelLinear(nn.Linear):
    """An ``nn.Linear`` whose calls without autograd on a few float32 rows run on the kernels (the client's LM head:
    one row per sequence per generated token); every other call is ``nn.Linear``'s."""

    _group_key = None
    _group: Optional[LinearGroup] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        tracked = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        flat = x.reshape(-1, self.in_features) if x.dim() >= 2 else None
        if (tracked or flat is None or weight.dtype != torch.float32 or not weight.is_contiguous()
                or (bias is not None and bias.dtype != torch.float32) or not usable(flat)):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), None if bias is None else bias.data_ptr(), tuple(weight.shape))
        if self._group_key != key:  # the weights were replaced (tied, loaded, moved): take the new ones
            self._group = LinearGroup([weight.detach()], None, [None if bias is None else bias.detach()])
            self._group_key = key
        return self._group(flat).view(*x.shape[:-1], self.out_features)
