"""``RequestHandlers``: the server's answer to each service of the table, one method per service name.

Each method validates its request against what this server holds, then queues the compute on the scheduler
(inference before training) and builds the reply. The dispatcher turns what they raise into ``ErrorReply``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from typing import Callable, Optional

from corolla.core.errors import BadRequestError, CorollaError, SessionEvictedError
from corolla.models.lora import LoraSet, check_lora
from corolla.server.activations import ActivationStore
from corolla.server.cache import CacheBudget
from corolla.server.compute import BlockCompute
from corolla.server.config import ServerConfig
from corolla.server.relay import RelayLinks, Relays, relay_failure
from corolla.server.scheduler import Priority, Scheduler
from corolla.server.sessions import SessionTable
from corolla.wire.validation import check_blocks, check_hidden, check_mask, check_positions, check_prompts, \
    check_same_shape
from corolla.wire.compression import parse_codec
from corolla.wire.swarm_key import load_swarm_key
from corolla.wire.relay import check_trail, parse_route
from corolla.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    InfoReply,
    InfoRequest,
    OpenSession,
    RelayOpen,
    RelayOpened,
    SessionOpened,
    SessionStep,
    SessionStepReply,
)

logger = logging.getLogger(__name__)


class RequestHandlers:
    def __init__(self, stack, config: ServerConfig, budget: CacheBudget, scheduler: Scheduler,
                 info: Callable[[], InfoReply], transport, adapters: Optional[dict[str, LoraSet]] = None,
                 locate=None):
        self.config = config
        self.transport = transport  # to relay outputs to the next server of a chain
        self.swarm_key = load_swarm_key(config.swarm_key_path)
        # session steps, by where they came from; and the step replies sent
        self.counts = {"client_steps": 0, "relayed_in": 0, "relayed_out": 0, "answered": 0}
        self.scheduler = scheduler
        # to the next servers (``locate``: where each announces it can be dialled; see RelayLinks)
        self.relay_links = RelayLinks(transport, config.relay_timeout_s, self.swarm_key, locate)
        self._info = info
        self.replace_stack(stack, budget, adapters or {})

    def replace_stack(self, stack, budget: CacheBudget, adapters: dict[str, LoraSet]) -> None:
        """Serve other blocks from now on (after a move); requests in flight keep the objects they started with."""
        self.stack = stack
        self.adapters = adapters  # name -> LoRA weights for the held blocks
        self.compute = None if stack is None else BlockCompute(
            stack, ActivationStore(self.config.activation_cache_bytes, self.config.activation_ttl_s))
        self.sessions = SessionTable(budget, self.config.max_sessions_per_peer)
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
        parse_codec(request.wire_codec)
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
        """Run the session's steps, from its own stream or pushed by the previous server of its chain, in order;
        reply to each on the session's stream and forward the outputs when the step names next hops."""
        stack, compute, sessions = self.stack, self.compute, self.sessions  # a move replaces them; keep ours
        codec = parse_codec(request.wire_codec)
        check_blocks(request.blocks, stack.blocks)
        lora = self._lora(request)
        if lora is not None and request.lora is not None:
            lora = LoraSet(lora.scaling, {k: (a.to(stack.device), b.to(stack.device))
                                          for k, (a, b) in lora.pairs.items()})
        session = await sessions.open(request, stack, lora, self.max_positions, owner=peer)
        channel.codec = codec
        relays = Relays(self.relay_links, codec)
        watchers: set[asyncio.Task] = set()  # joins that relayed steps went behind, awaiting the next server's answer
        reader = asyncio.create_task(self._read_steps(channel, session.inbox))
        try:
            await channel.reply(SessionOpened(session.session_id, sessions.budget.held_by(session)))
            last_valid = time.monotonic()  # only a valid step that brings tokens keeps a session alive
            while True:
                left = self.config.session_idle_timeout_s - (time.monotonic() - last_valid)
                try:
                    async with asyncio.timeout(max(0.0, left)):
                        step = await session.inbox.get()
                except asyncio.TimeoutError:
                    await channel.end(SessionEvictedError(
                        f"session {session.session_id} idle for {self.config.session_idle_timeout_s:.0f} s: closed"))
                    return
                if step is None:  # the client closed its stream
                    return
                step, relayed = step
                self.counts["relayed_in" if relayed else "client_steps"] += 1
                try:
                    session.check_step(step, stack, self.max_positions, self.config.max_batch_tokens)
                    route = parse_route(step.next_hops, self.transport.peer_id)
                    trail, tags = check_trail(step, relayed)
                    if step.answer_last and route and session.trail_key is None:
                        raise BadRequestError("answer_last needs a session opened with a trail_key")
                    await sessions.grow(session, step)
                    sessions.arrived(session)
                    # a step from a client waits briefly for other sessions due to step (groups form where the
                    # clients' steps come in, each at its own time); a relayed one does not: it came in one write with
                    # its group, and the company it could wait for is still upstream
                    outputs = await self.scheduler.run_batched(
                        Priority.INFERENCE, ("steps", id(compute)), (session, step), compute.session_steps,
                        None if relayed else sessions.company,
                        rows=step.hidden_states.shape[0] * step.hidden_states.shape[1], knee=stack.rows_per_pass)
                    if relayed and step.answer_last:  # what reached this server joins the trail
                        trail[str(len(trail))] = step.hidden_states
                    # a step only the last server answers need not wait for the next server to accept this
                    # session's join: it follows the join, and a refusal is answered to the client below
                    joins: Optional[list] = [] if step.answer_last else None
                    relay_error = await relays.forward(step, outputs, route, trail, tags, session.trail_key,
                                                       joins) if route else None
                    self.counts["relayed_out"] += bool(route) and relay_error is None
                    answer = SessionStepReply(
                        hidden_states=outputs, position=session.position, step_index=step.step_index,
                        attempt=step.attempt, relay_error=relay_error, trail=trail or None,
                        trail_tags=tags if step.answer_last else None)
                    if not (route and step.answer_last and relay_error is None):  # else the last server answers
                        self.counts["answered"] += 1
                        await channel.reply(answer)
                    watchers = {watcher for watcher in watchers if not watcher.done()}
                    for next_server, join in joins or ():
                        watchers.add(asyncio.create_task(self._join_refused(channel, answer, next_server, join)))
                    # only a step that brings tokens is a sign of use: one of none costs its sender nothing, and sent
                    # now and then it kept a session, and the cache it holds, past the idle timeout for ever
                    if step.hidden_states.shape[1]:
                        last_valid = time.monotonic()
                except CorollaError as exc:
                    await channel.error(exc, step.step_index, step.attempt)
        finally:
            reader.cancel()
            for watcher in watchers:
                watcher.cancel()
            relays.close()
            sessions.close(session)
            session.inbox = None
            await asyncio.wait([reader])  # its read has ended before the dispatcher reads the stream again

    async def _join_refused(self, channel, answer: SessionStepReply, next_server: str, join: asyncio.Future) -> None:
        """If the next server refuses the join a relayed step went behind, it drops the step: the client hears it
        from this server, with the outputs, as if the relay had failed on the spot (and carries that link)."""
        try:
            async with asyncio.timeout(self.config.relay_timeout_s):
                refusal = await join
        except (asyncio.TimeoutError, asyncio.CancelledError):
            return  # no answer: the client's own timeouts judge the silent server
        if refusal is None:
            return
        self.counts["relayed_out"] -= 1
        self.counts["answered"] += 1
        try:
            await channel.reply(dataclasses.replace(answer, relay_error=relay_failure(next_server, refusal)))
        except (ConnectionError, CorollaError) as exc:  # the client is gone: nobody to tell
            logger.debug("session %s: the refused relay could not be reported: %s", answer.step_index, exc)

    @staticmethod
    async def _read_steps(channel, inbox: asyncio.Queue) -> None:
        """Move the steps of the session's own stream into its inbox; None when the client closes the stream, or
        when reading it failed: the session ends then, rather than wait for steps until its idle timeout."""
        try:
            async for step in channel.steps(idle_timeout_s=None):  # idleness is judged on the inbox
                await inbox.put((step, False))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug of ours: said once, as the session ends
            logger.exception("reading the steps of a session failed")
            await channel.error(exc)
        await inbox.put(None)

    async def relay(self, request: RelayOpen, channel, peer: str) -> None:
        """Another server pushes steps of sessions open here: the session it opened the stream for, and each one
        that joined the stream since with a ``RelayOpen`` (each presents the token the session's client gave). A
        step runs only in a session that joined this stream with the token the step names: the sender serves many
        clients, and one may name another's session with a token of its own, which is refused; the session's own
        join stays, usable only with its own token (so the refusal cannot cut the session's relay either)."""
        session = self._relay_target(request)
        await channel.reply(RelayOpened(session.session_id))
        joined = {session.session_id: session}
        # Idle for the session idle timeout with none of its sessions open (they closed, or were evicted), the stream
        # is closed: the sender leaves a session without a word (and opens a new stream when one is needed), so
        # streams nobody uses would stay, each holding a stream of its peer's and a descriptor here, forever.
        async for message in channel.steps(still_needed=lambda: any(s.inbox is not None for s in joined.values())):
            if isinstance(message, RelayOpen):
                try:
                    joiner = self._relay_target(message)
                except BadRequestError as exc:
                    await channel.answer_join(RelayOpened(message.session_id, refused=str(exc)))
                    continue
                for gone in [i for i, s in joined.items() if s.inbox is None]:  # only sessions still open stay
                    del joined[gone]
                joined[joiner.session_id] = joiner
                await channel.answer_join(RelayOpened(joiner.session_id))
                continue
            target = joined.get(message.session_id)
            if target is None or target.inbox is None:
                joined.pop(message.session_id, None)
                await channel.error(BadRequestError(
                    f"session {message.session_id!r} has not joined this relay stream, or has ended"))
                continue
            if not _same_token(target.relay_token, message.relay_token):
                await channel.error(BadRequestError(
                    f"session {message.session_id!r} did not join this relay stream with the token of step "
                    f"{message.step_index}: dropped"))
                continue
            try:  # never wait here: one session's full inbox must not hold up the others on this stream
                target.inbox.put_nowait((message, True))
            except asyncio.QueueFull:
                await channel.error(BadRequestError(
                    f"session {message.session_id!r} has {target.inbox.maxsize} steps waiting already: step "
                    f"{message.step_index} dropped"))

    def _relay_target(self, request: RelayOpen):
        """The open session ``request`` names, if its token is that session's relay token."""
        session = self.sessions.get(request.session_id)
        if session is None or session.inbox is None or not _same_token(session.relay_token, request.token):
            raise BadRequestError(
                f"no session {request.session_id!r} here accepts relays with that token (closed, or not relayed)")
        return session

    def stray_step(self, step: SessionStep) -> BadRequestError:
        """The error for a step sent as the first message of a stream."""
        owner = "belongs to another stream" if step.session_id in self.sessions else "is not open here"
        return BadRequestError(
            f"unknown session {step.session_id!r}: it {owner}; open one with OpenSession on this stream"
        )

    def activations_kept(self) -> int:
        return 0 if self.compute is None else len(self.compute.activations)


def _same_token(expected: Optional[str], presented: Optional[str]) -> bool:
    """Whether ``presented`` is a session's relay token ``expected`` (in constant time; a session without one
    accepts no relays)."""
    return expected is not None and presented is not None and \
        hmac.compare_digest(expected.encode(), presented.encode())
