"""``BlockStack``: a contiguous range of a model's decoder blocks, built and loaded on their own."""
from __future__ import annotations

import collections
import copy
import itertools
import logging
import threading
from pathlib import Path
from typing import Optional

import torch
import transformers
from torch import nn
from transformers import DynamicCache

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, CorollaError
from corolla.models import cpu_kernels
from corolla.models.checkpoint import read_tensors, tensor_shapes
from corolla.models.family import ModelFamily, family_for
from corolla.models.fused import FusedLayer, fusable
from corolla.models.kv import DEFAULT_PAGE_TOKENS, PagedLayer
from corolla.models.packing import pack_layer
from corolla.models.quant import Int8Linear, quantize_layer

logger = logging.getLogger(__name__)


class BlockStack(nn.Module):
    """Runs blocks ``blocks`` of a model as the full HF model would run them, with an optional cache.

    The layers are renumbered from 0 inside the stack (cache layer ``i`` belongs to block ``blocks.start + i``).
    """

    def __init__(
        self,
        family: ModelFamily,
        config: transformers.PretrainedConfig,
        blocks: BlockRange,
        layers: list[nn.Module],
        dtype: torch.dtype,
        device: torch.device | str,
        fast_path: bool = True,
    ):
        super().__init__()
        if len(layers) != len(blocks):
            raise ValueError(f"blocks {blocks} need {len(blocks)} layers, got {len(layers)}")
        self.family = family
        self.config = config
        self.blocks = blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.hidden_size: int = config.hidden_size
        self.layers = nn.ModuleList(layers)
        for index, layer in zip(blocks, layers):  # the mask each layer attends with (see RotaryRunner)
            layer.corolla_attention = family.layer_type(config, index)
        self.runner = family.make_runner(config, self.device)
        self.quant = "none"  # how the layers' weights are quantized (load_block_stack sets it)
        self.packed: dict[str, int] = {}  # packing -> number of linear layers held packed (load_block_stack sets it)
        # the fast path (corolla.models.fused): layers built as Llama's run fused where no autograd or LoRA is involved
        # (CPU only: on CUDA, transformers' layers with PyTorch's kernels are what has been measured and tested)
        self.fast_path = bool(fast_path and self.device.type == "cpu" and family.fused_layers
                              and all(fusable(layer) for layer in layers))
        if self.fast_path:
            for layer in layers:
                layer.corolla_fused = FusedLayer(layer)
        for module in self.layers.modules():
            if isinstance(module, Int8Linear):
                module.kernels = fast_path  # without the fast path, quantized layers use PyTorch's kernels only

    def forward(
        self,
        hidden_states: torch.Tensor,  # [batch, new, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, past+new], 1 real token / 0 padding
        position_ids: torch.Tensor | None = None,  # [batch, new]
        cache: transformers.Cache | None = None,
        span: BlockRange | None = None,
        prompts: torch.Tensor | None = None,  # [len(span), batch or 1, prefix, hidden]
    ) -> torch.Tensor:  # [batch, new, hidden]
        """Run the stack, or only blocks ``span`` of it. With ``cache`` (made by ``new_cache(span)``), attend to the
        cached past and append the new keys/values in place.

        ``attention_mask`` None means no padding; ``position_ids`` None means ``past + arange(new)`` for every row.
        ``prompts`` (deep prompt tuning): ``prompts[i]`` is added to the hidden states entering the span's block ``i``
        at the sequence's first ``prefix`` positions (those of them in this call: past .. past+new).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise BadRequestError(
                f"hidden_states must be [batch, new, {self.hidden_size}], got {list(hidden_states.shape)}"
            )
        local = self._local_slice(span)
        layers = self.layers[local]
        hidden_states = hidden_states.to(device=self.device, dtype=self.dtype)
        batch_size, new_length, _ = hidden_states.shape
        past_length = self._check_cache(cache, batch_size, len(layers))
        if new_length == 0:
            return hidden_states  # [batch, 0, hidden]: nothing to run, the cache stays as it was
        attention_mask = self._check_attention_mask(attention_mask, batch_size, past_length + new_length)
        position_ids = self._check_position_ids(position_ids, batch_size, past_length, new_length)

        if cache is not None:
            self._number_layers_from(local.start)
        prepared = self.runner.prepare(hidden_states, attention_mask, position_ids, cache)
        if prompts is not None and prompts.shape[0] != len(layers):
            raise BadRequestError(f"prompts hold {prompts.shape[0]} blocks, the request runs {len(layers)}")
        for index, layer in enumerate(layers):
            if prompts is not None:
                hidden_states = _add_prompt(hidden_states, prompts[index], past_length)
            hidden_states = self.runner.run_layer(layer, hidden_states, prepared, cache)  # [batch, new, hidden]
        return hidden_states

    def layer(self, block: int) -> nn.Module:
        """The decoder layer of block ``block`` (numbered as in the full model)."""
        if block not in self.blocks:
            raise BadRequestError(f"this stack holds blocks {self.blocks}, not block {block}")
        return self.layers[block - self.blocks.start]

    def _local_slice(self, span: BlockRange | None) -> slice:
        """Indices into ``self.layers`` of blocks ``span`` (all of them for None)."""
        span = span or self.blocks
        if not self.blocks.covers(span):
            raise BadRequestError(f"this stack holds blocks {self.blocks}, not {span}")
        return slice(span.start - self.blocks.start, span.end - self.blocks.start)

    def _number_layers_from(self, first: int) -> None:
        """Point layer ``first`` at cache layer 0 (and the next ones after it): a span's cache holds its layers only.

        Only the compute thread calls the stack, so renumbering between calls of different spans is safe.
        """
        if getattr(self, "_numbered_from", 0) == first:
            return
        for index, layer in enumerate(self.layers):
            _renumber_layer(layer, index - first)
        self._numbered_from = first

    def _check_cache(self, cache: transformers.Cache | None, batch_size: int, num_layers: int) -> int:
        """Validate a cache made by ``new_cache`` and return how many tokens it holds."""
        if cache is None:
            return 0
        if not isinstance(cache, transformers.Cache) or len(cache.layers) != num_layers:
            raise BadRequestError(f"the cache was not made by new_cache() of this stack of blocks {self.blocks}")
        past_length = self.cache_length(cache)
        cached_batch = cache.layers[0].keys.shape[0] if past_length > 0 else batch_size
        if cached_batch != batch_size:
            raise BadRequestError(f"the cache holds {cached_batch} rows but hidden_states has {batch_size}")
        return past_length

    def _check_attention_mask(
        self, attention_mask: torch.Tensor | None, batch_size: int, total_length: int
    ) -> torch.Tensor:  # [batch, past+new]
        if attention_mask is None:
            return torch.ones(batch_size, total_length, dtype=torch.long, device=self.device)  # [batch, past+new]
        if tuple(attention_mask.shape) != (batch_size, total_length):
            raise BadRequestError(
                f"attention_mask must be [batch={batch_size}, past+new={total_length}], "
                f"got {list(attention_mask.shape)}"
            )
        if attention_mask.is_floating_point():
            raise BadRequestError(
                f"attention_mask must be long or bool (1 real token / 0 padding), got {attention_mask.dtype}"
            )
        return attention_mask.to(self.device)

    def _check_position_ids(
        self, position_ids: torch.Tensor | None, batch_size: int, past_length: int, new_length: int
    ) -> torch.Tensor:  # [batch, new]
        if position_ids is None:
            positions = torch.arange(past_length, past_length + new_length, device=self.device)  # [new]
            return positions.unsqueeze(0).expand(batch_size, new_length)  # [batch, new]
        if tuple(position_ids.shape) != (batch_size, new_length):
            raise BadRequestError(
                f"position_ids must be [batch={batch_size}, new={new_length}], got {list(position_ids.shape)}"
            )
        return position_ids.to(device=self.device, dtype=torch.long)

    def new_cache(self, span: BlockRange | None = None, page_tokens: int = DEFAULT_PAGE_TOKENS) -> transformers.Cache:
        """An empty cache for blocks ``span`` (default: the whole stack), one ``corolla.models.kv.PagedLayer`` per
        layer, growing ``page_tokens`` tokens at a time. Sliding-window layers keep every token too (their mask
        hides the old ones): a session can then be rewound anywhere and replayed exactly, which a cache that has
        dropped its oldest tokens cannot."""
        local = self._local_slice(span)
        cache = DynamicCache()
        cache.layers = [PagedLayer(page_tokens) for _ in range(local.stop - local.start)]
        return cache

    def cache_memory_bytes(self, cache: transformers.Cache) -> int:
        """Bytes the cache's buffers take (paged layers hold whole pages)."""
        return sum(getattr(layer, "memory_bytes", 0) for layer in cache.layers)

    def forward_batch(self, parts: list[tuple], span: BlockRange | None = None) -> list[torch.Tensor]:
        """Several sessions' steps through blocks ``span`` at once: ``parts`` are ``(hidden_states [b, n, hidden],
        attention_mask [b, past + n], position_ids [b, n] or None, cache)``, each with its own cache, length and
        positions. Where the family's runner can (``run_layer_batched``), the projections and MLPs of all parts
        run as one matrix product per weight and only attention runs per part; otherwise parts run one by one.
        Returns each part's outputs, as ``forward`` would."""
        local = self._local_slice(span)
        layers = self.layers[local]
        fused = self.fast_path and all(layer.corolla_fused.usable() for layer in layers)
        if not (self.family.batched_layers or fused):
            return [self.forward(h, m, p, c, span=span) for h, m, p, c in parts]
        batched = self.runner.run_layer_batched
        hiddens, prepared, caches = [], [], []
        for hidden, mask, positions, cache in parts:
            hidden = hidden.to(device=self.device, dtype=self.dtype)
            batch, new = hidden.shape[:2]
            past = self._check_cache(cache, batch, len(layers))
            mask = self._check_attention_mask(mask, batch, past + new)
            positions = self._check_position_ids(positions, batch, past, new)
            hiddens.append(hidden)
            prepared.append(self.runner.prepare(hidden, mask, positions, cache))
            caches.append(cache)
        if fused and hasattr(self.runner, "run_fused_batched"):
            return self.runner.run_fused_batched(list(layers), hiddens, prepared, caches)
        for index, layer in enumerate(layers):
            hiddens = batched(layer, hiddens, prepared, [cache.layers[index] for cache in caches])
        return hiddens

    def cache_length(self, cache: transformers.Cache) -> int:
        """Number of tokens already in ``cache``."""
        return cache.get_seq_length()

    def crop_cache(self, cache: transformers.Cache, length: int) -> None:
        """Keep the first ``length`` tokens of ``cache`` (0 <= length <= its length) and drop the rest, in place."""
        current = self.cache_length(cache)
        if not 0 <= length <= current:
            raise BadRequestError(f"cannot keep {length} tokens of a cache holding {current}")
        if length == current:
            return
        for layer in cache.layers:
            layer.crop(length - current)  # a negative count drops that many tokens from the end

    def reorder_cache(self, cache: transformers.Cache, hypo_ids: torch.Tensor) -> None:
        """Select / reorder the batch rows of ``cache`` in place: new row ``i`` is old row ``hypo_ids[i]``."""
        if hypo_ids.dim() != 1 or hypo_ids.is_floating_point():
            raise BadRequestError(f"hypo_ids must be a 1-D integer tensor, got {hypo_ids.dtype} {list(hypo_ids.shape)}")
        if self.cache_length(cache) == 0:
            return
        cached_batch = cache.layers[0].keys.shape[0]
        if hypo_ids.numel() and (int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= cached_batch):
            raise BadRequestError(f"hypo_ids must be in [0, {cached_batch}), got {hypo_ids.tolist()}")
        cache.reorder_cache(hypo_ids.to(device=self.device, dtype=torch.long))

    def cache_bytes_per_token(self) -> int:
        """Bytes of keys + values one token of one batch row costs across all blocks of the stack."""
        element_bytes = torch.empty((), dtype=self.dtype).element_size()
        return self.family.cache_values_per_token_per_layer(self.config) * element_bytes * len(self.blocks)

    @property
    def rows_per_pass(self) -> int | None:
        """Rows of a decode pass past which a larger batch costs as much per row as separate passes (the CPU kernels
        serve this many rows per read of the weights), or None where no such size is known (PyTorch's products, whose
        cost per row keeps falling with the batch). The server's scheduler batches sessions up to it."""
        if not self.fast_path or self.dtype != torch.float32:
            return None
        return cpu_kernels.rows_per_pass()  # None without the kernels

    def weight_bytes(self) -> int:
        """Bytes of the layers' parameters and buffers."""
        tensors = itertools.chain(self.layers.parameters(), self.layers.buffers())
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def extra_repr(self) -> str:
        return (f"model_type={self.family.model_type}, blocks={self.blocks}, dtype={self.dtype}, device={self.device}, "
                f"fast_path={self.fast_path}, packed={self.packed}")


