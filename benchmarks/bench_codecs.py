"""Wire codecs for activations: what each costs and saves, on the embedded model, in one run.

Run: .venv/bin/python benchmarks/bench_codecs.py [--new-tokens 64]

Three real servers (blocks 0:10, 10:20, 20:30) on the in-memory network, in this process, with relay on. For each
codec (none, float16, bfloat16, int8-block64):

* bytes per decode step: every byte that crossed any link (client to servers, server to server, answers to the
  client) during greedy decoding, divided by the steps, and the same for the 128-token prefill;
* encode + decode time of one step's hidden states (1 token and 128 tokens), median of repeated runs;
* the largest logit error against local transformers on a fixed ~2,000-token text (the README, wrapped), absolute
  and relative to the largest logit, and how often the top token equals local's at each of its positions
  (teacher-forced agreement);
* greedy-token agreement with local transformers over ``--new-tokens`` tokens: tokens equal at the same position,
  and the first position that differs.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.client.config import ClientConfig
from corolla.core.blocks import BlockRange
from corolla.models.embedded import embedded_model_dir
from corolla.testing.inprocess import InProcessSwarm
from corolla.wire.codec import PREFIX, decode_frame, decode_prefix
from corolla.wire.compression import SUPPORTED_CODECS
from corolla.wire.framing import encode_message
from corolla.wire.messages import SessionStep, message_from_frame

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def codec_time_ms(hidden: torch.Tensor, codec: str, repeats: int = 30) -> float:
    """Median time to encode a step's frame and decode it back."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode_message(SessionStep("s", hidden), codec=codec)
        header_len, _ = decode_prefix(data[:PREFIX.size])
        message_from_frame(decode_frame(data[PREFIX.size:PREFIX.size + header_len], data[PREFIX.size + header_len:]))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text_ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :2048]
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference_logits = local(text_ids).logits
        hidden = local(text_ids, output_hidden_states=True).hidden_states[10]  # what enters the second server
    reference_tokens = local.generate(prompt_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      do_sample=False)[0, prompt_ids.shape[1]:]
    prefill = torch.randn(1, 128, local.config.hidden_size) * hidden.std()

    rows = []
    spans = [BlockRange(0, 10), BlockRange(10, 20), BlockRange(20, 30)]
    with InProcessSwarm(path, spans, dht_prefix="codecs") as swarm:
        for codec in SUPPORTED_CODECS:
            model = swarm.client(client_config=ClientConfig(wire_codec=codec), torch_dtype=torch.float32)
            try:
                with torch.no_grad():
                    logits = model(text_ids).logits
                error = (logits - reference_logits).abs().max().item()
                top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
                sent = swarm.network.bytes_sent
                with model.inference_session(max_length=256) as session:
                    session.step(torch.zeros(1, 0, local.config.hidden_size))  # open the streams
                    start = sum(sent.values())
                    with torch.no_grad():
                        model(input_ids=torch.randint(100, 1000, (1, 128)))
                    prefill_bytes = sum(sent.values()) - start
                before = sum(sent.values())
                tokens = model.generate(prompt_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False)[0, prompt_ids.shape[1]:]
                decode_bytes = (sum(sent.values()) - before) / args.new_tokens  # the prompt step included: small
            finally:
                model.close()
            equal = [int(a == b) for a, b in zip(tokens.tolist(), reference_tokens.tolist())]
            first_diff = next((i for i, same in enumerate(equal) if not same), None)
            rows.append((codec, decode_bytes, prefill_bytes, codec_time_ms(hidden[:, -1:], codec),
                         codec_time_ms(prefill, codec), error, error / reference_logits.abs().max().item(), top1,
                         sum(equal), len(equal), first_diff))
    print(f"embedded model, 3 servers (0:10, 10:20, 20:30), relay on; greedy {args.new_tokens} tokens; "
          f"logits on a {text_ids.shape[1]}-token text (top-1 forced: share of its positions whose top token equals "
          "local's)")
    print(f"  {'codec':<13} {'bytes/decode step':>17} {'bytes/128-token prefill':>23} {'enc+dec 1 tok':>13} "
          f"{'enc+dec 128 tok':>15} {'max logit error':>15} {'(relative)':>10} {'top-1 forced':>12} "
          f"{'greedy agreement':>17} first diff")
    base = rows[0]
    for codec, step_b, prefill_b, t1, t128, err, rel, top1, same, total, first in rows:
        print(f"  {codec:<13} {step_b:>11.0f} ({step_b / base[1]:.2f}) {prefill_b:>15.0f} ({prefill_b / base[2]:.2f}) "
              f"{t1:>10.3f} ms {t128:>12.3f} ms {err:>15.2e} {rel:>10.1e} {top1:>12.4f} {same:>10}/{total:<6} "
              f"{'-' if first is None else first}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
