"""`corolla serve` and `corolla swarm` say how they are doing: a live status line on a terminal, JSON lines with
`--log-format json`."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "COROLLA_PARENT_PID": str(os.getpid())}


def test_serve_logs_json_lines_with_its_status(tiny_llama_dir):
    process = subprocess.Popen([sys.executable, "-m", "corolla.cli.main", "--log-format", "json", "--log-level",
                                "INFO", "serve", str(tiny_llama_dir), "--new-swarm", "--blocks", "0:4",
                                "--num-threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                               text=True, start_new_session=True)
    try:
        lines, status, banner = [], None, None
        deadline = time.monotonic() + 120
        while status is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            record = json.loads(line)  # every log line is one JSON object
            assert {"time", "level", "logger", "message"} <= set(record)
            if record.get("event") == "serving":  # the banner: where to reach this server
                banner = record
            elif record["logger"] == "corolla.status":
                status = record
        assert status is not None, "".join(lines)[-2000:]
        assert banner is not None and banner["blocks"] == "0:4" and banner["addrs"][0].startswith("/ip4/127.0.0.1/")
        assert status["blocks"] == "0:4" and status["sessions"] == 0 and status["state"] == "online"
        assert "tokens_per_s" in status
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0
    assert process.stdout.read().strip() == ""  # nothing outside the JSON lines


def test_swarm_shows_a_live_status_line_on_a_terminal(tiny_llama_dir):
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "corolla.cli.main", "swarm", str(tiny_llama_dir), "--servers",
                                "2"], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=_env(),
                               start_new_session=True)
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and b"tokens/s" not in output:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    output += os.read(leader, 65536)
                except OSError:
                    break
        text = output.decode(errors="replace")
        assert "\r\x1b[K" in text, text[-2000:]  # rewritten in place
        line = text.rsplit("\r\x1b[K", 1)[1]
        assert "swarm: 2/2 servers online | all 4 blocks served | 0 session(s) | " in line, line
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        finally:
            os.close(leader)
    assert process.returncode == 0
