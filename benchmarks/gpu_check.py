"""A Corolla swarm on CUDA: exactness against local transformers, and speed.

Run (GPU machine): python benchmarks/gpu_check.py [--device cuda] [--out DIR]
Run (smoke test, no GPU): python benchmarks/gpu_check.py --device cpu --small --quant int8

It builds two random-weight checkpoints with a fixed seed (a Llama of moderate size and a tiny BLOOM), then for
float32 and bfloat16 starts a LocalSwarm of 3 servers with ``--device DEVICE`` and loads the client (on CPU, as
always). For each model and dtype it compares, against a local transformers model on DEVICE in the same dtype:
greedy ``generate`` (32 new tokens) token for token and its per-step logits (max abs diff up to the first token
that differs), the same for a left-padded batch of 2, and ``model(ids).logits``. For the Llama it also times
64 greedy new tokens, local vs. the 3-server swarm. With ``--quant`` (default int8 nf4: bitsandbytes' LLM.int8() and
NF4 on CUDA) the Llama runs again with quantized servers against the unquantized reference. A summary table is
printed and written to
DIR/gpu_check.txt (DIR: --out, else $OUT, else the current directory).
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")  # as `corolla` sets it for its processes; before torch loads

import argparse
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.testing.local_swarm import LocalSwarm

PAD = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(*parts) -> None:
    print(*parts, flush=True)


def build_models(root: Path, small: bool) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    if small:
        llama = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        bloom = BloomConfig(vocab_size=512, hidden_size=64, n_layer=6, n_head=4)
    else:
        llama = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
        bloom = BloomConfig(vocab_size=32000, hidden_size=256, n_layer=6, n_head=8)
    paths = {}
    for name, config, cls in (("llama", llama, LlamaForCausalLM), ("bloom", bloom, BloomForCausalLM)):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, PAD
        torch.manual_seed(0)
        start = time.perf_counter()
        model = cls(config).eval()
        path = root / name
        model.save_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        log(f"built {name}: {config.num_hidden_layers} blocks, hidden {config.hidden_size}, "
            f"{params / 1e6:.1f} M params -> {path} ({time.perf_counter() - start:.1f} s)")
        paths[name] = path
        del model
    return paths


def random_ids(seed: int, batch: int, length: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=generator)


def compare_generate(local, remote, device: str, ids: torch.Tensor, mask, new_tokens: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        exp = local.generate(ids.to(device), attention_mask=None if mask is None else mask.to(device), **kwargs)
        got = remote.generate(ids, attention_mask=mask, **kwargs)
    exp_seq, got_seq = exp.sequences.cpu(), got.sequences.cpu()
    prompt = ids.shape[1]
    same = exp_seq.tolist() == got_seq.tolist()
    differs = (exp_seq[:, prompt:] != got_seq[:, prompt:]).any(dim=0).nonzero()
    first = int(differs[0]) if len(differs) else new_tokens  # first new-token position that differs (any row)
    steps = min(first + 1, new_tokens)  # logits up to and including the first differing step are comparable
    diff = max((exp.logits[i].float().cpu() - got.logits[i].float().cpu()).abs().max().item() for i in range(steps))
    scale = max(exp.logits[i].float().abs().max().item() for i in range(steps))
    return {"same": same, "first_diff": None if same else first, "max_diff": diff, "scale": scale}


def compare_forward(local, remote, device: str, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        exp = local(ids.to(device)).logits.float().cpu()
        got = remote(ids).logits.float().cpu()
    return {"max_diff": (exp - got).abs().max().item(), "scale": exp.abs().max().item(),
            "same_argmax": bool((exp.argmax(-1) == got.argmax(-1)).all())}


def timed_generate(model, ids: torch.Tensor, new_tokens: int, repeats: int, sync) -> tuple[float, list]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        times, out = [], None
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times), out.cpu().tolist()


def gpu_apps() -> str:
    """What nvidia-smi says each process holds on the GPU (proof that the servers use it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return "; ".join(line.strip() for line in out.splitlines()) or "(none listed)"
    except Exception as error:  # noqa: BLE001 - informational only
        return f"(nvidia-smi: {error})"


def run_case(name: str, path: Path, dtype_name: str, args, rows: list, notes: list, quant: str = "none") -> None:
    """``quant`` other than none: the servers' weights are quantized (the reference stays unquantized, so tokens
    may differ after a while: the rows then report agreement and logit distance, not equality)."""
    dtype = DTYPES[dtype_name]
    device = args.device
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    tag = f"{name}/{dtype_name}" + ("" if quant == "none" else f"/{quant}")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = local.config.vocab_size
    start = time.perf_counter()
    with LocalSwarm(model=str(path), num_servers=3, device=device, dtype=dtype_name,
                    extra_server_args=["--quant", quant]) as swarm:
        ready = time.perf_counter() - start
        log(f"[{tag}] swarm of 3 servers on {device} ready in {ready:.1f} s")
        if device.startswith("cuda"):
            apps = gpu_apps()
            pids = {str(c.process.pid) for c in swarm.servers}
            log(f"    nvidia-smi compute apps (pid, memory): {apps}; server pids {sorted(pids)}")
            notes.append(f"{tag}: nvidia-smi apps {apps}; server pids {sorted(pids)}; this pid {os.getpid()}")
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers,
                                                                 torch_dtype=dtype)
        try:
            ids = random_ids(0, 1, 12, vocab)
            g1 = compare_generate(local, remote, device, ids, None, args.new_tokens)
            rows.append((tag, f"greedy generate b=1 ({args.new_tokens} new)", g1))
            log(f"[{tag}] generate b=1: {g1}")
            ids2 = random_ids(1, 2, 12, vocab)
            mask = torch.ones_like(ids2)
            ids2[0, :5], mask[0, :5] = PAD, 0
            g2 = compare_generate(local, remote, device, ids2, mask, args.new_tokens)
            rows.append((tag, f"greedy generate b=2 left-padded ({args.new_tokens} new)", g2))
            log(f"[{tag}] generate b=2 left-padded: {g2}")
            f1 = compare_forward(local, remote, device, random_ids(2, 2, 24, vocab))
            rows.append((tag, "model(ids).logits b=2 len 24", f1))
            log(f"[{tag}] forward logits: {f1}")
            if name == "llama":
                bench_ids = random_ids(3, 1, 12, vocab)
                local_tps, local_out = timed_generate(local, bench_ids.to(device), args.bench_tokens, args.repeats, sync)
                swarm_tps, swarm_out = timed_generate(remote, bench_ids, args.bench_tokens, args.repeats, lambda: None)
                bench = {"local_tok_s": local_tps, "swarm_tok_s": swarm_tps, "ratio": swarm_tps / local_tps,
                         "same": local_out == swarm_out}
                rows.append((tag, f"speed: {args.bench_tokens} greedy new tokens, median of {args.repeats}", bench))
                log(f"[{tag}] speed: {bench}")
        finally:
            remote.close()
    del local
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def fmt(result: dict) -> str:
    if "local_tok_s" in result:
        return (f"local {result['local_tok_s']:.1f} tok/s | swarm {result['swarm_tok_s']:.1f} tok/s | "
                f"ratio {result['ratio']:.3f} | tokens same: {result['same']}")
    if "error" in result:
        return f"FAILED: {result['error']}"
    parts = []
    if "same" in result:
        parts.append(f"tokens same: {result['same']}" + ("" if result["same"] else f" (first diff at new token {result['first_diff']})"))
    if "same_argmax" in result:
        parts.append(f"argmax same: {result['same_argmax']}")
    parts.append(f"max|dlogit| {result['max_diff']:.3g} (max|logit| {result['scale']:.3g})")
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="where the servers and the local reference run")
    parser.add_argument("--small", action="store_true", help="tiny models (a CPU smoke test of this script)")
    parser.add_argument("--models-dir", default="/tmp/model")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="dtypes of the full-precision cases (none: only the --quant cases)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bench-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", nargs="*", default=["int8", "nf4"],
                        help="also run the llama with servers' weights quantized so (bitsandbytes on CUDA; on CPU "
                             "int8/int4 are Corolla's own)")
    parser.add_argument("--out", default=None, help="directory for gpu_check.txt (default: $OUT or .)")
    args = parser.parse_args()
    total_start = time.perf_counter()

    header = [f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__}"]
    try:
        import hivemind

        header[0] += f" | hivemind {hivemind.__version__}"
    except Exception as error:  # noqa: BLE001
        header[0] += f" | hivemind import failed: {error}"
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        header.append(f"device: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
                      f"CUDA {torch.version.cuda}; servers --device {args.device}; client on CPU; "
                      f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        header.append(f"device: {args.device} (no GPU)")
    for line in header:
        log(line)

    paths = build_models(Path(args.models_dir), args.small)
    rows: list = []
    notes: list = []
    for dtype_name in args.dtypes:
        for name in ("llama", "bloom"):
            try:
                run_case(name, paths[name], dtype_name, args, rows, notes)
            except Exception as error:  # noqa: BLE001 - record and go on with the next case
                traceback.print_exc()
                rows.append((f"{name}/{dtype_name}", "case", {"error": f"{type(error).__name__}: {str(error)[:400]}"}))

    quant_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    for mode in args.quant:
        try:
            run_case("llama", paths["llama"], quant_dtype, args, rows, notes, quant=mode)
        except Exception as error:  # noqa: BLE001 - e.g. bitsandbytes missing on this machine: say so, go on
            traceback.print_exc()
            rows.append((f"llama/{quant_dtype}/{mode}", "case", {"error": f"{type(error).__name__}: {str(error)[:400]}"}))

    lines = ["", "=== Corolla on " + args.device + " : summary ===", *header]
    size = "small" if args.small else "llama 16x1024 (GQA 16/4, 32000 vocab), bloom 6x256"
    lines.append(f"models: {size}; 3 servers per swarm; reference = local transformers on {args.device}, same dtype")
    for tag, what, result in rows:
        lines.append(f"{tag:15} {what:48} {fmt(result)}")
    lines.extend(f"note: {n}" for n in notes)
    lines.append(f"total wall time {time.perf_counter() - total_start:.0f} s")
    text = "\n".join(lines)
    log(text)
    out_dir = Path(args.out or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
