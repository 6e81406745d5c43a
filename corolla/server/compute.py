"""``BlockCompute``: the torch work of a server, on validated requests. Runs on the compute thread only.

Forward passes (with or without autograd, keeping activations for the backward pass that will follow), backward
passes (with the kept activations, or recomputing), and inference steps of sessions.
"""
from __future__ import annotations

from typing import Optional

import torch

from corolla.core.errors import BadRequestError
from corolla.models.lora import LoraSet, lora_applied
from corolla.server.activations import ActivationStore, Graph
from corolla.server.sessions import SessionState
from corolla.wire.messages import BackwardReply, BackwardRequest, ForwardReply, ForwardRequest, SessionStep


class BlockCompute:
    """The stack of blocks a server holds and what runs through it."""

    def __init__(self, stack, activations: ActivationStore):
        self.stack = stack
        self.activations = activations  # training passes whose backward pass has not come yet
        self.tokens_run = 0  # tokens (rows x new tokens) of inference steps run

    def _inputs(self, request: ForwardRequest | BackwardRequest):
        device = self.stack.device
        batch, seq = request.hidden_states.shape[:2]
        mask = request.attention_mask
        mask = torch.ones(batch, seq, dtype=torch.long) if mask is None else mask.to(torch.long)
        positions = request.position_ids
        positions = None if positions is None else positions.to(device=device, dtype=torch.long)
        prompts = None if request.prompts is None else request.prompts.to(device)
        return request.hidden_states.to(device), mask.to(device), positions, prompts

    def forward(self, request: ForwardRequest, lora: Optional[LoraSet]) -> ForwardReply:
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
            saved = _SavedBytes()
            with lora_applied(self.stack, lora), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                outputs = self.stack(inputs, mask, positions, None, span=request.blocks, prompts=prompts)
        return Graph(outputs, wrt, request.blocks, prompts is not None, list(lora.pairs) if trained else [],
                     size_bytes=saved.total + outputs.numel() * outputs.element_size())

    def backward(self, request: BackwardRequest, lora: Optional[LoraSet]) -> BackwardReply:
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

    def session_step(self, session: SessionState, step: SessionStep) -> torch.Tensor:
        """One validated step of ``session`` (``SessionState.check_step`` passed)."""
        result = self.session_steps([(session, step)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def session_steps(self, items: list[tuple[SessionState, SessionStep]]) -> list:
        """Validated steps of several sessions, run together: each is rewound and reordered as it asks, then the
        steps that can share a pass (same blocks and LoRA weights, no deep prompts) go through the blocks as one
        batch (``BlockStack.forward_batch``). Returns each step's outputs [batch, new, hidden], or the exception
        that step met."""
        results: list = [None] * len(items)
        groups: dict[tuple, list] = {}
        for index, (session, step) in enumerate(items):
            try:
                work = self._begin_step(session, step)
            except Exception as exc:  # noqa: BLE001 - that step's own failure
                results[index] = exc
                continue
            if isinstance(work, torch.Tensor):  # nothing to run
                results[index] = work
                continue
            alone = step.prompts is not None
            key = (session.blocks, id(session.lora), index if alone else None)
            groups.setdefault(key, []).append((index, session, step, work))
        for members in groups.values():
            try:
                outputs = self._run_group(members)
            except Exception as exc:  # noqa: BLE001 - the group's failure, reported to each of its steps
                outputs = [exc] * len(members)
            for (index, session, _, work), output in zip(members, outputs):
                if not isinstance(output, BaseException):
                    session.mask = work[1]
                    session.position += work[0].shape[1]
                    self.tokens_run += work[0].shape[0] * work[0].shape[1]
                results[index] = output
        return results

    def _begin_step(self, session: SessionState, step: SessionStep):
        """Rewind and reorder the session as the step asks; its inputs to run (hidden, full mask, positions), or
        the outputs already (a step of no new tokens)."""
        stack = self.stack
        hidden_states, hypo_ids = step.hidden_states, step.hypo_ids
        if step.step_index is not None and step.step_index == session.last_step_index:
            hypo_ids = None  # a repeat of the last step (retried upstream): its reordering is in the cache already
        session.last_step_index = step.step_index
        start = session.position if step.start_from_position is None else step.start_from_position
        if start < session.position:
            stack.crop_cache(session.cache, start)
            session.mask = session.mask[:, :start]
            session.position = start
        batch, new = hidden_states.shape[:2]
        device = stack.device
        if hypo_ids is not None:
            with torch.inference_mode():
                hypo_ids = hypo_ids.to(device=device, dtype=torch.int64)
                stack.reorder_cache(session.cache, hypo_ids)
                session.mask = session.mask[hypo_ids]
        if new == 0:
            return hidden_states
        new_mask = (
            torch.ones(batch, new, dtype=torch.long, device=device)
            if step.attention_mask is None
            else step.attention_mask.to(device=device, dtype=torch.long)
        )
        full_mask = torch.cat([session.mask, new_mask], dim=1)  # [batch, position + new]
        positions = step.position_ids
        positions = None if positions is None else positions.to(device=device, dtype=torch.long)
        return hidden_states.to(device), full_mask, positions

    def _run_group(self, members: list) -> list[torch.Tensor]:
        stack = self.stack
        session, step = members[0][1], members[0][2]
        with torch.inference_mode(), lora_applied(stack, session.lora):
            if len(members) == 1:
                hidden, mask, positions = members[0][3]
                prompts = None if step.prompts is None else step.prompts.to(stack.device)
                return [stack(hidden, mask, positions, session.cache, span=session.blocks, prompts=prompts)]
            parts = [(work[0], work[1], work[2], member_session.cache) for _, member_session, _, work in members]
            return stack.forward_batch(parts, span=session.blocks)


class _SavedBytes:
    """Counts the bytes autograd saves for a backward pass (each storage once): what keeping a graph costs."""

    def __init__(self):
        self.total = 0
        self._seen: set = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen and storage.data_ptr():
            self._seen.add(key)
            self.total += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor
