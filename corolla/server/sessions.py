"""Inference sessions: the state a server keeps for each between steps, and the table of open sessions.

``SessionTable.open`` validates an ``OpenSession`` (its batch within ``CacheBudget.max_session_batch``) and makes it
hold its first page of cache (waiting, up to the budget's stated time, for room within its peer's opening share);
``grow`` makes a session hold the pages a step needs before the step runs; ``close`` frees them.
``SessionState.check_step`` validates a step against its session before any compute, so a rejected step leaves the
session usable.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, CacheExhaustedError, CorollaError
from corolla.models.lora import LoraSet
from corolla.server.cache import CacheBudget
from corolla.wire.validation import check_blocks, check_hidden, check_mask, check_positions, check_prompts
from corolla.wire.messages import OpenSession, SessionStep


class ServerBusyError(CorollaError):
    """A peer asked for more than its share of this server (streams, sessions, cache)."""


@dataclass(eq=False)  # identity: a session is a holder of cache pages
class SessionState:
    session_id: str
    blocks: BlockRange  # the span of this server's blocks the session runs
    max_length: int  # tokens the session may hold, declared by the client
    batch_size: int
    cache: Any  # the block stack's attention cache
    mask: torch.Tensor  # [batch, position]: 1 = token, 0 = padding, for everything cached so far
    lora: Optional[LoraSet] = None  # LoRA weights applied in every step (the client's, or a loaded adapter's)
    position: int = 0  # tokens cached so far
    relay_token: Optional[str] = None  # who presents it may push steps into this session (the previous hop)
    trail_key: Optional[str] = None  # signs this session's outputs in trails (only the client knows it too)
    last_step_time: float = 0.0  # when its last step arrived (time.monotonic())
    step_interval_s: Optional[float] = None  # moving average of the time between its steps' arrivals
    owner: str = ""  # the peer that opened it
    extra_tokens: int = 0  # what else it holds (its LoRA weights), counted in cache tokens
    last_step_index: Optional[int] = None  # the client's number of the last step applied
    inbox: Optional[asyncio.Queue] = None  # steps to run, from the client's stream or pushed by the previous hop

    def check_step(self, step: SessionStep, stack, max_positions: Optional[int],
                   max_step_tokens: Optional[int] = None) -> None:
        """Every check of a step against this session and the stack, before anything changes."""
        if step.session_id != self.session_id:
            raise BadRequestError(
                f"unknown session {step.session_id!r}: this stream holds session {self.session_id!r}"
            )
        hidden_states = step.hidden_states
        check_hidden("hidden_states", hidden_states, stack.hidden_size, stack.dtype)
        batch, new = hidden_states.shape[:2]
        if batch != self.batch_size:
            raise BadRequestError(f"step has batch {batch}, the session was opened with batch {self.batch_size}")
        start = self.position if step.start_from_position is None else step.start_from_position
        if not 0 <= start <= self.position:
            raise BadRequestError(
                f"start_from_position {start} is outside session {self.session_id}'s 0..{self.position} "
                "cached tokens: a session can only rewind"
            )
        if start + new > self.max_length:
            raise BadRequestError(
                f"a step of {new} tokens would bring session {self.session_id} to {start + new} tokens, "
                f"past its max_length of {self.max_length}"
            )
        if max_step_tokens is not None and batch * new > max_step_tokens:
            raise BadRequestError(
                f"a step of {batch} x {new} tokens is over this server's limit of {max_step_tokens} per step; split it"
            )
        check_mask("attention_mask", step.attention_mask, batch, new)
        check_positions(step.position_ids, batch, new, max_positions)
        check_prompts(step.prompts, self.blocks, batch, stack.hidden_size, stack.dtype)
        hypo_ids = step.hypo_ids
        if hypo_ids is not None:
            if list(hypo_ids.shape) != [batch] or hypo_ids.dtype not in (torch.int64, torch.int32):
                raise BadRequestError(f"hypo_ids must be an int64 tensor of shape [{batch}], got {list(hypo_ids.shape)}")
            if batch and (int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= batch):
                raise BadRequestError(f"hypo_ids must index rows 0..{batch - 1}")


def _lora_bytes(lora: Optional[LoraSet]) -> int:
    return 0 if lora is None else sum(t.numel() * t.element_size() for t in lora.tensors())


class SessionTable:
    """The sessions open on this server and the cache pages they hold."""

    def __init__(self, budget: CacheBudget, max_per_peer: int = 64):
        self.budget = budget
        self.max_per_peer = max_per_peer
        self.sessions: dict[str, SessionState] = {}

    async def open(self, request: OpenSession, stack, lora: Optional[LoraSet],
                   max_positions: Optional[int], owner: str = "") -> SessionState:
        check_blocks(request.blocks, stack.blocks)
        if request.max_length < 1 or request.batch_size < 1:
            raise BadRequestError(
                f"max_length and batch_size must be >= 1, got {request.max_length} and {request.batch_size}"
            )
        if request.session_id in self.sessions:
            raise BadRequestError(f"session {request.session_id!r} is already open")
        for name in ("relay_token", "trail_key"):
            secret = getattr(request, name)
            if secret is not None and not 16 <= len(secret) <= 200:
                raise BadRequestError(f"{name} must be 16..200 characters")
        if max_positions is not None and request.max_length > max_positions:
            raise BadRequestError(f"max_length {request.max_length} exceeds the model's {max_positions} positions")
        if sum(1 for s in self.sessions.values() if s.owner == owner) >= self.max_per_peer:
            raise ServerBusyError(f"you have {self.max_per_peer} sessions open here already, the most one peer may")
        whole = self.budget.tokens_for(request.max_length, request.batch_size)
        if whole > self.budget.total_tokens:
            raise CacheExhaustedError(
                f"a session of max_length {request.max_length} x batch {request.batch_size} ({whole} cache tokens) "
                f"exceeds this server's whole cache of {self.budget.total_tokens} tokens; ask for less"
            )
        if request.batch_size > self.budget.max_session_batch:  # its first page alone: a page for each row
            raise CacheExhaustedError(
                f"a session of batch {request.batch_size} would hold {self.budget.tokens_for(1, request.batch_size)} "
                f"cache tokens at its opening (a page of {self.budget.page_tokens} per row); this server opens "
                f"sessions of batch {self.budget.max_session_batch} at most (their first page within "
                f"{self.budget.opening_cap} of its {self.budget.total_tokens} tokens); ask for a smaller batch"
            )
        session = SessionState(
            session_id=request.session_id,
            lora=lora,
            blocks=request.blocks,
            max_length=request.max_length,
            batch_size=request.batch_size,
            cache=stack.new_cache(request.blocks, self.budget.page_tokens),
            mask=torch.zeros(request.batch_size, 0, dtype=torch.long, device=stack.device),
            relay_token=request.relay_token,
            trail_key=request.trail_key,
            inbox=asyncio.Queue(maxsize=4),
            owner=owner,
            extra_tokens=-(-_lora_bytes(lora) // max(1, self.budget.bytes_per_token)),  # its LoRA weights count too
        )
        self.sessions[session.session_id] = session
        try:
            first_page = self.budget.tokens_for(1, session.batch_size) + session.extra_tokens
            await self.budget.hold(session, first_page, owner=owner, opening=True)
        except BaseException:
            self.close(session)
            raise
        return session

    async def grow(self, session: SessionState, step: SessionStep) -> None:
        """Make ``session`` hold the pages it will after ``step`` (fewer after a rewind), waiting for room."""
        start = session.position if step.start_from_position is None else step.start_from_position
        tokens = max(1, start + step.hidden_states.shape[1])
        await self.budget.hold(session, self.budget.tokens_for(tokens, session.batch_size) + session.extra_tokens)

    def close(self, session: SessionState) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        self.budget.release(session)

    def arrived(self, session: SessionState) -> None:
        """A step of ``session`` arrived now: update its rhythm."""
        now = time.monotonic()
        if session.last_step_time:
            interval = now - session.last_step_time
            previous = session.step_interval_s
            session.step_interval_s = interval if previous is None else 0.7 * previous + 0.3 * interval
        session.last_step_time = now

    def company(self, items: list, window_s: float) -> int:
        """How many sessions other than those of ``items`` ((session, step) pairs about to run) are due to send a
        step within ``window_s``, by their own rhythm: the scheduler waits that long for them at most."""
        running = {session.session_id for session, _ in items}
        now = time.monotonic()
        count = 0
        for session in self.sessions.values():
            if session.session_id in running or session.step_interval_s is None:
                continue
            due = session.last_step_time + session.step_interval_s
            if now - 0.5 * session.step_interval_s < due <= now + window_s:  # due soon, or a little late
                count += 1
        return count

    def get(self, session_id: str) -> Optional[SessionState]:
        return self.sessions.get(session_id)

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions
