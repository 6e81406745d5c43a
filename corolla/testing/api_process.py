"""Starting and stopping ``corolla api`` / ``corolla health --port`` processes for tests (loopback, a free port)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def start_http_process(workdir: Path, command: str, initial_peers, *extra: str,
                       timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``corolla <command>`` (api or health) on a free loopback port; returns the process and its base URL."""
    index = len(list(workdir.glob(f"{command}-*.addr")))
    address = workdir / f"{command}-{index}.addr"
    log_path = workdir / f"{command}-{index}.log"
    env = {**os.environ, "COROLLA_PARENT_PID": str(os.getpid()), "OMP_NUM_THREADS": "1"}
    port_args = ["--port", "0"]
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "corolla.cli.main", command, "--initial-peers",
                                    *initial_peers, *port_args, "--address-file", str(address), *extra],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not address.exists() or not address.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"corolla {command} did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return process, address.read_text().split()[0]


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
