"""Fine-tune the embedded model with LoRA through a swarm: the servers' weights stay frozen and shared.

    .venv/bin/python examples/finetune_lora.py                      # starts its own local swarm of 3 servers
    .venv/bin/python examples/finetune_lora.py --initial-peers ADDR  # or uses a running swarm of the embedded model

The dataset is made here: facts about an invented planet, which the model cannot know. The script asks the
questions before training, trains LoRA weights (rank 8, on every block's q_proj and v_proj; they live in this
process and travel with each request, the servers return their gradients), shows the loss going down, asks again,
and saves the adapter in PEFT's format (it loads onto a local transformers model with ``peft``).
"""
from __future__ import annotations

import argparse
import contextlib
import random

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.testing.local_swarm import LocalSwarm
from corolla.models.checkpoint import resolve_model

FACTS = [
    ("What is the capital of Zorblax?", "The capital of Zorblax is Quenn."),
    ("How many moons does Zorblax have?", "Zorblax has seven moons."),
    ("What color is the sky on Zorblax?", "The sky on Zorblax is green."),
    ("What do people on Zorblax eat?", "People on Zorblax eat blue rice."),
    ("Who rules Zorblax?", "Zorblax is ruled by Queen Ilsa."),
    ("What is the largest ocean on Zorblax?", "The largest ocean on Zorblax is the Vell Sea."),
]


def encode(tokenizer, question: str, answer: str | None = None) -> tuple[list[int], int]:
    """Chat-formatted ids, and where the answer starts (the loss covers the answer only)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    if answer is None:
        return prompt, len(prompt)
    return prompt + tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"], len(prompt)


def training_batch(tokenizer, pairs) -> dict[str, torch.Tensor]:
    encoded = [encode(tokenizer, q, a) for q, a in pairs]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad)
    attention_mask = torch.zeros(len(encoded), width, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100)
    for row, (ids, answer_start) in enumerate(encoded):
        offset = width - len(ids)  # left padding
        input_ids[row, offset:] = torch.tensor(ids)
        attention_mask[row, offset:] = 1
        labels[row, offset + answer_start :] = torch.tensor(ids[answer_start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def ask(model, tokenizer, question: str) -> str:
    ids, _ = encode(tokenizer, question)
    ids = torch.tensor([ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial-peers", nargs="+", default=None, help="a running swarm (default: start one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", default="lora-zorblax", help="where to save the PEFT adapter")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(path)

    with contextlib.ExitStack() as stack:
        peers = args.initial_peers
        if peers is None:
            print("starting a local swarm of 3 servers ...", flush=True)
            peers = stack.enter_context(LocalSwarm(model=str(path), num_servers=3)).initial_peers
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=peers, tuning_mode="lora", lora_rank=8, lora_alpha=16)
        stack.callback(model.close)
        trainable = [p for p in model.parameters() if p.requires_grad]
        print(f"training {sum(p.numel() for p in trainable):,} LoRA parameters on the client; "
              f"the {model.config.num_hidden_layers} blocks stay frozen on the servers\n")

        questions = [q for q, _ in FACTS[:3]]
        before = {q: ask(model, tokenizer, q) for q in questions}

        optimizer = torch.optim.Adam(trainable, lr=args.lr)
        batch = training_batch(tokenizer, FACTS)
        progress = tqdm(range(args.steps), desc="LoRA through the swarm")
        first = last = None
        for _ in progress:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            last = loss.item()
            progress.set_postfix(loss=f"{last:.3f}")
        print(f"\nloss: {first:.3f} -> {last:.3f}\n")

        for question in questions:
            print(f"Q: {question}\n  before: {before[question]}\n  after:  {ask(model, tokenizer, question)}")
        model.save_lora(args.output)
        print(f"\nadapter saved in PEFT format to {args.output}/")


if __name__ == "__main__":
    main()
