"""``InferenceSession``: step-by-step inference through a chain of servers that keep attention caches.

Relay: the client sends a step to the first server of the chain with the route to the others; each server
forwards its outputs to the next one: a step costs one one-way delay per link instead of a round trip per server.
The client still learns every server's inputs (for replays) and outputs (for checks): a small step carries a
trail (each server adds what it received and signs its outputs), and only the last server answers, with all of
it; a long step is answered by every server, off the critical path. A server that cannot reach the next says so
in its answer, and the client carries that link itself.

Failover: when a server of the chain dies, drops the stream, errors or stays silent past the step timeout (in a
silent trail: the first server that does not answer a liveness probe), the session bans it, plans replacement
servers for exactly its blocks, replays to them every input that server had received in this session (rows as its
cache held them) so they rebuild its cache at the same positions, and continues the step from there. The caller
sees the same outputs as in an unbroken run. Replacements are planned on the view of the swarm the client holds.

Checks (``corolla.client.verify``): at the verify rate a span of the chain has its outputs computed again by other
servers, in a check session of their own for that span, fed what the span's server received since the last check.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from corolla.client.failures import describe_attempts, is_server_failure
from corolla.client.rpc import SessionStream, call
from corolla.client.verify import TOLERANCE, OutputsRejected, Verdict, check
from corolla.net.exchange import reply_limit
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError, CorollaError, RemoteError
from corolla.core.records import ServerRecord
from corolla.models.lora import LoraSet
from corolla.wire.codec import dtype_from_name, dtype_name
from corolla.wire.compression import recodes_exactly
from corolla.wire.messages import InfoRequest, OpenSession, SessionStep, SessionStepReply
from corolla.wire.relay import NextHop, encode_route, trail_tag
from corolla.wire.validation import all_finite

logger = logging.getLogger(__name__)


class SessionLengthError(ValueError):
    """A step would take the session past the ``max_length`` it was opened with (a ``ValueError``, as in Petals)."""


@dataclass(frozen=True)
class _History:
    """Every input a server has cached in this session, rows kept in the order of its cache.

    Kept as the list of steps (concatenated only for a replay), so a step costs no copy of the whole history.
    """

    steps: tuple = ()  # ((hidden [batch, new, hidden], mask [batch, new], positions [batch, new]), ...)

    @property
    def length(self) -> int:
        return sum(hidden.shape[1] for hidden, _, _ in self.steps)

    def reordered(self, hypo_ids: Optional[torch.Tensor]) -> "_History":
        if hypo_ids is None:
            return self
        return _History(tuple((h[hypo_ids], m[hypo_ids], p[hypo_ids]) for h, m, p in self.steps))

    def appended(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> "_History":
        return _History(self.steps + ((hidden, mask, positions),))

    def truncated(self, length: int) -> "_History":
        """The history of the first ``length`` tokens only (after the session rewinds)."""
        steps, kept = [], 0
        for hidden, mask, positions in self.steps:
            if kept >= length:
                break
            take = min(hidden.shape[1], length - kept)
            # a whole step stays the same objects: check sessions recognise it as inputs they already hold
            steps.append((hidden, mask, positions) if take == hidden.shape[1]
                         else (hidden[:, :take], mask[:, :take], positions[:, :take]))
            kept += take
        return _History(tuple(steps))

    def joined(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [batch, tokens, hidden], mask [batch, tokens], positions [batch, tokens]) of every step."""
        return tuple(torch.cat(parts, dim=1) for parts in zip(*self.steps))


TRAIL_MAX_ROWS = 32  # relayed steps of at most this many rows (batch x new tokens) are answered with a trail
PROBE_TIMEOUT_S = 2.0  # the most a liveness probe of a silent chain waits for each server


def _too_small(error: BaseException) -> bool:
    """Whether a server refused to open a session for want of cache (the session does not fit its whole cache, or
    its cache stayed full past its wait): its capacity, not a fault."""
    return isinstance(error, RemoteError) and error.kind == "CacheExhaustedError"


def _defaults_dropped(mask: torch.Tensor, positions: torch.Tensor, past: int) -> tuple:
    """A step's mask and positions as they travel: None where they are what a server assumes without them (every
    token real; positions past, past + 1, ... in every row), so a decode step's frames carry its hidden states alone
    (two tensors fewer to encode, check and decode at every server of the chain)."""
    batch, new = mask.shape
    if batch * new <= 64:  # (a small step: Python lists cost less than tensor ops)
        all_real = all(value == 1 for value in mask.reshape(-1).tolist())
        expected = list(range(past, past + new))
        default_positions = all(row == expected for row in positions.tolist())
    else:
        all_real = bool(mask.eq(1).all())
        default_positions = bool(positions.eq(torch.arange(past, past + new)).all())
    return (None if all_real else mask), (None if default_positions else positions)


@dataclass
class _SegmentResult:
    """What one send along a segment of the chain brought back."""

    outputs: list  # [(outputs, inputs as that hop received them, or None: as we sent them), ...] from its first hop
    error: Optional[BaseException] = None  # why the hop ``failed_after`` did not answer
    failed_after: int = 0  # that hop's place in the segment (0: its first hop), whether or not the outputs of the
    #                        hops before it are in ``outputs`` (a trail's are lost with it)
    relay_failed: bool = False  # the last hop that answered could not reach the next one


