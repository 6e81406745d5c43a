"""Checks of a request's contents (blocks, shapes, dtypes, values). Each failure is a ``BadRequestError`` naming
the cause. Servers run them on every request before any compute, so a bad request never disturbs other clients;
clients run them before sending, so a mistake of the caller is raised to the caller and anything a server
refuses is that server's failure."""
from __future__ import annotations

import math
from typing import Optional

import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite. A sum is finite only if every term is (a NaN or an infinity
    never sums to a finite value), so one sum answers for the usual case at a third of the cost of
    ``isfinite().all()``; a sum that overflowed is checked value by value."""
    if not tensor.numel():
        return True
    if math.isfinite(tensor.sum().item()):
        return True
    return bool(torch.isfinite(tensor).all())


def check_blocks(requested: BlockRange, held: BlockRange) -> None:
    if not held.covers(requested):
        raise BadRequestError(f"this server holds blocks {held}, not {requested}")


def check_hidden(
    name: str, tensor: torch.Tensor, hidden_size: int, dtype: torch.dtype, max_tokens: Optional[int] = None
) -> None:
    if tensor.dim() != 3:
        raise BadRequestError(f"{name} must be [batch, seq, hidden], got shape {list(tensor.shape)}")
    if tensor.shape[-1] != hidden_size:
        raise BadRequestError(f"{name} has hidden size {tensor.shape[-1]}, this model's is {hidden_size}")
    if tensor.dtype != dtype:
        raise BadRequestError(f"{name} has dtype {tensor.dtype}, this server computes in {dtype}")
    if tensor.shape[0] < 1:
        raise BadRequestError(f"{name} has an empty batch")
    if max_tokens is not None and tensor.shape[0] * tensor.shape[1] > max_tokens:
        raise BadRequestError(
            f"{name} holds {tensor.shape[0] * tensor.shape[1]} tokens (batch x seq), over this server's limit of "
            f"{max_tokens} per request; split it"
        )
    if not all_finite(tensor):
        raise BadRequestError(f"{name} contains non-finite values (NaN or inf)")


def check_mask(name: str, mask: Optional[torch.Tensor], batch: int, length: int) -> None:
    if mask is None:
        return
    if list(mask.shape) != [batch, length]:
        raise BadRequestError(f"{name} must have shape [{batch}, {length}], got {list(mask.shape)}")
    if mask.dtype not in (torch.int64, torch.int32, torch.bool, torch.uint8):
        raise BadRequestError(f"{name} must be an integer or bool tensor of 0/1, got {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise BadRequestError(f"{name} may hold only 0 (padding) and 1 (token)")


def check_positions(
    position_ids: Optional[torch.Tensor], batch: int, length: int, max_positions: Optional[int]
) -> None:
    if position_ids is None:
        return
    if list(position_ids.shape) != [batch, length]:
        raise BadRequestError(f"position_ids must have shape [{batch}, {length}], got {list(position_ids.shape)}")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise BadRequestError(f"position_ids must be int64, got {position_ids.dtype}")
    if position_ids.numel():
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or (max_positions is not None and high >= max_positions):
            raise BadRequestError(f"position_ids must lie in [0, {max_positions}), got {low}..{high}")


def check_same_shape(name: str, tensor: torch.Tensor, reference: torch.Tensor) -> None:
    if tensor.shape != reference.shape:
        raise BadRequestError(
            f"{name} has shape {list(tensor.shape)}, but the hidden states have shape {list(reference.shape)}"
        )
    if tensor.dtype != reference.dtype:
        raise BadRequestError(f"{name} has dtype {tensor.dtype}, expected {reference.dtype}")
    if not all_finite(tensor):
        raise BadRequestError(f"{name} contains non-finite values (NaN or inf)")


def check_prompts(prompts: Optional[torch.Tensor], blocks: BlockRange, batch: int, hidden_size: int,
                  dtype: torch.dtype) -> None:
    """Deep prompts: [len(blocks), batch or 1, prefix, hidden], the server's dtype, finite."""
    if prompts is None:
        return
    if prompts.dim() != 4 or prompts.shape[0] != len(blocks) or prompts.shape[1] not in (1, batch) \
            or prompts.shape[3] != hidden_size:
        raise BadRequestError(
            f"prompts must be [{len(blocks)} blocks, {batch} or 1, prefix, {hidden_size}], got {list(prompts.shape)}"
        )
    if prompts.dtype != dtype:
        raise BadRequestError(f"prompts have dtype {prompts.dtype}, this server computes in {dtype}")
    if not all_finite(prompts):
        raise BadRequestError("prompts contain non-finite values (NaN or inf)")
