"""``RemoteSequential``: the model's remote blocks as one differentiable, sliceable torch module."""
from __future__ import annotations

import asyncio
from typing import Optional

import torch
from torch import nn

from corolla.client.rpc import call_unary
from corolla.client.swarm import RemoteSwarm
from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord
from corolla.wire.codec import dtype_from_name
from corolla.wire.messages import BackwardReply, BackwardRequest, ForwardReply, ForwardRequest

Chain = list[tuple[ServerRecord, BlockRange]]


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

    async def _forward_piece(self, chain: Chain, hidden, mask, positions) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = []
        for record, span in chain:
            hidden = hidden.to(dtype_from_name(record.dtype))
            inputs.append(hidden)
            request = ForwardRequest(span, hidden, attention_mask=mask, position_ids=positions)
            reply = await call_unary(self.swarm.peer, record, request, ForwardReply, self.swarm.config.request_timeout_s)
            hidden = reply.hidden_states
        return hidden, inputs

    async def _backward_piece(self, chain: Chain, inputs, grad, mask, positions) -> torch.Tensor:
        for (record, span), hidden in reversed(list(zip(chain, inputs))):
            grad = grad.to(hidden.dtype)
            request = BackwardRequest(span, hidden, grad, attention_mask=mask, position_ids=positions)
            reply = await call_unary(self.swarm.peer, record, request, BackwardReply, self.swarm.config.request_timeout_s)
            grad = reply.grad_inputs
        return grad

    async def run_forward(self, hidden, mask, positions):
        chain = await self.swarm.plan(self.blocks)
        pieces = self._pieces(*hidden.shape[:2])
        results = await asyncio.gather(
            *(
                self._forward_piece(chain, hidden[p], _rows(mask, p), _rows(positions, p))
                for p in pieces
            )
        )
        outputs = torch.cat([out for out, _ in results], dim=0)
        return outputs, (chain, pieces, [inputs for _, inputs in results])

    async def run_backward(self, saved, grad, mask, positions):
        chain, pieces, inputs = saved
        grads = await asyncio.gather(
            *(
                self._backward_piece(chain, piece_inputs, grad[p], _rows(mask, p), _rows(positions, p))
                for p, piece_inputs in zip(pieces, inputs)
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
