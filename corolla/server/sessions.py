"""Inference sessions: the per-session state a server keeps between steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError
from corolla.models.lora import LoraSet, lora_applied
from corolla.server.validation import check_hidden, check_mask, check_positions, check_prompts


@dataclass
class SessionState:
    session_id: str
    blocks: BlockRange  # the span of this server's blocks the session runs
    max_length: int  # tokens the session may hold, declared by the client
    batch_size: int
    cache: Any  # the block stack's attention cache
    mask: torch.Tensor  # [batch, position]: 1 = token, 0 = padding, for everything cached so far
    lora: Optional[LoraSet] = None  # LoRA weights applied in every step (the client's, or a loaded adapter's)
    position: int = 0  # tokens cached so far

    @property
    def reserved_tokens(self) -> int:
        return self.max_length * self.batch_size


def run_step(
    stack,
    session: SessionState,
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    hypo_ids: Optional[torch.Tensor],
    max_positions: Optional[int],
    prompts: Optional[torch.Tensor] = None,
    start_from_position: Optional[int] = None,
) -> torch.Tensor:
    """Validate one step against the session, then run it through ``stack`` and update the session.

    ``start_from_position`` rewinds the session first: cached tokens from that position on are dropped.
    Every check happens before the session changes, so a rejected step leaves it usable.
    """
    check_hidden("hidden_states", hidden_states, stack.hidden_size, stack.dtype)
    batch, new = hidden_states.shape[:2]
    if batch != session.batch_size:
        raise BadRequestError(f"step has batch {batch}, the session was opened with batch {session.batch_size}")
    start = session.position if start_from_position is None else start_from_position
    if not 0 <= start <= session.position:
        raise BadRequestError(
            f"start_from_position {start} is outside session {session.session_id}'s 0..{session.position} "
            "cached tokens: a session can only rewind"
        )
    if start + new > session.max_length:
        raise BadRequestError(
            f"a step of {new} tokens would bring session {session.session_id} to {start + new} tokens, "
            f"past its max_length of {session.max_length}"
        )
    check_mask("attention_mask", attention_mask, batch, new)
    check_positions(position_ids, batch, new, max_positions)
    check_prompts(prompts, session.blocks, batch, stack.hidden_size, stack.dtype)
    if hypo_ids is not None:
        if list(hypo_ids.shape) != [batch] or hypo_ids.dtype not in (torch.int64, torch.int32):
            raise BadRequestError(f"hypo_ids must be an int64 tensor of shape [{batch}], got {list(hypo_ids.shape)}")
        if batch and (int(hypo_ids.min()) < 0 or int(hypo_ids.max()) >= batch):
            raise BadRequestError(f"hypo_ids must index rows 0..{batch - 1}")

    if start < session.position:
        stack.crop_cache(session.cache, start)
        session.mask = session.mask[:, :start]
        session.position = start
    if new == 0 and hypo_ids is None:
        return hidden_states
    device = stack.device
    with torch.inference_mode(), lora_applied(stack, session.lora):
        if hypo_ids is not None:
            hypo_ids = hypo_ids.to(device=device, dtype=torch.int64)
            stack.reorder_cache(session.cache, hypo_ids)
            session.mask = session.mask[hypo_ids]
        if new == 0:
            return hidden_states
        new_mask = (
            torch.ones(batch, new, dtype=torch.long, device=device)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.long)
        )
        full_mask = torch.cat([session.mask, new_mask], dim=1)  # [batch, position + new]
        outputs = stack(
            hidden_states.to(device),
            full_mask,
            None if position_ids is None else position_ids.to(device=device, dtype=torch.long),
            session.cache,
            span=session.blocks,
            prompts=None if prompts is None else prompts.to(device),
        )
    session.mask = full_mask
    session.position += new
    return outputs
