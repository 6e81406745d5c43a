"""Generating text on the terminal, with tokens streamed as they arrive."""
from __future__ import annotations

import sys
from typing import Optional

import torch
from transformers import AutoTokenizer, TextStreamer

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


def generate_reply(model, tokenizer, input_ids: torch.Tensor, args, session=None) -> str:
    """Generate and stream a reply to stdout; returns the reply's text."""
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    outputs = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        session=session,
        **sampling_kwargs(args),
    )
    sys.stdout.flush()
    return tokenizer.decode(outputs[0, input_ids.shape[1]:], skip_special_tokens=True)


def chat_loop(model, tokenizer, args) -> None:
    """Read user turns from stdin until EOF or an empty line; keep the conversation as context."""
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chatting with the swarm. An empty line or Ctrl-D ends.", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        input_ids = chat_input_ids(tokenizer, messages)
        print("model> ", end="", flush=True)
        reply = generate_reply(model, tokenizer, input_ids, args)
        messages.append({"role": "assistant", "content": reply.strip()})
