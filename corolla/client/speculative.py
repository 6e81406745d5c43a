"""Speculative decoding through the swarm: a small local model drafts, the swarm checks every draft in one step.

Each round the draft model proposes ``k`` tokens one by one; one inference step sends the last accepted token and
the ``k`` drafts through the remote blocks and returns the target's logits at all ``k + 1`` positions. Drafts are
accepted up to the first one the target disagrees with; the session then rewinds past the rejected tail
(``session.position = ...``, which the servers apply with the next step), so nothing but the accepted tokens
stays in the servers' caches.

- Greedy: a draft is accepted when it is the target's argmax; the output equals plain greedy decoding.
- Sampling: the standard speculative sampling rule (accept ``x ~ q`` with probability ``min(1, p(x) / q(x))``,
  on rejection sample from ``max(0, p - q)`` normalized, after ``k`` acceptances sample one more token from the
  target), so every token is distributed exactly as the target's (processed) distribution.
- ``k`` adapts: the acceptance rate and the costs of a draft token and of a verification step are measured as
  generation goes, and each round takes the ``k`` that maximizes expected tokens per second.

The logits processors and stopping criteria are transformers' own, built from the generation config exactly as
``generate()`` builds them, and applied at every position with the context that position has.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache

from corolla.client.verify import OutputsRejected

def accept_drafts(
    target_probs: Optional[torch.Tensor],  # [k + 1, vocab] (sampling) or None (greedy)
    target_choice: torch.Tensor,  # [k + 1] argmax of the processed target logits (greedy)
    draft_probs: Optional[torch.Tensor],  # [k, vocab] (sampling) or None (greedy)
    drafts: torch.Tensor,  # [k] the draft tokens
    generator: Optional[torch.Generator] = None,
) -> tuple[int, int]:
    """How many drafts to accept and the token that follows them: ``(m, token)``, ``0 <= m <= k``.

    With ``target_probs`` None this is greedy verification; otherwise speculative sampling, which makes the
    returned tokens follow ``target_probs`` exactly whatever ``draft_probs`` are.
    """
    k = drafts.shape[0]
    if target_probs is None:
        for i in range(k):
            if int(target_choice[i]) != int(drafts[i]):
                return i, int(target_choice[i])
        return k, int(target_choice[k])
    for i in range(k):
        token = int(drafts[i])
        p, q = float(target_probs[i, token]), float(draft_probs[i, token])
        if q > 0 and torch.rand((), generator=generator).item() * q < p:  # accept with probability min(1, p / q)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)  # [vocab]
        if float(residual.sum()) <= 0:  # only rounding can get here (a rejection needs p < q somewhere)
            residual = target_probs[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Mean tokens one round of ``k`` drafts yields (accepted drafts plus the correction or bonus token)."""
    if acceptance >= 1:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


