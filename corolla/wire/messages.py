"""Every message of the Corolla protocol, as typed dataclasses.

Each frame carries ``type`` (the message's ``WIRE_NAME``, an explicit constant, so renaming a class cannot change
the protocol) and ``version`` (``PROTOCOL_VERSION``). A receiver that meets another version answers
``ErrorReply(kind="ProtocolVersionError")``. Tensor fields travel in the frame body; ``BlockRange`` fields travel as
``"start:end"``; everything else as JSON. Which request opens which exchange, and its reply, is the service table
in ``corolla.wire.services``.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, ProtocolVersionError
from corolla.wire.codec import Frame

PROTOCOL_VERSION = 9  # 2: start_from_position; 3: wire names, service table; 4: relay; 5: wire codecs; 6: trails;
#                       7: records under one directory key per model; 8: one relay stream per pair of servers;
#                       9: a relayed step carries the relay token its session joined the relay stream with
TensorDict = dict[str, torch.Tensor]  # a field of named tensors; travels as tensors "<field>/<name>"
RPC_PROTOCOL = "/corolla/rpc"  # the libp2p protocol name servers register; the version travels in each frame


class Message:
    """Base of all messages: frozen dataclasses declared with ``class X(Message, wire_name="...")``."""

    registry: ClassVar[dict[str, type["Message"]]] = {}  # wire name -> class
    WIRE_NAME: ClassVar[str]
    COMPRESSIBLE: ClassVar[tuple[str, ...]] = ()  # activation fields a wire codec may compress
    RECOMPRESSIBLE: ClassVar[tuple[str, ...]] = ()  # those carried on (and signed) as decoded: compressed only by
    #                                                 codecs that encode their own output exactly

    def __init_subclass__(cls, wire_name: str, **kwargs):
        super().__init_subclass__(**kwargs)
        if wire_name in Message.registry:
            raise TypeError(f"wire name {wire_name!r} of {cls.__name__} is taken by {Message.registry[wire_name]}")
        cls.WIRE_NAME = wire_name
        Message.registry[wire_name] = cls

    def to_parts(self, version: int = PROTOCOL_VERSION) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        header: dict[str, Any] = {"type": self.WIRE_NAME, "version": version}
        tensors: dict[str, torch.Tensor] = {}
        for name, kind in _wire_kinds(type(self)):  # (by each field's declared type: no isinstance chain)
            value = getattr(self, name)
            if kind == _TENSOR and isinstance(value, torch.Tensor):
                tensors[name] = value
            elif kind == _TENSORS and value and isinstance(value, dict) and \
                    all(isinstance(v, torch.Tensor) for v in value.values()):
                for key, tensor in value.items():
                    tensors[f"{name}/{key}"] = tensor
            elif kind == _BLOCKS and isinstance(value, BlockRange):
                header[name] = str(value)
            else:
                header[name] = value
        return header, tensors


def message_from_frame(frame: Frame) -> Message:
    """Build the typed message a frame holds, checking version, type and every field's kind."""
    header = dict(frame.header)
    version = header.pop("version", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(f"this peer speaks Corolla protocol version {PROTOCOL_VERSION}, got {version!r}")
    type_name = header.pop("type", None)
    cls = Message.registry.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise BadRequestError(f"unknown message type {type_name!r}")
    values: dict[str, Any] = {}
    for field, base, optional in _field_kinds(cls):
        if base is torch.Tensor:
            value = frame.tensors.get(field.name)
        elif base == TensorDict:
            prefix = field.name + "/"
            value = {k[len(prefix):]: t for k, t in frame.tensors.items() if k.startswith(prefix)} or None
        else:
            value = header.get(field.name)
        if value is None:
            if optional or field.default is not dataclasses.MISSING:
                values[field.name] = None if field.default is dataclasses.MISSING else field.default
                continue
            raise BadRequestError(f"{type_name} is missing its field {field.name!r}")
        values[field.name] = _convert(type_name, field.name, base, value)
    return cls(**values)


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> tuple[tuple[dataclasses.Field, Any, bool], ...]:
    """Each field of a message class with its base type and whether it is optional (computed once per class)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, _strip_optional(hints[f.name]), _is_optional(hints[f.name])) for f in dataclasses.fields(cls))


_PLAIN, _TENSOR, _TENSORS, _BLOCKS = range(4)  # how a field travels: in the header as it is, as a tensor, as
#                                              named tensors, as "start:end"


@functools.lru_cache(maxsize=None)
def _wire_kinds(cls: type) -> tuple[tuple[str, int], ...]:
    """Each field of a message class by name, with how it travels (``_PLAIN`` ... ``_BLOCKS``)."""
    kinds = {torch.Tensor: _TENSOR, BlockRange: _BLOCKS}
    return tuple((field.name, _TENSORS if base == TensorDict else kinds.get(base, _PLAIN))
                 for field, base, _ in _field_kinds(cls))


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_optional(hint):
    if _is_optional(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _convert(type_name: str, field_name: str, base, value):
    try:
        if base is BlockRange and isinstance(value, str):  # (anything else is refused below)
            return BlockRange.parse(value)
        if base is torch.Tensor or base == TensorDict:
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base in (int, str, bool) and type(value) is base:
            return value
        if (base is list or typing.get_origin(base) is list) and isinstance(value, list):
            return value
        if base is dict and isinstance(value, dict):
            return value
    except ValueError as exc:
        raise BadRequestError(f"{type_name}.{field_name}: {exc}") from None
    shown = repr(value)
    shown = shown if len(shown) <= 100 else shown[:100] + "..."
    raise BadRequestError(f"{type_name}.{field_name} must be {getattr(base, '__name__', base)}, got {shown}")


# ---------------------------------------------------------------- requests and replies


@dataclass(frozen=True)
class InfoRequest(Message, wire_name="info"):
    pass


@dataclass(frozen=True)
class InfoReply(Message, wire_name="info.reply"):
    model: str  # DHT prefix of the model
    blocks: BlockRange  # blocks held by the server
    hidden_size: int
    dtype: str  # the dtype hidden states must have
    state: str  # a ServerState value
    throughput: float  # announced throughput, tokens/s through all held blocks
    cache_tokens_free: int  # tokens (of one batch row) the session cache can still reserve
    cache_tokens_total: int
    activations_kept: int  # forward passes whose activations wait for their backward pass
    max_message_bytes: int  # largest frame the server accepts
    protocol_version: int
    sessions_open: int = 0
    steps_run: int = 0  # inference steps run since start
    step_batches: int = 0  # calls those steps ran in (steps_run / step_batches: the mean batch)
    step_compute_s: float = 0.0  # compute-thread CPU seconds those calls took
    step_wall_s: float = 0.0  # wall seconds those calls took (the compute thread busy with inference steps)
    step_gather_s: float = 0.0  # seconds batches waited for company that was due before their call
    tokens_run: int = 0  # tokens (rows x new tokens) those steps carried


@dataclass(frozen=True)
class ForwardRequest(Message, wire_name="forward"):
    COMPRESSIBLE = ("hidden_states",)
    blocks: BlockRange
    hidden_states: torch.Tensor  # [batch, seq, hidden]
    attention_mask: Optional[torch.Tensor] = None  # [batch, seq], 1 = token, 0 = padding
    position_ids: Optional[torch.Tensor] = None  # [batch, seq]
    prompts: Optional[torch.Tensor] = None  # [blocks, batch or 1, prefix, hidden]: added before each block (deep prompts)
    lora: Optional[TensorDict] = None  # "<block>.<module>.lora_A" [rank, in] / ".lora_B" [out, rank]: the client's LoRA
    lora_scaling: float = 1.0  # LoRA output multiplier (alpha / rank)
    active_adapter: Optional[str] = None  # a LoRA adapter loaded by the server (--adapters), by name
    keep_activations: bool = False  # a backward pass will follow: keep this pass's activations for it
    wire_codec: Optional[str] = None  # how to encode the reply's hidden states (compression.py); None = none


@dataclass(frozen=True)
class ForwardReply(Message, wire_name="forward.reply"):
    COMPRESSIBLE = ("hidden_states",)
    hidden_states: torch.Tensor  # [batch, seq, hidden]
    activation_id: Optional[str] = None  # with keep_activations: name them in the BackwardRequest


@dataclass(frozen=True)
class BackwardRequest(Message, wire_name="backward"):
    COMPRESSIBLE = ("hidden_states", "grad_outputs")
    blocks: BlockRange
    hidden_states: torch.Tensor  # [batch, seq, hidden]: the inputs of the forward pass
    grad_outputs: torch.Tensor  # [batch, seq, hidden]: d loss / d outputs
    attention_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    prompts: Optional[torch.Tensor] = None  # as in ForwardRequest; its gradient comes back
    lora: Optional[TensorDict] = None  # as in ForwardRequest; their gradients come back
    lora_scaling: float = 1.0
    active_adapter: Optional[str] = None
    activation_id: Optional[str] = None  # from the ForwardReply: use those activations instead of recomputing
    wire_codec: Optional[str] = None  # how to encode the reply's gradients


@dataclass(frozen=True)
class BackwardReply(Message, wire_name="backward.reply"):
    COMPRESSIBLE = ("grad_inputs",)
    grad_inputs: torch.Tensor  # [batch, seq, hidden]: d loss / d inputs
    grad_prompts: Optional[torch.Tensor] = None  # d loss / d prompts, when prompts were sent
    grad_lora: Optional[TensorDict] = None  # d loss / d each LoRA tensor sent, same names


@dataclass(frozen=True)
class OpenSession(Message, wire_name="session.open"):
    session_id: str
    blocks: BlockRange
    max_length: int  # tokens (prefix + generated) the session may ever hold
    batch_size: int
    lora: Optional[TensorDict] = None  # the client's LoRA weights, for every step of the session
    lora_scaling: float = 1.0
    active_adapter: Optional[str] = None  # or a LoRA adapter loaded by the server, by name
    relay_token: Optional[str] = None  # a secret: whoever presents it (the previous server of the chain) may push
    #                                    steps into this session with RelayOpen
    wire_codec: Optional[str] = None  # how this session's step replies and relayed steps encode hidden states
    trail_key: Optional[str] = None  # a secret only this server and the client know: it signs this server's
    #                                  outputs in a relayed step's trail, so later servers cannot alter them


@dataclass(frozen=True)
class SessionOpened(Message, wire_name="session.opened"):
    session_id: str
    cache_tokens_reserved: int  # max_length * batch_size


@dataclass(frozen=True)
class SessionStep(Message, wire_name="session.step"):
    COMPRESSIBLE = ("hidden_states",)
    RECOMPRESSIBLE = ("trail",)
    session_id: str
    hidden_states: torch.Tensor  # [batch, new, hidden]; new may be 0
    attention_mask: Optional[torch.Tensor] = None  # [batch, new] mask of the new tokens; None = all ones
    position_ids: Optional[torch.Tensor] = None  # [batch, new]; None = past + arange(new)
    hypo_ids: Optional[torch.Tensor] = None  # [batch]: reorder cached rows first (beam search)
    prompts: Optional[torch.Tensor] = None  # deep prompts, applied to the session's first positions
    start_from_position: Optional[int] = None  # tokens of the cache to keep before this step (0 .. position):
    #                                            the rest are dropped first, so the session rewinds
    step_index: Optional[int] = None  # the client's number for this step; a step repeating the last one applied
    #                                   (a retry after a failure upstream) does not reorder the cache again
    attempt: Optional[int] = None  # which try of that step; echoed in the reply
    next_hops: Optional[list] = None  # relay: [{"peer_id", "session_id", "token", "dtype", "maddrs"}, ...], the
    #                                   servers after this one; it forwards its outputs to the first of them
    answer_last: bool = False  # relay: only the route's last server answers the client, with the trail; servers
    #                            before it answer only to report an error or a relay that failed
    trail: Optional[TensorDict] = None  # answer_last: "0", "1", ...: the inputs of the relayed servers before
    #                                     this one (each the outputs of the server before it), in route order
    trail_tags: Optional[list] = None  # answer_last: per trail entry, then for hidden_states, the HMAC its
    #                                    producer signed it with (its session's trail_key)
    relay_token: Optional[str] = None  # a relayed step: the token its session joined the relay stream with (the
    #                                    stream is shared: a step runs only in a session joined with its token)


@dataclass(frozen=True)
class SessionStepReply(Message, wire_name="session.step.reply"):
    COMPRESSIBLE = ("hidden_states",)
    RECOMPRESSIBLE = ("trail",)
    hidden_states: torch.Tensor  # [batch, new, hidden]
    position: int  # tokens in the session's cache after this step
    step_index: Optional[int] = None  # echoed from the step
    attempt: Optional[int] = None
    relay_error: Optional[str] = None  # the outputs could not be forwarded to the next hop: why
    trail: Optional[TensorDict] = None  # answer_last: the inputs of the relayed servers of the route, this one's
    #                                     included (the outputs of each server before it), in route order
    trail_tags: Optional[list] = None  # their producers' HMACs, as in SessionStep


@dataclass(frozen=True)
class RelayOpen(Message, wire_name="relay.open"):
    """Opens a relay stream for a session, or (sent on an open relay stream) adds another session to it."""
    session_id: str  # a session open on the receiving server
    token: str  # its relay_token, as the client handed it to the sender


@dataclass(frozen=True)
class RelayOpened(Message, wire_name="relay.opened"):
    session_id: str
    refused: Optional[str] = None  # a session that asked to join an open relay stream and may not: why


@dataclass(frozen=True)
class ErrorReply(Message, wire_name="error"):
    kind: str  # class name of the error on the server
    message: str
    step_index: Optional[int] = None  # inside a session: the step that failed, if the error is about one
    attempt: Optional[int] = None
