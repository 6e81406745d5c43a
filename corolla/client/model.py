"""Models whose transformer blocks run in the swarm, with the Hugging Face interface users know.

The client holds only the embeddings, the final norm and the LM head (what the family's ``client_parts`` says);
``model.model.layers`` (Llama and most families) or ``model.transformer.h`` (BLOOM) is a ``RemoteSequential``.
Each family's classes are its Hugging Face classes over ``DistributedModelMixin``, made on first use
(``distributed_causal_lm(model_type)``). ``generate()`` is Hugging Face's own, fed through
a ``RemoteCache`` so that every step sends only the new tokens to servers that keep the attention caches.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Optional

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeModelOutputWithPast

from corolla.client.cache import RemoteCache, ReplayCache
from corolla.client.config import ClientConfig
from corolla.client.sequential import RemoteSequential
from corolla.client.session import InferenceSession
from corolla.client.swarm import RemoteSwarm, hivemind_client
from corolla.client.tuning import PromptTuning, RemoteLora, TuningConfig, TuningMode
from corolla.client.verify import OutputsRejected
from corolla.models.checkpoint import (config_digest, is_embedded_name, load_config, model_dht_prefix, read_tensors,
                                      resolve_model)
from corolla.models.dtypes import resolve_dtype
from corolla.models.cpu_kernels import KernelLinear
from corolla.core.errors import CorollaError
from corolla.models.family import ClientParts, ModelFamily, family_for, family_for_type
from corolla.net.transport import TransportFactory

logger = logging.getLogger(__name__)


def _get(root: nn.Module, path: str):
    return functools.reduce(getattr, path.split("."), root)


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set ``module`` at dotted ``path`` under ``root``, making empty containers on the way (OPT's ``decoder``)."""
    *parents, name = path.split(".")
    for part in parents:
        if part not in root._modules:
            setattr(root, part, nn.Module())
        root = getattr(root, part)
    setattr(root, name, module)


