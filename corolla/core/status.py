"""What a running `corolla serve` / `corolla swarm` says about itself: a one-line live status on a terminal
(rewritten in place), plain log lines elsewhere (every ``LOG_EVERY_S``), JSON lines with ``--log-format json``."""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, TextIO

LOG_EVERY_S = 30.0
logger = logging.getLogger("corolla.status")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the status fields, when a status line)."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
                   "message": record.getMessage()}
        fields = getattr(record, "status", None)
        if fields:
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logger.setLevel(logging.INFO)  # status lines show whatever the level of the rest


class StatusLine:
    def __init__(self, stream: Optional[TextIO] = None, log_format: str = "text"):
        self.stream = stream or sys.stdout
        self.live = log_format == "text" and self.stream.isatty()
        self._last_log = 0.0
        self._tokens: Optional[int] = None
        self._time = time.monotonic()

    def rate(self, tokens: int) -> float:
        """Tokens per second since the previous call (a counter that went back, e.g. a server that moved, restarts)."""
        now = time.monotonic()
        previous, self._tokens = self._tokens, tokens
        elapsed, self._time = now - self._time, now
        if previous is None or tokens < previous or elapsed <= 0:
            return 0.0
        return (tokens - previous) / elapsed

    def show(self, text: str, **fields) -> None:
        if self.live:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            logger.info(text, extra={"status": fields})

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
