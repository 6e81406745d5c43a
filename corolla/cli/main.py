"""``corolla``: the command line. Each subcommand parses its flags into one config and calls an entry point."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

# Set before torch loads OpenMP. After a parallel region, OpenMP's idle workers spin on their cores for a while;
# in a swarm whose processes share cores, that spin steals the core the next server in the chain computes on.
# A shorter spin kept one process's speed and made a 3-server chain with 2 threads each ~25% faster per token
# (see benchmarks/bench_inference.py). A value set by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "50000")

from corolla.core.blocks import BlockRange
from corolla.server.config import ServerConfig
from corolla.wire.compression import SUPPORTED_CODECS

_SERVER = ServerConfig()  # the serve flags' defaults are its settings' defaults
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def _number(kind, low=None, high=None, above=None, what=None):
    """An argparse type: a ``kind`` (int or float) within bounds, refused with a message naming the bound."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what or kind.__name__} expected, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"a finite number expected, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be above {above}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    parse.__name__ = what or kind.__name__  # what argparse names in its own messages
    return parse


_COUNT = _number(int, low=1)  # a count of things: at least one
_PORT = _number(int, low=0, high=65535, what="port")


def _blocks(text: str) -> BlockRange:
    try:
        return BlockRange.parse(text)
    except ValueError as exc:  # argparse shows a ValueError's type only, not its message
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse takes a word that begins with ``-`` for an option unless it is a plain negative number, so
    ``--blocks -1:3`` failed with "expected one argument" instead of saying what is wrong with the range. Such a word
    after a flag of ``_DASHED_VALUES`` is that flag's value (as if written ``--blocks=-1:3``), which its type checks."""

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        for word in words:
            if joined and joined[-1] in _DASHED_VALUES and word.startswith("-") and ":" in word:
                joined[-1] = f"{joined[-1]}={word}"
            else:
                joined.append(word)
        return super().parse_known_args(joined, namespace)


_DASHED_VALUES = {"--blocks"}  # flags whose values (START:END) may begin with "-"


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None,
        help="checkpoint directory or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct, 'smollm2')",
    )


def _add_peer_args(parser: argparse.ArgumentParser, address_help: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="IP address to listen on and announce (default 127.0.0.1)")
    parser.add_argument("--port", type=_PORT, default=0, help="TCP port (default 0: any free port)")
    parser.add_argument("--address-file", default=None, help=address_help)


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="multiaddrs of the swarm")
    parser.add_argument("--dht-prefix", default=None, help="DHT name of the model (default: derived from the model)")
    parser.add_argument("--dtype", default="float32", help="client dtype: float32, bfloat16, float16 or auto")
    parser.add_argument("--num-threads", type=_COUNT, default=None, help="torch threads of this process")
    parser.add_argument("--wire-codec", default="none", choices=SUPPORTED_CODECS,
                        help="how hidden states travel: none (exact), float16, bfloat16 or int8-block64")
    parser.add_argument("--swarm-key", default=None, metavar="FILE", help="a private swarm's secret")
    parser.add_argument("--allow-server", nargs="+", default=None, metavar="PEER_ID",
                        help="use only these servers (peer ids)")
    parser.add_argument("--no-relay", action="store_true",
                        help="send every inference step to every server from here (no server-to-server relay)")
    _add_sampling_args(parser)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=_COUNT, default=128, help="(default %(default)s)")
    parser.add_argument("--temperature", type=_number(float, low=0.0), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=_number(int, low=0), default=50,
                        help="sample among the k likeliest tokens (default %(default)s; 0: all)")
    parser.add_argument("--top-p", type=_number(float, above=0.0, high=1.0), default=1.0,
                        help="sample among the likeliest tokens whose probabilities sum to p, 0 < p <= 1 "
                             "(default %(default)g: all)")
    parser.add_argument("--repetition-penalty", type=_number(float, above=0.0), default=1.0,
                        help="(default %(default)g: none)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="system prompt for the chat template")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(LOG_LEVELS)} expected, got {text!r}")
    return text.upper()


def _add_logging(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """``--log-level`` and ``--log-format``: before the subcommand (with the defaults) or after it."""
    def default(value):
        return value if defaults else argparse.SUPPRESS  # after the subcommand: only if given

    parser.add_argument("--log-level", type=_log_level, default=default("WARNING"),
                        help="DEBUG, INFO, WARNING (default) or ERROR")
    parser.add_argument("--log-format", default=default("text"), choices=("text", "json"),
                        help="text (a live status line on a terminal) or json (one JSON object per line)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="corolla", description="Run and fine-tune LLMs collaboratively.")
    _add_logging(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="start a DHT bootstrap node")
    _add_peer_args(dht, "write the multiaddrs others pass as --initial-peers here, one per line")
    dht.add_argument("--swarm-key", default=None, metavar="FILE",
                     help="a private swarm's secret: DHT peers without it are refused")

    serve = commands.add_parser("serve", help="serve a span of a model's blocks")
    _add_model(serve)
    serve.add_argument("--initial-peers", nargs="+", default=[], metavar="ADDR", help="multiaddrs of the swarm")
    serve.add_argument("--new-swarm", action="store_true", help="start a new swarm with this server as bootstrap")
    serve.add_argument("--blocks", type=_blocks, default=None, metavar="START:END", help="blocks to serve")
    serve.add_argument("--num-blocks", type=_COUNT, default=None, metavar="N",
                       help="without --blocks: serve N blocks (at most the model's) where the swarm is weakest "
                            "(default: all)")
    serve.add_argument("--dht-prefix", default=None, help="DHT name of the model (default: derived from the model)")
    serve.add_argument("--dtype", default=_SERVER.dtype, help="float32 (default), bfloat16, float16 or auto")
    serve.add_argument("--quant", default=_SERVER.quant, choices=("none", "int8", "int4", "nf4", "auto"),
                       help="weights: none (default), int8 or int4 on CPU, int8 or nf4 on CUDA (bitsandbytes), "
                            "auto (int8 on CPU, nf4 on CUDA)")
    serve.add_argument("--device", default=_SERVER.device, help="cpu (default), cuda, cuda:N")
    serve.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                       help="run every layer through transformers' modules and PyTorch's kernels (the fast path "
                            "fuses Llama-built layers and runs decode steps on Corolla's CPU kernels)")
    serve.add_argument("--no-weight-packing", dest="pack_weights", action="store_false",
                       help="hold float32 weights as they are, even where they lie exactly on a grid (a model "
                            "converted from GGUF, bfloat16 values), which the fast path otherwise reads packed, "
                            "with the same results")
    serve.add_argument("--num-threads", type=_COUNT, default=None, help="torch threads (default: torch's choice)")
    serve.add_argument("--cache-tokens", type=_COUNT, default=_SERVER.cache_tokens,
                       help="session cache budget: tokens held (per batch row, in pages), %(default)s")
    serve.add_argument("--swarm-key", default=None, metavar="FILE",
                       help="a private swarm's secret: streams and records without it are refused")
    serve.add_argument("--identity", default=None, metavar="FILE",
                       help="the server's key (its peer id, which signs its records); created there if missing "
                            "(default: a new key each run)")
    serve.add_argument("--cache-wait", type=float, default=_SERVER.cache_wait_s,
                       help="seconds a session waits for cache when the budget is full before failing (%(default)g)")
    serve.add_argument("--max-batch", type=int, default=_SERVER.max_batch,
                       help="the most sessions' steps one pass through the blocks takes, %(default)s")
    serve.add_argument("--batch-gather", type=float, default=_SERVER.batch_gather_s, metavar="SECONDS",
                       help="the longest a batch of sessions' steps waits for other sessions due to step, %(default)g "
                            "(0: run whatever is queued at once)")
    serve.add_argument("--no-compute-idle", dest="compute_idle", action="store_false",
                       help="run the compute thread at --compute-nice instead of under SCHED_IDLE (where it takes a "
                            "core only when no other thread wants it: the default for CPU servers on Linux; on a "
                            "machine busy with other work it then gets almost none)")
    serve.add_argument("--compute-nice", type=int, default=_SERVER.compute_nice, metavar="N",
                       help="with --no-compute-idle (or on a GPU): run the compute thread N nice steps below the "
                            "server's other threads, 0-19 (%(default)s: its event loop and libp2p daemon relay "
                            "messages first; 0: all alike). Linux only")
    serve.add_argument("--session-idle-timeout", type=float, default=_SERVER.session_idle_timeout_s,
                       help="seconds after which a session that sends nothing is closed (%(default)g)")
    serve.add_argument("--max-message-mb", type=float, default=_SERVER.max_message_bytes / 2**20,
                       help="largest request accepted, MiB (%(default)g)")
    serve.add_argument("--frame-budget-mb", type=float, default=_SERVER.frame_budget_bytes / 2**20,
                       help="request frames held at once, all streams together, MiB (%(default)g; one peer: half while "
                            "others wait)")
    serve.add_argument("--throughput", type=float, default=None, help="tokens/s to announce instead of measuring")
    serve.add_argument("--adapters", nargs="+", default=[], metavar="PATH_OR_ID",
                       help="PEFT LoRA adapters to load; clients choose one per request by this name (active_adapter)")
    serve.add_argument("--rebalance-period", type=float, default=_SERVER.rebalance_period_s,
                       help="seconds between checks whether to move to weaker blocks (%(default)g; only without "
                            "--blocks)")
    serve.add_argument("--balance-quality", type=float, default=_SERVER.balance_quality,
                       help="move only if the swarm's throughput would exceed current / this (default %(default)g)")
    serve.add_argument("--announce-period", type=float, default=_SERVER.announce_period_s, metavar="SECONDS",
                       help="seconds between refreshes of this server's DHT record (%(default)g)")
    serve.add_argument("--record-ttl", type=float, default=_SERVER.record_ttl_s, metavar="SECONDS",
                       help="seconds this server's record lives unrefreshed: how long a server that died unannounced "
                            "stays listed (%(default)g; more than --announce-period, at most an hour)")
    serve.add_argument("--close-wait", type=float, default=_SERVER.close_wait_s, metavar="SECONDS",
                       help="seconds an answered stream waits for its requester to close it before this server "
                            "closes it (%(default)g; 0 closes at once, which loses about one reply in 5,000 in "
                            "hivemind)")
    _add_peer_args(serve, "write this server's multiaddrs here once it serves")

    swarm = commands.add_parser("swarm", help="run a local swarm: a DHT node and N servers splitting the model")
    _add_model(swarm)
    swarm.add_argument("--servers", type=_COUNT, default=3, help="number of servers (default 3)")
    swarm.add_argument("--num-threads", type=_COUNT, default=1, help="torch threads per server (default 1)")
    swarm.add_argument("--dtype", default="float32",
                       help="the servers' compute dtype: float32 (default), bfloat16, float16 or auto")
    swarm.add_argument("--device", default="cpu", help="the servers' torch device: cpu (default), cuda, cuda:N")
    swarm.add_argument("--address-file", default=None,
                       help="write the initial peers here once every server serves (the file appears only then)")
    swarm.add_argument("--api", type=_PORT, default=None, metavar="PORT",
                       help="also serve the OpenAI-compatible API and the swarm page on this port")

    generate = commands.add_parser("generate", help="complete a prompt with a model served by a swarm")
    _add_model(generate)
    generate.add_argument("prompt", help="the prompt")
    generate.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _add_client_args(generate)

    chat = commands.add_parser("chat", help="chat with a model served by a swarm")
    _add_model(chat)
    _add_client_args(chat)
    chat.add_argument("--max-context", type=_COUNT, default=2048,
                      help="tokens the conversation's server-side session holds; older turns are dropped to fit")

    api = commands.add_parser("api", help="serve the OpenAI-compatible HTTP API of a swarm's model")
    _add_model(api)
    api.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="multiaddrs of the swarm")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=_PORT, default=8000, help="TCP port (default 8000; 0: any free port)")
    api.add_argument("--dht-prefix", default=None, help="DHT name of the model (default: derived from the model)")
    api.add_argument("--max-sessions", type=_COUNT, default=8, help="requests generating at once (default 8)")
    api.add_argument("--max-waiting", type=_number(int, low=0), default=64,
                     help="requests waiting for a turn beyond those (default 64); more get HTTP 429")
    api.add_argument("--wait-for-blocks", type=_number(float, low=0.0), default=10.0,
                     help="seconds a request waits for missing blocks before HTTP 503 (default 10)")
    api.add_argument("--max-context", type=_COUNT, default=None, metavar="TOKENS",
                     help="the most tokens (prompt and completion) one request may use (default: the model's context)")
    api.add_argument("--num-threads", type=_COUNT, default=None, help="torch threads of this process")
    api.add_argument("--swarm-key", default=None, metavar="FILE", help="a private swarm's secret")
    api.add_argument("--address-file", default=None, help="write the API's URL here once it listens")

    health = commands.add_parser("health", help="the swarm's servers and blocks: a table, or a web page (--port)")
    _add_model(health)
    health.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="multiaddrs of the swarm")
    health.add_argument("--port", type=_PORT, default=None, help="serve the swarm page on this port instead of printing")
    health.add_argument("--host", default="127.0.0.1", help="address the page listens on (default 127.0.0.1)")
    health.add_argument("--dht-prefix", default=None, help="DHT name of the model (default: derived from the model)")
    health.add_argument("--swarm-key", default=None, metavar="FILE", help="a private swarm's secret")
    health.add_argument("--address-file", default=None, help="write the page's URL here once it listens")

    demo = commands.add_parser("demo", help="start a local swarm of 3 servers, answer a prompt, stop the swarm")
    _add_model(demo)
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to ask (default: %(default)r)")
    demo.add_argument("--servers", type=_COUNT, default=3, help="servers of the local swarm (default 3)")
    demo.add_argument("--api", type=_PORT, nargs="?", const=8000, default=None, metavar="PORT",
                      help="after the answer, keep the swarm up with the API and swarm page on PORT (8000) until "
                           "Ctrl-C")
    _add_sampling_args(demo)
    for command in commands.choices.values():
        _add_logging(command, defaults=False)
    return parser


def _exit_with_parent() -> None:
    """For processes started by ``LocalSwarm``: receive SIGTERM when the parent dies, so nothing outlives it."""
    parent = os.environ.pop("COROLLA_PARENT_PID", None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the line above took effect
        sys.exit(1)


def main(argv=None) -> int:
    _exit_with_parent()
    args = build_parser().parse_args(argv)
    from corolla.core.status import configure_logging

    configure_logging(args.log_level, args.log_format)
    address_file = getattr(args, "address_file", None)
    if address_file and os.path.isfile(address_file):
        os.remove(address_file)  # a stale one from an earlier run would look ready: the file appears when it is
    handler = {"dht": _dht, "serve": _serve, "swarm": _swarm, "generate": _generate, "chat": _chat, "demo": _demo,
               "api": _api, "health": _health}
    try:
        return handler[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _users_to_fix(exc):
            raise
        import logging

        logging.getLogger(__name__).debug("what stopped corolla %s", args.command, exc_info=True)
        print(f"corolla {args.command}: {exc}", file=sys.stderr)  # the message names the cause; no traceback
        return 2


def _users_to_fix(exc: BaseException) -> bool:
    """Whether ``exc`` is about what the user gave or has (a setting, a file, a peer's address, a port), as opposed
    to a bug of ours: those are told in one line (``--log-level DEBUG`` logs their traceback too)."""
    from corolla.core.errors import CorollaError

    return isinstance(exc, (CorollaError, ValueError, OSError)) or type(exc).__name__ == "P2PDaemonError"


def _api(args) -> int:
    from corolla.api.serve import run_api
    from corolla.wire.swarm_key import load_swarm_key

    return run_api(args.model, tuple(args.initial_peers), args.host, args.port, dht_prefix=args.dht_prefix,
                   max_sessions=args.max_sessions, max_waiting=args.max_waiting,
                   wait_for_blocks_s=args.wait_for_blocks, swarm_key=load_swarm_key(args.swarm_key),
                   num_threads=args.num_threads, address_file=args.address_file, max_context=args.max_context)


def _health(args) -> int:
    from corolla.api.serve import run_health
    from corolla.wire.swarm_key import load_swarm_key

    return run_health(args.model, tuple(args.initial_peers), host=args.host, port=args.port,
                      dht_prefix=args.dht_prefix, swarm_key=load_swarm_key(args.swarm_key),
                      address_file=args.address_file)


def _dht(args) -> int:
    from corolla.cli.dht_node import run_dht

    from corolla.wire.swarm_key import load_swarm_key

    return run_dht(args.host, args.port, args.address_file, swarm_key=load_swarm_key(args.swarm_key))


def serve_config(args):
    """The ``ServerConfig`` of parsed ``corolla serve`` arguments; a ``ValueError`` names a bad combination (the
    command line tells it in one line, exit status 2, as argparse's own refusals)."""
    from corolla.wire.records import MAX_RECORD_TTL_S, MAX_THROUGHPUT

    if args.max_batch < 1 or args.batch_gather < 0:
        raise ValueError("--max-batch must be at least 1 and --batch-gather at least 0")
    if not 0 <= args.compute_nice <= 19:
        raise ValueError(f"--compute-nice must lie in 0..19 (got {args.compute_nice})")
    if not 0 <= args.close_wait < math.inf:
        raise ValueError(f"--close-wait must be finite and at least 0 (got {args.close_wait:g})")
    if not 0 < args.announce_period < args.record_ttl <= MAX_RECORD_TTL_S:
        raise ValueError(f"--announce-period must be positive and below --record-ttl, which must be at "
                         f"most {MAX_RECORD_TTL_S:g} (got {args.announce_period:g} and {args.record_ttl:g}): a record "
                         f"must be refreshed before it expires, and expire once its server is gone; DHT nodes refuse "
                         f"records that expire later")
    if args.throughput is not None and not 0 < args.throughput <= MAX_THROUGHPUT:  # (NaN fails this too)
        raise ValueError(f"--throughput must be above 0 and at most {MAX_THROUGHPUT:g} tokens/s (got "
                         f"{args.throughput:g}): readers drop records that claim more, or nothing, so the server "
                         "would serve nobody")
    if args.blocks is not None and args.num_blocks is not None:
        raise ValueError("give --blocks (the span to serve) or --num-blocks (how many blocks the server chooses), "
                         "not both")
    return ServerConfig(
        model=args.model, dht_prefix=args.dht_prefix, blocks=args.blocks, num_blocks=args.num_blocks,
        initial_peers=tuple(args.initial_peers), new_swarm=args.new_swarm, host=args.host, port=args.port,
        address_file=args.address_file, identity_path=args.identity, swarm_key_path=args.swarm_key, dtype=args.dtype,
        quant=args.quant, device=args.device, fast_path=args.fast_path, pack_weights=args.pack_weights,
        num_threads=args.num_threads, cache_tokens=args.cache_tokens, cache_wait_s=args.cache_wait,
        batch_gather_s=args.batch_gather, max_batch=args.max_batch, compute_nice=args.compute_nice,
        compute_idle=args.compute_idle,
        session_idle_timeout_s=args.session_idle_timeout,
        max_message_bytes=int(args.max_message_mb * 2**20), frame_budget_bytes=int(args.frame_budget_mb * 2**20),
        throughput=args.throughput, rebalance_period_s=args.rebalance_period, balance_quality=args.balance_quality,
        adapters=tuple(args.adapters), announce_period_s=args.announce_period, record_ttl_s=args.record_ttl,
        close_wait_s=args.close_wait,
    )


def _serve(args) -> int:
    from corolla.server.server import run_server

    return run_server(serve_config(args), args.log_format)


def _swarm(args) -> int:
    from corolla.testing.local_swarm import LocalSwarm
    from corolla.net.addresses import write_address_file

    stop = {"now": False}

    def _on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with LocalSwarm(model=args.model, num_servers=args.servers, num_threads=args.num_threads, dtype=args.dtype,
                    device=args.device) as swarm:
        print(f"local swarm up: 1 DHT node, {args.servers} servers. Initial peers:", flush=True)
        for addr in swarm.initial_peers:
            print(f"  {addr}", flush=True)
        if args.address_file:
            write_address_file(args.address_file, swarm.initial_peers)
        api = _start_api_child(args.model, swarm.initial_peers, args.api) if args.api is not None else None
        print("Ctrl-C stops the swarm.", flush=True)
        try:
            _swarm_status(swarm, args, stop)
        finally:
            _stop_child(api)
        print("stopping the swarm...", flush=True)
    return 0


def _start_api_child(model, initial_peers, port: int):
    """``corolla api`` as a child process of this one (it exits with us); waits until it listens."""
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="corolla-api-")
    address = os.path.join(folder, "api.addr")
    command = [sys.executable, "-m", "corolla.cli.main", "api", *([model] if model else []), "--initial-peers",
               *initial_peers, "--port", str(port), "--address-file", address]
    env = {**os.environ, "COROLLA_PARENT_PID": str(os.getpid())}
    child = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (os.path.exists(address) and open(address).read().strip()):
        if child.poll() is not None or time.monotonic() > deadline:
            _stop_child(child)
            raise RuntimeError("the API did not start")
        time.sleep(0.2)
    url = open(address).read().split()[0]
    print(f"OpenAI-compatible API at {url}/v1, swarm page at {url}/", flush=True)
    return child


def _stop_child(child) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(30)
    except Exception:  # noqa: BLE001 - it would not stop: end it
        child.kill()


def _swarm_status(swarm, args, stop: dict) -> None:
    """Until ``stop``: a live line (servers online, blocks covered, sessions, tokens/s) from the servers' info."""
    from corolla.client.config import ClientConfig
    from corolla.client.rpc import call
    from corolla.client.swarm import RemoteSwarm, hivemind_client
    from corolla.core.records import ServerState
    from corolla.core.spans import describe_blocks
    from corolla.core.status import StatusLine
    from corolla.models.checkpoint import load_config, model_dht_prefix, resolve_model
    from corolla.wire.messages import InfoRequest

    path = resolve_model(args.model)
    model_config = load_config(path)
    total = model_config.num_hidden_layers
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers))
    try:
        viewer = RemoteSwarm(config, model_dht_prefix(args.model if args.model else path, model_config), total,
                             hivemind_client(config))
    except Exception as exc:  # noqa: BLE001 - no status then; the swarm itself is fine
        if not stop["now"]:
            print(f"(no live status: {type(exc).__name__}: {exc})", flush=True)
        while not stop["now"]:
            time.sleep(0.2)
        return

    async def read():
        records = [r for r in await viewer.refresh() if r.state is ServerState.ONLINE]
        infos = []
        for record in records:
            try:
                infos.append(await call(viewer.transport, record, InfoRequest(), 5.0))
            except Exception:  # noqa: BLE001 - a server going away: not counted
                pass
        return records, infos

    status = StatusLine(log_format=args.log_format)
    try:
        while not stop["now"]:
            try:
                records, infos = viewer.run(read(), 30)
            except Exception:  # noqa: BLE001 - the DHT busy for a moment: try again next second
                time.sleep(1.0)
                continue
            served = {b for r in records for b in r.blocks}
            missing = describe_blocks([b for b in range(total) if b not in served])
            sessions = sum(i.sessions_open for i in infos)
            rate = status.rate(sum(i.tokens_run for i in infos))
            status.show(f"swarm: {len(records)}/{len(swarm.servers)} servers online | "
                        + (f"blocks {missing} missing" if missing else f"all {total} blocks served")
                        + f" | {sessions} session(s) | {rate:.1f} tokens/s",
                        servers_online=len(records), missing=missing, sessions=sessions, tokens_per_s=round(rate, 2))
            for _ in range(5):
                if stop["now"]:
                    break
                time.sleep(0.2)
    finally:
        status.close()
        viewer.close()


