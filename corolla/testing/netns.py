"""``NetnsSwarm``: run a swarm as separate hosts, each a Linux network namespace on this machine.

Topology: every host is a namespace with ``lo`` up and one interface ``eth0`` holding ``10.213.0.<10+i>/24``
(only inside these namespaces; nothing is routed to the machine's own network). The hosts meet at a switch:

* backend ``"netem"`` (when the kernel has ``sch_netem``): a namespace ``<prefix>switch`` holding a Linux bridge;
  each host joins it with a veth pair, and ``tc netem`` on the host's ``eth0`` adds its delay, loss and rate.
* backend ``"bridge"``: the same bridge without netem: ``rate_mbit`` only (a ``tbf`` qdisc); delay or loss raise.
* backend ``"userspace"`` (when ``sch_netem`` is missing, as on kernels built without it): each host's ``eth0`` is a
  TAP device whose other end is a small switch process (``corolla/testing/tap_switch.py``, stdlib only)
  that learns MAC addresses like a bridge, holds every frame a host sends for that host's delay and drops it with
  that host's loss probability; the rate is a kernel ``tbf`` qdisc on the host's ``eth0``. Delays are accurate to
  about a millisecond plus the switch's scheduling latency (it runs at nice -10).

Either way every impairment applies to what a host *sends*: a packet from A to B waits ``A.delay_ms``, so the
round trip between A and B is ``A.delay_ms + B.delay_ms``; ``rate_mbit`` caps A's upload, ``loss_pct`` drops that
share of A's packets. Give every host 25 ms and every pair of hosts has a 50 ms RTT.

Usage::

    with NetnsSwarm([HostSpec("dht"), HostSpec("s0", delay_ms=10), HostSpec("client", delay_ms=10)]) as net:
        net.start_dht("dht")
        server = net.start_server("s0", blocks="0:30")        # returns when its address file appears
        proc = net.run("client", [sys.executable, "my_client.py", *net.initial_peers])
        net.shape("s0", delay_ms=50)                         # change a host's link while everything runs

Every namespace is named ``crl<pid>-<n>-<host>`` (``<pid>`` = the harness process), so leftovers of a crashed run
are recognisable: ``cleanup_stale()`` (called by every ``start()``, or ``python -m corolla.testing.netns cleanup``)
removes those whose process is gone. ``close()`` (also on ``with`` exit and at interpreter exit) stops every
process (SIGTERM, then SIGKILL of its process group), the switch, and deletes every namespace it created.
Needs root, ``ip`` and ``tc`` (iproute2). ``netns_available()`` says whether this machine can run it and how.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from corolla.testing.local_swarm import ChildProcess
from corolla.net.addresses import read_address_file

NAME_PREFIX = "crl"  # every namespace this module creates starts with crl<pid>-
_STALE_RE = re.compile(rf"^{NAME_PREFIX}(\d+)-")
_HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,23}$")
_run_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or process of the harness could not be set up."""


@dataclass(frozen=True)
class HostSpec:
    name: str  # lower-case letters, digits, _ (becomes part of the namespace name)
    delay_ms: float = 0.0  # one-way delay added to every packet this host sends
    rate_mbit: Optional[float] = None  # this host's upload rate; None = unlimited
    loss_pct: float = 0.0  # share of this host's packets dropped, percent


@dataclass
class HostProcess(ChildProcess):
    """A process started on a host by ``NetnsSwarm`` (``address_file`` only for DHT nodes and servers)."""

    host: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def addresses(self) -> list[str]:
        if self.address_file is None or not self.address_file.exists():
            return []
        return read_address_file(self.address_file)


# ---------------------------------------------------------------------------------------------- shell helpers


