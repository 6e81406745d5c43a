"""``RemoteSequential``: the model's remote blocks as one differentiable, sliceable torch module."""
from __future__ import annotations

import asyncio
from typing import Optional

import torch
from torch import nn

from corolla.client.failures import describe_attempts, is_server_failure
from corolla.client.rpc import call_unary
from corolla.client.swarm import RemoteSwarm
from corolla.core.blocks import BlockRange
from corolla.core.errors import CorollaError
from corolla.core.records import ServerRecord
from corolla.wire.codec import dtype_from_name
from corolla.wire.messages import BackwardReply, BackwardRequest, ForwardReply, ForwardRequest

Hop = tuple[ServerRecord, BlockRange, torch.Tensor]  # a server, the blocks it ran, their inputs


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
        self.active_session = None  # set while a model-level inference session is open

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

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, model={self.swarm.model_prefix!r}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, seq, hidden] through every block, differentiable w.r.t. the input."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [batch, seq, hidden], got {list(hidden_states.shape)}")
        return _RemoteBlocksFunction.apply(hidden_states, attention_mask, position_ids, self)

    def inference_session(self, max_length: int):
        from corolla.client.session import InferenceSession

        return InferenceSession(self, max_length)

    # ---------------------------------------------------------------- remote calls

    def _pieces(self, batch: int, seq: int) -> list[slice]:
        rows = max(1, self.swarm.config.max_request_tokens // max(seq, 1))
        return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]

    async def _call(self, record, request, expected):
        return await call_unary(self.swarm.peer, record, request, expected, self.swarm.config.request_timeout_s)

    async def _forward_span(self, blocks: BlockRange, hidden, mask, positions) -> tuple[torch.Tensor, list[Hop]]:
        """Run ``blocks`` through servers chosen by throughput; a failed server's blocks go to another one.
        Returns the outputs and, per hop, (server, blocks, inputs) for the backward pass."""
        hops: list[Hop] = []
        attempts: list[tuple[str, str]] = []
        position = blocks.start
        while position < blocks.end:
            chain = await self.swarm.plan_batch(BlockRange(position, blocks.end))
            for record, span in chain:
                inputs = hidden.to(dtype_from_name(record.dtype))
                try:
                    reply = await self._call(record, ForwardRequest(span, inputs, mask, positions), ForwardReply)
                except Exception as exc:
                    self._handle_failure(record, span, exc, attempts)
                    break  # plan the remaining blocks again, without that server
                hops.append((record, span, inputs))
                hidden = reply.hidden_states
                position = span.end
        return hidden, hops

    async def _backward_span(self, record, span: BlockRange, inputs, grad, mask, positions, attempts=None):
        """d loss / d inputs of ``span``; if its server fails, recompute the span's forward on other servers and
        backpropagate through them instead."""
        attempts = [] if attempts is None else attempts
        try:
            request = BackwardRequest(span, inputs, grad.to(inputs.dtype), mask, positions)
            return (await self._call(record, request, BackwardReply)).grad_inputs
        except Exception as exc:
            self._handle_failure(record, span, exc, attempts)
        _, hops = await self._forward_span(span, inputs, mask, positions)
        for other, other_span, other_inputs in reversed(hops):
            grad = await self._backward_span(other, other_span, other_inputs, grad, mask, positions, attempts)
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

    async def run_forward(self, hidden, mask, positions):
        pieces = self._pieces(*hidden.shape[:2])
        results = await asyncio.gather(
            *(self._forward_span(self.blocks, hidden[p], _rows(mask, p), _rows(positions, p)) for p in pieces)
        )
        outputs = torch.cat([out for out, _ in results], dim=0)
        return outputs, (pieces, [hops for _, hops in results])

    async def _backward_piece(self, hops: list[Hop], grad, mask, positions):
        for record, span, inputs in reversed(hops):
            grad = await self._backward_span(record, span, inputs, grad, mask, positions)
        return grad

    async def run_backward(self, saved, grad, mask, positions):
        pieces, hops = saved
        grads = await asyncio.gather(
            *(
                self._backward_piece(piece_hops, grad[p], _rows(mask, p), _rows(positions, p))
                for p, piece_hops in zip(pieces, hops)
            )
        )
        return torch.cat(grads, dim=0)


def _rows(tensor: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[rows]


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, attention_mask, position_ids, seq: RemoteSequential):
        outputs, saved = seq.swarm.run(seq.run_forward(hidden_states.detach().cpu(), attention_mask, position_ids))
        ctx.seq, ctx.saved = seq, saved
        ctx.mask, ctx.positions = attention_mask, position_ids
        ctx.input_dtype, ctx.input_device = hidden_states.dtype, hidden_states.device
        return outputs.to(device=hidden_states.device, dtype=hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        seq: RemoteSequential = ctx.seq
        grad = seq.swarm.run(seq.run_backward(ctx.saved, grad_outputs.detach().cpu(), ctx.mask, ctx.positions))
        return grad.to(device=ctx.input_device, dtype=ctx.input_dtype), None, None, None