@dataclass
class _Hop:
    """This session at one server: the blocks it runs, its open stream, what it has cached."""

    record: ServerRecord
    span: BlockRange
    stream: SessionStream
    session_id: str  # this hop's id at its server: unique, since one server may run two spans of a session
    token: str = ""  # the relay token of this hop's session: the previous hop presents it to push steps here
    trail_key: str = ""  # the secret this hop's server signs its outputs with in a trail (only it and we know it)
    codec: str = "none"  # the wire codec of this hop's session (its replies, and the steps it relays)
    history: _History = field(default_factory=_History)
    relay_ok: bool = True  # False once this server failed to reach the next one: the client carries that link
    joined_at: int = 0  # the session's position when this server took over these blocks: its outputs count from there

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.record.dtype)


@dataclass
class _CheckSession:
    """Other servers running the blocks of one span of the chain, in a session of their own, to check the server
    that runs them: each check feeds them what that server received since the last check, so a check costs the
    tokens since then, not the whole history again."""

    span: BlockRange
    suspect: str  # the server of the chain whose outputs this checks
    hops: list  # _Hop of the checking servers (no relay: the client sends each its step)
    fed: tuple = ()  # the history steps the checking servers hold (the checked hop's own step objects)

    @property
    def peers(self) -> frozenset:
        return frozenset(hop.record.peer_id for hop in self.hops)

    def close(self) -> None:
        for hop in self.hops:
            hop.stream.close()


def _tokens_in_common(fed: tuple, steps: tuple) -> int:
    """Tokens at the start of a history (``steps``) that a check session was already fed (``fed``): the steps they
    share as the same objects (a rewind or a beam reordering makes new ones)."""
    common = 0
    for held, current in zip(fed, steps):
        if any(a is not b for a, b in zip(held, current)):
            break
        common += current[0].shape[1]
    return common


