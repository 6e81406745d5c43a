"""A learning Ethernet switch between TAP devices in network namespaces, delaying and dropping frames per host.

Used by ``corolla.testing.netns`` when the kernel lacks ``sch_netem``: ``python -m corolla.testing.tap_switch CONFIG``
where CONFIG is JSON ``{"ports": [{"host", "netns", "ifname", "delay_ms", "loss_pct"}, ...], "seed": N}``.
Standard library only.
"""
from __future__ import annotations

import ctypes
import fcntl
import heapq
import itertools
import json
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass

NETNS_DIR = "/run/netns" if os.path.isdir("/run/netns") else "/var/run/netns"  # where ``ip netns add`` mounts them

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


def _open_tap(namespace: str, ifname: str) -> int:
    """Create TAP device ``ifname`` inside ``namespace`` and return its fd (the device lives while the fd is open)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR)  # the TAP device belongs to the namespace current at open()
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI))
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    os.set_blocking(fd, False)
    return fd


@dataclass
class _Port:
    host: str
    fd: int
    delay_s: float
    loss_pct: float


def _switch_main(config_json: str) -> int:
    """A learning Ethernet switch between TAP devices; frames from a port wait its delay and meet its loss.

    Control on stdin, one JSON line per change (``{"host", "delay_ms", "loss_pct"}``), answered "ok" on stdout.
    Exits on EOF of stdin (the harness closed it or died) or SIGTERM.
    """
    config = json.loads(config_json)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        os.nice(-10)  # forward frames on time even when the hosts' processes keep both cores busy
    except OSError:
        pass
    ports = [
        _Port(p["host"], _open_tap(p["netns"], p["ifname"]), p["delay_ms"] / 1000, p["loss_pct"])
        for p in config["ports"]
    ]
    by_host = {port.host: port for port in ports}
    by_fd = {port.fd: i for i, port in enumerate(ports)}
    rng = random.Random(config.get("seed", 0))
    mac_to_port: dict[bytes, int] = {}
    queue: list[tuple[float, int, int, bytes]] = []  # (due time, sequence, destination fd, frame)
    sequence = itertools.count()
    poller = select.epoll()
    for port in ports:
        poller.register(port.fd, select.EPOLLIN)
    stdin = sys.stdin.buffer.fileno()
    poller.register(stdin, select.EPOLLIN)
    control = b""
    print("ready", flush=True)
    while True:
        timeout_s = max(0.0, queue[0][0] - time.monotonic()) if queue else -1
        for fd, _ in poller.poll(timeout_s):
            if fd == stdin:
                data = os.read(stdin, 65536)
                if not data:
                    return 0
                control += data
                while b"\n" in control:
                    line, control = control.split(b"\n", 1)
                    change = json.loads(line)
                    port = by_host[change["host"]]
                    port.delay_s = float(change["delay_ms"]) / 1000
                    port.loss_pct = float(change["loss_pct"])
                    print("ok", flush=True)
                continue
            source = by_fd[fd]
            port = ports[source]
            for _ in range(256):  # bounded, so one busy port cannot starve the delivery of due frames
                try:
                    frame = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # the interface went down
                    break
                if len(frame) < 14:
                    continue
                mac_to_port[frame[6:12]] = source
                if port.loss_pct and rng.random() * 100 < port.loss_pct:
                    continue
                destination = frame[0:6]
                known = mac_to_port.get(destination)
                if destination[0] & 1 or known is None:  # broadcast, multicast or not yet learned: flood
                    targets = [i for i in range(len(ports)) if i != source]
                else:
                    targets = [known] if known != source else []
                due = time.monotonic() + port.delay_s
                for target in targets:
                    heapq.heappush(queue, (due, next(sequence), ports[target].fd, frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, frame = heapq.heappop(queue)
            try:
                os.write(fd, frame)
            except OSError:  # destination down or its queue full: the frame is lost, as on a wire
                pass


if __name__ == "__main__":
    sys.exit(_switch_main(sys.argv[1]))
