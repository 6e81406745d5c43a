"""``RotaryRunner``: runs the layers of rotary-position families (Llama, Mistral, Mixtral, Qwen, Gemma, Phi-3):
rotary embeddings, grouped-query attention, causal / sliding-window + padding masks; and, for layers built exactly
as Llama's, several sessions' steps through a layer at once."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from corolla.models.family import attention_type
from corolla.models.fused import join_rotary, rotary_tables, split_rows


@dataclass(frozen=True)
class RotaryInputs:
    """What every layer of a rotary stack receives for one forward."""

    masks: dict[str, torch.Tensor | None]  # per attention type: [batch, 1, new, past+new] (bool for sdpa) or None
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per attention type: cos, sin [batch, new, dim]
    position_ids: torch.Tensor  # [batch, new]
    fused_tables: dict = field(default_factory=dict)  # per attention type: fused.rotary_tables, made on first use

    def fused_rotary(self, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.fused_tables.get(kind)
        if tables is None:
            tables = self.fused_tables[kind] = rotary_tables(*self.position_embeddings[kind], dtype)
        return tables


class RotaryRunner(nn.Module):
    """Runs layers that take ``(hidden_states, attention_mask, position_ids, cache, use_cache,
    position_embeddings)`` by keyword and return a tensor, as Llama, Mistral, Mixtral, Qwen, Gemma and Phi-3 do.

    Each layer attends with the mask of its attention type (``layer.corolla_attention``, set by ``BlockStack``):
    ``full_attention`` (causal) or ``sliding_attention`` (causal within ``config.sliding_window``). With
    ``rotary_per_type`` (Gemma 3) each type also has its own rotary embedding."""

    def __init__(
        self,
        config: transformers.PretrainedConfig,
        device: torch.device,
        rotary_class: type[nn.Module] = LlamaRotaryEmbedding,
        rotary_per_type: bool = False,
        cache_argument: str = "cache",
    ):
        super().__init__()
        self.config = config
        self.rotary_per_type = rotary_per_type
        self.cache_argument = cache_argument  # the layer's name for the cache: "cache", or "layer_past" (GPT-NeoX)
        self.attention_types = sorted({attention_type(config, i) for i in range(config.num_hidden_layers)})
        # inv_freq stays float32, as in the HF model; cos/sin come out in the hidden states' dtype.
        self.rotary_emb = rotary_class(config=config).to(device)

    def prepare(
        self,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        attention_mask: torch.Tensor,  # [batch, past+new]
        position_ids: torch.Tensor,  # [batch, new]
        cache: transformers.Cache | None,
    ) -> RotaryInputs:
        masks, embeddings = {}, {}
        unmasked_decode = self._unmasked_decode(hidden_states, attention_mask)
        for kind in self.attention_types:
            if unmasked_decode and kind == "full_attention":
                masks[kind] = None  # what create_causal_mask returns here, without its ~80 us per session step
            else:
                make_mask = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                masks[kind] = make_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                        cache=cache, position_ids=position_ids)
            if self.rotary_per_type:
                embeddings[kind] = self.rotary_emb(hidden_states, position_ids, kind)
        if not self.rotary_per_type:
            shared = self.rotary_emb(hidden_states, position_ids=position_ids)
            embeddings = {kind: shared for kind in self.attention_types}
        return RotaryInputs(masks, embeddings, position_ids)

    def _unmasked_decode(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """True for one new token per row, no padding, causal SDPA attention: then transformers' full-attention mask
        is None (SDPA needs no mask for a single query that sees every key), and ``prepare`` says so without asking."""
        return (hidden_states.shape[1] == 1 and self.config._attn_implementation == "sdpa"
                and getattr(self.config, "is_causal", True) and attention_mask is not None and attention_mask.dim() == 2
                and not attention_mask.is_floating_point() and bool(attention_mask.all()))

    def run_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        prepared: RotaryInputs,
        cache: transformers.Cache | None,
    ) -> torch.Tensor:  # [batch, new, hidden]
        kind = layer.corolla_attention
        fused = layer.__dict__.get("corolla_fused")
        if fused is not None and fused.usable():
            cache_layer = None if cache is None else cache.layers[layer.self_attn.layer_idx]
            rotary = prepared.fused_rotary(kind, hidden_states.dtype)
            return fused([hidden_states], [prepared.masks[kind]], [rotary], [cache_layer])[0]
        return layer(
            hidden_states,
            attention_mask=prepared.masks[kind],
            position_ids=prepared.position_ids,
            use_cache=cache is not None,
            position_embeddings=prepared.position_embeddings[kind],
            **{self.cache_argument: cache},
        )

    def run_fused_batched(
        self,
        layers: list[nn.Module],  # each with a usable ``corolla_fused`` (``FusedLayer``)
        hiddens: list[torch.Tensor],  # per session: [batch, new, hidden]
        prepared: list[RotaryInputs],
        caches: list,  # per session: its cache (its layers line up with ``layers``)
    ) -> list[torch.Tensor]:
        """Several sessions' steps through Llama-built layers, the sessions' tokens held as one matrix from the
        first layer to the last: what ``run_layer_batched`` computes layer by layer, without concatenating and
        splitting the sessions' states at every layer, and with each attention type's masks and rotary tables
        gathered once for all layers."""
        shapes = [h.shape for h in hiddens]
        flat = torch.cat([h.reshape(-1, h.shape[-1]) for h in hiddens])
        per_kind: dict[str, tuple] = {}
        for index, layer in enumerate(layers):
            kind = layer.corolla_attention
            inputs = per_kind.get(kind)
            if inputs is None:
                rotary = [session.fused_rotary(kind, flat.dtype) for session in prepared]
                inputs = per_kind[kind] = ([session.masks[kind] for session in prepared], rotary, join_rotary(rotary))
            masks, rotary, joined = inputs
            flat = layer.corolla_fused.run_flat(flat, shapes, masks, rotary, [cache.layers[index] for cache in caches],
                                                joined)
        return split_rows(flat, shapes)

    def run_layer_batched(
        self,
        layer: nn.Module,
        hiddens: list[torch.Tensor],  # per session: [batch, new, hidden]
        prepared: list[RotaryInputs],
        cache_layers: list,  # per session: this layer's cache (keys/values appended in place)
    ) -> list[torch.Tensor]:
        """One decoder layer for several sessions: every projection and the MLP run once on all sessions' tokens;
        rotary positions, the cache and attention (transformers' own attention function) per session.
        The same computation as ``run_layer`` on each session alone, for layers built like Llama's."""
        kind = layer.corolla_attention
        fused = layer.__dict__.get("corolla_fused")
        if fused is not None and fused.usable():
            return fused(hiddens, [inputs.masks[kind] for inputs in prepared],
                         [inputs.fused_rotary(kind, h.dtype) for inputs, h in zip(prepared, hiddens)], cache_layers)
        attention = layer.self_attn
        sizes = [h.shape[0] * h.shape[1] for h in hiddens]
        flat = torch.cat([h.reshape(-1, h.shape[-1]) for h in hiddens])  # [tokens, hidden]
        normed = layer.input_layernorm(flat)
        queries, keys, values = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, None)
        outputs, start = [], 0
        for hidden, inputs, cache_layer, size in zip(hiddens, prepared, cache_layers, sizes):
            batch, new = hidden.shape[:2]
            shape = (batch, new, -1, attention.head_dim)
            part = slice(start, start + size)
            q = queries[part].view(shape).transpose(1, 2)  # [batch, heads, new, head_dim]
            k = keys[part].view(shape).transpose(1, 2)  # [batch, kv_heads, new, head_dim]
            v = values[part].view(shape).transpose(1, 2)
            cos, sin = inputs.position_embeddings[kind]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = cache_layer.update(k, v)
            out, _ = interface(attention, q, k, v, inputs.masks[kind], dropout=0.0, scaling=attention.scaling)
            outputs.append(out.reshape(size, -1))
            start += size
        hidden = flat + attention.o_proj(torch.cat(outputs))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return [part.view(h.shape) for part, h in zip(torch.split(hidden, sizes), hiddens)]