class RemoteBaseModel(nn.Module):
    """Embeddings -> remote blocks -> final norm, with the forward signature of a HF base model.

    Attribute names follow the family's checkpoint names (``embed_tokens``/``norm``/``layers`` for Llama,
    ``word_embeddings``/``word_embeddings_layernorm``/``ln_f``/``h`` for BLOOM) so tensors load by name.
    """

    def __init__(self, config, parts: ClientParts, swarm):
        super().__init__()
        self.config = config
        self._names = (parts.embed, parts.final_norm, parts.layers)
        self._parts = parts
        for path, module in parts.modules.items():
            _put(self, path, module)
        _put(self, parts.layers, RemoteSequential(swarm))
        self.prompt_tuning: Optional[PromptTuning] = None  # set by tuning_mode="ptune" / "deep_ptune"
        self.remote_lora: Optional[RemoteLora] = None  # set by tuning_mode="lora"
        # word_embeddings_layernorm of families without one; kept out of the submodules (it holds nothing)
        object.__setattr__(self, "_identity", nn.Identity())

    # Petals' names and Hugging Face's, for every family: the same modules under both.
    _ALIASES = {"word_embeddings": 0, "embed_tokens": 0, "ln_f": 1, "norm": 1, "h": 2, "layers": 2}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            index = RemoteBaseModel._ALIASES.get(name)
            if index is not None and name != self._names[index] and self._names[index] is not None:
                return _get(self, self._names[index])
            if name == "word_embeddings_layernorm":
                return self.__dict__["_identity"]
            if name in ("prompt_embeddings", "intermediate_prompt_embeddings"):  # where Petals keeps them
                tuning = self.prompt_tuning
                if tuning is not None and getattr(tuning, name) is not None:
                    return getattr(tuning, name)
            raise

    @property
    def active_adapter(self) -> Optional[str]:
        """The server-loaded LoRA adapter every request uses; kept in ``config.active_adapter`` as in Petals."""
        return getattr(self.config, "active_adapter", None)

    @active_adapter.setter
    def active_adapter(self, name: Optional[str]) -> None:
        self.config.active_adapter = name

    @property
    def remote_layers(self) -> RemoteSequential:
        return _get(self, self._names[2])

    def get_input_embeddings(self) -> nn.Embedding:
        return _get(self, self._names[0])

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_router_logits"):
            raise ValueError("output_router_logits: the experts' router logits stay on the servers")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions: the attention weights stay on the servers, which never send them")
        if attention_mask is not None and attention_mask.is_floating_point():  # transformers takes 0./1. too
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("a floating-point attention_mask must hold only 0 and 1 (1: a real token)")
            attention_mask = attention_mask.long()
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [batch, seq, hidden]
        hidden = inputs_embeds
        session = cache.session if isinstance(cache, RemoteCache) else None
        replay = cache if isinstance(cache, ReplayCache) else None
        if cache is not None and session is None and replay is None:
            raise TypeError(f"a distributed model keeps its cache on the servers; got a local {type(cache).__name__}")
        manual = session is None and self.remote_layers.active_session is not None
        if replay is not None and (manual or self.prompt_tuning is not None):
            raise ValueError("this cache came from a call outside an inference session (the servers kept nothing); "
                             "it continues only such calls, without a soft prompt: use one session throughout")
        if manual:  # ``model(ids)`` inside ``with model.inference_session(...)``: the session's next tokens
            session = self.remote_layers.active_session
            held = max(0, session.position - session.prefix_length)
        prefix = 0
        if self.prompt_tuning is not None:
            hidden, attention_mask, position_ids, prefix = self._with_soft_prompt(hidden, attention_mask, position_ids, session)
        if self._parts.prepare_inputs is not None:  # e.g. OPT's learned positions, which need the past's length
            past = attention_mask.shape[1] - hidden.shape[1] if attention_mask is not None else (
                session.position if session is not None else replay.get_seq_length() if replay is not None else 0)
            hidden = self._parts.prepare_inputs(self, hidden, attention_mask, position_ids, past)
        if self._parts.after_embed is not None:
            hidden = _get(self, self._parts.after_embed)(hidden)
        block_inputs = hidden
        deep_prompts = None if self.prompt_tuning is None else self.prompt_tuning.deep_prompts()
        lora = None if self.remote_lora is None else self.remote_lora.lora_set()
        if session is not None:
            new = hidden.shape[1]
            new_mask = None if attention_mask is None else attention_mask[:, attention_mask.shape[1] - new :]
            fed = max(0, session.position - session.prefix_length)
            sent_mask, sent_positions = new_mask, position_ids
            hypo_ids = None if manual else cache.take_hypo_ids()
            reordered = hypo_ids is not None
            if not manual and self._crosses_rope_switch(session, new):
                hidden, sent_mask, sent_positions = _from_the_start(session, hidden, new_mask, position_ids, hypo_ids)
                hypo_ids = None  # (the held rows were reordered as they were sent again)
            if deep_prompts is not None and session.position < prefix:
                deep_prompts = deep_prompts.to(hidden.dtype)
            else:
                deep_prompts = None
            hidden = session.step(hidden, sent_mask, sent_positions, hypo_ids=hypo_ids, prompts=deep_prompts)
            hidden = hidden[:, hidden.shape[1] - new:]
            if manual:
                _record_tokens(session, held, input_ids, new_mask)
            else:
                _record_fed(session, fed, input_ids, new_mask, reordered)
        else:
            if deep_prompts is not None:
                deep_prompts = deep_prompts.to(hidden.dtype)
            past = 0
            if replay is not None:  # transformers' manual loop outside a session: the whole sequence again
                past = replay.get_seq_length()
                hidden, attention_mask, position_ids = _replayed(replay, hidden, attention_mask, position_ids)
            wants_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", False)
            if wants_cache and self.prompt_tuning is None:
                cache = ReplayCache(hidden.detach(), position_ids)
            hidden = self.remote_layers(hidden, attention_mask, position_ids, prompts=deep_prompts, lora=lora,
                                        active_adapter=self.active_adapter)[:, past:]
        for path in ((self._names[1],) if self._names[1] else ()) + self._parts.after_norm:
            hidden = _get(self, path)(hidden)
        hidden = hidden[:, prefix:]  # the soft prompt's positions are not outputs
        all_hidden = None
        if output_hidden_states:
            # transformers' shape: what enters the first block, each block's outputs, the last of them after the
            # final norm. The servers send only the last block's outputs: the blocks between are None (slice the
            # RemoteSequential for them), so code that reads one fails loudly instead of reading another's.
            all_hidden = (block_inputs[:, prefix:], *([None] * (self.config.num_hidden_layers - 1)), hidden)
        return MoeModelOutputWithPast(  # a base model's output; router_logits for mixture-of-experts heads
            last_hidden_state=hidden,
            cache=cache,
            hidden_states=all_hidden,
            router_logits=None,
        )

    def _crosses_rope_switch(self, session: InferenceSession, new: int) -> bool:
        """Whether this step of ``generate()`` takes a Phi-3 session past ``original_max_position_embeddings``, where
        LongRoPE switches from its short to its long factors: transformers' Phi-3 then computes the whole sequence
        again (its cache's keys were rotated with the short factors), and so does the session."""
        switch = getattr(self.config, "original_max_position_embeddings", None)
        if self.config.model_type != "phi3" or switch is None:
            return False
        past = session.position - session.prefix_length
        return 0 < past <= switch < past + new

    def _with_soft_prompt(self, hidden, attention_mask, position_ids, session):
        """Prepend the trainable prompt (first step of a session, or every stateless call); shift positions."""
        prefix = self.prompt_tuning.pre_seq_len
        batch = hidden.shape[0]
        if session is not None and session.position > 0:  # the prompt is already in the servers' caches
            return hidden, attention_mask, None if position_ids is None else position_ids + prefix, 0
        prompt = self.prompt_tuning.input_prompts(batch).to(hidden.dtype)  # [batch, prefix, hidden]
        hidden = torch.cat([prompt, hidden], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
        if position_ids is not None:
            head = torch.arange(prefix, device=position_ids.device).expand(batch, prefix)
            position_ids = torch.cat([head, position_ids + prefix], dim=1)
        if session is not None:
            session.prefix_length = prefix
        return hidden, attention_mask, position_ids, prefix


def _from_the_start(session: InferenceSession, hidden, mask, position_ids, hypo_ids=None):
    """Rewind ``session`` to 0 and return the step that sends everything it held (its rows reordered by ``hypo_ids``,
    if given), then ``hidden``: its inputs, mask and positions (the new tokens' own, or counted on)."""
    held = session.inputs_held()
    if held is None:
        return hidden, mask, position_ids
    old_hidden, old_mask, old_positions = held if hypo_ids is None else (part[hypo_ids] for part in held)
    new = hidden.shape[1]
    session.position = 0
    mask = torch.ones(hidden.shape[0], new, dtype=old_mask.dtype) if mask is None else mask.to(old_mask.dtype)
    return (torch.cat([old_hidden.to(hidden.dtype), hidden.detach().cpu()], dim=1), torch.cat([old_mask, mask], dim=1),
            _positions_on(old_positions, new, position_ids))


def _positions_on(before: torch.Tensor, new: int, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Positions ``before`` [batch, past], then the ``new`` tokens': their own, or counted on from the last."""
    after = before[:, -1:] + 1 + torch.arange(new, device=before.device) if position_ids is None else position_ids
    return torch.cat([before, after.to(before.device, before.dtype)], dim=1)


def _replayed(replay: ReplayCache, hidden, attention_mask, position_ids):
    """The whole sequence of a manual loop outside a session: ``replay``'s block inputs then ``hidden``'s, the mask
    (transformers passes it for the whole sequence) and the positions (each part's own, or counted on)."""
    past, new = replay.get_seq_length(), hidden.shape[1]
    if replay.block_inputs.shape[0] != hidden.shape[0] or replay.block_inputs.shape[2] != hidden.shape[2]:
        raise ValueError(f"the cache holds inputs of shape {list(replay.block_inputs.shape)}, which the new ones "
                         f"{list(hidden.shape)} cannot follow")
    if attention_mask is not None and attention_mask.shape[1] != past + new:
        raise ValueError(f"with a cache of {past} tokens, attention_mask must cover all {past + new} tokens (as "
                         f"transformers takes it), got {attention_mask.shape[1]}")
    if position_ids is not None or replay.position_ids is not None:
        before = replay.position_ids
        if before is None:
            before = torch.arange(past, device=hidden.device).expand(hidden.shape[0], -1)
        position_ids = _positions_on(before, new, position_ids)
    return torch.cat([replay.block_inputs.to(hidden.dtype), hidden], dim=1), attention_mask, position_ids


def _restore(session: InferenceSession, before: tuple, error: BaseException) -> None:
    """After a ``generate()`` that failed in ``session``: the session as it was before the call (what the call
    stepped is forgotten), so that it can go on; if even that fails, why its tokens are unknown."""
    position, output_ids, output_mask, ids_lost = before
    try:
        if session.position > position:
            session.position = position
        session.output_ids, session.output_mask, session.ids_lost = output_ids, output_mask, ids_lost
    except Exception:  # noqa: BLE001 - the session is broken; its use says so
        session.output_ids = session.output_mask = None
        session.ids_lost = f"a generate() in it failed midway ({type(error).__name__}: {error})"


class _AfterHistory:
    """A streamer for ``generate()`` in a session: transformers gives it the whole sequence as its prompt, history
    included; it passes on only the part this call was given (as local ``generate()`` would show it)."""

    def __init__(self, streamer, history: int):
        self._streamer, self._history = streamer, history

    def put(self, value) -> None:
        if self._history:
            value, self._history = value[..., self._history:], 0
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()


def _record_tokens(session: InferenceSession, held: int, input_ids, mask) -> None:
    """Keep ``session.output_ids`` (the token ids the servers hold) true after a step made by calling the model:
    the ``held`` tokens before it, then ``input_ids``; unknown (None) when the step came as embeddings."""
    if input_ids is None or (session.output_ids is None and held > 0):
        session.output_ids = session.output_mask = None
        session.ids_lost = "it was stepped with hidden states or embeddings, not token ids"
        return
    mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.device)
    if session.output_ids is None:
        session.output_ids, session.output_mask = input_ids, mask
        return
    session.output_ids = torch.cat([session.output_ids[:, :held], input_ids.to(session.output_ids.device)], dim=1)
    session.output_mask = torch.cat([session.output_mask[:, :held], mask.to(session.output_mask.dtype)], dim=1)


def _record_fed(session: InferenceSession, held: int, input_ids, mask, reordered: bool) -> None:
    """Keep ``session.fed_ids``, the ids ``generate()`` sent (to start again after a rollback), in step."""
    if session.fed_ids is None:
        return
    if input_ids is None or reordered or input_ids.shape[0] != session.fed_ids.shape[0]:
        # embeddings, or beams (rows expanded, reordered): the rows' tokens are no longer known here
        session.fed_ids = session.fed_mask = None
        return
    mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.device)
    session.fed_ids = torch.cat([session.fed_ids[:, :held], input_ids.to(session.fed_ids.device)], dim=1)
    session.fed_mask = torch.cat([session.fed_mask[:, :held], mask.to(session.fed_mask.dtype)], dim=1)


