"""Generating text on the terminal, with tokens streamed as they arrive."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

import torch
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextStreamer

from corolla.models.checkpoint import resolve_model


def load_tokenizer(model: Optional[str]):
    return AutoTokenizer.from_pretrained(str(resolve_model(model)))


def chat_input_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def sampling_kwargs(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = args.repetition_penalty
    return kwargs


class ReplyInterrupt:
    """Inside: Ctrl-C (SIGINT) ends the reply being generated at its next token instead of ending the program, as
    chat programs do; a second Ctrl-C before the reply ends raises ``KeyboardInterrupt`` as usual. Outside, and off
    the main thread (where signal handlers cannot be set), Ctrl-C keeps its usual effect."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None

    def __enter__(self) -> "ReplyInterrupt":
        self.event.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate_reply(model, tokenizer, input_ids: torch.Tensor, args, session=None,
                   interrupt: Optional[threading.Event] = None) -> str:
    """Generate and stream a reply to stdout; returns the reply's text. Setting ``interrupt`` ends it at the next
    token."""
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    extra = {} if interrupt is None else {"stopping_criteria": StoppingCriteriaList([_StopWhenSet(interrupt)])}
    outputs = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        session=session,
        **sampling_kwargs(args),
        **extra,
    )
    sys.stdout.flush()
    return tokenizer.decode(outputs[0, input_ids.shape[1]:], skip_special_tokens=True)


def chat_loop(model, tokenizer, args) -> None:
    """Read user turns from stdin until EOF or an empty line; keep the conversation as context. Ctrl-C during a
    reply ends that reply where it is (the conversation keeps what was said); at the prompt it ends the chat.

    The conversation lives in one inference session: each turn sends only the tokens the servers do not hold yet
    (the session rewinds to the longest prefix it shares with the new prompt, e.g. where the template re-tokenized
    the last reply differently, or where old turns were dropped to stay within ``--max-context``).
    """
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict] = []
    max_context = getattr(args, "max_context", 2048)
    print("Chatting with the swarm. An empty line or Ctrl-D ends; Ctrl-C stops a reply.", flush=True)
    interrupt = ReplyInterrupt()
    with model.inference_session(max_length=max_context) as session:
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if not text:
                break
            turns.append({"role": "user", "content": text})
            input_ids = chat_input_ids(tokenizer, system + turns)
            while input_ids.shape[1] + args.max_new_tokens > max_context and len(turns) > 1:
                turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop the oldest exchange
                input_ids = chat_input_ids(tokenizer, system + turns)
            if input_ids.shape[1] + args.max_new_tokens > max_context:
                print(f"(this message needs more than --max-context {max_context} tokens; not sent)", flush=True)
                turns.pop()
                continue
            new_ids = _rewind_to_shared_prefix(session, input_ids)
            print("model> ", end="", flush=True)
            with interrupt:
                reply = generate_reply(model, tokenizer, new_ids, args, session=session, interrupt=interrupt.event)
            if interrupt.event.is_set():
                print("[stopped]", flush=True)
            turns.append({"role": "assistant", "content": reply.strip()})


def _rewind_to_shared_prefix(session, input_ids: torch.Tensor) -> torch.Tensor:
    """Rewind ``session`` to the longest prefix of ``input_ids`` it holds; returns the tokens it still needs."""
    held = session.output_ids
    if held is None:
        session.position = 0
        return input_ids
    length = min(session.position, held.shape[1], input_ids.shape[1] - 1)  # at least one new token to send
    same = (held[0, :length] == input_ids[0, :length]).long()
    shared = int(same.cumprod(0).sum()) if length > 0 else 0
    session.position = shared
    return input_ids[:, shared:]