def _sh(argv: Sequence[str], check: bool = True, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed with code {result.returncode}: {result.stderr.strip()}")
    return result


def _netns_dir() -> Path:
    return Path("/run/netns") if Path("/run/netns").is_dir() else Path("/var/run/netns")


def _list_netns() -> list[str]:
    result = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(namespace: str) -> None:
    """SIGKILL every process still inside ``namespace`` (its process group too)."""
    result = _sh(["ip", "netns", "pids", namespace], check=False)
    for token in result.stdout.split():
        if token.isdigit():
            for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
                try:
                    kill(int(token))
                except (ProcessLookupError, PermissionError):
                    pass


def _die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when the harness dies (``PR_SET_PDEATHSIG``; survives ``exec``)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def cleanup_stale() -> list[str]:
    """Delete the namespaces (and kill their processes) left by harness processes that no longer exist."""
    removed = []
    for namespace in _list_netns():
        match = _STALE_RE.match(namespace)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        _kill_netns_pids(namespace)
        _sh(["ip", "netns", "del", namespace], check=False)
        removed.append(namespace)
    return removed


# ---------------------------------------------------------------------------------------------- availability


@lru_cache(maxsize=None)
def _probe() -> tuple[bool, bool, str]:
    """(namespaces work, netem works, reason if namespaces do not)."""
    if not sys.platform.startswith("linux"):
        return False, False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, False, "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, False, f"`{tool}` (iproute2) is not installed"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    try:
        made = _sh(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return False, False, f"`ip netns add` failed: {made.stderr.strip()}"
        netem = _sh(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], check=False)
        tap = _sh(["ip", "-n", probe, "tuntap", "add", "dev", "t0", "mode", "tap"], check=False)
        if netem.returncode == 0:
            return True, True, ""
        if tap.returncode != 0:
            return False, False, (
                f"neither `tc qdisc ... netem` ({netem.stderr.strip()}) nor TAP devices ({tap.stderr.strip()}) work"
            )
        return True, False, ""
    finally:
        _sh(["ip", "netns", "del", probe], check=False)


def netns_available() -> tuple[bool, str]:
    """Whether ``NetnsSwarm`` can run here, and why not (or which backend it will use)."""
    works, netem, reason = _probe()
    if not works:
        return False, reason
    if netem:
        return True, "network namespaces with a bridge and tc netem"
    return True, "network namespaces; sch_netem is missing, so delay and loss come from a userspace switch (TAP)"


# ---------------------------------------------------------------------------------------------- the harness


class NetnsSwarm:
    """Hosts as network namespaces joined by an emulated switch; processes started on them; all removed on close."""

    def __init__(
        self,
        hosts: Sequence[HostSpec],
        *,
        backend: str = "auto",  # "auto" (netem if it works, else userspace), "netem", "bridge" or "userspace"
        subnet: str = "10.213.0",  # first three octets of the hosts' /24
        workdir: Optional[str] = None,  # logs and address files; None = a temporary directory, removed on close
        start_timeout_s: float = 180.0,
        seed: int = 0,  # for the userspace switch's packet loss
    ):
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        for name in names:
            if name == "switch":
                raise ValueError("'switch' is the name of the bridge's namespace; call the host something else")
            if not _HOST_NAME_RE.match(name):
                raise ValueError(f"host name {name!r}: use lower-case letters, digits and _ (at most 24)")
        if not 1 <= len(hosts) <= 200:
            raise ValueError("between 1 and 200 hosts")
        if backend not in ("auto", "netem", "bridge", "userspace"):
            raise ValueError(f"backend must be auto, netem, bridge or userspace, got {backend!r}")
        self.hosts: dict[str, HostSpec] = {h.name: h for h in hosts}
        self.requested_backend = backend
        self.backend: Optional[str] = None
        self.subnet = subnet
        self.prefix = f"{NAME_PREFIX}{os.getpid()}-{next(_run_counter)}-"
        self.start_timeout_s = start_timeout_s
        self.seed = seed
        self.initial_peers: list[str] = []
        self.children: list[HostProcess] = []
        self._workdir_arg = workdir
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.workdir: Optional[Path] = None
        self._namespaces: list[str] = []  # created so far, deleted by close()
        self._switch: Optional[subprocess.Popen] = None
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "NetnsSwarm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        works, netem, reason = _probe()
        if not works:
            raise NetnsError(f"network namespaces are not available here: {reason}")
        if self.requested_backend == "netem" and not netem:
            raise NetnsError("backend 'netem' requested but `tc qdisc add ... netem` does not work here")
        self.backend = "netem" if (self.requested_backend == "auto" and netem) else self.requested_backend
        if self.backend == "auto":
            self.backend = "userspace"
        cleanup_stale()
        if self._workdir_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="corolla-netns-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        try:
            for name in self.hosts:
                self._add_namespace(self.namespace(name))
            if self.backend in ("netem", "bridge"):
                self._join_bridge()
            else:
                self._join_userspace_switch()
            for i, name in enumerate(self.hosts):
                ns = self.namespace(name)
                _sh(["ip", "-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0"])
                _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
                self._apply_shape(name)
        except BaseException:
            self.close()
            raise

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL of its group after ``grace_s``), the switch, the namespaces."""
        if self._closed or not self._started:
            return
        self._closed = True
        try:
            children = list(reversed(self.children))
            for child in children:
                if child.process.poll() is None:
                    try:
                        child.process.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace_s
            for child in children:
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for child in children:
                try:
                    os.killpg(child.process.pid, signal.SIGKILL)  # the child and its helpers (libp2p daemon)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    child.process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            for namespace in self._namespaces:
                _kill_netns_pids(namespace)
            self._stop_switch()
            for namespace in reversed(self._namespaces):
                _sh(["ip", "netns", "del", namespace], check=False)
            self._namespaces = []
        finally:
            atexit.unregister(self.close)
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    # ------------------------------------------------------------------ names and addresses

    def namespace(self, host: str) -> str:
        self._check_host(host)
        return f"{self.prefix}{host}"

    def address(self, host: str) -> str:
        """The host's IPv4 address on the emulated network."""
        self._check_host(host)
        return f"{self.subnet}.{10 + list(self.hosts).index(host)}"

    def _check_host(self, host: str) -> None:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r}; hosts: {', '.join(self.hosts)}")

    # ------------------------------------------------------------------ links

    def _add_namespace(self, namespace: str) -> None:
        _sh(["ip", "netns", "add", namespace])
        self._namespaces.append(namespace)
        _sh(["ip", "-n", namespace, "link", "set", "lo", "up"])
        # No IPv6 on the emulated network: its router solicitations and MLD reports are noise here.
        _sh(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1"], check=False)

    def _join_bridge(self) -> None:
        switch = f"{self.prefix}switch"
        self._add_namespace(switch)
        _sh(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", switch, "link", "set", "br0", "up"])
        for i, name in enumerate(self.hosts):
            port = f"p{i}"
            _sh(["ip", "link", "add", "eth0", "netns", self.namespace(name), "type", "veth",
                 "peer", "name", port, "netns", switch])
            _sh(["ip", "-n", switch, "link", "set", port, "master", "br0"])
            _sh(["ip", "-n", switch, "link", "set", port, "up"])

    def _join_userspace_switch(self) -> None:
        ports = [
            {"host": h.name, "netns": self.namespace(h.name), "ifname": "eth0", "delay_ms": h.delay_ms,
             "loss_pct": h.loss_pct}
            for h in self.hosts.values()
        ]
        log = open(self.workdir / "switch.log", "w")
        self._switch = subprocess.Popen(
            [sys.executable, "-m", "corolla.testing.tap_switch", json.dumps({"ports": ports, "seed": self.seed})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        reply = self._switch_reply(30.0)
        if reply != "ready":
            raise NetnsError(f"the userspace switch did not start ({reply!r}):\n{self._switch_log()}")

    def _switch_reply(self, timeout_s: float) -> str:
        assert self._switch is not None and self._switch.stdout is not None
        ready, _, _ = select.select([self._switch.stdout], [], [], timeout_s)
        if not ready:
            return "(no answer)"
        return self._switch.stdout.readline().decode(errors="replace").strip()

    def _switch_log(self) -> str:
        try:
            return (self.workdir / "switch.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def _stop_switch(self) -> None:
        switch, self._switch = self._switch, None
        if switch is None:
            return
        try:
            switch.stdin.close()  # EOF: the switch exits and its TAP devices disappear
        except OSError:
            pass
        try:
            switch.wait(3)
        except subprocess.TimeoutExpired:
            switch.kill()
            switch.wait()

    def shape(self, host: str, *, delay_ms: Optional[float] = None, rate_mbit: Any = ...,
              loss_pct: Optional[float] = None) -> None:
        """Change a host's link: one-way delay of what it sends, its upload rate (None = unlimited), its loss."""
        self._check_host(host)
        spec = self.hosts[host]
        changes: dict[str, Any] = {}
        if delay_ms is not None:
            changes["delay_ms"] = float(delay_ms)
        if rate_mbit is not ...:
            changes["rate_mbit"] = rate_mbit
        if loss_pct is not None:
            changes["loss_pct"] = float(loss_pct)
        self.hosts[host] = dataclasses.replace(spec, **changes)
        self._apply_shape(host)

    def shape_all(self, **changes) -> None:
        for host in self.hosts:
            self.shape(host, **changes)

    def _apply_shape(self, host: str) -> None:
        spec = self.hosts[host]
        ns = self.namespace(host)
        if self.backend == "netem":
            if spec.delay_ms or spec.loss_pct or spec.rate_mbit:
                netem = ["delay", f"{spec.delay_ms}ms"]
                if spec.loss_pct:
                    netem += ["loss", f"{spec.loss_pct}%"]
                if spec.rate_mbit:
                    netem += ["rate", f"{spec.rate_mbit}mbit"]
                _sh(["tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", "netem", *netem, "limit", "100000"])
            else:
                _sh(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], check=False)
            return
        if self.backend == "bridge" and (spec.delay_ms or spec.loss_pct):
            raise NetnsError(f"host {host}: the 'bridge' backend has no delay or loss (that needs sch_netem)")
        if spec.rate_mbit:
            rate_bytes_s = spec.rate_mbit * 1e6 / 8
            burst = max(32 * 1024, int(rate_bytes_s / 1000))  # at least 1 ms of traffic and a few full frames
            _sh(["tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{spec.rate_mbit}mbit",
                 "burst", str(burst), "latency", "500ms"])
        else:
            _sh(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], check=False)
        if self._switch is not None:
            message = {"host": host, "delay_ms": spec.delay_ms, "loss_pct": spec.loss_pct}
            self._switch.stdin.write((json.dumps(message) + "\n").encode())
            self._switch.stdin.flush()
            reply = self._switch_reply(10.0)
            if reply != "ok":
                raise NetnsError(f"the userspace switch refused {message} ({reply!r}):\n{self._switch_log()}")

    # ------------------------------------------------------------------ processes

    def run(self, host: str, argv: Sequence[str], *, name: Optional[str] = None, env: Optional[dict] = None,
            log_path: Optional[str] = None, **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host`` (``ip netns exec``); output goes to a log file unless ``stdout=`` says otherwise.

        The process gets its own process group, PYTHONUNBUFFERED=1 and OMP_NUM_THREADS=1 (``env`` overrides), and
        SIGTERM when the harness process dies. ``close()`` stops it.
        """
        return self._spawn(host, argv, name=name, env=env, log_path=log_path, **popen_kwargs).process

    def _spawn(self, host: str, argv: Sequence[str], *, name: Optional[str] = None, env: Optional[dict] = None,
               log_path: Optional[str] = None, address_file: Optional[Path] = None, **popen_kwargs) -> HostProcess:
        if not self._started or self._closed:
            raise NetnsError("the NetnsSwarm is not running (use it as a context manager or call start())")
        namespace = self.namespace(host)
        name = name or f"{host}-{len(self.children)}"
        log = Path(log_path) if log_path else self.workdir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COROLLA_PARENT_PID=str(os.getpid()))
        full_env.update(env or {})
        with open(log, "w") as log_file:
            popen_kwargs.setdefault("stdout", log_file)
            popen_kwargs.setdefault("stderr", subprocess.STDOUT if popen_kwargs["stdout"] is log_file else log_file)
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv], env=full_env, start_new_session=True,
                preexec_fn=_die_with_parent, **popen_kwargs,
            )
        child = HostProcess(name, process, log, address_file, host=host)
        self.children.append(child)
        return child

    def run_json(self, host: str, argv: Sequence[str], *, timeout_s: float = 300.0, name: Optional[str] = None,
                 env: Optional[dict] = None) -> Any:
        """Run ``argv`` on ``host`` to completion; return the JSON of the last stdout line that starts with ``{``."""
        name = name or f"{host}-{len(self.children)}"
        out_path = self.workdir / f"{name}.out"
        with open(out_path, "w") as out:
            child = self._spawn(host, argv, name=name, env=env, stdout=out)
            try:
                code = child.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(child)
                raise TimeoutError(f"{name} on {host} ran past {timeout_s:.0f} s:\n{child.log_tail()}") from None
        lines = [ln for ln in out_path.read_text(errors="replace").splitlines() if ln.startswith("{")]
        if code != 0 or not lines:
            raise NetnsError(f"{name} on {host} exited with code {code}:\n{child.log_tail(60)}")
        return json.loads(lines[-1])

    def start_dht(self, host: str, *, wait: bool = True) -> HostProcess:
        """A DHT bootstrap node on ``host``; its multiaddrs become ``initial_peers`` of later servers."""
        name = f"dht-{host}"
        address_file = self.workdir / f"{name}.addr"
        argv = [sys.executable, "-m", "corolla.cli.main", "dht", "--host", self.address(host), "--port", "0",
                "--address-file", str(address_file)]
        child = self._spawn(host, argv, name=name, address_file=address_file)
        if wait:
            self.wait_ready([child])
            self.initial_peers = child.addresses
        return child

    def start_server(self, host: str, model: Optional[str] = None, blocks: Any = None, extra_args: Sequence[str] = (),
                     *, initial_peers: Optional[Sequence[str]] = None, dtype: str = "float32",
                     wait: bool = True) -> HostProcess:
        """``corolla serve`` on ``host`` with ``--num-threads 1``; ``blocks`` as "0:10" or a BlockRange."""
        peers = list(initial_peers if initial_peers is not None else self.initial_peers)
        if not peers:
            raise NetnsError("no initial peers: call start_dht() first or pass initial_peers")
        name = f"server-{host}-{sum(1 for c in self.children if c.host == host)}"
        address_file = self.workdir / f"{name}.addr"
        argv = [sys.executable, "-m", "corolla.cli.main", "serve", *([model] if model else []),
                "--initial-peers", *peers, "--host", self.address(host), "--port", "0", "--num-threads", "1",
                "--dtype", dtype]
        if blocks is not None:
            argv += ["--blocks", str(blocks)]
        argv += [*extra_args, "--address-file", str(address_file)]
        child = self._spawn(host, argv, name=name, address_file=address_file)
        if wait:
            self.wait_ready([child])
        return child

    def wait_ready(self, children: Sequence[HostProcess], timeout_s: Optional[float] = None) -> None:
        """Wait until each child's address file exists; raise with its log if it exits or takes too long."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        for child in children:
            while child.address_file is None or not child.address_file.exists():
                if child.process.poll() is not None:
                    raise NetnsError(f"{child.name} exited with code {child.process.returncode}:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} not ready in time:\n{child.log_tail()}")
                time.sleep(0.1)

    def kill(self, child: HostProcess, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child's whole process group (the process and its libp2p daemon)."""
        try:
            os.killpg(child.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if sig == signal.SIGKILL:
            child.process.wait()


def _main(argv: Sequence[str]) -> int:
    if argv == ["cleanup"]:
        for namespace in cleanup_stale():
            print(f"removed {namespace}")
        return 0
    if argv == ["check"]:
        ok, reason = netns_available()
        print(("available: " if ok else "unavailable: ") + reason)
        return 0 if ok else 1
    print("usage: python -m corolla.testing.netns check | cleanup", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
