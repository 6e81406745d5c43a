"""``InferenceSession``: step-by-step inference through a chain of servers that keep attention caches."""
from __future__ import annotations

import uuid
from typing import Optional

import torch

from corolla.client.rpc import SessionStream
from corolla.core.errors import BadRequestError
from corolla.wire.codec import dtype_from_name
from corolla.wire.messages import OpenSession, SessionStep, SessionStepReply


class InferenceSession:
    """A session over the blocks of a ``RemoteSequential``; use as a context manager.

    ``step(hidden_states)`` sends the new tokens' hidden states ([batch, new, hidden], ``new`` may be 0) and
    returns their outputs; the servers remember every earlier step of this session. The server streams are
    opened on the first step, when the batch size is known. At most ``max_length`` tokens in all.
    """

    def __init__(self, seq, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.seq = seq
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens the servers hold for this session
        self.batch_size: Optional[int] = None
        self.output_ids: Optional[torch.Tensor] = None  # token history, kept by the model's generate()
        self.output_mask: Optional[torch.Tensor] = None  # its attention mask (0 = left padding)
        self._streams: Optional[list[SessionStream]] = None
        self._closed = False

    # ---------------------------------------------------------------- public API

    def step(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        hypo_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the new tokens' hidden states through every block; returns [batch, new, hidden].

        ``attention_mask`` ([batch, new], 1 = token, 0 = padding) and ``position_ids`` ([batch, new]) describe the
        new tokens only; ``hypo_ids`` ([batch]) reorders the rows cached so far first (beam search).
        """
        if self._closed:
            raise RuntimeError("this inference session is closed")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [batch, new, hidden], got {list(hidden_states.shape)}")
        batch, new = hidden_states.shape[:2]
        if self.position + new > self.max_length:
            raise BadRequestError(
                f"a step of {new} tokens would bring the session to {self.position + new} tokens, "
                f"past its max_length of {self.max_length}"
            )
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"this session has batch size {self.batch_size}, the step has {batch}")
        outputs = self.seq.swarm.run(
            self._step(hidden_states.detach().cpu(), attention_mask, position_ids, hypo_ids),
            self.seq.swarm.config.request_timeout_s * 2,
        )
        self.position += new
        return outputs.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._streams:
            streams, self._streams = self._streams, None

            async def _close():
                for stream in streams:
                    stream.close()

            self.seq.swarm.run(_close(), 10)

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- on the client's loop

    async def _open(self, batch: int) -> None:
        chain = await self.seq.swarm.plan(self.seq.blocks)
        timeout_s = self.seq.swarm.config.request_timeout_s
        streams: list[SessionStream] = []
        try:
            for record, span in chain:
                request = OpenSession(self.session_id, span, self.max_length, batch)
                streams.append(await SessionStream.open(self.seq.swarm.peer, record, request, timeout_s))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        self._streams = streams
        self.batch_size = batch

    async def _step(self, hidden, attention_mask, position_ids, hypo_ids) -> torch.Tensor:
        if self._streams is None:
            await self._open(hidden.shape[0])
        timeout_s = self.seq.swarm.config.request_timeout_s
        for stream in self._streams:
            hidden = hidden.to(dtype_from_name(stream.record.dtype))
            step = SessionStep(
                self.session_id, hidden, attention_mask=attention_mask, position_ids=position_ids, hypo_ids=hypo_ids
            )
            reply: SessionStepReply = await stream.call(step, SessionStepReply, timeout_s)
            hidden = reply.hidden_states
        return hidden