def _client_model(args):
    import torch

    from corolla.client.config import ClientConfig
    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.wire.swarm_key import load_swarm_key

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, torch_dtype=args.dtype,
        client_config=ClientConfig(wire_codec=args.wire_codec, relay=not args.no_relay,
                                   swarm_key=load_swarm_key(args.swarm_key),
                                   allowed_servers=None if args.allow_server is None else tuple(args.allow_server)),
    )


def _generate(args) -> int:
    from corolla.cli.chatting import chat_input_ids, generate_reply, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = _client_model(args)
    try:
        if args.raw:
            input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}
            ]
            input_ids = chat_input_ids(tokenizer, messages)
        generate_reply(model, tokenizer, input_ids, args)
        print()
    finally:
        model.close()
    return 0


def _chat(args) -> int:
    from corolla.cli.chatting import chat_loop, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = _client_model(args)
    try:
        chat_loop(model, tokenizer, args)
    finally:
        model.close()
    return 0


def _demo(args) -> int:
    import torch

    from corolla.cli.chatting import chat_input_ids, generate_reply, load_tokenizer
    from corolla.testing.local_swarm import LocalSwarm
    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import resolve_model

    resolve_model(args.model)  # convert the embedded model once, before the servers start
    torch.set_num_threads(1)
    started = time.monotonic()
    print(f"starting a local swarm: 1 DHT node + {args.servers} servers on 127.0.0.1 ...", flush=True)
    with LocalSwarm(model=args.model, num_servers=args.servers, num_threads=1) as swarm:
        for child, span in zip(swarm.servers, _spans(swarm)):
            print(f"  {child.name}: blocks {span} (pid {child.process.pid})", flush=True)
        print(f"swarm ready in {time.monotonic() - started:.1f} s; initial peer {swarm.initial_peers[0]}", flush=True)
        tokenizer = load_tokenizer(args.model)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
            print(f"\nuser> {args.prompt}\nmodel> ", end="", flush=True)
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            input_ids = chat_input_ids(tokenizer, messages)
            began = time.monotonic()
            reply = generate_reply(model, tokenizer, input_ids, args)
            elapsed = time.monotonic() - began
            tokens = len(tokenizer(reply)["input_ids"])
            print(f"\n({tokens} tokens in {elapsed:.1f} s through {args.servers} servers)", flush=True)
        finally:
            model.close()
        if args.api is not None:
            api = _start_api_child(args.model, swarm.initial_peers, args.api)
            stop = {"now": False}
            signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
            signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
            print("Ctrl-C stops the swarm.", flush=True)
            try:
                while not stop["now"] and api.poll() is None:
                    time.sleep(0.2)
            finally:
                _stop_child(api)
        print("stopping the swarm ...", flush=True)
    print("done.", flush=True)
    return 0


def _spans(swarm):
    from corolla.testing.local_swarm import split_blocks

    return split_blocks(swarm._num_blocks(), swarm.num_servers)


if __name__ == "__main__":
    sys.exit(main())
