"""The fast path of a server's blocks: decoder layers built as Llama's, run without transformers' per-module calls.

A ``FusedLayer`` wraps one loaded layer of a family whose layers are built exactly as Llama's (RMS norms, q/k/v/o
projections with optional biases, optional per-head RMS norms of queries and keys, a gated MLP): Llama, Mistral,
Qwen2, Qwen3 (``ModelFamily.fused_layers``).
It computes what the layer computes, with fewer operations:

- for a few rows of tokens (decode steps), the q, k and v projections are one call of Corolla's CPU kernels
  (``corolla.models.cpu_kernels``), which read the weights near memory speed where PyTorch's products reach about
  half of it, and so are the MLP's gate and up projections; float32, int8 (``Int8Linear``) and packed float32
  (``PackedLinear``) weights, read where the layer holds them (no copy);
- RMS norms are single calls, rotary embeddings of queries and keys one multiply-add over both;
- several sessions' tokens share every projection and the MLP; only attention runs per session.

The results equal the layer's own to float rounding (tests compare them; ``BlockStack`` uses this path only for
forward passes without autograd and without LoRA weights, where the layer's hooks would not be called).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from corolla.models import cpu_kernels
from corolla.models.kv import PagedLayer
from corolla.models.packing import PackedLinear
from corolla.models.quant import Int8Linear, QuantizedLinear


class Projection:
    """Several linear layers that read the same input, as one call returning their outputs side by side: one call
    of Corolla's CPU kernels (``corolla.models.cpu_kernels``) where they take the weights and the input, else each
    layer's own call."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.group = _kernel_group(modules)
        self.max_rows = cpu_kernels.MAX_ROWS
        if self.group is not None and self.group.packing is not None:
            self.max_rows = cpu_kernels.PACKED_MAX_ROWS
        elif self.group is not None and self.group.dtype == torch.int8:
            self.max_rows = cpu_kernels.INT8_MAX_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in] -> [tokens, sum of outs]
        if self.group is not None and cpu_kernels.usable(x, self.max_rows):
            return self.group(x)
        outputs = [module(x) for module in self.modules]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _kernel_group(modules: list[nn.Module]) -> cpu_kernels.LinearGroup | None:
    """The kernels' group for ``modules`` if they are all float32 ``nn.Linear``, all ``Int8Linear`` on CPU, or all
    ``PackedLinear`` of one packing."""
    if not cpu_kernels.available():
        return None
    biases = [None if module.bias is None else module.bias.detach() for module in modules]
    if any(bias is not None and bias.dtype != torch.float32 for bias in biases):
        return None
    if all(type(module) is nn.Linear for module in modules):
        weights = [module.weight.detach() for module in modules]
        if all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() for w in weights):
            return cpu_kernels.LinearGroup(weights, None, biases)
    if all(isinstance(module, Int8Linear) and module.qweight.device.type == "cpu" for module in modules):
        return cpu_kernels.LinearGroup([module.qweight for module in modules], [module.scales for module in modules],
                                       biases)
    if all(isinstance(module, PackedLinear) for module in modules) and len({m.packing for m in modules}) == 1:
        return cpu_kernels.LinearGroup([module.packed for module in modules], None, biases)
    return None


