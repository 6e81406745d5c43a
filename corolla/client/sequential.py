"""``RemoteSequential``: the model's remote blocks as one differentiable, sliceable torch module."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from corolla.client.failures import describe_attempts, is_server_failure
from corolla.client.rpc import call
from corolla.client.swarm import RemoteSwarm
from corolla.client.verify import check
from corolla.core.blocks import BlockRange
from corolla.core.errors import CorollaError, RemoteError
from corolla.core.records import ServerRecord
from corolla.models.lora import LoraSet
from corolla.wire.codec import dtype_from_name
from corolla.wire.messages import BackwardReply, BackwardRequest, ForwardRequest

Hop = tuple[ServerRecord, BlockRange, torch.Tensor, Optional[str]]  # server, blocks it ran, inputs, activations kept


class RemoteSequential(nn.Module):
    """Blocks ``blocks`` of the model, run by the swarm.

    ``seq(hidden_states)`` runs them (and backpropagates through them under autograd); ``seq[a:b]`` is a
    RemoteSequential of blocks a..b-1 of this one; ``seq.inference_session(max_length=...)`` opens a session
    whose ``step()`` keeps attention caches on the servers.
    """

    def __init__(self, swarm: RemoteSwarm, blocks: Optional[BlockRange] = None):
        super().__init__()
        self.swarm = swarm
        self.blocks = blocks if blocks is not None else BlockRange(0, swarm.num_blocks)
        # the session entered with ``with seq.inference_session(...)``: per thread (and per asyncio task), as Petals
        # keeps it, so that a session entered in one thread does not take over another thread's calls
        self._active_session = contextvars.ContextVar(f"corolla_active_session_{id(self)}", default=None)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index) -> "RemoteSequential":
        if isinstance(index, int):
            if index < 0:
                index += len(self)
            if not 0 <= index < len(self):
                raise IndexError(f"block index {index} out of range for {len(self)} blocks")
            return RemoteSequential(self.swarm, BlockRange(self.blocks.start + index, self.blocks.start + index + 1))
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1 or start >= stop:
                raise IndexError(f"slice {index} of {len(self)} blocks must be contiguous and non-empty")
            return RemoteSequential(self.swarm, BlockRange(self.blocks.start + start, self.blocks.start + stop))
        raise TypeError(f"RemoteSequential indices must be int or slice, not {type(index).__name__}")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def active_session(self):
        """The session entered with ``with seq.inference_session(...)`` in this thread, if any."""
        return self._active_session.get()

    @active_session.setter
    def active_session(self, session) -> None:
        self._active_session.set(session)

    @property
    def position(self) -> int:
        """Tokens the active session holds (0 without one), as Petals' ``RemoteSequential.position``."""
        session = self.active_session
        return 0 if session is None or session._closed else session.position

    @contextlib.contextmanager
    def use_session(self, session):
        """Make ``session`` (opened earlier, not closed) the one calls continue inside the ``with`` block (Petals'
        name)."""
        previous, self.active_session = self.active_session, session
        try:
            yield session
        finally:
            self.active_session = previous

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, model={self.swarm.model_prefix!r}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        prompts: Optional[torch.Tensor] = None,
        lora: Optional[LoraSet] = None,
        active_adapter: Optional[str] = None,
    ) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, seq, hidden] through every block, differentiable w.r.t. the input,
        the deep ``prompts`` ([blocks, batch or 1, prefix, hidden]) and the ``lora`` weights (a ``LoraSet`` whose
        tensors may require grad). ``active_adapter`` names a LoRA adapter the servers loaded instead.

        Inside ``with seq.inference_session(...)`` the call is a step of that session instead (as in Petals):
        the inputs are the session's next tokens and the servers keep their attention caches."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [batch, seq, hidden], got {list(hidden_states.shape)}")
        if self.active_session is not None:  # inside ``with seq.inference_session(...)``: continue that session
            return self.active_session.step(hidden_states, attention_mask, position_ids, prompts=prompts)
        self.swarm.check_inputs(hidden_states, attention_mask, position_ids)
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] != len(self)):
            raise ValueError(f"prompts must be [{len(self)} blocks, batch or 1, prefix, hidden], got {list(prompts.shape)}")
        if lora is not None:
            lora = lora.for_blocks(self.blocks)
        lora_tensors = lora.tensors() if lora else []
        differentiated = [hidden_states, prompts, *lora_tensors]
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiated)
        options = _Options(list(lora.pairs) if lora else [], lora.scaling if lora else 1.0, active_adapter, keep)
        return _RemoteBlocksFunction.apply(hidden_states, attention_mask, position_ids, prompts, self, options,
                                           *lora_tensors)

    def inference_session(self, max_length: int, lora: Optional[LoraSet] = None, active_adapter: Optional[str] = None):
        """A session keeping attention caches on the servers; ``lora`` (weights, as of now) or ``active_adapter``
        (a server-loaded adapter) apply to every step."""
        from corolla.client.session import InferenceSession

        return InferenceSession(self, max_length, lora=None if lora is None else lora.for_blocks(self.blocks),
                                active_adapter=active_adapter)

    # ---------------------------------------------------------------- remote calls

    def _pieces(self, batch: int, seq: int) -> list[slice]:
        """Row ranges: each within the request size limit, and enough of them to keep the chain's servers busy."""
        config = self.swarm.config
        rows = max(1, config.max_request_tokens // max(seq, 1))
        rows = min(rows, max(1, -(-batch // max(1, config.pipeline_pieces))))  # ceil(batch / pieces)
        return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]

    async def _call(self, record, request):
        return await call(self.swarm.transport, record, request, self.swarm.config.request_timeout_s,
                          codec=request.wire_codec, swarm_key=self.swarm.config.swarm_key)

    def _extras(self, span: BlockRange, rows: slice, extras: "_Extras", dtype: torch.dtype) -> dict:
        """The deep prompts and LoRA weights of ``span`` for batch ``rows``, as request fields."""
        fields = {"active_adapter": extras.adapter}
        if extras.prompts is not None:
            prompts = extras.prompts[span.start - self.blocks.start : span.end - self.blocks.start]
            fields["prompts"] = (prompts if prompts.shape[1] == 1 else prompts[:, rows]).to(dtype)
        if extras.lora is not None:
            lora = extras.lora.for_blocks(span)
            fields["lora"] = {k: t.to(dtype) for k, t in lora.to_flat().items()} or None
            fields["lora_scaling"] = lora.scaling
        return fields

    async def _forward_span(self, blocks: BlockRange, hidden, mask, positions, rows: slice, extras: "_Extras"):
        """Run ``blocks`` through servers chosen by throughput; a failed server's blocks go to another one.
        Returns the outputs and, per hop, (server, blocks, inputs) for the backward pass."""
        hops: list[Hop] = []
        attempts: list[tuple[str, str]] = []
        position = blocks.start
        while position < blocks.end:
            chain = await self.swarm.plan_batch(BlockRange(position, blocks.end), extras.adapter)
            for record, span in chain:
                dtype = dtype_from_name(record.dtype)
                inputs = hidden.to(dtype)
                request = ForwardRequest(span, inputs, mask, positions, keep_activations=extras.keep_activations,
                                         wire_codec=self.swarm.codec_for(record),
                                         **self._extras(span, rows, extras, dtype))
                try:
                    reply = await self._call(record, request)
                    if self.swarm.verify_now():
                        await self._check(record, span, inputs, mask, positions, rows, extras, reply.hidden_states)
                except Exception as exc:
                    self._handle_failure(record, span, exc, attempts)
                    break  # plan the remaining blocks again, without that server
                self.swarm.report_success(record.peer_id)
                hops.append((record, span, inputs, reply.activation_id))
                hidden = reply.hidden_states
                position = span.end
        return hidden, hops

    async def _check(self, record, span, inputs, mask, positions, rows, extras: "_Extras", claimed) -> None:
        """Have other servers recompute ``record``'s outputs; a server caught lying is banned and its span run again
        (raises, like a failed server)."""
        checked = {"active_adapter": extras.adapter, "lora": extras.lora}
        if extras.prompts is not None:
            prompts = extras.prompts[span.start - self.blocks.start: span.end - self.blocks.start]
            checked["prompts"] = prompts if prompts.shape[1] == 1 else prompts[:, rows]
        verdict = await check(self.swarm, span, record.peer_id, claimed, inputs, mask, positions, checked,
                              record.dtype, inputs.shape[1], like=record)
        if verdict.liar is not None:
            self.swarm.ban_liar(verdict.liar)
        if verdict.liar is not None or verdict.disputed:
            raise RemoteError("WrongOutputs", f"outputs of blocks {span} contradicted: {verdict.detail}",
                              record.peer_id)

    async def _backward_span(self, record, span: BlockRange, inputs, activation_id, grad, mask, positions, rows,
                             extras, grads, attempts=None):
        """d loss / d inputs of ``span`` (prompt and LoRA gradients go into ``grads``); if its server fails,
        recompute the span's forward on other servers and backpropagate through them instead."""
        attempts = [] if attempts is None else attempts
        try:
            request = BackwardRequest(span, inputs, grad.to(inputs.dtype), mask, positions,
                                      activation_id=activation_id, wire_codec=self.swarm.codec_for(record),
                                      **self._extras(span, rows, extras, inputs.dtype))
            reply = await self._call(record, request)
            grads.add(span, rows, reply)
            return reply.grad_inputs
        except Exception as exc:
            self._handle_failure(record, span, exc, attempts)
        _, hops = await self._forward_span(span, inputs, mask, positions, rows, extras)
        for other, other_span, other_inputs, other_id in reversed(hops):
            grad = await self._backward_span(other, other_span, other_inputs, other_id, grad, mask, positions, rows,
                                             extras, grads, attempts)
        return grad

    def _handle_failure(self, record, span, exc, attempts: list[tuple[str, str]]) -> None:
        """Ban a failed server and note the attempt; re-raise what is not a server failure, or when out of tries."""
        if not is_server_failure(exc):
            raise exc
        self.swarm.report_failure(record.peer_id)
        attempts.append((record.peer_id, f"{type(exc).__name__}: {exc}"))
        if len(attempts) > self.swarm.config.max_retries:
            raise CorollaError(
                f"blocks {span} failed on {len(attempts)} servers in a row: {describe_attempts(attempts)}"
            ) from exc

    async def run_forward(self, hidden, mask, positions, extras: "_Extras"):
        pieces = self._pieces(*hidden.shape[:2])
        results = await asyncio.gather(
            *(self._forward_span(self.blocks, hidden[p], _rows(mask, p), _rows(positions, p), p, extras) for p in pieces)
        )
        outputs = torch.cat([out for out, _ in results], dim=0)
        return outputs, (pieces, [hops for _, hops in results])

    async def _backward_piece(self, hops: list[Hop], grad, mask, positions, rows, extras, grads):
        for record, span, inputs, activation_id in reversed(hops):
            grad = await self._backward_span(record, span, inputs, activation_id, grad, mask, positions, rows, extras,
                                             grads)
        return grad

    async def run_backward(self, saved, grad, mask, positions, extras: "_Extras", grads: "_Gradients"):
        pieces, hops = saved
        results = await asyncio.gather(
            *(
                self._backward_piece(piece_hops, grad[p], _rows(mask, p), _rows(positions, p), p, extras, grads)
                for p, piece_hops in zip(pieces, hops)
            )
        )
        return torch.cat(results, dim=0)


@dataclass(frozen=True)
class _Options:
    """What the autograd function needs besides tensors: LoRA key order and scaling, the server adapter."""

    lora_keys: list[str]
    lora_scaling: float
    adapter: Optional[str]
    keep_activations: bool  # a backward pass will follow: servers keep activations for it


@dataclass(frozen=True)
class _Extras:
    """Deep prompts and LoRA weights (detached) sent with each request of one forward/backward pass."""

    prompts: Optional[torch.Tensor]
    lora: Optional[LoraSet]
    adapter: Optional[str]
    keep_activations: bool = False


class _Gradients:
    """Sums the prompt and LoRA gradients that servers return, over hops and batch pieces."""

    def __init__(self, seq: "RemoteSequential", extras: _Extras):
        self.seq = seq
        self.prompts = None if extras.prompts is None else torch.zeros_like(extras.prompts, dtype=torch.float32)
        self.lora = {k: torch.zeros_like(t, dtype=torch.float32) for k, t in (extras.lora.to_flat().items() if extras.lora else [])}

    def add(self, span: BlockRange, rows: slice, reply: BackwardReply) -> None:
        if self.prompts is not None and reply.grad_prompts is not None:
            local = slice(span.start - self.seq.blocks.start, span.end - self.seq.blocks.start)
            if self.prompts.shape[1] == 1:
                self.prompts[local] += reply.grad_prompts.float()
            else:
                self.prompts[local, rows] += reply.grad_prompts.float()
        for key, grad in (reply.grad_lora or {}).items():
            if key in self.lora:
                self.lora[key] += grad.float()


def _rows(tensor: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[rows]


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, attention_mask, position_ids, prompts, seq: RemoteSequential, options: _Options,
                *lora_tensors):
        lora = None
        if options.lora_keys:
            flat = iter(t.detach().cpu() for t in lora_tensors)
            lora = LoraSet(options.lora_scaling, {key: (next(flat), next(flat)) for key in options.lora_keys})
        extras = _Extras(None if prompts is None else prompts.detach().cpu(), lora, options.adapter,
                         options.keep_activations)
        outputs, saved = seq.swarm.run(seq.run_forward(hidden_states.detach().cpu(), attention_mask, position_ids, extras))
        ctx.seq, ctx.saved, ctx.extras = seq, saved, extras
        ctx.mask, ctx.positions = attention_mask, position_ids
        ctx.input_dtype, ctx.input_device = hidden_states.dtype, hidden_states.device
        ctx.prompts_like = prompts
        ctx.lora_like = lora_tensors
        return outputs.to(device=hidden_states.device, dtype=hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        seq: RemoteSequential = ctx.seq
        grads = _Gradients(seq, ctx.extras)
        grad = seq.swarm.run(
            seq.run_backward(ctx.saved, grad_outputs.detach().cpu(), ctx.mask, ctx.positions, ctx.extras, grads)
        )
        grad_prompts = None
        if ctx.prompts_like is not None:
            grad_prompts = grads.prompts.to(device=ctx.prompts_like.device, dtype=ctx.prompts_like.dtype)
        grad_lora = []
        if ctx.extras.lora is not None:
            flat = grads.lora
            for key, like in zip([k for key in ctx.extras.lora.pairs for k in (f"{key}.lora_A", f"{key}.lora_B")],
                                 ctx.lora_like):
                grad_lora.append(flat[key].to(device=like.device, dtype=like.dtype))
        grad_inputs = grad.to(device=ctx.input_device, dtype=ctx.input_dtype)
        return (grad_inputs, None, None, grad_prompts, None, None, *grad_lora)
