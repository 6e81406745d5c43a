"""Many users at once: aggregate decode speed of concurrent sessions, and what their caches cost the servers.

Run: .venv/bin/python benchmarks/bench_concurrency.py [--sessions 1 4 8 16] [--new-tokens 64] [--rounds 3]
     [--min-tokens 512]

A local swarm of three servers (the embedded model, blocks 0:10, 10:20, 20:30, float32, one torch thread each) on
loopback. For each count N, N client processes (each its own process, like N users) load the model, warm up, wait
at a barrier, then each generates ``--new-tokens`` greedy tokens after its own short prompt (``eos_token_id=None``:
every session runs its full length, past an end of sequence, as the local reference does; ``min_new_tokens`` would do
the same through transformers' length processors, which cost each client ~0.8 ms of CPU per token, a tenth of its
own share of the CPU this benchmark measures). Aggregate tokens/s = all tokens / (last finish - first start).

Every count is timed over about as many tokens (``--min-tokens``, default 512: eight sessions' worth): a count with
fewer sessions runs in waves, each a fresh set of N clients started once the last has gone, until it has that many,
and its tokens/s is all the waves' tokens over the sum of their spans (one session: eight sessions one after
another, the eight prompts the eight-session run uses). One session's 64 tokens take ~3 s here, and this machine's
speed swings within seconds: timed over one such run, one session's rate ranged 19.1-27.1 tokens/s across three
rounds of one benchmark (the eight sessions' run, ~9 s, ranged less), and that noise went straight into the ratio.

The counts run in ``--rounds`` rounds (1, 4, 8, 16, then again): this machine's speed drifts by 10-20% over
minutes (same code, same count: 83.5 and 102.0 tokens/s in two runs ten minutes apart), and a single short run of
each count turned that drift into the ratio. Each count's figure is the median of its rounds, and the ratio is
against the median of N = 1 in the same run; each round's own ratios are printed as they come. Every client's
tokens are checked against local transformers. With each count: where its tokens' CPU time went, and the whole
machine's steal time (its cores waiting for the host), kernel time and idle time over its runs, from /proc/stat
(idle: what no process had work for, the slack a better schedule could still use), and how long the
processes' threads were runnable but waited for a core (Linux's scheduler statistics): where a token's wall time
went to the queue for the machine's cores.

Memory: 16 clients each open a session declaring max_length 2048 and fill 200 tokens; while they hold them, the
servers' memory (PSS of each server process and its libp2p daemon) and the cache tokens the servers hold are
read, against the same servers before the sessions.
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "50000")

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "The three laws of robotics are",
           "My favourite recipe for pancakes", "In 1969, the first humans", "A haiku about autumn:",
           "The quick brown fox", "Water boils at", "The largest planet in the solar system",
           "To make a paper airplane,", "The history of the printing press", "Photosynthesis is",
           "The best way to learn a language", "Mount Everest is", "A good night's sleep", "The stock market"]


def warm_client(config: dict):
    """A user's client process: the model loaded (one torch thread) and warmed up on ``config["prompt"]``; returns
    (model, prompt ids)."""
    import torch
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoDistributedModelForCausalLM.from_pretrained(config["model"], initial_peers=config["initial_peers"],
                                                            torch_dtype=torch.float32)
    ids = tokenizer(config["prompt"], return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: connections, route
    return model, ids


def client_main(config: dict) -> None:
    import torch

    model, ids = warm_client(config)
    if config["mode"] == "hold":  # open a long session, fill it, hold it until told to stop
        with model.inference_session(max_length=config["max_length"]) as session:
            filler = torch.randint(100, 40000, (1, config["fill_tokens"]))
            with torch.no_grad():
                model(filler)
            print(json.dumps({"ready": True, "position": session.position}), flush=True)
            sys.stdin.readline()
        model.close()
        return
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the barrier
    own, daemon = time.process_time(), _cpu_s(os.getpid(), children_only=True)
    waited, daemon_waited = _wait_s(os.getpid(), own_only=True), _wait_s(os.getpid(), children_only=True)
    started = time.time()
    out = model.generate(ids, max_new_tokens=config["new_tokens"], eos_token_id=None, do_sample=False)
    finished = time.time()
    own, daemon = time.process_time() - own, _cpu_s(os.getpid(), children_only=True) - daemon
    waited = _wait_s(os.getpid(), own_only=True) - waited
    daemon_waited = _wait_s(os.getpid(), children_only=True) - daemon_waited
    print(json.dumps({"start": started, "end": finished, "tokens": out[0, ids.shape[1]:].tolist(), "cpu_s": own,
                      "daemon_cpu_s": daemon, "wait_s": waited, "daemon_wait_s": daemon_waited}), flush=True)
    model.close()


def _spawn_clients(configs: list[dict]) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), "client", json.dumps(c)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env) for c in configs]


def _read_json(process: subprocess.Popen, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"client {process.pid} exited with {process.wait()}")
        if line.startswith("{"):
            return json.loads(line)
    raise TimeoutError("client gave no answer")


def _family(pid: int, children_only: bool = False, own_only: bool = False) -> list:
    """A process and its descendants (its libp2p daemon), or its descendants only, or the process only."""
    import psutil

    process = psutil.Process(pid)
    return ([] if own_only else process.children(recursive=True)) + ([] if children_only else [process])


def _cpu_s(pid: int, children_only: bool = False) -> float:
    """CPU seconds (user + system) of a process and its descendants, or of its descendants only."""
    import psutil

    total = 0.0
    for proc in _family(pid, children_only):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _wait_s(pid: int, children_only: bool = False, own_only: bool = False) -> float:
    """Seconds the threads of ``_family(pid, children_only, own_only)`` spent runnable but waiting for a core, from
    Linux's per-thread scheduler statistics (/proc/PID/task/TID/schedstat, its second field); NaN where the kernel
    keeps none. A thread that has exited takes its share with it."""
    if not os.path.exists("/proc/self/schedstat"):
        return math.nan
    total = 0.0
    for proc in _family(pid, children_only, own_only):
        try:
            tasks = os.listdir(f"/proc/{proc.pid}/task")
        except OSError:  # gone
            continue
        for task in tasks:
            try:
                with open(f"/proc/{proc.pid}/task/{task}/schedstat") as stats:
                    total += int(stats.read().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                pass
    return total


def _pss_mb(pid: int) -> float:
    import psutil

    total = 0
    for proc in _family(pid):
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def _infos(swarm_peers, model) -> list:
    """Each server's info reply (cache held, steps run and the calls they ran in), by blocks."""
    import torch

    from corolla import AutoDistributedModelForCausalLM
    from corolla.client.rpc import call
    from corolla.core.errors import RemoteError
    from corolla.wire.messages import InfoRequest

    client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm_peers, torch_dtype=torch.float32)
    try:
        swarm = client.swarm
        records = sorted(swarm.run(swarm.refresh()), key=lambda r: r.blocks.start)
        infos = []
        for record in records:
            for attempt in range(3):
                try:
                    infos.append(swarm.run(call(swarm.transport, record, InfoRequest(), 30)))
                    break
                except RemoteError as exc:  # once, a fresh client's stream closed unanswered right after 8 clients
                    #                         left (the benchmark's own bookkeeping: said, then asked again)
                    print(f"      (info request to {record.peer_id[-8:]} failed, try {attempt + 1} of 3: {exc})",
                          flush=True)
                    if attempt == 2:
                        raise
                    time.sleep(1.0)
        return infos
    finally:
        client.close()


def _run_count(swarm, model: str, count: int, new_tokens: int, expected: dict, min_tokens: int) -> dict:
    """``count`` client processes generating at once, in as many waves as it takes to generate ``min_tokens``
    (each wave a fresh set of ``count`` clients, started when the last one has gone): tokens/s of all (all waves'
    tokens over the sum of their spans), per session, the servers' mean batch, how many equalled local, and the CPU
    seconds of servers, clients and their daemons."""
    waves = [_run_wave(swarm, model, [PROMPTS[(wave * count + i) % len(PROMPTS)] for i in range(count)], new_tokens,
                       expected)
             for wave in range(_waves(count, new_tokens, min_tokens))]
    span = sum(w["span"] for w in waves)
    total = {key: sum(w[key] for w in waves) for key in
             ("tokens", "steps", "batches", "step_wall_s", "step_gather_s", "servers_compute", "same",
              "servers_python", "servers_daemon", "clients_python", "clients_daemon")}
    return {
        "tokens_s": total["tokens"] / span, "tokens": total["tokens"], "span": span, "waves": len(waves),
        "per_session": statistics.median(rate for w in waves for rate in w["rates"]),
        "batch": total["steps"] / max(1, total["batches"]),
        # each server's compute thread: the share of the spans it spent running steps, and waiting for company
        "busy": total["step_wall_s"] / len(swarm.servers) / span,
        "gather": total["step_gather_s"] / len(swarm.servers) / span,
        "sessions": count * len(waves),
        **{key: total[key] for key in ("servers_compute", "same", "servers_python", "servers_daemon",
                                       "clients_python", "clients_daemon")},
        # the whole machine's CPU seconds over the waves, by kind (steal: taken by the host)
        "machine": {key: sum(w["machine"][key] for w in waves) for key in waves[0]["machine"]},
        # seconds the threads of each kind were runnable but waited for a core, over the waves
        "wait": {key: sum(w["wait"][key] for w in waves) for key in waves[0]["wait"]},
    }


def _waves(count: int, new_tokens: int, min_tokens: int) -> int:
    """Waves of ``count`` sessions of ``new_tokens`` each it takes to generate ``min_tokens`` (at least one)."""
    return max(1, -(-min_tokens // (count * new_tokens)))


def _run_wave(swarm, model: str, prompts: list[str], new_tokens: int, expected: dict) -> dict:
    """One client process per prompt, released at once; what ``_run_count`` adds up."""
    configs = [{"mode": "generate", "model": model, "initial_peers": swarm.initial_peers, "prompt": prompt,
                "new_tokens": new_tokens} for prompt in prompts]
    clients = _spawn_clients(configs)
    try:
        for client in clients:
            _read_json(client)  # ready
        before = _infos(swarm.initial_peers, model)
        server_cpu = [(_cpu_s(server.process.pid), _cpu_s(server.process.pid, children_only=True))
                      for server in swarm.servers]
        server_wait = [(_wait_s(server.process.pid), _wait_s(server.process.pid, children_only=True))
                       for server in swarm.servers]
        machine = _machine_times()
        for client in clients:
            client.stdin.write("go\n")
            client.stdin.flush()
        results = [_read_json(client) for client in clients]
        machine = {key: value - machine[key] for key, value in _machine_times().items()}
        server_cpu = [(_cpu_s(server.process.pid) - everything, _cpu_s(server.process.pid, True) - daemon)
                      for server, (everything, daemon) in zip(swarm.servers, server_cpu)]
        server_wait = [(_wait_s(server.process.pid) - everything, _wait_s(server.process.pid, True) - daemon)
                       for server, (everything, daemon) in zip(swarm.servers, server_wait)]
    finally:
        for client in clients:
            client.wait(60)
    after = _infos(swarm.initial_peers, model)
    servers_daemon = sum(daemon for _, daemon in server_cpu)
    return {
        "span": max(r["end"] for r in results) - min(r["start"] for r in results),
        "tokens": sum(len(r["tokens"]) for r in results),
        "rates": [len(r["tokens"]) / (r["end"] - r["start"]) for r in results],
        "steps": sum(a.steps_run - b.steps_run for a, b in zip(after, before)),
        "batches": sum(a.step_batches - b.step_batches for a, b in zip(after, before)),
        "step_wall_s": sum(a.step_wall_s - b.step_wall_s for a, b in zip(after, before)),
        "step_gather_s": sum(a.step_gather_s - b.step_gather_s for a, b in zip(after, before)),
        "servers_compute": sum(a.step_compute_s - b.step_compute_s for a, b in zip(after, before)),  # their CPU
        "same": sum(r["tokens"] == expected[c["prompt"]] for r, c in zip(results, configs)),
        "servers_python": sum(everything for everything, _ in server_cpu) - servers_daemon,
        "servers_daemon": servers_daemon,
        "clients_python": sum(r["cpu_s"] for r in results),
        "clients_daemon": sum(r["daemon_cpu_s"] for r in results),
        "wait": {"servers_python": sum(everything - daemon for everything, daemon in server_wait),
                 "servers_daemon": sum(daemon for _, daemon in server_wait),
                 "clients_python": sum(r["wait_s"] for r in results),
                 "clients_daemon": sum(r["daemon_wait_s"] for r in results)},
        "machine": machine,
    }


def _machine_times() -> dict:
    """The machine's CPU seconds since boot, all cores: ``steal`` (time the hypervisor ran something else while
    this machine's cores had work), ``system``, ``idle`` (with I/O wait) and ``total``."""
    import psutil

    times = psutil.cpu_times()
    total = sum(getattr(times, name, 0.0) for name in
                ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"))
    idle = times.idle + getattr(times, "iowait", 0.0)
    return {"steal": getattr(times, "steal", 0.0), "system": times.system, "idle": idle, "total": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the counts; medians are reported")
    parser.add_argument("--server-args", default="", help="extra `corolla serve` flags for the three servers")
    parser.add_argument("--min-tokens", type=int, default=512,
                        help="a count's run repeats in waves of fresh clients until it has generated this many tokens "
                             "(default: eight sessions' worth), so that every count is timed over about as long")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.models.embedded import embedded_model_dir
    from corolla.testing.local_swarm import LocalSwarm

    model = str(embedded_model_dir())
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model)
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    expected = {}
    used = max(count * _waves(count, args.new_tokens, args.min_tokens) for count in args.sessions)
    for prompt in PROMPTS[: min(len(PROMPTS), used)]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = local.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=None, do_sample=False)
        expected[prompt] = out[0, ids.shape[1]:].tolist()
    del local
    with LocalSwarm(model=model, num_servers=3, num_threads=1, extra_server_args=args.server_args.split()) as swarm:
        print(f"3-server swarm of the embedded model on loopback; {args.new_tokens} greedy tokens per session, one "
              "client process per session, 1 torch thread per process", flush=True)
        runs: dict[int, list[dict]] = {count: [] for count in args.sessions}
        for round_ in range(args.rounds):  # the counts alternate, so a drift of the machine's speed hits them alike
            for count in args.sessions:
                run = _run_count(swarm, model, count, args.new_tokens, expected, args.min_tokens)
                runs[count].append(run)
                first = runs[args.sessions[0]][round_]
                print(f"  round {round_ + 1}: {count:2d} session(s) {run['tokens_s']:6.1f} tokens/s "
                      f"({run['waves']} wave(s), {run['span']:.1f} s), x"
                      f"{run['tokens_s'] / first['tokens_s']:.2f} of this round's {args.sessions[0]}", flush=True)
        print(f"\nmedian of {args.rounds} round(s); x = median tokens/s against the median of "
              f"{args.sessions[0]} session(s):")
        base = statistics.median(run["tokens_s"] for run in runs[args.sessions[0]])
        for count in args.sessions:
            each = runs[count]
            speeds = [run["tokens_s"] for run in each]
            speed = statistics.median(speeds)
            same = sum(run["same"] for run in each)
            print(f"  {count:2d} session(s): {speed:6.1f} tokens/s in all ({min(speeds):.1f}-{max(speeds):.1f}), "
                  f"{statistics.median(r['per_session'] for r in each):5.1f} "
                  f"per session (median), x{speed / base:.2f} of one session; mean batch "
                  f"{statistics.mean(r['batch'] for r in each):.1f} steps; tokens equal local in {same}/"
                  f"{sum(run['sessions'] for run in each)}", flush=True)
            # where the CPU time of a token goes (core-milliseconds per generated token, all rounds together; the
            # machine's cores x the spans is what there was)
            tokens = sum(r["tokens"] for r in each)
            per = 1e3 / tokens
            cpu = {key: sum(r[key] for r in each) * per for key in
                   ("servers_python", "servers_daemon", "clients_python", "clients_daemon")}
            available = os.cpu_count() * sum(r["span"] for r in each) * per
            compute = sum(r["servers_compute"] for r in each) * per
            print(f"      core-ms per token: servers {cpu['servers_python']:.1f} (their compute threads' steps "
                  f"{compute:.1f}) + their libp2p daemons "
                  f"{cpu['servers_daemon']:.1f}; clients {cpu['clients_python']:.1f} + their daemons "
                  f"{cpu['clients_daemon']:.1f}; total {sum(cpu.values()):.1f} of {available:.1f} available", flush=True)
            waited = {key: sum(r["wait"][key] for r in each) * per for key in cpu}
            print(f"      core-ms per token runnable but waiting for a core: servers {waited['servers_python']:.1f} + "
                  f"their daemons {waited['servers_daemon']:.1f}; clients {waited['clients_python']:.1f} + their "
                  f"daemons {waited['clients_daemon']:.1f}", flush=True)
            print(f"      each server's compute thread: running steps {statistics.mean(r['busy'] for r in each):.0%} "
                  f"of the time, waiting for company {statistics.mean(r['gather'] for r in each):.0%}", flush=True)
            machine = {key: sum(r["machine"][key] for r in each) for key in ("steal", "system", "idle", "total")}
            share = {key: machine[key] / max(machine["total"], 1e-9) for key in ("steal", "system", "idle")}
            print(f"      the machine over these runs: steal time {share['steal']:.1%} of its cores' time (taken by "
                  f"the host), kernel time {share['system']:.1%}, idle {share['idle']:.1%}", flush=True)

        print("\nmemory: 16 sessions declaring max_length 2048, each filled with 200 tokens")
        before = [_pss_mb(server.process.pid) for server in swarm.servers]
        configs = [{"mode": "hold", "model": model, "initial_peers": swarm.initial_peers, "prompt": PROMPTS[i],
                    "max_length": 2048, "fill_tokens": 200} for i in range(16)]
        clients = _spawn_clients(configs)
        try:
            for client in clients:
                _read_json(client)
            time.sleep(1.0)
            during = [_pss_mb(server.process.pid) for server in swarm.servers]
            held = [i.cache_tokens_total - i.cache_tokens_free for i in _infos(swarm.initial_peers, model)]
        finally:
            for client in clients:
                client.stdin.write("stop\n")
                client.stdin.flush()
            for client in clients:
                client.wait(60)
        per_token = 2 * 3 * 64 * 4 * 10  # keys + values, 3 KV heads x 64, float32, 10 blocks: bytes per token
        for index, (b, d, h) in enumerate(zip(before, during, held)):
            print(f"  server {index}: PSS {b:.0f} MB idle -> {d:.0f} MB with the sessions (+{d - b:.0f} MB); holds "
                  f"{h} cache tokens ({h * per_token / 2**20:.0f} MB of keys and values); reserving max_length x "
                  f"batch up front would hold {16 * 2048} ({16 * 2048 * per_token / 2**20:.0f} MB)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "client":
        client_main(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
