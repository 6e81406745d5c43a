"""``RequestHandlers``: the server's answer to each service of the table, one method per service name.

Each method validates its request against what this server holds, then queues the compute on the scheduler
(inference before training) and builds the reply. The dispatcher turns what they raise into ``ErrorReply``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from corolla.core.errors import BadRequestError, CorollaError
from corolla.models.lora import LoraSet, check_lora
from corolla.server.activations import ActivationStore
from corolla.server.cache import CacheBudget
from corolla.server.compute import BlockCompute
from corolla.server.config import ServerConfig
from corolla.server.scheduler import Priority, Scheduler
from corolla.server.sessions import SessionTable
from corolla.server.validation import check_blocks, check_hidden, check_mask, check_positions, check_prompts, \
    check_same_shape
from corolla.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    InfoReply,
    InfoRequest,
    OpenSession,
    SessionOpened,
    SessionStep,
    SessionStepReply,
)

logger = logging.getLogger(__name__)


class RequestHandlers:
    def __init__(self, stack, config: ServerConfig, budget: CacheBudget, scheduler: Scheduler,
                 info: Callable[[], InfoReply], adapters: Optional[dict[str, LoraSet]] = None):
        self.config = config
        self.scheduler = scheduler
        self._info = info
        self.replace_stack(stack, budget, adapters or {})

    def replace_stack(self, stack, budget: CacheBudget, adapters: dict[str, LoraSet]) -> None:
        """Serve other blocks from now on (after a move); requests in flight keep the objects they started with."""
        self.stack = stack
        self.adapters = adapters  # name -> LoRA weights for the held blocks
        self.compute = None if stack is None else BlockCompute(
            stack, ActivationStore(self.config.activation_cache_bytes, self.config.activation_ttl_s))
        self.sessions = SessionTable(budget)
        self.max_positions = None if stack is None else getattr(stack.config, "max_position_embeddings", None)

    # ---------------------------------------------------------------- single exchanges

    async def info(self, request: InfoRequest, peer: str) -> InfoReply:
        return self._info()

    async def forward(self, request: ForwardRequest, peer: str) -> ForwardReply:
        lora = self._check_batch_request(request)
        compute = self.compute
        return await self.scheduler.run(Priority.TRAINING, compute.forward, request, lora)

    async def backward(self, request: BackwardRequest, peer: str) -> BackwardReply:
        lora = self._check_batch_request(request)
        check_same_shape("grad_outputs", request.grad_outputs, request.hidden_states)
        compute = self.compute
        return await self.scheduler.run(Priority.TRAINING, compute.backward, request, lora)

    def _check_batch_request(self, request: ForwardRequest | BackwardRequest) -> Optional[LoraSet]:
        """Validate the request; returns the LoRA weights it asks for (validated once, here)."""
        check_blocks(request.blocks, self.stack.blocks)
        hidden = request.hidden_states
        check_hidden("hidden_states", hidden, self.stack.hidden_size, self.stack.dtype, self.config.max_batch_tokens)
        batch, seq = hidden.shape[:2]
        check_mask("attention_mask", request.attention_mask, batch, seq)
        check_positions(request.position_ids, batch, seq, self.max_positions)
        check_prompts(request.prompts, request.blocks, batch, self.stack.hidden_size, self.stack.dtype)
        return self._lora(request)

    def _lora(self, request) -> Optional[LoraSet]:
        """The LoRA weights a request asks for: its own (validated) or a server-loaded adapter's; None for neither."""
        if request.lora is not None and request.active_adapter is not None:
            raise BadRequestError("send either LoRA weights or active_adapter, not both")
        if request.lora is not None:
            lora = LoraSet.from_flat(request.lora, request.lora_scaling)
            check_lora(self.stack, lora, request.blocks)
            return lora
        if request.active_adapter is not None:
            adapter = self.adapters.get(request.active_adapter)
            if adapter is None:
                raise BadRequestError(
                    f"unknown adapter {request.active_adapter!r}; this server has {sorted(self.adapters) or 'none'}"
                )
            return adapter.for_blocks(request.blocks)
        return None

    # ---------------------------------------------------------------- inference sessions

    async def open_session(self, request: OpenSession, channel, peer: str) -> None:
        stack, compute, sessions = self.stack, self.compute, self.sessions  # a move replaces them; keep ours
        check_blocks(request.blocks, stack.blocks)
        lora = self._lora(request)
        if lora is not None and request.lora is not None:
            lora = LoraSet(lora.scaling, {k: (a.to(stack.device), b.to(stack.device))
                                          for k, (a, b) in lora.pairs.items()})
        session = sessions.open(request, stack, lora, self.max_positions)
        try:
            await channel.reply(SessionOpened(session.session_id, session.reserved_tokens))
            async for step in channel.steps():
                try:
                    session.check_step(step, stack, self.max_positions)
                    outputs = await self.scheduler.run(Priority.INFERENCE, compute.session_step, session, step)
                    await channel.reply(SessionStepReply(hidden_states=outputs, position=session.position))
                except CorollaError as exc:
                    await channel.error(exc)
        finally:
            sessions.close(session)

    def stray_step(self, step: SessionStep) -> BadRequestError:
        """The error for a step sent as the first message of a stream."""
        owner = "belongs to another stream" if step.session_id in self.sessions else "is not open here"
        return BadRequestError(
            f"unknown session {step.session_id!r}: it {owner}; open one with OpenSession on this stream"
        )

    def activations_kept(self) -> int:
        return 0 if self.compute is None else len(self.compute.activations)

