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
            with lora_applied(self.stack, lora):
                outputs = self.stack(inputs, mask, positions, None, span=request.blocks, prompts=prompts)
        return Graph(outputs, wrt, request.blocks, prompts is not None, list(lora.pairs) if trained else [],
                     size_bytes=self._activation_bytes(hidden, request.blocks))

    def _activation_bytes(self, hidden: torch.Tensor, blocks) -> int:
        """A generous estimate of what autograd keeps for ``hidden`` through ``blocks``."""
        config = self.stack.config
        width = 12 * config.hidden_size + 4 * getattr(config, "intermediate_size", 4 * config.hidden_size)
        return hidden.shape[0] * hidden.shape[1] * len(blocks) * width * hidden.element_size()

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
        """One validated step of ``session`` (``SessionState.check_step`` passed): rewind if asked, reorder rows
        if asked, run the new tokens; returns their outputs [batch, new, hidden]."""
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
                if step.attention_mask is None
                else step.attention_mask.to(device=device, dtype=torch.long)
            )
            full_mask = torch.cat([session.mask, new_mask], dim=1)  # [batch, position + new]
            positions = step.position_ids
            outputs = stack(
                hidden_states.to(device),
                full_mask,
                None if positions is None else positions.to(device=device, dtype=torch.long),
                session.cache,
                span=session.blocks,
                prompts=None if step.prompts is None else step.prompts.to(device),
            )
        session.mask = full_mask
        session.position += new
        return outputs