def fusable(layer: nn.Module) -> bool:
    """True for a layer built as Llama's: what ``FusedLayer`` computes is exactly what the layer computes."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attention is None or mlp is None or not all(hasattr(attention, n) for n in names):
        return False
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if hasattr(attention, "q_norm") != hasattr(attention, "k_norm"):
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [getattr(attention, n) for n in ("q_norm", "k_norm") if hasattr(attention, n)]  # Qwen3's, per head
    if not all(_is_rms_norm(norm) for norm in norms):
        return False
    linears = [getattr(attention, n) for n in names] + [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    known = all(type(m) is nn.Linear or isinstance(m, QuantizedLinear) for m in linears)
    # extra submodules (Gemma's extra norms, soft-capping ...) mean a layer this path does not know
    expected_children = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    return known and set(dict(layer.named_children())) <= expected_children


def _is_rms_norm(module: nn.Module) -> bool:
    # Llama-style RMS norms: weight * normalize(x), no offset (Gemma's norms add 1 to the weight: not this)
    name = type(module).__name__
    return name.endswith("RMSNorm") and not name.startswith("Gemma") and hasattr(module, "weight") and (
        hasattr(module, "variance_epsilon") or hasattr(module, "eps"))


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class FusedLayer:
    """Runs one Llama-built decoder layer for one or several sessions' tokens (see the module's docstring)."""

    def __init__(self, layer: nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        self.head_dim = attention.head_dim
        self.scaling = float(attention.scaling)
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.qkv = Projection([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = Projection([attention.o_proj])
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj])
        self.down = Projection([mlp.down_proj])
        self.intermediate = mlp.gate_proj.out_features
        self.act = F.silu if isinstance(mlp.act_fn, nn.SiLU) else mlp.act_fn
        self.input_norm = (layer.input_layernorm.weight, _eps(layer.input_layernorm))
        self.post_norm = (layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm))
        self.is_causal = getattr(attention, "is_causal", True)
        self.qk_norms = None  # Qwen3: an RMS norm over each query head and each key head, before the rotary
        if hasattr(attention, "q_norm"):
            self.qk_norms = ((attention.q_norm.weight, _eps(attention.q_norm)),
                             (attention.k_norm.weight, _eps(attention.k_norm)))
        self.linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj,
                        mlp.up_proj, mlp.down_proj]

    def usable(self) -> bool:
        """False while autograd records (training) or a hook is on a projection (LoRA weights applied): then the
        layer's own modules must run."""
        if torch.is_grad_enabled():
            return False
        return not any(module._forward_hooks or module._forward_pre_hooks for module in self.linears)

    def __call__(
        self,
        hiddens: list[torch.Tensor],  # per session: [batch, new, hidden]
        masks: list[torch.Tensor | None],  # per session: [batch, 1, new, past+new] bool, or None
        rotary: list[tuple[torch.Tensor, torch.Tensor]],  # per session: ``rotary_tables(cos, sin)``
        cache_layers: list,  # per session: this layer's cache (PagedLayer), or None (no cache)
    ) -> list[torch.Tensor]:
        shapes = [h.shape for h in hiddens]
        width = shapes[0][-1]
        flat = hiddens[0].reshape(-1, width) if len(hiddens) == 1 else torch.cat([h.reshape(-1, width) for h in hiddens])
        hidden = self.run_flat(flat, shapes, masks, rotary, cache_layers)
        if len(hiddens) == 1:
            return [hidden.view(shapes[0])]
        return split_rows(hidden, shapes)

    def run_flat(
        self,
        flat: torch.Tensor,  # [tokens, hidden]: every session's tokens, one after another
        shapes: list,  # per session: the shape of its hidden states, [batch, new, hidden]
        masks: list[torch.Tensor | None],
        rotary: list[tuple[torch.Tensor, torch.Tensor]],
        cache_layers: list,
        joined_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,  # the sessions' ``rotary`` concatenated
    ) -> torch.Tensor:  # [tokens, hidden]
        """The layer on the sessions' tokens held as one matrix: a stack of these layers passes it from one to the
        next, with no concatenation or split between layers (``RotaryRunner.run_fused_batched``)."""
        sizes = [shape[0] * shape[1] for shape in shapes]
        normed = _rms_norm(flat, *self.input_norm)
        qkv = self.qkv(normed)  # [tokens, (heads + 2 kv_heads) * head_dim]
        d, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        qk = qkv[:, : (heads + kv_heads) * d].view(-1, heads + kv_heads, d)
        if self.qk_norms is not None:
            (q_weight, q_eps), (k_weight, k_eps) = self.qk_norms
            qk = torch.cat([_head_norm(qk[:, :heads], q_weight, q_eps), _head_norm(qk[:, heads:], k_weight, k_eps)],
                           dim=1)
        values = qkv[:, (heads + kv_heads) * d :].view(-1, kv_heads, d)
        if self._decoding(flat, shapes, masks, cache_layers):
            attended = self._decode_attention(qk, values, rotary, cache_layers, joined_rotary)
        else:
            attended = self._attention(shapes, masks, rotary, cache_layers, sizes, qk, values)
        hidden = flat + self.o_proj(attended)
        gate_up = self.gate_up(_rms_norm(hidden, *self.post_norm))
        gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
        return hidden + self.down(self.act(gate) * up)

    def _decoding(self, flat, shapes, masks, cache_layers) -> bool:
        """True for decode steps the kernels' attention takes: one new token per session, one row, no mask (all
        cached tokens visible), a float32 paged cache of one row."""
        if not self.is_causal or flat.dtype != torch.float32 or flat.device.type != "cpu" or not cpu_kernels.available():
            return False
        for shape, mask, cache_layer in zip(shapes, masks, cache_layers):
            if shape[0] != 1 or shape[1] != 1 or mask is not None or type(cache_layer) is not PagedLayer:
                return False
            keys = cache_layer._keys
            if keys is not None and (keys.shape[0] != 1 or keys.dtype != torch.float32):
                return False
        return True

    def _decode_attention(self, qk, values, rotary, cache_layers, joined_rotary=None) -> torch.Tensor:
        """Every session's new token: rotary on all of them at once, then one kernel call writes their keys and
        values into their caches and attends (``cpu_kernels.decode_attention``)."""
        d, heads, half = self.head_dim, self.heads, self.head_dim // 2
        if joined_rotary is not None:
            cos, signed_sin = joined_rotary
        elif len(rotary) == 1:
            cos, signed_sin = rotary[0]
        else:
            cos, signed_sin = join_rotary(rotary)
        rotated = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * signed_sin  # [sessions, h+kv, d]
        positions = [layer.append_slot(self.kv_heads, d, torch.float32) for layer in cache_layers]
        return cpu_kernels.decode_attention(
            rotated[:, :heads].reshape(-1, heads * d), rotated[:, heads:], values,
            [layer._keys for layer in cache_layers], [layer._values for layer in cache_layers], positions,
            self.scaling)

    def _attention(self, shapes, masks, rotary, cache_layers, sizes, qk, values) -> torch.Tensor:
        """Each session's attention with PyTorch's (any shape, mask and cache): [tokens, heads * d]."""
        d, heads, kv_heads, half = self.head_dim, self.heads, self.kv_heads, self.head_dim // 2
        outputs, start = [], 0
        for shape, mask, (cos, signed_sin), cache_layer, size in zip(shapes, masks, rotary, cache_layers, sizes):
            batch, new = shape[0], shape[1]
            part = qk if len(shapes) == 1 else qk[start : start + size]
            start += size
            rotated = part * cos + torch.cat((part[..., half:], part[..., :half]), dim=-1) * signed_sin
            q = rotated[:, :heads].view(batch, new, heads, d).transpose(1, 2)  # [batch, heads, new, d]
            k = rotated[:, heads:].view(batch, new, kv_heads, d).transpose(1, 2)  # [batch, kv_heads, new, d]
            v = values[start - size : start].view(batch, new, kv_heads, d).transpose(1, 2)
            if cache_layer is not None:
                k, v = cache_layer.update(k, v)
            causal = mask is None and new > 1 and self.is_causal
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                                 enable_gqa=heads != kv_heads)  # [batch, heads, new, d]
            outputs.append(out.transpose(1, 2).reshape(size, heads * d))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def split_rows(flat: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    """``flat`` [tokens, hidden] back into the sessions' hidden states of ``shapes``."""
    return [part.view(shape) for part, shape in zip(torch.split(flat, [s[0] * s[1] for s in shapes]), shapes)]


def join_rotary(rotary: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sessions' ``rotary_tables`` as one pair, rows in the sessions' order."""
    return torch.cat([r[0] for r in rotary]), torch.cat([r[1] for r in rotary])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        if x.dim() == 2 and cpu_kernels.usable(x, max_rows=x.shape[0]) and weight.dtype == torch.float32:
            return cpu_kernels.rms_norm(x, weight, eps)
        return F.rms_norm(x, weight.shape, weight, eps)
    # as transformers does for 16-bit states: normalize in float32, round, then scale
    normed = F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)
    return weight * normed


def _head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim of ``x`` [tokens, heads, d] (per head), as ``_rms_norm`` computes it."""
    tokens, heads, d = x.shape
    return _rms_norm(x.reshape(tokens * heads, d), weight, eps).view(tokens, heads, d)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``FusedLayer``'s form of rotary embeddings ``cos``, ``sin`` [batch, new, d] (computed once per forward for all
    layers): ``(cos, signed_sin)`` [batch * new, 1, d], with which the rotary embedding of ``x`` [tokens, heads, d] is
    ``x * cos + swap_halves(x) * signed_sin`` (transformers' ``x * cos + rotate_half(x) * sin``, where
    ``rotate_half(x) = cat(-x2, x1)``)."""
    d = cos.shape[-1]
    half = d // 2
    cos = cos.reshape(-1, 1, d).to(dtype)
    sin = sin.reshape(-1, 1, d).to(dtype)
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