@dataclass
class DraftLength:
    """Chooses the number of draft tokens per round from what it has measured so far.

    With acceptance rate ``a`` a round of ``k`` drafts yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average and
    costs ``k * draft_s + verify_s(k + 1)`` (``verify_s`` linear in the tokens sent: latency plus compute).
    Measurements decay geometrically, so the choice follows the text being generated.
    """

    max_tokens: int = 12
    initial: int = 4
    decay: float = 0.8
    # decayed sums: accepted drafts, rejections; draft seconds, draft tokens; verify (weight, n, t, n*n, n*t)
    accepted: float = 1.2  # a mild prior: acceptance rate 0.6 until measured
    rejected: float = 0.8
    draft_s: float = 0.0
    draft_tokens: float = 0.0
    _verify: tuple = (0.0, 0.0, 0.0, 0.0, 0.0)
    rounds: int = 0
    probe_every: int = 8  # while drafting does not pay (but could, were more drafts accepted), draft one token
    #                       every this many rounds
    _plain_rounds: int = 0

    def update(self, offered: int, accepted: int, draft_s: float, verify_s: float) -> None:
        d = self.decay
        if offered:  # a plain step (no drafts) says nothing about the draft
            self.accepted = d * self.accepted + accepted
            self.rejected = d * self.rejected + (1 if accepted < offered else 0)
            self.draft_s = d * self.draft_s + draft_s
            self.draft_tokens = d * self.draft_tokens + offered
        w, n, t, nn, nt = self._verify
        sent = offered + 1
        self._verify = (d * w + 1, d * n + sent, d * t + verify_s, d * nn + sent * sent, d * nt + sent * verify_s)
        self.rounds += 1

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.accepted + self.rejected, 1e-9)

    def verify_cost_s(self, tokens: int) -> float:
        w, n, t, nn, nt = self._verify
        if w <= 0:
            return 1.0
        mean_n, mean_t = n / w, t / w
        variance = nn / w - mean_n * mean_n
        slope = max(0.0, (nt / w - mean_n * mean_t) / variance) if variance > 0.01 else 0.0
        return max(1e-6, mean_t + slope * (tokens - mean_n))

    def next(self, limit: int) -> int:
        """Draft tokens for the next round, at most ``limit``. 0 (a plain step) when drafting does not pay, except
        every ``probe_every``-th round, which drafts one token so the acceptance rate stays measured."""
        limit = min(limit, self.max_tokens)
        if limit <= 0:
            return 0
        if self.rounds == 0:
            return min(self.initial, limit)
        a = min(self.acceptance, 0.999)
        per_draft_s = self.draft_s / max(self.draft_tokens, 1e-9)

        def rate(k: int) -> float:
            return expected_tokens_per_round(a, k) / (k * per_draft_s + self.verify_cost_s(k + 1))

        best = max(range(0, limit + 1), key=rate)
        if best == 0:
            self._plain_rounds += 1
            if self._plain_rounds % self.probe_every == 0 and self._could_pay(per_draft_s, limit):
                return 1
        return best

    def _could_pay(self, per_draft_s: float, limit: int) -> bool:
        """Whether drafting would pay if every draft were accepted: if not, no acceptance rate a probe could measure
        makes it pay (a draft token costs more than the step it saves), and probes only cost time. Plain steps keep
        measuring the step; once it grows (a slower or farther swarm), probes resume."""
        plain = 1.0 / self.verify_cost_s(1)
        return any((k + 1) / (k * per_draft_s + self.verify_cost_s(k + 1)) > plain for k in range(1, limit + 1))