class LoadAbandoned(Exception):
    """A load stopped part-way because its server is stopping (``load_block_stack``'s ``abandon``)."""


def load_block_stack(
    path: str | Path,
    config: transformers.PretrainedConfig,
    blocks: BlockRange,
    dtype: torch.dtype,
    device: torch.device | str,
    quant: str = "none",
    progress: bool = False,
    fast_path: bool = True,
    pack_weights: bool = True,
    abandon: Optional[threading.Event] = None,
) -> BlockStack:
    """Build blocks ``blocks`` of the model at ``path`` and load only their tensors (never the full model); with
    ``quant`` (``corolla.models.quant``), each block is read and quantized before the next is read, so the float
    weights of one block at a time are held. ``fast_path``: see ``corolla.models.fused``. ``pack_weights`` (with
    ``fast_path``, float32 on CPU, no ``quant``): float32 weights that lie exactly on a grid are held packed
    (``corolla.models.packing``; the same outputs, fewer bytes read per step) where the kernels rebuild them with
    vector instructions (``cpu_kernels.packing_pays``). Once ``abandon`` is set (the server is stopping), the load
    ends before the next block with ``LoadAbandoned``."""
    family = family_for(config)
    num_layers = config.num_hidden_layers
    if blocks.end > num_layers:
        raise CorollaError(f"blocks {blocks} are out of range: the model has {num_layers} blocks (0:{num_layers})")
    stack_config = copy.deepcopy(config)
    stack_config._attn_implementation = family.attn_implementation
    stack_config._experts_implementation = "eager"  # mixture-of-experts layers: the plain per-expert loop

    def block_states(wanted_blocks) -> dict[int, dict[str, torch.Tensor]]:
        tensors = read_tensors(path, lambda name: family.is_block_tensor(name) in wanted_blocks, dtype=dtype,
                               device=device)
        states: dict[int, dict[str, torch.Tensor]] = {index: {} for index in wanted_blocks}
        for name in list(tensors):
            index, local_name = family.split_block_tensor(name)
            states[index][local_name] = tensors.pop(name)
        if family.convert_block_state is not None:
            states = {index: family.convert_block_state(state) for index, state in states.items()}
        return states

    packing = (pack_weights and fast_path and quant == "none" and dtype == torch.float32
               and torch.device(device).type == "cpu" and cpu_kernels.available() and cpu_kernels.packing_pays())
    # quantized or packed: one block's float tensors at a time; otherwise all at once (each shard opened once)
    one_at_a_time = quant != "none" or packing
    keep_float = family.linears_kept_float(config)
    if keep_float and (quant != "none" or packing):
        logger.info("%s stay float (read as tensors by the %s layer under this config): neither quantized nor packed",
                    ", ".join(keep_float), family.model_type)
    states = {} if one_at_a_time else block_states(blocks)
    packed_kinds: collections.Counter = collections.Counter()
    from tqdm import tqdm

    layers = []
    for local_index, index in tqdm(list(enumerate(blocks)), desc=f"loading blocks {blocks}", unit="block",
                                   disable=not progress, leave=False):
        if abandon is not None and abandon.is_set():
            raise LoadAbandoned(f"loading blocks {blocks} stopped before block {index}")
        state = block_states(range(index, index + 1))[index] if one_at_a_time else states.pop(index)
        with torch.device("meta"):
            layer = family.build_layer(stack_config, index)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CorollaError(f"checkpoint {path} does not match block {index} of {family.model_type}: {exc}") from exc
        del state
        still_meta = [name for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()) if t.is_meta]
        if still_meta:
            raise CorollaError(f"block {index} of {path} has tensors the checkpoint does not provide: {still_meta}")
        replaced = pack_layer(layer, keep=keep_float) if packing else {}
        packed_kinds.update(replaced.values())
        if quant != "none" or replaced:
            if quant != "none":
                quantize_layer(layer, quant, torch.device(device), keep=keep_float)
            for tensor in itertools.chain(layer.parameters(), layer.buffers()):
                # what stays in float (norms, biases) may still point into the checkpoint's memory map, which
                # would keep every page of it read so far: give it its own memory
                tensor.data = tensor.data.clone()
        _renumber_layer(layer, local_index)
        layer.eval()
        layer.requires_grad_(False)
        layers.append(layer)
    stack = BlockStack(family, stack_config, blocks, layers, dtype, device, fast_path=fast_path)
    stack.quant = quant
    stack.packed = dict(packed_kinds)
    if quant != "none" or packed_kinds:
        release_freed_memory()  # the float weights are gone: give their pages back, so memory follows the weights
    return stack


