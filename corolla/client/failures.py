"""Which failures of a server the client works around (by another server) and which it reports to the user."""
from __future__ import annotations

import asyncio

from corolla.core.errors import RemoteError


def is_server_failure(exc: BaseException) -> bool:
    """True for anything that came from a server: it died, dropped the stream, timed out, sent something we cannot
    read, or refused the request (the client checks its requests before sending them, so a server that refuses
    one is wrong, or lying: another server gets it). False for errors raised here, the caller's own mistakes."""
    if isinstance(exc, RemoteError):
        return True
    return isinstance(exc, (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, EOFError))


def describe_attempts(attempts: list[tuple[str, str]]) -> str:
    """``[(peer, error), ...]`` -> a readable list for an error message."""
    return "; ".join(f"{peer[-8:]}: {error}" for peer, error in attempts) or "no server was available"
