"""``AutoDistributedSpeculativeModel``: a distributed causal LM whose ``generate()`` decodes speculatively.

``from_pretrained(name, small_model=..., initial_peers=...)`` takes Petals' arguments; ``small_model`` is a local
Hugging Face causal LM (or a path to one) with the target's vocabulary. See ``corolla.client.speculative``.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList, StoppingCriteriaList

from corolla.client.model import _AutoDistributed, distributed_causal_lm
from corolla.client.session import InferenceSession
from corolla.client.speculative import DraftLength, SpeculativeRun, check_vocabularies
from corolla.client.verify import OutputsRejected

# generate() options that need several sequences, beams or per-step outputs: not speculative decoding's business
_UNSUPPORTED = {
    "num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False,
    "output_logits": False, "output_attentions": False, "output_hidden_states": False,
}


class SpeculativeGenerationMixin:
    """``generate()`` with a local draft model (``self.small_model``); everything else as the distributed model."""

    small_model: torch.nn.Module

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None, *, small_model, initial_peers=(),
                        max_draft_tokens: int = 12, **kwargs):
        model = super().from_pretrained(name_or_path, initial_peers=initial_peers, **kwargs)
        try:
            if isinstance(small_model, (str, bytes)) or hasattr(small_model, "__fspath__"):
                small_model = AutoModelForCausalLM.from_pretrained(small_model, dtype=model.dtype)
            check_vocabularies(model.config, small_model)
        except BaseException:
            model.close()
            raise
        object.__setattr__(model, "small_model", small_model.eval())  # a helper, not a submodule of the model
        model.draft_length = DraftLength(max_tokens=max_draft_tokens)
        model.last_speculation = {}  # rounds, drafted, accepted, new_tokens of the last generate()
        return model

    def generate(self, inputs: Optional[torch.Tensor] = None, *, session: Optional[InferenceSession] = None,
                 streamer=None, num_draft_tokens: Optional[int] = None, **kwargs):
        """Speculative decoding of one sequence: the output is that of plain ``generate()`` (greedy) or follows
        its distribution exactly (``do_sample=True``, with transformers' processors: temperature, top-k, top-p,
        repetition penalty, ...). ``num_draft_tokens`` fixes the drafts per round; by default it adapts.
        Sessions behave as with the plain model (Petals' return convention)."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        kwargs.pop("input_ids", None)
        if kwargs.get("max_length") is None:
            kwargs.pop("max_length", None)
        if num_draft_tokens is not None and (isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int)
                                             or num_draft_tokens < 1):
            raise ValueError(f"num_draft_tokens must be a positive int or None (adaptive), got {num_draft_tokens!r}")
        tokenizer = kwargs.pop("tokenizer", None)
        config, extra = self._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
        self._check_supported(config, extra)
        session = session or self.active_session
        owns_session = session is None
        ids, previous = self._session_inputs(session, inputs, extra)
        mask = extra.get("attention_mask")
        if ids.shape[0] != 1 or (mask is not None and not bool((mask != 0).all())):
            raise ValueError(
                f"speculative generation decodes one unpadded sequence at a time; got batch {ids.shape[0]}"
                + ("" if mask is None or bool((mask != 0).all()) else " with padding")
            )
        ids = ids.long()
        if config.max_new_tokens is not None:
            config.max_length = ids.shape[1] + config.max_new_tokens
        self._prepare_special_tokens(config, mask is not None, device=ids.device)
        processors = self._get_logits_processor(
            config, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(), device=ids.device, model_kwargs={"attention_mask": mask},
        )
        stopping = self._get_stopping_criteria(config, stopping_criteria=StoppingCriteriaList(), tokenizer=tokenizer)
        max_draft = num_draft_tokens or self.draft_length.max_tokens
        if owns_session:
            session = self._new_session(config.max_length + max_draft + 1)
        try:
            held = session.position - session.prefix_length
            if held >= ids.shape[1]:  # the servers hold every token: the last one is sent again for its logits
                session.position = session.prefix_length + ids.shape[1] - 1
                held = ids.shape[1] - 1
            if streamer is not None:
                streamer.put(ids.cpu())
            self._prefill(session, ids[:, held:-1])
            draft_length = self.draft_length if num_draft_tokens is None else copy.copy(self.draft_length)
            run = SpeculativeRun(self, self.small_model, session, processors, stopping, config, streamer,
                                 draft_length, num_draft_tokens)
            output = run.run(ids)
            while True:  # the checks still running; a lie they catch sends the run back to its last checked position
                try:
                    session.settle()
                    break
                except OutputsRejected as rejected:
                    output = run.run(run._after_rejection(output, rejected))
            self.last_speculation = {"rounds": run.rounds, "drafted": run.drafted, "accepted": run.accepted,
                                     "new_tokens": output.shape[1] - ids.shape[1]}
            if streamer is not None:
                streamer.end()
        finally:
            if owns_session:
                session.close()
        if not owns_session:
            self._remember_tokens(session, ids, output, mask)
        return output[:, previous:]

    def _prefill(self, session: InferenceSession, tokens: torch.Tensor) -> None:
        """Send ``tokens`` (all but the last token the session lacks) through the swarm in one step."""
        from corolla.client.cache import RemoteCache

        if tokens.shape[1] == 0:
            return
        with torch.no_grad():
            self(input_ids=tokens, cache=RemoteCache(session), use_cache=True)

    @staticmethod
    def _check_supported(config, extra: dict) -> None:
        wrong = [name for name, default in _UNSUPPORTED.items() if getattr(config, name, default) not in (default, None)]
        unknown = sorted(set(extra) - {"attention_mask"})
        if wrong or unknown:
            raise ValueError(
                "speculative generation decodes one sequence, greedy or sampled; it does not take "
                + ", ".join([f"{name}={getattr(config, name)!r}" for name in wrong] + unknown)
            )


@functools.cache
def distributed_speculative_model(model_type: str) -> type:
    """The causal LM of ``model_type`` with speculative ``generate()``."""
    base = distributed_causal_lm(model_type)
    return type(base.__name__.replace("ForCausalLM", "ForSpeculativeGeneration"), (SpeculativeGenerationMixin, base),
                {"__module__": __name__})


DistributedLlamaForSpeculativeGeneration = distributed_speculative_model("llama")
DistributedBloomForSpeculativeGeneration = distributed_speculative_model("bloom")


class AutoDistributedSpeculativeModel(_AutoDistributed):
    _class_for = staticmethod(distributed_speculative_model)