def release_freed_memory() -> None:
    """Ask glibc to return freed heap pages to the system (a no-op where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_checkpoint(path: str | Path, config: transformers.PretrainedConfig, blocks: BlockRange) -> None:
    """Raise ``CorollaError`` naming what is wrong if the checkpoint lacks a tensor of ``blocks`` or holds one of
    another shape than the family's layer has (read from the shards' headers; nothing is loaded)."""
    family = family_for(config)
    if blocks.end > config.num_hidden_layers:
        raise CorollaError(f"blocks {blocks} are out of range: the model has {config.num_hidden_layers} blocks")
    stack_config = copy.deepcopy(config)
    stack_config._attn_implementation = family.attn_implementation
    shapes = tensor_shapes(path, lambda name: family.is_block_tensor(name) in blocks)
    by_block: dict[int, dict[str, torch.Tensor]] = {index: {} for index in blocks}
    for name, shape in shapes.items():
        index, local_name = family.split_block_tensor(name)
        by_block[index][local_name] = torch.empty(shape, device="meta")
    for index in blocks:
        state = by_block[index]
        if family.convert_block_state is not None:
            state = family.convert_block_state(state)
        with torch.device("meta"):
            layer = family.build_layer(stack_config, index)
        expected = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        wrong = sorted(name for name in set(expected) & set(state) if tuple(state[name].shape) != expected[name])
        if missing or wrong:
            detail = (f"lacks {missing[:4]}" if missing else "") + (" and " if missing and wrong else "") + (
                f"has other shapes for {wrong[:4]}" if wrong else "")
            raise CorollaError(f"checkpoint {path} does not hold block {index} of this {family.model_type} model: "
                               f"it {detail}")


def _add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, past: int) -> torch.Tensor:
    """``hidden`` [batch, new, hidden] holds positions past .. past+new; add ``prompt`` [batch or 1, prefix, hidden]
    to those of them below ``prefix``."""
    end = min(prompt.shape[1], past + hidden.shape[1])
    if end <= past:
        return hidden
    count = end - past
    head = hidden[:, :count] + prompt[:, past:end].to(hidden.dtype)  # [batch, count, hidden]
    return torch.cat([head, hidden[:, count:]], dim=1)


def _renumber_layer(layer: nn.Module, local_index: int) -> None:
    """Point the layer's cache/mask lookups at index ``local_index`` of the stack's own cache."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = local_index
