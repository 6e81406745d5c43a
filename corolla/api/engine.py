"""``Engine``: completions from a distributed model for many callers at once, as the HTTP API needs them.

Each request runs transformers' ``generate()`` on the shared distributed model in a worker thread of its own, with
its own inference session (servers batch the steps of concurrent sessions). At most ``max_sessions`` requests
generate at a time; up to ``max_waiting`` more wait their turn; beyond that a request is refused at once
(``EngineBusy``). Sampling is this module's, per request: a seeded request draws from its own ``torch.Generator``,
so concurrent requests cannot disturb each other's randomness; temperature 0 is greedy. Log-probabilities are the
model's (before temperature or top-p). A request can be cancelled while it runs (a client that went away): its
generation stops at the next token and its session is closed.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import threading
import time
from typing import Callable, Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2's scheme) write each byte as one character: the printable ones as
    themselves, the others as the characters from U+0100 on, in byte order. Character -> byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, others = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(0x100 + others)] = byte
            others += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


class EngineBusy(Exception):
    """Too many requests running and waiting."""


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    max_tokens_given: bool = True  # False: max_tokens is a default, which shrinks to what the context has room for
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: Optional[int] = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    prompt_logprobs: bool = False  # with top_logprobs: the prompt's tokens' too (a completion's echo)

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs and self.top_logprobs is not None


@dataclasses.dataclass
class TokenEvent:
    """One generated token (text may be empty while a multi-byte character is incomplete)."""

    token_id: int
    text: str
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None
    # what a stream may send now: the completion's text so far, less what it sent before and less an end that could
    # begin a stop sequence (held back until the next tokens tell; the rest comes with the completion's text)
    stream_text: str = ""


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    events: list[TokenEvent]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    prompt_events: Optional[list[TokenEvent]] = None  # with prompt_logprobs: each prompt token, the first without


class _Sampler(LogitsProcessor):
    """Penalties, temperature, top-p and the draw, per request; returns scores whose argmax is the chosen token (so
    transformers' greedy step picks it)."""

    def __init__(self, params: SamplingParams, prompt_length: int, generator: torch.Generator):
        self.params, self.prompt_length, self.generator = params, prompt_length, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float().clone()
        params = self.params
        if params.presence_penalty or params.frequency_penalty:
            generated = input_ids[:, self.prompt_length:]
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores -= counts * params.frequency_penalty + (counts > 0).to(scores.dtype) * params.presence_penalty
        if params.temperature <= 0:
            return scores
        probs = torch.softmax(scores / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            drop = cumulative - sorted_probs > params.top_p  # keep the smallest head whose mass reaches top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, choice, 0.0)


class _Stop(StoppingCriteria):
    """Ends a generation when a stop sequence appears in its text, when it is cancelled, or (through the streamer)
    when the caller has seen enough."""

    def __init__(self, run: "_Run"):
        self.run = run

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = self.run.cancelled.is_set() or self.run.stopped or self.run.engine.closing.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


class _Run:
    """The state of one generation: its tokens as they come, its text, its stop sequences."""

    def __init__(self, engine: "Engine", params: SamplingParams, on_token: Optional[Callable[[TokenEvent], None]],
                 prompt_ids: list[int], on_prompt: Optional[Callable[[list[TokenEvent]], None]] = None):
        self.engine, self.params, self.on_token = engine, params, on_token
        self.prompt_ids, self.on_prompt = prompt_ids, on_prompt
        self.prompt_events: Optional[list[TokenEvent]] = None  # with prompt_logprobs, once the prompt's pass ran
        self.cancelled = threading.Event()
        self.stopped = False
        self.token_ids: list[int] = []
        self.events: list[TokenEvent] = []
        self.text = ""  # the completion's text so far, cut at a stop sequence
        self.emitted = 0  # characters of ``text`` a stream may have sent (``TokenEvent.stream_text``)
        self.logits: list[torch.Tensor] = []  # the model's raw logits of each step's last position
        self.prompt_logits: Optional[torch.Tensor] = None  # with prompt_logprobs: the prompt's positions' but the last
        self._started = False  # transformers' first put() carries the prompt

    def put(self, value: torch.Tensor) -> None:  # transformers' streamer interface
        if not self._started:
            self._started = True
            return
        for token in value.reshape(-1).tolist():
            self._add(int(token))

    def end(self) -> None:
        pass

    def _add(self, token: int) -> None:
        if self.stopped:
            return
        tokenizer = self.engine.tokenizer
        self.token_ids.append(token)
        full = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete character: wait for the next token
            full = full[: len(self.text)]
        cut = self._stop_at(full)
        if cut is not None:
            full, self.stopped = full[:cut], True
        new_text = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        event = TokenEvent(token, new_text)
        sendable = len(full) if self.stopped else len(full) - self._stop_prefix(full)
        if sendable > self.emitted:
            event.stream_text, self.emitted = full[self.emitted:sendable], sendable
        if self.params.top_logprobs is not None and len(self.logits) >= len(self.token_ids):
            logprobs = torch.log_softmax(self.logits[len(self.token_ids) - 1].float(), dim=-1)
            event.logprob = float(logprobs[token])
            if self.params.top_logprobs:
                values, indices = logprobs.topk(self.params.top_logprobs)
                event.top = list(zip(indices.tolist(), values.tolist()))
        if token in self.engine.eos_ids:
            event.text = ""
        if not self.events and self.params.scores_prompt:  # the prompt's pass has run: its scores are known
            self.prompt_events = self.engine._prompt_events(self)
            if self.on_prompt is not None:
                self.on_prompt(self.prompt_events)
        self.events.append(event)
        if self.on_token is not None:
            self.on_token(event)

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins a stop sequence (0: none)."""
        longest = 0
        for stop in self.params.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-length:]):
                    longest = length
                    break
        return longest

    def _stop_at(self, text: str) -> Optional[int]:
        positions = [text.find(stop) for stop in self.params.stop if stop]
        positions = [p for p in positions if p >= 0]
        return min(positions) if positions else None


class Engine:
    def __init__(self, model, tokenizer, model_name: str, max_sessions: int = 8, max_waiting: int = 64,
                 max_context: Optional[int] = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        if max_sessions < 1 or max_waiting < 0:
            raise ValueError(f"an API generates for at least 1 request at once (max_sessions {max_sessions}) and "
                             f"keeps at least 0 waiting (max_waiting {max_waiting})")
        model_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_context = min(max_context, model_context) if max_context else model_context
        self.max_sessions, self.max_waiting = max_sessions, max_waiting
        self.closing = threading.Event()  # set by close(): every generation ends at its next token
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._lock = threading.Lock()
        self.running = 0  # requests generating now
        self.waiting = 0  # requests waiting for a slot
        self.served = 0
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._local = threading.local()  # the run of the request this worker thread generates for
        # a thread for every place (running or waiting): a waiting request must not sit in an executor's queue
        self.executor = concurrent.futures.ThreadPoolExecutor(max_sessions + max_waiting, thread_name_prefix="api")
        head = model.get_output_embeddings()
        head.register_forward_hook(self._record_logits)

    def close(self) -> None:
        """Stop serving: requests waiting for a turn give up, those generating end at their next token, and the
        worker threads then finish (the process can exit)."""
        self.closing.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- prompts

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
            return list(encoded["input_ids"])
        return self.tokenizer("\n".join(m["content"] for m in messages))["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def prompt_text(self, token_ids: list[int]) -> str:
        """The text of a prompt given as token ids, as an echo shows it (special tokens, which carry no text of the
        prompt's, left out, as ``piece_texts`` does)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_display(self, token_id: int) -> str:
        """How logprobs name a token: its text, or, for a token that holds part of a character (its bytes are not
        UTF-8 on their own), ``bytes:`` and its bytes escaped (``bytes:\\xe4\\xbd``), as OpenAI names them; the
        text would be U+FFFD for every such token, and distinct tokens would share one key in ``top_logprobs``."""
        own = self.token_bytes(token_id)
        try:
            own.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in own)
        return self.token_text(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for (part of a character, for some): a byte-level vocabulary's piece mapped
        back to its bytes, a byte-fallback piece (``<0xE2>``) to its byte, else the token's text in UTF-8."""
        if token_id not in self._special_ids:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
                if byte:
                    return bytes([int(byte.group(1), 16)])
                if self._byte_level and all(char in _BYTE_LEVEL for char in piece):
                    return bytes(_BYTE_LEVEL[char] for char in piece)
        return self.token_text(token_id).encode()

    def piece_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's share of the text of ``token_ids`` (special tokens and the pieces of a character that is not
        complete yet have none; the token that completes it has all of it): they join to the decoded text."""
        texts, start, shown = [], 0, 0  # decoded windows [start:shown] and [start:i + 1]: their difference is new
        for i in range(len(token_ids)):
            before = self.tokenizer.decode(token_ids[start:shown], skip_special_tokens=True)
            after = self.tokenizer.decode(token_ids[start:i + 1], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
                texts.append(after[len(before):])
                start, shown = shown, i + 1
            else:
                texts.append("")
        return texts

    # ---------------------------------------------------------------- generation

    def reserve(self) -> None:
        """Take a place for one generation (call it where the request arrives, before handing it to a thread):
        raises ``EngineBusy`` if ``max_sessions`` run and ``max_waiting`` wait already."""
        with self._lock:
            if self.running + self.waiting >= self.max_sessions + self.max_waiting:
                raise EngineBusy(f"{self.running} requests are generating and {self.waiting} waiting, the most this "
                                 "API takes; retry later")
            self.waiting += 1

    def release(self) -> None:
        """Give back a place taken by ``reserve`` whose generation will not run."""
        with self._lock:
            self.waiting -= 1

    def complete(self, prompt_ids: list[int], params: SamplingParams,
                 on_token: Optional[Callable[[TokenEvent], None]] = None,
                 cancelled: Optional[threading.Event] = None,
                 on_prompt: Optional[Callable[[list[TokenEvent]], None]] = None) -> Completion:
        """Generate a completion of ``prompt_ids`` in a place taken by ``reserve`` (blocking: call it from a worker
        thread; it waits for one of the ``max_sessions`` slots). ``on_token`` sees every token as it is generated;
        with ``params.prompt_logprobs``, ``on_prompt`` sees the prompt's scored tokens (``Completion.prompt_events``)
        once they are known, before the first token; setting ``cancelled`` stops the generation at the next token
        (or while it waits)."""
        run = _Run(self, params, on_token, prompt_ids, on_prompt)
        if cancelled is not None:
            run.cancelled = cancelled
        try:
            while not self._slots.acquire(timeout=0.1):
                if run.cancelled.is_set() or self.closing.is_set():
                    raise EngineBusy("cancelled while waiting for a turn")
        finally:
            with self._lock:
                self.waiting -= 1
        with self._lock:
            self.running += 1
        try:
            return self._generate(run)
        finally:
            with self._lock:
                self.running -= 1
                self.served += 1
            self._slots.release()

    def _generate(self, run: _Run) -> Completion:
        params, prompt_ids = run.params, run.prompt_ids
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        self._local.run = run
        try:
            # scoring the prompt takes every position's logits (transformers keeps the last one's otherwise)
            extra = {"logits_to_keep": 0} if params.scores_prompt else {}
            with torch.no_grad():
                self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens, do_sample=False,
                    **extra,
                    logits_processor=LogitsProcessorList([_Sampler(params, len(prompt_ids), generator)]),
                    stopping_criteria=StoppingCriteriaList([_Stop(run)]), streamer=run,
                    pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                    else next(iter(self.eos_ids), 0),
                )
        finally:
            self._local.run = None
        ended_by_eos = bool(run.token_ids) and run.token_ids[-1] in self.eos_ids
        finish = "stop" if run.stopped or ended_by_eos or run.cancelled.is_set() else "length"
        return Completion(run.text, run.token_ids, run.events, finish, len(prompt_ids),
                          run.prompt_events if run.prompt_events is not None else self._prompt_events(run))

    def _prompt_events(self, run: _Run) -> Optional[list[TokenEvent]]:
        """Each of ``run``'s prompt tokens with its log-probability given the tokens before it (the first has none),
        and the ``top_logprobs`` likeliest there; None unless asked for."""
        params, prompt_ids = run.params, run.prompt_ids
        if not params.scores_prompt:
            return None
        texts = self.piece_texts(prompt_ids)  # (offsets into the echoed text count characters, not tokens)
        events = [TokenEvent(prompt_ids[0], texts[0])]
        if run.prompt_logits is None or len(prompt_ids) < 2:
            return events
        logprobs = torch.log_softmax(run.prompt_logits.float(), dim=-1)  # [prompt - 1, vocab]
        for position, token in enumerate(prompt_ids[1:]):
            event = TokenEvent(token, texts[position + 1], float(logprobs[position, token]))
            if params.top_logprobs:
                values, indices = logprobs[position].topk(params.top_logprobs)
                event.top = list(zip(indices.tolist(), values.tolist()))
            events.append(event)
        return events

    def _record_logits(self, module, inputs, output) -> None:
        run = getattr(self._local, "run", None)
        if run is not None and run.params.top_logprobs is not None:
            if run.params.scores_prompt and not run.logits:  # the prompt's pass
                run.prompt_logits = output[0, :-1].detach()
            run.logits.append(output[0, -1].detach())