class DistributedModelMixin:
    """What every distributed model adds to its Hugging Face class: loading, sessions, generate()."""

    _base_attr: str  # "model" or "transformer": the base model's attribute
    _base_path: str  # where the RemoteBaseModel is: the base model, or inside it ("model.decoder" in OPT)

    @property
    def remote_base(self) -> "RemoteBaseModel":
        return _get(self, self._base_path)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Optional[str] = None,
        *,
        initial_peers=(),
        torch_dtype: "torch.dtype | str | None" = None,
        dtype: "torch.dtype | str | None" = None,
        dht_prefix: Optional[str] = None,
        client_config: Optional[ClientConfig] = None,
        tuning_mode: Optional[str] = None,
        pre_seq_len: int = 0,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_target_modules: Optional[tuple[str, ...]] = None,
        active_adapter: Optional[str] = None,
        transport_factory: Optional[TransportFactory] = None,
        **config_overrides,
    ):
        """Load the client's parts of a checkpoint (local dir, hub id, or None for the embedded model) and
        connect to the swarm at ``initial_peers``.

        ``tuning_mode``: "ptune" (a trainable soft prompt of ``pre_seq_len`` tokens), "deep_ptune" (plus a trainable
        prompt for every block) or "lora" (trainable LoRA weights of rank ``lora_rank`` for ``lora_target_modules``
        of every block). The client's own weights are then frozen: only the tuning parameters (and a task head,
        if any) train. ``active_adapter`` picks a LoRA adapter the servers loaded (``corolla serve --adapters``).
        ``transport_factory`` replaces the libp2p peer joined to ``initial_peers`` (tests: an in-memory network).
        """
        path = resolve_model(name_or_path)
        config = load_config(path)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        if getattr(config, "output_router_logits", False) and "output_router_logits" not in config_overrides:
            # a checkpoint trained with the experts' balancing loss asks for router logits by default; they stay on
            # the servers, so the default is dropped (asking for them explicitly is refused, naming why)
            logger.info("%s: output_router_logits off (the experts' router logits stay on the servers)", path)
            config.output_router_logits = False
        family = family_for(config)
        client_config = client_config or ClientConfig()
        client_config = ClientConfig(
            **{
                **client_config.__dict__,
                "initial_peers": tuple(initial_peers),
                "dht_prefix": dht_prefix or client_config.dht_prefix,
            }
        )
        prefix = client_config.dht_prefix or model_dht_prefix(name_or_path if name_or_path is not None else path,
                                                              config)
        swarm = RemoteSwarm(client_config, prefix, config.num_hidden_layers,
                            transport_factory or hivemind_client(client_config), hidden_size=config.hidden_size,
                            max_positions=getattr(config, "max_position_embeddings", None),
                            config_digest=config_digest(config))
        try:
            model = cls(config, swarm)
            tensors = read_tensors(path, lambda name: family.is_block_tensor(name) is None)
            model._load_client_tensors(family.client_tensors(tensors, model.state_dict().keys()))
            tuning = TuningConfig(TuningMode(tuning_mode or "none"), pre_seq_len, lora_rank, lora_alpha,
                                  None if lora_target_modules is None else tuple(lora_target_modules))
            model._set_up_tuning(tuning, family)
            if active_adapter is not None:
                config.active_adapter = active_adapter
            model.to(resolve_dtype(dtype or torch_dtype, config))
            for trainable in (model.remote_base.prompt_tuning, model.remote_base.remote_lora):
                if trainable is not None:  # trained in float32 whatever the model's dtype (as Petals keeps its
                    trainable.float()      # prompts): small steps are not rounded away; cast when sent
        except BaseException:
            swarm.close()
            raise
        model.eval()
        if (path / "generation_config.json").is_file():  # the checkpoint's defaults (end-of-turn ids, lengths), as
            try:                                           # transformers loads them
                model.generation_config = GenerationConfig.from_pretrained(path)
            except (OSError, ValueError) as error:
                logger.warning("ignoring %s: %s", path / "generation_config.json", error)
        for module in model.modules():
            if isinstance(module, KernelLinear):
                module.prepare()
        # a name only Corolla knows (the embedded model's) is its directory to transformers' loaders and to PEFT
        model.name_or_path = str(path if is_embedded_name(name_or_path) else name_or_path)
        return model

    _new_head_prefixes: tuple[str, ...] = ()  # task heads trained from scratch: not in the checkpoint

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "transformer") and name != self._base_attr:  # Petals' and HF's name of the base
                return getattr(self, self._base_attr)
            raise

    def _set_up_tuning(self, tuning: TuningConfig, family) -> None:
        base = self.remote_base
        self.tuning = tuning
        if tuning.mode is TuningMode.NONE:
            return
        for name, parameter in self.named_parameters():  # the pretrained client weights stay as they are
            if not name.startswith(self._new_head_prefixes):
                parameter.requires_grad_(False)
        if tuning.mode in (TuningMode.PTUNE, TuningMode.DEEP_PTUNE):
            base.prompt_tuning = PromptTuning(
                self.config.num_hidden_layers, self.config.hidden_size, tuning.pre_seq_len,
                deep=tuning.mode is TuningMode.DEEP_PTUNE,
            )
        elif tuning.mode is TuningMode.LORA:
            base.remote_lora = RemoteLora(family, self.config, self.config.num_hidden_layers, tuning.lora_rank,
                                          tuning.lora_alpha, tuning.lora_targets)

    def save_lora(self, path) -> None:
        """Save the trained LoRA weights as a PEFT adapter (loads onto a local model with ``peft``)."""
        lora = self.remote_base.remote_lora
        if lora is None:
            raise ValueError('this model has no LoRA weights: load it with tuning_mode="lora"')
        heads = {name: tensor for name, tensor in self.state_dict().items() if name.startswith(self._new_head_prefixes)} \
            if self._new_head_prefixes else {}
        # a task head trained from scratch goes with the adapter, as PEFT saves a sequence classifier's
        lora.save_pretrained(path, base_model=str(getattr(self, "name_or_path", "")),
                             task_type="SEQ_CLS" if heads else "CAUSAL_LM", saved_modules=heads or None)

    def load_lora(self, path) -> None:
        """Load a PEFT LoRA adapter into this model's LoRA weights (and its task head, if the adapter saved one)."""
        lora = self.remote_base.remote_lora
        if lora is None:
            raise ValueError('this model has no LoRA weights: load it with tuning_mode="lora"')
        saved = lora.load_pretrained(path)
        own = self.state_dict()
        for name, tensor in saved.items():
            if name not in own or own[name].shape != tensor.shape:
                raise ValueError(f"the adapter at {path} saves {name} {list(tensor.shape)}, which this model "
                                 f"{'has as ' + str(list(own[name].shape)) if name in own else 'does not have'}")
        with torch.no_grad():
            for name, tensor in saved.items():
                own[name].copy_(tensor)

    def _load_client_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = [name for name in own if name not in tensors and not name.startswith(self._new_head_prefixes)]
        tied = self._ties_embeddings()
        head = self.get_output_embeddings()
        head_name = next((name for name, module in self.named_children() if module is head), None)
        if tied and head_name is not None:
            missing = [name for name in missing if not name.startswith(head_name + ".")]
        if missing:
            raise ValueError(f"the checkpoint lacks client tensors {missing}")
        self.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
        if tied and head_name is not None:
            head.weight = self.get_input_embeddings().weight

    def _ties_embeddings(self) -> bool:
        return bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))

    @property
    def swarm(self) -> RemoteSwarm:
        return self.remote_layers.swarm

    @property
    def remote_layers(self) -> RemoteSequential:
        return self.remote_base.remote_layers

    def inference_session(self, max_length: int) -> InferenceSession:
        """``with model.inference_session(max_length=N) as session:`` keeps the servers' attention caches across
        ``generate()`` calls and ``model(...)`` calls inside the block (N counts every token the session will hold)."""
        return self._new_session(max_length)

    @property
    def active_session(self) -> Optional[InferenceSession]:
        """The session entered with ``with model.inference_session(...)``, if any (Petals' name)."""
        session = self.remote_layers.active_session
        return None if session is None or session._closed else session

    @contextlib.contextmanager
    def use_session(self, session: Optional[InferenceSession]):
        """Make ``session`` (opened earlier, not closed) the active one inside the ``with`` block (Petals' name)."""
        with self.remote_layers.use_session(session):
            yield session

    def _new_session(self, max_length: int) -> InferenceSession:
        """A session with this model's LoRA weights (as they are now) or server adapter, and room for its prompt."""
        base = self.remote_base
        prefix = base.prompt_tuning.pre_seq_len if base.prompt_tuning is not None else 0
        lora = None if base.remote_lora is None else base.remote_lora.lora_set()
        return self.remote_layers.inference_session(max_length + prefix, lora=lora, active_adapter=base.active_adapter)

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, session: Optional[InferenceSession] = None, **kwargs):
        """Hugging Face ``generate()`` with the blocks in the swarm.

        Without a session, it opens one for this call and returns the inputs followed by the new tokens, as
        transformers does. Inside ``with model.inference_session(...)`` (or with ``session=``), each call continues
        the session, with Petals' results: the first call returns its inputs and the new tokens; a later
        ``generate(new_ids)`` appends ``new_ids`` to everything the session holds and returns ``new_ids`` and the new
        tokens; ``generate(None)`` continues and returns only the new tokens. After ``session.position = k`` the
        session continues from its first ``k`` tokens.
        """
        if inputs is None and kwargs.get("input_ids") is not None:
            inputs = kwargs.pop("input_ids")
        kwargs.pop("input_ids", None)
        if kwargs.get("max_length") is None:
            kwargs.pop("max_length", None)
        session = session or self.active_session
        if kwargs.get("use_cache", (kwargs.get("generation_config") or self.generation_config).use_cache) is False:
            # no cache: every step sends the whole sequence again, which a session would append to what it holds
            if session is not None:
                raise ValueError("generate(use_cache=False) sends the whole sequence at every step, so it runs "
                                 "without a session: call it outside inference_session(), or keep the cache on")
            return super().generate(inputs, *args, **kwargs)
        if inputs is None and kwargs.get("inputs_embeds") is not None:
            return self._generate_from_embeddings(session, args, kwargs)
        owns_session = session is None
        inputs, previous = self._session_inputs(session, inputs, kwargs)
        if kwargs.get("attention_mask") is None:
            kwargs.pop("attention_mask", None)
        if previous and kwargs.get("streamer") is not None:  # the streamer hears of this call's inputs, not history
            kwargs["streamer"] = _AfterHistory(kwargs["streamer"], previous)
        if owns_session:
            session = self._new_session(self._session_length(inputs.shape[1], kwargs))
            before = None
        else:
            before = (session.position, session.output_ids, session.output_mask, session.ids_lost)
            if session.position - session.prefix_length >= inputs.shape[1]:
                # the servers hold every input token (after a rewind, or model(...) steps): generate() needs the
                # logits of the last one, so it is run again
                session.position = session.prefix_length + inputs.shape[1] - 1
        try:
            outputs, inputs = self._generate_checked(session, inputs, args, kwargs)
        except BaseException as error:
            if before is not None:
                _restore(session, before, error)
            raise
        finally:
            if owns_session:
                session.close()
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        if not owns_session:
            self._remember_tokens(session, inputs, sequences, kwargs.get("attention_mask"))
        if previous == 0:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs[:, previous:]
        outputs.sequences = sequences[:, previous:]
        return outputs

    def _generate_from_embeddings(self, session: Optional[InferenceSession], args, kwargs):
        """``generate(inputs_embeds=...)`` without token ids: transformers returns only the new tokens. It starts a
        sequence: in its own session, or in an empty one (which then cannot continue with ``generate(None)``: the
        ids of its first tokens are not known)."""
        embeds = kwargs["inputs_embeds"]
        if session is not None and session.position > session.prefix_length:
            raise ValueError("generate(inputs_embeds=...) starts a sequence, and this session holds tokens already: "
                             "continue it with input_ids, or start a new session")
        owns_session = session is None
        if owns_session:  # transformers counts a max_length given with embeddings as new tokens only
            generation_config = self._generation_config(kwargs)
            new = generation_config.max_new_tokens
            session = self._new_session(embeds.shape[1] + (new if new is not None else generation_config.max_length))
        try:
            outputs = super().generate(None, *args, cache=RemoteCache(session), **kwargs)
            session.settle()
        finally:
            if owns_session:
                session.close()
        if not owns_session:
            session.output_ids = session.output_mask = None
            session.ids_lost = "it began with inputs_embeds, whose token ids are not known"
        return outputs

    def _generation_config(self, kwargs: dict) -> GenerationConfig:
        """The settings transformers' ``generate()`` will run with (kwargs over ``generation_config`` over the
        model's, then transformers' defaults: 20 tokens in all when no length is given)."""
        rest = {key: value for key, value in kwargs.items() if key != "generation_config"}
        return self._prepare_generation_config(kwargs.get("generation_config"), **rest)[0]

    def _generate_checked(self, session: InferenceSession, inputs: torch.Tensor, args, kwargs):
        """transformers' ``generate()`` on the session; if a check catches a server's lie (``OutputsRejected``: the
        session went back to its last checked position, on honest servers), generate again from there. Returns the
        outputs and the inputs of the attempt that produced them."""
        held = session.position - session.prefix_length
        mask = kwargs.get("attention_mask")
        session.fed_ids = inputs[:, :held]
        session.fed_mask = (torch.ones_like(inputs) if mask is None else mask)[:, :held]
        original, original_mask = inputs, mask
        max_new = self._generation_config(kwargs).max_new_tokens
        total = inputs.shape[1] + max_new if max_new is not None else None
        min_new = kwargs.get("min_new_tokens")
        min_total = None if min_new is None else inputs.shape[1] + min_new
        for attempt in range(self.swarm.config.max_retries + 1):
            try:
                outputs = super().generate(inputs, *args, cache=RemoteCache(session), **kwargs)
                session.settle()
                return outputs, inputs
            except OutputsRejected as rejected:
                if session.fed_ids is None or attempt == self.swarm.config.max_retries:
                    raise
                logger.warning("generating again from position %d: %s", rejected.position, rejected)
                kept = session.fed_ids if session.fed_ids.shape[1] >= original.shape[1] else original
                inputs = kept
                if original_mask is not None:
                    kwargs["attention_mask"] = torch.cat(
                        [original_mask, original_mask.new_ones(kept.shape[0], kept.shape[1] - original.shape[1])],
                        dim=1)[:, : kept.shape[1]]
                if total is not None:
                    kwargs["max_new_tokens"] = total - kept.shape[1]
                if min_total is not None:
                    kwargs["min_new_tokens"] = max(0, min_total - kept.shape[1])
                if session.position - session.prefix_length >= inputs.shape[1]:
                    session.position = session.prefix_length + inputs.shape[1] - 1
        raise AssertionError("unreachable")

    @staticmethod
    def _session_inputs(session: Optional[InferenceSession], inputs, kwargs) -> tuple[torch.Tensor, int]:
        """The whole sequence to hand to transformers' ``generate()`` (the session's tokens, then ``inputs``; the
        attention mask in ``kwargs`` extended likewise), and how many of its tokens earlier calls returned."""
        history = None if session is None else session.output_ids
        held = 0 if session is None else session.position - session.prefix_length
        if history is None and held > 0:
            why = session.ids_lost or "they were sent as hidden states or embeddings, not token ids"
            raise ValueError(
                f"generate() cannot continue this session: it holds {held} tokens whose ids are not known here ({why});"
                " start a new session, or step it with model(input_ids=...)"
            )
        if inputs is None:
            if history is None or history.shape[1] == 0:
                raise ValueError("generate(None) continues an inference session, but none holds tokens yet")
            kwargs["attention_mask"] = session.output_mask
            return history, history.shape[1]
        if history is None or history.shape[1] == 0:
            return inputs, 0
        if history.shape[0] != inputs.shape[0]:
            raise ValueError(f"the session holds batch {history.shape[0]}, got inputs with batch {inputs.shape[0]}")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(inputs) if mask is None else mask
        kwargs["attention_mask"] = torch.cat([session.output_mask, mask.to(session.output_mask.dtype)], dim=1)
        return torch.cat([history, inputs.to(history.device)], dim=1), history.shape[1]

    @staticmethod
    def _remember_tokens(session: InferenceSession, inputs, sequences, mask) -> None:
        """After ``generate()`` in a session: the token ids of the session (the last one not yet sent)."""
        rows = session.batch_size if session.batch_size is not None else sequences.shape[0]
        if rows != inputs.shape[0] or sequences.shape[0] != inputs.shape[0]:
            # beams or several sequences per input: the servers hold rows that are not the returned sequences
            session.output_ids = session.output_mask = None
            session.ids_lost = (f"generate() ran {rows} rows in it for {inputs.shape[0]} input(s) (beams or "
                                "num_return_sequences): the servers hold those rows, not the sequences it returned")
            return
        mask = torch.ones_like(inputs) if mask is None else mask
        extra = torch.ones(sequences.shape[0], sequences.shape[1] - mask.shape[1], dtype=mask.dtype, device=mask.device)
        session.output_ids = sequences
        session.output_mask = torch.cat([mask, extra], dim=1)

    def _session_length(self, length: int, kwargs: dict) -> int:
        """Tokens a session for ``generate()`` on ``length`` tokens needs: they and what the call may add, as
        transformers counts it (``max_new_tokens``; else ``max_length`` in all; else 20 new tokens, within the
        model's positions)."""
        generation_config = self._generation_config(kwargs)
        if generation_config.max_new_tokens is not None:
            return length + generation_config.max_new_tokens
        given = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_length") is None and given.max_length is None and self.generation_config.max_length is None:
            limit = getattr(self.config, "max_position_embeddings", None) or float("inf")
            return max(min(length + generation_config.max_length, limit), length + 1)
        return max(generation_config.max_length, length + 1)

    def close(self) -> None:
        """Disconnect from the swarm (stops the client's peer)."""
        self.swarm.close()


