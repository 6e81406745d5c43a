"""Which failures of a server the client works around (by another server) and which it reports to the user."""
from __future__ import annotations

import asyncio

from corolla.core.errors import RemoteError


def is_server_failure(exc: BaseException) -> bool:
    """True for a server that died, dropped the stream, timed out or broke; False for the caller's own mistake
    (a bad request is answered the same by every server, so trying another one cannot help)."""
    if isinstance(exc, RemoteError):
        return not exc.is_bad_request
    return isinstance(exc, (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, EOFError))


def describe_attempts(attempts: list[tuple[str, str]]) -> str:
    """``[(peer, error), ...]`` -> a readable list for an error message."""
    return "; ".join(f"{peer[-8:]}: {error}" for peer, error in attempts) or "no server was available"
