"""Checking servers' outputs by redundant computation.

At a rate (``ClientConfig.verify_fraction``) the client has another server compute what a server just computed, from
the same inputs, and compares the outputs within the dtype's tolerance. For an inference step the other servers
hold a check session of their own for those blocks (``corolla.client.session``): fed what the checked server
received since the last check of those blocks, they compute only that, not the whole history again. Forward passes
of training are recomputed as they came. If the two disagree, a third server decides, recomputing statelessly; the
one the other two contradict is a liar. With no third server to ask the dispute stays open: the client then trusts
neither for this session.

This catches a server that lies on the steps it is checked on, with the probability of the rate per step; it does
not catch a server that lies rarely and was lucky, nor two colluding servers that agree on the same wrong outputs
(``verify_fraction`` = 1 and distinct owners make both unlikely, at a cost).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch

from corolla.client.rpc import call
from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError, CorollaError
from corolla.wire.codec import dtype_from_name
from corolla.wire.messages import ForwardRequest

logger = logging.getLogger(__name__)

TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}  # relative to the outputs' largest magnitude


class OutputsRejected(CorollaError):
    """A server of this session was caught returning wrong outputs: the session went back to ``position`` (the
    last position whose outputs were checked), on honest servers; what came after must be computed again."""

    def __init__(self, position: int, liar: Optional[str]):
        self.position = position
        self.liar = liar
        super().__init__(f"server {liar or '(disputed)'} returned wrong outputs; the session went back to "
                         f"position {position}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    checked: bool  # another server computed the same and compared
    liar: Optional[str] = None  # the server caught lying, if any
    disputed: bool = False  # two servers disagree and nobody could decide
    detail: str = ""


def agree(claimed: torch.Tensor, other: torch.Tensor, dtype: str) -> bool:
    """Whether two servers' outputs for the same inputs are the same up to the dtype's rounding."""
    if claimed.shape != other.shape:
        return False
    claimed, other = claimed.float(), other.float()
    if not (torch.isfinite(claimed).all() and torch.isfinite(other).all()):
        return False
    scale = max(float(other.abs().max()), 1e-6)
    return float((claimed - other).abs().max()) <= TOLERANCE.get(dtype, 6e-2) * scale


async def recompute(swarm, span: BlockRange, hidden: torch.Tensor, mask, positions, extras: dict,
                    exclude: frozenset, like=None) -> tuple[torch.Tensor, frozenset]:
    """``span`` run on ``hidden`` by servers not in ``exclude`` (stateless forward passes); the outputs and who ran
    them. ``BlocksNotServedError`` at once if no such servers hold the blocks."""
    # the fewest servers (the least-time chain): a disagreement then leaves the most servers for a third opinion
    # on the view the client holds (the background refresh keeps it): a check never waits for a DHT lookup
    chain = await swarm.plan_inference(span, extras.get("active_adapter"), exclude=exclude, wait=False, like=like,
                                       max_age_s=math.inf)
    used = []
    for record, part in chain:
        dtype = dtype_from_name(record.dtype)
        fields = {k: v for k, v in extras.items() if k not in ("lora", "prompts")}
        if extras.get("lora") is not None:
            lora = extras["lora"].for_blocks(part)
            fields.update(lora={k: t.to(dtype) for k, t in lora.to_flat().items()} or None, lora_scaling=lora.scaling)
        if extras.get("prompts") is not None:
            prompts = extras["prompts"][part.start - span.start: part.end - span.start]
            fields["prompts"] = prompts.to(dtype)
        request = ForwardRequest(part, hidden.to(dtype), mask, positions, **fields)
        reply = await call(swarm.transport, record, request, swarm.config.request_timeout_s,
                           swarm_key=swarm.config.swarm_key)
        hidden = reply.hidden_states
        used.append(record.peer_id)
    return hidden, frozenset(used)


async def check(swarm, span: BlockRange, suspect: str, claimed: torch.Tensor, hidden, mask, positions, extras: dict,
                dtype: str, last: int, distrusted: frozenset = frozenset(), like=None,
                second: Optional[tuple[torch.Tensor, frozenset]] = None) -> Verdict:
    """Whether ``suspect``'s ``claimed`` outputs of its blocks ``span`` (the last ``last`` positions of what it ran
    on ``hidden``) are what other servers (none of ``distrusted``) compute; a third decides a disagreement.
    ``second``: (those outputs, the servers that computed them) when the caller already has them (an inference
    session's check session); else they are recomputed here."""
    excluded = frozenset({suspect}) | distrusted
    if second is None:
        try:
            full, seconds = await recompute(swarm, span, hidden, mask, positions, extras, excluded, like)
        except BlocksNotServedError:
            return Verdict(False, detail=f"no other server holds blocks {span}")
        except Exception as exc:  # the checker failed: nothing learned about the suspect
            return Verdict(False, detail=f"the check failed: {type(exc).__name__}: {exc}")
        second = full[:, hidden.shape[1] - last:]
    else:
        second, seconds = second
    if agree(claimed, second, dtype):
        return Verdict(True, detail="agree")
    try:
        third, _ = await recompute(swarm, span, hidden, mask, positions, extras, excluded | seconds, like)
    except Exception:
        return Verdict(True, disputed=True, detail=f"{suspect} and {sorted(seconds)} disagree; no third server")
    third = third[:, hidden.shape[1] - last:]
    if agree(second, third, dtype):
        return Verdict(True, liar=suspect, detail=f"two other servers agree against {suspect}")
    if agree(claimed, third, dtype) and len(seconds) == 1:
        return Verdict(True, liar=next(iter(seconds)), detail=f"{suspect} and a third server agree")
    return Verdict(True, disputed=True, detail="three servers, three answers")