def _base_model(family: ModelFamily, config, swarm: RemoteSwarm) -> RemoteBaseModel:
    return RemoteBaseModel(config, family.client_parts(config), swarm)


def _init_causal_lm(self, config, swarm: RemoteSwarm) -> None:
    """``__init__`` of every distributed causal LM: the family's client parts, the head; never the blocks."""
    family = family_for(config)
    PreTrainedModel.__init__(self, config)
    _put_base(self, family, _base_model(family, config, swarm))
    self.vocab_size = config.vocab_size
    # the head's decode calls (a row per sequence) run on Corolla's CPU kernels where they can (KernelLinear)
    self.lm_head = KernelLinear(family.output_features(config), config.vocab_size, bias=family.lm_head_bias)


def _init_sequence_classification(self, config, swarm: RemoteSwarm) -> None:
    """``__init__`` of every distributed classifier: a ``score`` head (trained from scratch) on the last real token."""
    family = family_for(config)
    PreTrainedModel.__init__(self, config)
    self.num_labels = config.num_labels
    _put_base(self, family, _base_model(family, config, swarm))
    self.score = nn.Linear(family.output_features(config), config.num_labels, bias=False)


class _Delegate(nn.Module):
    """A base model that is only a container for the remote one (OPT's ``model`` around ``decoder``)."""

    def __init__(self, child: str, module: nn.Module):
        super().__init__()
        self._child = child
        setattr(self, child, module)

    def forward(self, *args, **kwargs):
        return getattr(self, self._child)(*args, **kwargs)