class SpeculativeRun:
    """One call of speculative ``generate()``: a draft model, a remote session, transformers' processors."""

    def __init__(self, model, small_model, session, processors, stopping, generation_config, streamer,
                 draft_length: DraftLength, fixed_draft: Optional[int]):
        self.model = model
        self.small_model = small_model
        self.session = session
        self.processors = processors
        self.stopping = stopping
        self.sampling = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length  # of the whole sequence, prompt included
        self.streamer = streamer
        self.draft_length = draft_length
        self.fixed_draft = fixed_draft
        self.draft_cache = DynamicCache()
        self.draft_held = 0  # tokens of the sequence in the draft model's cache
        self.rounds = 0
        self.drafted = 0
        self.accepted = 0

    def run(self, ids: torch.Tensor) -> torch.Tensor:  # [1, prompt] -> [1, prompt + new]
        """Generate until a stopping criterion holds; ``ids``' last token is the first one the session lacks."""
        self.prompt_length = getattr(self, "prompt_length", ids.shape[1])  # the first run's: the user's prompt
        done = bool(self.stopping(ids, None).any())
        while not done:
            room = self.session.max_length - self.session.position - 1  # the verify step sends k + 1 tokens
            if self.max_length is not None:  # no more drafts than tokens still wanted (the last one comes free)
                room = min(room, self.max_length - ids.shape[1] - 1)
            k = max(0, min(self.fixed_draft if self.fixed_draft is not None else self.draft_length.next(room), room))
            started = time.perf_counter()
            drafts, draft_probs = self._draft(ids, k)  # [k], [k, vocab] or None
            drafted = time.perf_counter()
            try:
                target_probs, target_choice = self._verify(ids, drafts)
            except OutputsRejected as rejected:  # a server lied: go on from the last checked position
                ids = self._after_rejection(ids, rejected)
                continue
            verified = time.perf_counter()
            m, token = accept_drafts(target_probs, target_choice, draft_probs, drafts)
            self.draft_length.update(k, m, drafted - started, verified - drafted)
            self.rounds, self.drafted, self.accepted = self.rounds + 1, self.drafted + k, self.accepted + m
            # the servers hold ids[:-1] + the last token + k drafts: keep ids + the m accepted drafts
            if m < k:
                self.session.position = self.session.position - (k - m)
            new_tokens = [int(t) for t in drafts[:m]] + [token]
            for t in new_tokens:
                ids = torch.cat([ids, ids.new_tensor([[t]])], dim=1)
                if self.streamer is not None:
                    self.streamer.put(ids[:, -1:].cpu())
                if bool(self.stopping(ids, None).any()):
                    done = True
                    break
            self.draft_held = min(self.draft_held, ids.shape[1] - 1)
        held = self.session.position - self.session.prefix_length
        if held > ids.shape[1] - 1:  # stopped inside the accepted drafts: the servers keep only what is returned
            self.session.position -= held - (ids.shape[1] - 1)
        return ids

    def _after_rejection(self, ids: torch.Tensor, rejected: OutputsRejected) -> torch.Tensor:
        """The sequence to go on from after the session went back to ``rejected.position``: the tokens whose logits
        were checked (the prompt stays whole), with the session caught up to all but the last of them."""
        from corolla.client.cache import RemoteCache

        held = rejected.position - self.session.prefix_length
        ids = ids[:, : max(held + 1, self.prompt_length)]
        if held < ids.shape[1] - 1:
            with torch.no_grad():
                self.model(input_ids=ids[:, held:-1], cache=RemoteCache(self.session), use_cache=True)
        self.draft_held = min(self.draft_held, held)
        return ids

    def _processed(self, context: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """transformers' logits processors for the token after ``context`` [1, n]; logits [1, vocab] in float32."""
        return self.processors(context, logits.to(torch.float32))

    def _draft(self, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if k == 0:
            return ids.new_zeros(0), None
        self.draft_cache.crop(self.draft_held - self.draft_cache.get_seq_length())  # forget rejected drafts
        context = ids
        tokens, probs = [], []
        feed = ids[:, self.draft_held:]
        with torch.no_grad():
            for _ in range(k):
                logits = self.small_model(input_ids=feed.to(self._draft_device), cache=self.draft_cache,
                                          use_cache=True).logits[:, -1]  # [1, vocab]
                scores = self._processed(context, logits.cpu())
                if self.sampling:
                    p = torch.softmax(scores, dim=-1)
                    token = torch.multinomial(p, 1)  # [1, 1]
                    probs.append(p[0])
                else:
                    token = scores.argmax(dim=-1, keepdim=True)
                tokens.append(int(token))
                context = torch.cat([context, token.to(context.dtype)], dim=1)
                feed = token.to(context.dtype)
        self.draft_held = context.shape[1] - 1  # the last draft was not fed
        return torch.tensor(tokens, dtype=torch.long), (torch.stack(probs) if probs else None)

    @property
    def _draft_device(self) -> torch.device:
        return next(self.small_model.parameters()).device

    def _verify(self, ids: torch.Tensor, drafts: torch.Tensor):
        """Target logits after ``ids`` and after each draft, from one session step of the last token + drafts."""
        from corolla.client.cache import RemoteCache

        chunk = torch.cat([ids[:, -1:], drafts.unsqueeze(0).to(ids.dtype)], dim=1)  # [1, k + 1]
        with torch.no_grad():
            logits = self.model(input_ids=chunk, cache=RemoteCache(self.session), use_cache=True).logits[0]
        context = ids
        choices, probs = [], []
        for i in range(chunk.shape[1]):  # [k + 1, vocab]
            scores = self._processed(context, logits[i : i + 1])
            if self.sampling:
                probs.append(torch.softmax(scores, dim=-1)[0])
            choices.append(int(scores.argmax()))
            if i < drafts.shape[0]:
                context = torch.cat([context, drafts[i : i + 1].view(1, 1).to(context.dtype)], dim=1)
        return (torch.stack(probs) if probs else None), torch.tensor(choices)


def check_vocabularies(target_config, small_model) -> None:
    """A draft model must speak the target's vocabulary (its logits index the same tokens)."""
    target = target_config.vocab_size
    draft = getattr(getattr(small_model, "config", None), "vocab_size", None)
    if draft != target:
        raise ValueError(
            f"the draft model's vocabulary has {draft} tokens, the target's {target}: speculative decoding needs a "
            "draft model with the target's tokenizer"
        )