class InferenceSession:
    """A session over the blocks of a ``RemoteSequential``; use as a context manager.

    ``step(hidden_states)`` sends the new tokens' hidden states ([batch, new, hidden], ``new`` may be 0) and
    returns their outputs; the servers remember every earlier step of this session. The server streams are
    opened on the first step, when the batch size is known. At most ``max_length`` tokens in all.

    ``session.position`` is the number of tokens the servers hold; assigning a smaller value rewinds the session
    (the servers drop the later tokens with the next step, and a replacement server after a failover is rebuilt
    only up to it), as speculative decoding or regenerating an answer need. While the session is entered
    (``with ... as session``), the ``RemoteSequential`` (and the model) it belongs to run their calls through it.
    """

    def __init__(self, seq, max_length: int, lora=None, active_adapter: Optional[str] = None):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        positions = seq.swarm.max_positions
        if positions is not None and max_length > positions:  # every server would refuse it (and was banned for it)
            raise SessionLengthError(f"a session of max_length {max_length} exceeds the model's {positions} "
                                     "positions (max_position_embeddings)")
        self.seq = seq
        self.swarm = seq.swarm
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self._hop_ids = itertools.count()
        self._step_index = 0  # steps sent so far; every server of the chain sees a step under the same number
        self._position = 0  # tokens the servers hold for this session (after the next step's rewind, if any)
        self.batch_size: Optional[int] = None
        self.output_ids: Optional[torch.Tensor] = None  # token history, kept by the model's generate()
        self.ids_lost: Optional[str] = None  # why output_ids is None though the session holds tokens
        self.output_mask: Optional[torch.Tensor] = None  # its attention mask (0 = left padding)
        self.failovers = 0  # servers replaced during this session
        self.prefix_length = 0  # soft-prompt positions at the start of the session (prompt tuning)
        self.lora = None if lora is None else LoraSet(lora.scaling, {k: (a.detach().cpu(), b.detach().cpu())
                                                                      for k, (a, b) in lora.pairs.items()})
        self.active_adapter = active_adapter
        self._prompts: Optional[torch.Tensor] = None  # deep prompts [blocks, 1, prefix, hidden], for replays
        self._hops: Optional[list[_Hop]] = None
        self._closed = False
        self._entered_over: list = []  # the sessions that were active on ``seq`` before each __enter__
        self._broken: Optional[str] = None  # why, once a failed step left the servers out of step
        self._trails = True  # relayed small steps are answered by the last server only (False: by every server)
        self.fed_ids: Optional[torch.Tensor] = None  # token ids sent through the model's forward, when known
        self.fed_mask: Optional[torch.Tensor] = None
        # checking servers' outputs (corolla.client.verify)
        self._verify_rng = random.Random(self.swarm.config.verify_seed)
        self._checks: list = []  # (task, position after the checked step, peer id) still running
        self._check_sessions: dict[BlockRange, _CheckSession] = {}  # by the span of the chain they check
        self._check_locks: dict[BlockRange, asyncio.Lock] = {}
        self._checks_started = 0
        self._check_offset = self._verify_rng.randrange(1 << 16)
        self._avoid: set[str] = set()  # servers this session no longer trusts
        self.checks = {"run": 0, "agreed": 0, "caught": 0, "disputed": 0}
        self.rejections: list[tuple[int, Optional[str]]] = []  # (step number when caught, liar) of each rollback

    @property
    def position(self) -> int:
        """Tokens the servers hold for this session."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        """Rewind to ``value`` tokens (0 <= value <= position): later tokens are forgotten by the servers."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"position must be an int, got {type(value).__name__}")
        if not 0 <= value <= self._position:
            raise ValueError(
                f"a session can only rewind: position must be in 0..{self._position} (the tokens it holds), got {value}"
            )
        if 0 < value < self.prefix_length:
            raise ValueError(
                f"cannot rewind into the soft prompt (positions 0..{self.prefix_length - 1}): rewind to 0 to send it "
                f"again, or to {self.prefix_length} or later"
            )
        if value == self._position:
            return
        self._rewind(value)

    def _rewind(self, value: int) -> None:
        self._position = value
        for hop in self._hops or []:
            hop.joined_at = min(hop.joined_at, value)
            hop.history = hop.history.truncated(value)
        kept = max(0, value - self.prefix_length)  # tokens of the user's sequence the servers still hold
        if self.output_ids is not None:
            self.output_ids = self.output_ids[:, :kept]
            self.output_mask = self.output_mask[:, :kept]
        if self.fed_ids is not None:
            self.fed_ids = self.fed_ids[:, :kept]
            self.fed_mask = self.fed_mask[:, :kept]

    def inputs_held(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(hidden states [batch, tokens, hidden], mask, positions) of every token the servers hold: what the first
        server of the chain received, rows in its cache's order; None before the first step."""
        if not self._hops:
            return None
        history = self._hops[0].history.truncated(self._position)
        return history.joined() if history.length else None

    @property
    def chain(self) -> list[tuple[str, BlockRange]]:
        """``[(peer id, blocks), ...]`` of the servers currently running this session."""
        return [(hop.record.peer_id, hop.span) for hop in self._hops or []]

    # ---------------------------------------------------------------- public API

    def step(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        hypo_ids: Optional[torch.Tensor] = None,
        prompts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the new tokens' hidden states through every block; returns [batch, new, hidden].

        ``attention_mask`` ([batch, new], 1 = token, 0 = padding) and ``position_ids`` ([batch, new]) describe the
        new tokens only; ``hypo_ids`` ([batch]) reorders the rows cached so far first (beam search); ``prompts``
        ([blocks, 1, prefix, hidden], deep prompt tuning) are added at the session's first ``prefix`` positions.
        """
        if self._closed:
            raise RuntimeError("this inference session is closed")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [batch, new, hidden], got {list(hidden_states.shape)}")
        batch, new = hidden_states.shape[:2]
        if self.position + new > self.max_length:
            raise SessionLengthError(
                f"a step of {new} tokens would bring the session to {self.position + new} tokens, "
                f"past its max_length of {self.max_length}"
            )
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"this session has batch size {self.batch_size}, the step has {batch}")
        if self._broken is not None:
            raise CorollaError(f"this session broke in an earlier step ({self._broken}); open a new one")
        self.swarm.check_inputs(hidden_states, attention_mask, position_ids)
        if hypo_ids is not None and (list(hypo_ids.shape) != [batch] or hypo_ids.is_floating_point()
                                     or (batch and (int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= batch))):
            raise ValueError(f"hypo_ids must be {batch} integer row indices in 0..{batch - 1}")
        mask = torch.ones(batch, new, dtype=torch.long) if attention_mask is None else attention_mask.detach().cpu().long()
        if position_ids is None:
            position_ids = torch.arange(self.position, self.position + new).unsqueeze(0).expand(batch, new)
        positions = position_ids.detach().cpu().long()
        hypo = None if hypo_ids is None else hypo_ids.detach().cpu().long()
        if prompts is not None:
            self._prompts = prompts.detach().cpu()
        try:
            outputs = self.swarm.run(self._step(hidden_states.detach().cpu(), mask, positions, hypo))
        except BaseException as exc:
            self._abandon_step(exc, hypo is not None)
            raise
        self._position += new
        return outputs.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _abandon_step(self, error: BaseException, reordered: bool) -> None:
        """A step failed for good part-way along the chain: the servers it reached hold its tokens, the others do
        not. Without a beam reordering the step is rolled back (histories trimmed; the next step's
        ``start_from_position`` makes those servers drop the tokens); a reordering cannot be undone on the servers
        it reached, so the session is marked broken instead of being left half-advanced."""
        for hop in self._hops or []:
            if hop.history.length > self._position:
                if reordered:
                    self._broken = f"{type(error).__name__}: {error}"
                    return
                hop.history = hop.history.truncated(self._position)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        checking, self._check_sessions = list(self._check_sessions.values()), {}
        if self._hops or checking:
            hops, self._hops = self._hops or [], None

            async def _close():
                for hop in hops:
                    hop.stream.close()
                for session in checking:
                    session.close()

            self.swarm.run(_close(), 10)

    def __enter__(self) -> "InferenceSession":
        self._entered_over.append(self.seq.active_session)
        self.seq.active_session = self
        return self

    def __exit__(self, *exc) -> None:
        if self._entered_over:
            self.seq.active_session = self._entered_over.pop()
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- on the client's loop

    async def _step(self, hidden, mask, positions, hypo_ids) -> torch.Tensor:
        """Run one step through the chain: in relayed segments (the client sends to a segment's first server,
        every server forwards to the next, each answers the client) or hop by hop. A failed server is replaced
        (its inputs replayed) and the step goes on from it; servers after it may run the step a second time,
        which ``start_from_position`` and ``step_index`` make harmless."""
        if self._hops is None:
            self.batch_size = hidden.shape[0]
            self._hops = await self._open_chain(self.seq.blocks, _History())
        await self._collect_checks(wait=False)  # a caught lie sends the session back before it goes further
        self._step_index += 1
        past, attempt, index = self.position, 0, 0
        answered = []  # (hop, its outputs) of this step
        while index < len(self._hops):
            attempt += 1
            start, length = index, self._segment_length(index, past)
            result = await self._run_segment(start, length, hidden, mask, positions, hypo_ids, past, attempt)
            for output, received in result.outputs:  # the servers that answered: their histories gain this step
                hop = self._hops[index]
                self.swarm.report_success(hop.record.peer_id)  # a server that answers again starts its bans over
                received = hidden.to(hop.dtype) if received is None else received
                hop.history = hop.history.reordered(hypo_ids).appended(received, mask, positions)
                answered.append((hop, output))
                hidden = output
                index += 1
            if result.relay_failed:  # the last server that answered could not reach the next: we carry this link
                self._hops[index - 1].relay_ok = False
                continue
            if result.error is not None:
                if not is_server_failure(result.error):
                    raise result.error
                # (counted from the segment's first hop: ``index`` has moved past the hops that answered; a trail's
                # outputs are lost with it, and the step runs again from the start)
                failed = start + result.failed_after
                self._hops[failed : failed + 1] = await self._replace(self._hops[failed], result.error)
                if failed > 0:
                    self._hops[failed - 1].relay_ok = True  # a new link: worth trying
        if hypo_ids is None and answered and self._verify_rng.random() < self.swarm.config.verify_fraction:
            self._checks_started += 1  # the servers of the chain take turns, from a random one
            hop, output = answered[(self._checks_started + self._check_offset) % len(answered)]
            self._start_check(hop, output, past + hidden.shape[1], hidden.shape[1])
        return hidden

    # ---------------------------------------------------------------- checking servers' outputs

    def _start_check(self, hop: _Hop, claimed: torch.Tensor, position: int, new: int) -> None:
        """Have other servers compute ``hop``'s outputs of this step (in the background): its check session, fed
        what ``hop`` received since that session's last check."""
        history = hop.history  # as it stands now: later steps append to a new one
        spans = {h.span for h in self._hops or []}
        for span in [span for span in self._check_sessions if span not in spans]:  # a failover re-split the chain
            self._check_sessions.pop(span).close()
        extras = {"active_adapter": self.active_adapter,
                  "lora": None if self.lora is None else self.lora.for_blocks(hop.span)}
        if self._prompts is not None and history.length > 0:
            start = hop.span.start - self.seq.blocks.start
            extras["prompts"] = self._prompts[start: start + len(hop.span)]
        # outputs that came in a trail were cast to the next server's dtype: judge them at the coarser of the two
        dtype = max((hop.record.dtype, dtype_name(claimed.dtype)), key=lambda name: TOLERANCE.get(name, 1.0))
        task = asyncio.ensure_future(self._check(hop, history, claimed, extras, dtype, new))
        self._checks.append((task, position, hop.record.peer_id))
        self.checks["run"] += 1

    async def _check(self, hop: _Hop, history: _History, claimed: torch.Tensor, extras: dict, dtype: str,
                     new: int) -> Verdict:
        lock = self._check_locks.setdefault(hop.span, asyncio.Lock())
        async with lock:  # one check of a span at a time: its check session runs the steps in order
            try:
                second, (hidden, mask, positions) = await self._run_check_session(hop, history, new)
            except BlocksNotServedError:
                return Verdict(False, detail=f"no other server holds blocks {hop.span}")
            except Exception as exc:  # the checkers failed: nothing learned about the suspect
                return Verdict(False, detail=f"the check failed: {type(exc).__name__}: {exc}")
        return await check(self.swarm, hop.span, hop.record.peer_id, claimed, hidden, mask, positions, extras, dtype,
                           new, frozenset(self._avoid), like=hop.record, second=second)

    async def _run_check_session(self, hop: _Hop, history: _History, new: int) -> tuple[tuple, tuple]:
        """``(hop``'s outputs of its last ``new`` positions, who computed them``)``, from its span's check session
        (opened on servers other than it, as like it as failover's replacements, the first time or when the last
        one is unusable), fed the inputs it has not seen yet (from where its history and ``history`` part, at most
        ``new`` from the end); and ``history`` joined (hidden, mask, positions). Where no other server holds the
        span, ``BlocksNotServedError`` comes before ``history`` is joined (a copy of the whole history)."""
        span, suspect = hop.span, hop.record.peer_id
        excluded = self._avoid | {suspect}
        checking = self._check_sessions.pop(span, None)
        if checking is not None and (checking.suspect != suspect or checking.peers & excluded):
            checking.close()
            checking = None
        try:
            if checking is None:
                chain = await self.swarm.plan_inference(span, self.active_adapter, frozenset(excluded), wait=False,
                                                        like=hop.record, max_age_s=math.inf)
                checking = _CheckSession(span, suspect, [])
                for record, part in chain:
                    checking.hops.append(await self._open_hop(record, part, in_chain=False))
            hidden, mask, positions = history.joined()
            total = hidden.shape[1]
            start = min(_tokens_in_common(checking.fed, history.steps), total - new)
            piece = max(1, self.swarm.config.max_request_tokens // max(1, hidden.shape[0]))
            outputs = []
            for begin in range(start, total, piece):  # a first feed of a long history goes in pieces
                end = min(total, begin + piece)
                x = hidden[:, begin:end]
                timeout_s = self.swarm.config.step_timeout_s + (end - begin) * self.swarm.config.token_timeout_s
                for checker in checking.hops:
                    step = SessionStep(checker.session_id, x.to(checker.dtype), attention_mask=mask[:, begin:end],
                                       position_ids=positions[:, begin:end], prompts=self._hop_prompts(checker, begin),
                                       start_from_position=begin)
                    reply = await checker.stream.step(step, timeout_s)
                    self._check_reply(checker, reply, x.shape, begin)
                    x = reply.hidden_states
                outputs.append(x)
            checking.fed = history.steps
        except BaseException:  # its servers' state is unknown (a failure, or this check cancelled): not reused
            if checking is not None:
                checking.close()
            raise
        if self._closed:  # the session ended while this check ran
            checking.close()
        else:
            self._check_sessions[span] = checking
        return (torch.cat(outputs, dim=1)[:, -new:], checking.peers), (hidden, mask, positions)

    def settle(self) -> None:
        """Wait for the checks still running; raises ``OutputsRejected`` (the session gone back) if one caught a lie."""
        if self._checks and not self._closed:
            self.swarm.run(self._collect_checks(wait=True))

    async def _collect_checks(self, wait: bool) -> None:
        """Take the verdicts of finished checks (all of them with ``wait``), in order; on a lie, go back."""
        while self._checks:
            task, position, suspect = self._checks[0]
            if not task.done() and not wait:
                return
            self._checks.pop(0)
            try:
                verdict = await task
            except Exception as exc:  # the check itself failed: nothing learned
                logger.debug("a check of %s failed: %s", suspect, exc)
                continue
            if verdict.checked and not verdict.liar and not verdict.disputed:
                self.checks["agreed"] += 1
                continue
            if not verdict.checked:
                continue
            await self._reject(verdict, suspect)

    async def _reject(self, verdict, suspect: str) -> None:
        """Outputs were caught wrong: distrust (or ban) the culprit, go back to where it joined the session (none of
        its outputs can be trusted, checked or not), on other servers, and tell the caller (``OutputsRejected``)."""
        for task, _, _ in self._checks:
            task.cancel()
        self._checks.clear()
        culprit = verdict.liar or suspect
        if verdict.liar:
            self.checks["caught"] += 1
            self.swarm.ban_liar(verdict.liar)
        else:
            self.checks["disputed"] += 1
            logger.warning("servers disagree on outputs of %s (%s): not using it in this session", suspect,
                           verdict.detail)
        self._avoid.add(culprit)
        self.rejections.append((self._step_index, verdict.liar))
        joined = [hop.joined_at for hop in self._hops or [] if hop.record.peer_id == culprit]
        target = min(joined, default=self._position)
        if 0 < target < self.prefix_length:
            target = 0
        self._rewind(target)
        hops = self._hops or []
        for index in reversed(range(len(hops))):  # from the end: a replacement of several hops shifts only later ones
            hop = hops[index]
            if hop.record.peer_id == culprit:
                hop.stream.close()
                hops[index: index + 1] = await self._open_chain(hop.span, hop.history, max_age_s=math.inf)
        raise OutputsRejected(target, verdict.liar)

    def _segment_length(self, index: int, past: int) -> int:
        """How many servers from ``index`` on one relayed send reaches (1: the client sends to each itself). A
        segment names each server once (servers refuse a route that loops): a chain that visits a server twice
        (two spans of it, another server's between) starts a new segment at its second visit."""
        if not self.swarm.config.relay or (self._prompts is not None and past < self._prompts.shape[2]):
            return 1  # deep prompts differ per server: those first steps go hop by hop
        end, peers = index + 1, {self._hops[index].record.peer_id}
        while end < len(self._hops) and self._hops[end - 1].relay_ok and \
                self._hops[end - 1].codec in self._hops[end].record.codecs and \
                self._hops[end].record.peer_id not in peers:
            peers.add(self._hops[end].record.peer_id)
            end += 1
        return end - index

    def _hop_prompts(self, hop: _Hop, past: int) -> Optional[torch.Tensor]:
        """This hop's deep prompts, only when the step reaches positions the prompts cover."""
        if self._prompts is None or past >= self._prompts.shape[2]:
            return None
        start = hop.span.start - self.seq.blocks.start
        return self._prompts[start : start + len(hop.span)].to(hop.dtype)

    async def _run_segment(self, index: int, length: int, hidden, mask, positions, hypo_ids, past: int,
                           attempt: int) -> "_SegmentResult":
        """Send the step to hop ``index`` with the route to the next ``length - 1`` hops; collect their outputs: each
        hop's answer, or (a trail: small steps) the last hop's answer with all of them."""
        hops = self._hops[index : index + length]
        first = hops[0]
        # (int8 blocks cannot carry a trail compressed: with them every server answers, each answer compressed)
        trail = length > 1 and self._trails and hidden.shape[0] * hidden.shape[1] <= TRAIL_MAX_ROWS \
            and all(recodes_exactly(hop.codec) for hop in hops)
        route = [NextHop(h.record.peer_id, h.session_id, h.token, h.record.dtype, tuple(h.record.maddrs)) for h in hops[1:]]
        wire_mask, wire_positions = _defaults_dropped(mask, positions, past)
        step = SessionStep(first.session_id, hidden.to(first.dtype), attention_mask=wire_mask,
                           position_ids=wire_positions, hypo_ids=hypo_ids, prompts=self._hop_prompts(first, past),
                           start_from_position=past,
                           step_index=self._step_index, attempt=attempt, next_hops=encode_route(route),
                           answer_last=trail)
        timeout_s = self.swarm.config.step_timeout_s + hidden.shape[1] * self.swarm.config.token_timeout_s
        if trail:
            return await self._run_trail(hops, step, hidden.shape, past, timeout_s)
        limit = reply_limit(step)  # every answer holds hidden states of the step's shape
        outputs = []
        previous = time.perf_counter()
        for position, hop in enumerate(hops):
            try:
                if position == 0:
                    await hop.stream.send(step, codec=first.codec)
                reply = await hop.stream.receive(timeout_s, self._step_index, attempt, limit)
                self._check_reply(hop, reply, hidden.shape, past)
            except Exception as exc:
                hop.stream.close()  # after a timeout or a broken stream its state is unknown: never reuse it
                return _SegmentResult(outputs, exc, len(outputs))
            arrived = time.perf_counter()
            if hidden.shape[0] * hidden.shape[1] <= 4:  # a decode step: its time measures the server's speed
                # the first answer took a round trip; each later one, about one link after the one before
                links = self.swarm.latency_s.get(hop.record.peer_id, 0.0) * (1.0 if position == 0 else 0.5)
                self.swarm.speeds.observe(hop.record.peer_id, len(hop.span), max(0.0, arrived - previous - links))
            previous = arrived
            outputs.append((reply.hidden_states, None))
            if reply.relay_error is not None and position < len(hops) - 1:
                logger.info("server %s could not relay: %s", hop.record.peer_id, reply.relay_error)
                return _SegmentResult(outputs, relay_failed=True)
        return _SegmentResult(outputs)

    async def _run_trail(self, hops: list[_Hop], step: SessionStep, shape, past: int,
                         timeout_s: float) -> "_SegmentResult":
        """A relayed step only the last hop answers, with every hop's outputs in its trail. Meanwhile each hop's
        stream is watched for an error, a failed relay or a broken stream. Silence for a hop's step timeout sends
        each hop a liveness probe: the first that does not answer it is the one that stalled. A trail that does
        not check out, or silence past every hop's timeout, turns trails off for this session and runs the step
        again, each hop answering (whose timeouts then name a slow server)."""
        started = time.perf_counter()
        try:
            await hops[0].stream.send(step, codec=hops[0].codec)
        except Exception as exc:
            hops[0].stream.close()
            return _SegmentResult([], exc, 0)
        limit = reply_limit(step) * len(hops)  # the last answer holds every hop's hidden states
        for hop in hops:
            hop.stream.limit = limit
        futures = {hop.stream.next_message(): position for position, hop in enumerate(hops)}
        probe_at, give_up = started + timeout_s, started + timeout_s * len(hops)
        while True:
            done, _ = await asyncio.wait(list(futures), timeout=max(0.0, probe_at - time.perf_counter()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                now = time.perf_counter()
                if now >= give_up:
                    logger.info("a trail got no answer within %.1f s, though every server is alive: each server "
                                "answers from now on", now - started)
                    self._trails = False
                    return _SegmentResult([])
                stalled = await self._probe(hops, min(timeout_s, PROBE_TIMEOUT_S))
                if stalled is not None:
                    hops[stalled].stream.close()
                    return _SegmentResult([], RemoteError(
                        "Timeout", f"no answer within {now - started:.1f} s, nor to a liveness probe",
                        hops[stalled].record.peer_id), stalled)
                probe_at = min(give_up, time.perf_counter() + timeout_s)
                continue
            for future in sorted(done, key=futures.get):
                position = futures.pop(future)
                hop = hops[position]
                try:
                    reply = hop.stream.take(future)
                    if hop.stream.is_stale(reply, step.step_index, step.attempt):
                        futures[hop.stream.next_message()] = position
                        continue
                    reply = hop.stream.checked(reply)
                    self._check_reply(hop, reply, shape, past)
                except Exception as exc:
                    hop.stream.close()
                    return _SegmentResult([], exc, position)
                if position < len(hops) - 1 and reply.relay_error is None:
                    futures[hop.stream.next_message()] = position  # answered though a later hop should: ignored
                    continue
                try:
                    outputs = self._read_trail(hops[: position + 1], reply, step)
                except RemoteError as exc:
                    logger.warning("%s: each server answers from now on", exc)
                    self._trails = False
                    return _SegmentResult([])
                if position == len(hops) - 1:
                    arrived = time.perf_counter()
                    if shape[0] * shape[1] <= 4:  # a decode step: the servers' speed, shared by their blocks
                        links = 0.5 * sum(self.swarm.latency_s.get(h.record.peer_id, 0.0) for h in hops) \
                            + 0.5 * self.swarm.latency_s.get(hops[-1].record.peer_id, 0.0)
                        per_block = max(0.0, arrived - started - links) / sum(len(h.span) for h in hops)
                        for h in hops:
                            self.swarm.speeds.observe(h.record.peer_id, len(h.span), per_block * len(h.span))
                    return _SegmentResult(outputs)
                logger.info("server %s could not relay: %s", hop.record.peer_id, reply.relay_error)
                return _SegmentResult(outputs, relay_failed=True)

    def _read_trail(self, hops: list[_Hop], reply: SessionStepReply, step: SessionStep) -> list:
        """[(outputs, inputs of the hop), ...] of ``hops``, from the trail of the last one's ``reply``: each entry
        the right shape and dtype, finite, and signed by the hop that produced it; ``RemoteError`` otherwise."""
        trail, tags = reply.trail or {}, reply.trail_tags if reply.trail_tags is not None else []
        sender = hops[-1].record.peer_id
        if set(trail) != {str(i) for i in range(len(hops) - 1)} or not isinstance(tags, list) \
                or len(tags) != len(hops) - 1:
            raise RemoteError("ForgedTrail", f"the trail holds {sorted(trail)[:8]} with {len(tags)} tags; expected "
                              f"{len(hops) - 1} of each", sender)
        inputs = [None]
        for i, hop in enumerate(hops[:-1]):
            entry, following = trail[str(i)], hops[i + 1]
            if entry.dtype != following.dtype or entry.shape != step.hidden_states.shape \
                    or not all_finite(entry):
                raise RemoteError("ForgedTrail", f"trail entry {i} is {entry.dtype} {list(entry.shape)} or not finite",
                                  sender)
            expected = trail_tag(hop.trail_key, hop.session_id, step.step_index, step.attempt, entry)
            if not isinstance(tags[i], str) or not hmac.compare_digest(tags[i].encode(), expected.encode()):
                raise RemoteError("ForgedTrail", f"the outputs of {hop.record.peer_id} in the trail are not the ones "
                                  "it signed", sender)
            inputs.append(entry)
        outputs = inputs[1:] + [reply.hidden_states]
        return list(zip(outputs, inputs))

    async def _probe(self, hops: list[_Hop], timeout_s: float) -> Optional[int]:
        """The position of the first of ``hops`` that does not answer a liveness probe within ``timeout_s``."""
        results = await asyncio.gather(*(call(self.swarm.transport, hop.record, InfoRequest(), timeout_s,
                                              swarm_key=self.swarm.config.swarm_key) for hop in hops),
                                       return_exceptions=True)
        return next((position for position, result in enumerate(results) if isinstance(result, BaseException)), None)

    @staticmethod
    def _check_reply(hop: _Hop, reply: SessionStepReply, shape, past: int) -> None:
        if reply.position != past + shape[1] or reply.hidden_states.shape != shape:
            raise RemoteError(
                "ProtocolError",
                f"the step reply holds {list(reply.hidden_states.shape)} at position {reply.position}; expected "
                f"{list(shape)} at {past + shape[1]}",
                hop.record.peer_id,
            )

    async def _replay(self, hop: _Hop, hidden, mask, positions) -> torch.Tensor:
        """Send a new server every input its predecessor had received, in one step from position 0."""
        timeout_s = self.swarm.config.step_timeout_s + hidden.shape[1] * self.swarm.config.token_timeout_s
        step = SessionStep(hop.session_id, hidden.to(hop.dtype), attention_mask=mask, position_ids=positions,
                           prompts=self._hop_prompts(hop, 0), start_from_position=0)
        try:
            reply = await hop.stream.step(step, timeout_s, codec=hop.codec)
            self._check_reply(hop, reply, hidden.shape, 0)
        except BaseException:
            hop.stream.close()
            raise
        return reply.hidden_states

    async def _open_hop(self, record: ServerRecord, span: BlockRange, in_chain: bool = True) -> _Hop:
        """This session opened at ``record``'s server for ``span``, with the session's LoRA weights and adapter: as a
        hop of the chain (a relay token, a trail key, the wire codec chosen for that server), or as a checking
        server's (``in_chain=False``: the client sends it each step itself, exactly)."""
        lora = None if self.lora is None else self.lora.for_blocks(span)
        hop_id = f"{self.session_id}.{'' if in_chain else 'check.'}{next(self._hop_ids)}"
        token, trail_key = (secrets.token_hex(16), secrets.token_hex(16)) if in_chain else ("", "")
        codec = self.swarm.codec_for(record) if in_chain else "none"
        request = OpenSession(
            hop_id, span, self.max_length, self.batch_size,
            lora={k: t.to(dtype_from_name(record.dtype)) for k, t in lora.to_flat().items()} or None
            if lora is not None else None,
            lora_scaling=1.0 if lora is None else lora.scaling,
            active_adapter=self.active_adapter,
            relay_token=token or None,
            wire_codec=codec,
            trail_key=trail_key or None,
        )
        stream = await SessionStream.open(self.swarm.transport, record, request, self.swarm.config.step_timeout_s,
                                          swarm_key=self.swarm.config.swarm_key)
        return _Hop(record, span, stream, hop_id, token, trail_key, codec)

    async def _open_chain(self, blocks: BlockRange, history: _History, max_age_s: Optional[float] = None) -> list[_Hop]:
        """Open this session on a chain of servers for ``blocks`` and replay ``history`` (inputs of ``blocks``)
        through it; retries other servers on failure. Planned on a view of the swarm at most ``max_age_s`` old
        (default: the refresh period). With no history to replay, the servers open at once: one round trip for the
        chain, not one per server."""
        attempts: list[tuple[str, str]] = []
        full: set[str] = set()  # servers whose whole cache is too small for this session: no fault, no use

        def failed_at(peer_id: str, error: Exception) -> None:
            attempts.append((peer_id, f"{type(error).__name__}: {error}"))
            if _too_small(error):  # a capacity, not a fault: not banned, only not asked again for this session
                full.add(peer_id)  # (and tried last by the next sessions for a while)
                self.swarm.report_full(peer_id)
            else:
                self.swarm.report_failure(peer_id)

        for _ in range(self.swarm.config.max_retries + 1):
            chain = None
            recently_full = self.swarm.recently_full() - full - self._avoid
            if recently_full:  # servers that had no cache for another session a moment ago: others first
                try:
                    chain = await self.swarm.plan_inference(blocks, self.active_adapter,
                                                            frozenset(self._avoid | full | recently_full), wait=False,
                                                            max_age_s=max_age_s)
                except BlocksNotServedError:
                    chain = None  # only they serve some blocks: they are asked again below
            try:
                # once a server said the session cannot fit it, waiting for other servers would hide why
                chain = chain or await self.swarm.plan_inference(blocks, self.active_adapter,
                                                                 frozenset(self._avoid | full), wait=not full,
                                                                 max_age_s=max_age_s)
            except BlocksNotServedError as exc:
                if not full:
                    raise
                raise CorollaError(f"no server can hold session {self.session_id[:8]} of max_length "
                                   f"{self.max_length} for blocks {blocks}: {describe_attempts(attempts)} ({exc})") \
                    from None
            started = time.perf_counter()
            hops: list[_Hop] = []
            replay = history.joined() if history.length else None
            current = None
            try:
                if replay is None and len(chain) > 1:  # nothing to replay: no server waits for another to open
                    opened = await asyncio.gather(*(self._open_hop(record, span) for record, span in chain),
                                                  return_exceptions=True)
                    hops = [hop for hop in opened if isinstance(hop, _Hop)]
                    failed = [(record, exc) for (record, _), exc in zip(chain, opened) if not isinstance(exc, _Hop)]
                    for record, exc in failed[1:]:  # every server that failed is at fault, not only the first
                        if isinstance(exc, Exception) and is_server_failure(exc):
                            failed_at(record.peer_id, exc)
                    if failed:
                        current = failed[0][0]
                        raise failed[0][1]
                for record, span in chain[len(hops):]:
                    current = record
                    hop = await self._open_hop(record, span)
                    hops.append(hop)
                    if replay is not None:
                        hidden, mask, positions = replay
                        outputs = await self._replay(hop, hidden, mask, positions)
                        hop.history = _History(((hidden.to(hop.dtype), mask, positions),))
                        replay = (outputs, mask, positions)
                for hop in hops:
                    hop.joined_at = history.length
                return hops
            except Exception as exc:
                for hop in hops:
                    hop.stream.close()
                if not is_server_failure(exc):
                    raise
                logger.info("opening blocks %s on %s failed after %.2f s (%s: %s); trying other servers", blocks,
                            current.peer_id, time.perf_counter() - started, type(exc).__name__, exc)
                failed_at(current.peer_id, exc)
        raise CorollaError(
            f"could not run blocks {blocks} of session {self.session_id[:8]} after {len(attempts)} attempts: "
            f"{describe_attempts(attempts)}"
        )

    async def _replace(self, failed: _Hop, error: BaseException) -> list[_Hop]:
        """New servers for ``failed``'s blocks, rebuilt with its history (rows as its cache held them before the
        current step, which then runs on them like on any other server)."""
        logger.warning("server %s failed for blocks %s (%s: %s); replacing it",
                       failed.record.peer_id, failed.span, type(error).__name__, error)
        if not (isinstance(error, RemoteError) and error.kind == "SessionEvictedError"):  # eviction is no fault
            self.swarm.report_failure(failed.record.peer_id)
        self.failovers += 1
        started = time.perf_counter()
        # planned on the view the background refresh keeps: a DHT lookup does not delay the next token
        hops = await self._open_chain(failed.span, failed.history, max_age_s=math.inf)
        logger.info("blocks %s now on %s, %d tokens replayed, in %.2f s", failed.span,
                    ", ".join(f"{hop.record.peer_id} ({hop.span})" for hop in hops), failed.history.length,
                    time.perf_counter() - started)
        return hops
