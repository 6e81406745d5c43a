"""Multiaddrs: building the ones we listen on, and address files that other processes read."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Sequence


def listen_maddrs(host: str, port: int) -> list[str]:
    """The multiaddrs to listen on for ``host`` (an IP address) and ``port`` (0 = any free port)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host must be an IP address such as 127.0.0.1, got {host!r}") from None
    family = "ip6" if ip.version == 6 else "ip4"
    return [f"/{family}/{host}/tcp/{port}"]


def write_address_file(path: str | os.PathLike, maddrs: Sequence[str]) -> None:
    """Write one multiaddr per line, atomically, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(f"{addr}\n" for addr in maddrs))
    os.replace(tmp, path)


def read_address_file(path: str | os.PathLike) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
