"""Serving one stream: read the request, validate it, run it on the compute thread, reply.

Every failure a request causes becomes an ``ErrorReply`` on its own stream; nothing a client sends can
stop the server or disturb other streams.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from corolla.core.errors import BadRequestError, CorollaError
from corolla.server.activations import ActivationStore, Graph
from corolla.server.cache import CacheBudget
from corolla.server.config import ServerConfig
from corolla.server.sessions import SessionState, run_step
from corolla.models.lora import LoraSet, check_lora, lora_applied
from corolla.server.validation import (
    check_blocks,
    check_hidden,
    check_mask,
    check_positions,
    check_prompts,
    check_same_shape,
)
from corolla.wire.framing import read_message, write_message
from corolla.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ForwardReply,
    ForwardRequest,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    SessionOpened,
    SessionStep,
    SessionStepReply,
)

logger = logging.getLogger(__name__)


class ServerShuttingDownError(CorollaError):
    """The server is leaving the swarm and takes no new work."""


class RequestHandler:
    def __init__(
        self,
        stack,
        config: ServerConfig,
        budget: CacheBudget,
        compute: ThreadPoolExecutor,
        info: Callable[[], InfoReply],
        adapters: Optional[dict[str, LoraSet]] = None,
    ):
        self.stack = stack
        self.config = config
        self.budget = budget
        self.compute = compute
        self.info = info
        self.adapters: dict[str, LoraSet] = adapters or {}  # name -> LoRA weights for the held blocks
        self.activations = ActivationStore(config.activation_cache_bytes, config.activation_ttl_s)
        self.sessions: dict[str, SessionState] = {}
        self._session_writers: dict[str, asyncio.StreamWriter] = {}
        self.accepting = True
        self.in_flight = 0
        self.max_positions = getattr(stack.config, "max_position_embeddings", None)

    async def handle_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self.in_flight += 1
        try:
            try:
                request = await read_message(reader, self.config.max_message_bytes)
            except CorollaError as exc:
                await self._reply_error(writer, exc)
                return
            if request is None:
                return
            if not self.accepting:
                await self._reply_error(writer, ServerShuttingDownError("this server is shutting down; use another"))
                return
            try:
                if isinstance(request, OpenSession):
                    await self._serve_session(request, reader, writer)
                else:
                    await write_message(writer, await self._unary(request))
            except CorollaError as exc:
                await self._reply_error(writer, exc)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("stream from %s ended abruptly: %s", peer, exc)
        except Exception as exc:  # a bug of ours: report it to the client, keep serving
            logger.exception("request from %s failed", peer)
            await self._reply_error(writer, exc)
        finally:
            self.in_flight -= 1

    async def _reply_error(self, writer: asyncio.StreamWriter, exc: BaseException) -> None:
        kind = type(exc).__name__ if isinstance(exc, CorollaError) else "InternalServerError"
        try:
            await write_message(writer, ErrorReply(kind=kind, message=str(exc)))
        except (ConnectionError, RuntimeError):
            pass

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    # ---------------------------------------------------------------- unary requests

    async def _unary(self, request: Message) -> Message:
        if isinstance(request, InfoRequest):
            return self.info()
        if isinstance(request, ForwardRequest):
            lora = self._check_batch_request(request)
            return await self._run(self._forward, request, lora)
        if isinstance(request, BackwardRequest):
            lora = self._check_batch_request(request)
            check_same_shape("grad_outputs", request.grad_outputs, request.hidden_states)
            return await self._run(self._backward, request, lora)
        if isinstance(request, SessionStep):
            owner = "belongs to another stream" if request.session_id in self.sessions else "is not open here"
            raise BadRequestError(
                f"unknown session {request.session_id!r}: it {owner}; open one with OpenSession on this stream"
            )
        raise BadRequestError(f"{type(request).__name__} is not a request this server answers")

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

    def _inputs(self, request: ForwardRequest | BackwardRequest):
        device = self.stack.device
        batch, seq = request.hidden_states.shape[:2]
        mask = request.attention_mask
        mask = torch.ones(batch, seq, dtype=torch.long) if mask is None else mask.to(torch.long)
        positions = request.position_ids
        positions = None if positions is None else positions.to(device=device, dtype=torch.long)
        prompts = None if request.prompts is None else request.prompts.to(device)
        return request.hidden_states.to(device), mask.to(device), positions, prompts

    def _forward(self, request: ForwardRequest, lora: Optional[LoraSet]) -> ForwardReply:
        if request.keep_activations:
            graph = self._graph(request, lora)
            return ForwardReply(hidden_states=graph.outputs.detach(), activation_id=self.activations.put(graph))
        hidden, mask, positions, prompts = self._inputs(request)
        with torch.inference_mode(), lora_applied(self.stack, lora):
            outputs = self.stack(hidden, mask, positions, None, span=request.blocks, prompts=prompts)
        return ForwardReply(hidden_states=outputs)

    def _graph(self, request: ForwardRequest | BackwardRequest, lora: Optional[LoraSet]) -> Graph:
        """Run the request's forward pass with autograd, ready to differentiate w.r.t. its inputs, prompts and the
        client's LoRA weights (a server-loaded adapter gets no gradient)."""
        hidden, mask, positions, prompts = self._inputs(request)
        trained = request.lora is not None
        with torch.enable_grad():
            inputs = hidden.detach().requires_grad_(True)
            wrt = [inputs]
            if prompts is not None:
                prompts = prompts.detach().requires_grad_(True)
                wrt.append(prompts)
            if trained:
                lora = LoraSet(lora.scaling, {
                    k: (a.detach().to(self.stack.device).requires_grad_(True),
                        b.detach().to(self.stack.device).requires_grad_(True))
                    for k, (a, b) in lora.pairs.items()
                })
                wrt.extend(lora.tensors())
            with lora_applied(self.stack, lora):
                outputs = self.stack(inputs, mask, positions, None, span=request.blocks, prompts=prompts)
        return Graph(outputs, wrt, request.blocks, prompts is not None, list(lora.pairs) if trained else [],
                     size_bytes=self._activation_bytes(hidden, request.blocks))

    def _activation_bytes(self, hidden: torch.Tensor, blocks) -> int:
        """A generous estimate of what autograd keeps for ``hidden`` through ``blocks``."""
        config = self.stack.config
        width = 12 * config.hidden_size + 4 * getattr(config, "intermediate_size", 4 * config.hidden_size)
        return hidden.shape[0] * hidden.shape[1] * len(blocks) * width * hidden.element_size()

    def _backward(self, request: BackwardRequest, lora: Optional[LoraSet]) -> BackwardReply:
        graph = self.activations.take(request.activation_id) if request.activation_id else None
        if graph is not None and (graph.blocks != request.blocks or graph.outputs.shape != request.grad_outputs.shape):
            raise BadRequestError(
                f"activations {request.activation_id} are of blocks {graph.blocks} and shape "
                f"{list(graph.outputs.shape)}, not {request.blocks} and {list(request.grad_outputs.shape)}"
            )
        if graph is None:  # never kept, evicted, expired, or kept by another server: recompute
            graph = self._graph(request, lora)
        with torch.enable_grad():
            grads = torch.autograd.grad(graph.outputs, graph.wrt, request.grad_outputs.to(graph.outputs.device),
                                        allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, graph.wrt)]
        grad_lora = None
        if graph.lora_keys:
            lora_grads = iter(grads[len(grads) - 2 * len(graph.lora_keys):])
            grad_lora = {}
            for key in graph.lora_keys:
                grad_lora[f"{key}.lora_A"], grad_lora[f"{key}.lora_B"] = next(lora_grads), next(lora_grads)
        return BackwardReply(grad_inputs=grads[0], grad_prompts=grads[1] if graph.has_prompts else None,
                             grad_lora=grad_lora)

    # ---------------------------------------------------------------- inference sessions

    async def _serve_session(self, request: OpenSession, reader, writer) -> None:
        check_blocks(request.blocks, self.stack.blocks)
        if request.max_length < 1 or request.batch_size < 1:
            raise BadRequestError(
                f"max_length and batch_size must be >= 1, got {request.max_length} and {request.batch_size}"
            )
        if request.session_id in self.sessions:
            raise BadRequestError(f"session {request.session_id!r} is already open")
        if self.max_positions is not None and request.max_length > self.max_positions:
            raise BadRequestError(
                f"max_length {request.max_length} exceeds the model's {self.max_positions} positions"
            )
        lora = self._lora(request)
        if lora is not None and request.lora is not None:
            lora = LoraSet(lora.scaling, {k: (a.to(self.stack.device), b.to(self.stack.device))
                                          for k, (a, b) in lora.pairs.items()})
        session = SessionState(
            session_id=request.session_id,
            lora=lora,
            blocks=request.blocks,
            max_length=request.max_length,
            batch_size=request.batch_size,
            cache=self.stack.new_cache(request.blocks),
            mask=torch.zeros(request.batch_size, 0, dtype=torch.long, device=self.stack.device),
        )
        budget = self.budget
        budget.reserve(session.reserved_tokens)
        self.sessions[session.session_id] = session
        self._session_writers[session.session_id] = writer
        try:
            await write_message(writer, SessionOpened(session.session_id, session.reserved_tokens))
            await self._session_loop(session, self.stack, reader, writer)
        finally:
            del self.sessions[session.session_id]
            del self._session_writers[session.session_id]
            budget.release(session.reserved_tokens)

    def close_sessions(self) -> int:
        """End every open session by closing its stream; their clients fail over to other servers."""
        writers = list(self._session_writers.values())
        for writer in writers:
            writer.close()
        return len(writers)

    def replace_stack(self, stack, budget: CacheBudget, adapters: dict[str, LoraSet]) -> None:
        """Serve other blocks from now on (after a move); requests in flight keep the objects they started with."""
        self.stack = stack
        self.budget = budget
        self.adapters = adapters
        self.activations = ActivationStore(self.config.activation_cache_bytes, self.config.activation_ttl_s)
        self.max_positions = getattr(stack.config, "max_position_embeddings", None)

    async def _session_loop(self, session: SessionState, stack, reader, writer) -> None:
        while True:
            try:
                step = await asyncio.wait_for(
                    read_message(reader, self.config.max_message_bytes), self.config.session_idle_timeout_s
                )
            except asyncio.TimeoutError:
                await self._reply_error(
                    writer,
                    BadRequestError(
                        f"session {session.session_id} idle for {self.config.session_idle_timeout_s:.0f} s: closed"
                    ),
                )
                return
            except CorollaError as exc:
                await self._reply_error(writer, exc)
                continue
            if step is None:
                return
            if not self.accepting:
                await self._reply_error(writer, ServerShuttingDownError("this server is shutting down; use another"))
                return
            try:
                if not isinstance(step, SessionStep):
                    raise BadRequestError(f"expected SessionStep inside a session, got {type(step).__name__}")
                if step.session_id != session.session_id:
                    raise BadRequestError(
                        f"unknown session {step.session_id!r}: this stream holds session {session.session_id!r}"
                    )
                outputs = await self._run(
                    run_step,
                    stack,
                    session,
                    step.hidden_states,
                    step.attention_mask,
                    step.position_ids,
                    step.hypo_ids,
                    self.max_positions,
                    step.prompts,
                    step.start_from_position,
                )
                await write_message(writer, SessionStepReply(hidden_states=outputs, position=session.position))
            except CorollaError as exc:
                await self._reply_error(writer, exc)
