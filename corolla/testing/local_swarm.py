"""``LocalSwarm``: a DHT bootstrap node and N servers as child processes on loopback.

Used by ``corolla swarm``, ``corolla demo``, the integration tests and the benchmarks. Every process it
starts is stopped (SIGTERM, then SIGKILL after a grace period) by ``stop()`` or on leaving the ``with`` block.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from corolla.core.blocks import BlockRange
from corolla.net.addresses import read_address_file


def split_blocks(num_blocks: int, num_servers: int) -> list[BlockRange]:
    """Contiguous spans, as equal as possible, covering ``num_blocks`` blocks with ``num_servers`` servers."""
    if not 1 <= num_servers <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks among {num_servers} servers")
    bounds = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    return [BlockRange(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    address_file: Optional[Path]

    @property
    def peer_id(self) -> str | None:
        """The libp2p peer id from the child's address file (None until it is ready)."""
        try:
            return read_address_file(self.address_file)[0].rsplit("/p2p/", 1)[1]
        except (OSError, IndexError, TypeError):  # not written yet, or no address file at all
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalSwarm:
    model: Optional[str] = None  # checkpoint; None = the embedded model
    num_servers: int = 3
    spans: Optional[Sequence[BlockRange]] = None  # explicit spans; None splits the model evenly
    num_threads: int = 1  # torch threads per server
    dtype: str = "float32"
    device: str = "cpu"
    dht_prefix: Optional[str] = None
    workdir: Optional[str] = None  # logs and address files; None = a temporary directory
    extra_server_args: Sequence[str] = ()
    swarm_key_path: Optional[str] = None  # a private swarm: the DHT node and every server get --swarm-key
    start_timeout_s: float = 180.0
    children: list[ChildProcess] = field(default_factory=list)
    initial_peers: list[str] = field(default_factory=list)

    def __enter__(self) -> "LocalSwarm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.num_threads))
        env["PYTHONUNBUFFERED"] = "1"
        env["COROLLA_PARENT_PID"] = str(os.getpid())  # children exit if this process dies (see cli/main.py)
        return env

    def _spawn(self, name: str, args: list[str]) -> ChildProcess:
        workdir = Path(self.workdir)
        address_file = workdir / f"{name}.addr"
        address_file.unlink(missing_ok=True)
        log_path = workdir / f"{name}.log"
        log = open(log_path, "w")
        command = [sys.executable, "-m", "corolla.cli.main", *args, "--address-file", str(address_file)]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()
        child = ChildProcess(name, process, log_path, address_file)
        self.children.append(child)
        return child

    def _wait_ready(self, children: Sequence[ChildProcess]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        for child in children:
            while not child.address_file.exists():
                if child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode}:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} not ready after {self.start_timeout_s:.0f} s:\n{child.log_tail()}")
                time.sleep(0.1)

    def _key_args(self) -> list[str]:
        return ["--swarm-key", self.swarm_key_path] if self.swarm_key_path else []

    def start(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="corolla-swarm-")
            self.workdir = self._tmp.name
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        try:
            dht = self._spawn("dht", ["dht", *self._key_args()])
            self._wait_ready([dht])
            self.initial_peers = read_address_file(dht.address_file)
            spans = list(self.spans) if self.spans is not None else split_blocks(self._num_blocks(), self.num_servers)
            servers = [self.start_server(span, wait=False) for span in spans]
            self._wait_ready(servers)
        except BaseException:
            self.stop()
            raise

    def start_server(self, span: Optional[BlockRange] = None, wait: bool = True, extra_args: Sequence[str] = ()) -> ChildProcess:
        """Start one more server (a span, or ``--num-blocks`` style args in ``extra_args``)."""
        index = sum(1 for c in self.children if c.name.startswith("server"))
        args = ["serve"] + ([self.model] if self.model else [])
        args += ["--initial-peers", *self.initial_peers, "--dtype", self.dtype, "--device", self.device]
        args += ["--num-threads", str(self.num_threads)]
        if span is not None:
            args += ["--blocks", str(span)]
        if self.dht_prefix:
            args += ["--dht-prefix", self.dht_prefix]
        args += [*self._key_args(), *self.extra_server_args, *extra_args]
        child = self._spawn(f"server{index}", args)
        if wait:
            self._wait_ready([child])
        return child

    @property
    def servers(self) -> list[ChildProcess]:
        return [c for c in self.children if c.name.startswith("server")]

    def server_by_peer(self, peer_id: str) -> ChildProcess:
        for child in self.servers:
            if child.peer_id == peer_id:
                return child
        raise KeyError(f"no server of this swarm has peer id {peer_id}")

    def _num_blocks(self) -> int:
        from corolla.models.checkpoint import load_config, resolve_model

        return load_config(resolve_model(self.model)).num_hidden_layers

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child (servers first), wait up to ``grace_s``, then SIGKILL what remains."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            _kill_group(child.process.pid)  # helpers it spawned (its libp2p daemon), if any outlived it
        self.children = []
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None
            self.workdir = None


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group we created for a child (``start_new_session=True``)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