def _put_base(model: nn.Module, family: ModelFamily, base: "RemoteBaseModel") -> None:
    first, *inner = family.base_path.split(".")
    for name in reversed(inner):
        base = _Delegate(name, base)
    setattr(model, first, base)


def _class_name(family: ModelFamily, hf_class: type) -> str:
    return "Distributed" + hf_class.__name__


@functools.cache
def distributed_causal_lm(model_type: str) -> type:
    """The distributed causal LM class of ``model_type``: the family's Hugging Face ``*ForCausalLM`` (its forward,
    generate() and head) over ``DistributedModelMixin`` (blocks in the swarm)."""
    family = family_for_type(model_type)
    hf_class = family.causal_lm_class
    return type(_class_name(family, hf_class), (DistributedModelMixin, hf_class),
                {"__init__": _init_causal_lm, "_base_attr": family.base_attr, "_base_path": family.base_path,
                 "__module__": __name__})


@functools.cache
def distributed_sequence_classification(model_type: str) -> type:
    family = family_for_type(model_type)
    hf_class = family.sequence_classification_class
    if hf_class is None:
        raise ValueError(f"{model_type} has no sequence classification model in Corolla")
    return type(_class_name(family, hf_class), (DistributedModelMixin, hf_class),
                {"__init__": _init_sequence_classification, "_base_attr": family.base_attr, "_base_path": family.base_path,
                 "_new_head_prefixes": ("score.",), "__module__": __name__})


DistributedLlamaForCausalLM = distributed_causal_lm("llama")
DistributedBloomForCausalLM = distributed_causal_lm("bloom")
DistributedLlamaForSequenceClassification = distributed_sequence_classification("llama")
DistributedBloomForSequenceClassification = distributed_sequence_classification("bloom")


class _AutoDistributed:
    """Picks the distributed class for a checkpoint's ``model_type``, like transformers' Auto classes."""

    _class_for: Callable[[str], type]  # model_type -> the distributed class (each Auto class sets it)

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None, *, initial_peers=(), **kwargs):
        config: PretrainedConfig = load_config(resolve_model(name_or_path))
        try:
            family_for(config)
        except CorollaError as exc:
            raise ValueError(f"{cls.__name__}: {exc}") from None
        model_class = cls._class_for(config.model_type)
        return model_class.from_pretrained(name_or_path, initial_peers=initial_peers, **kwargs)


class AutoDistributedModelForCausalLM(_AutoDistributed):
    _class_for = staticmethod(distributed_causal_lm)


class AutoDistributedModelForSequenceClassification(_AutoDistributed):
    _class_for = staticmethod(distributed_sequence_classification)
