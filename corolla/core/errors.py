"""Errors a Corolla user can meet. Each message names the cause and, where it can, what to do.

Errors raised by a server travel to the client as a ``RemoteError`` whose ``kind`` is the server-side
class name, so a client can tell a bad request (its own fault) from a broken server.
"""
from __future__ import annotations


class CorollaError(Exception):
    """Base class of every error Corolla raises on purpose."""


class BadRequestError(CorollaError):
    """The request itself is wrong (shape, dtype, values, sizes, unknown session...)."""


class ProtocolVersionError(BadRequestError):
    """The peer speaks a protocol version this side does not."""


class MessageTooLargeError(BadRequestError):
    """A message is larger than the receiver's configured limit."""


class CacheExhaustedError(CorollaError):
    """The server cannot reserve the attention cache a session asks for."""


class BlocksNotServedError(CorollaError):
    """Some blocks of the model are served by nobody reachable."""


class RemoteError(CorollaError):
    """An error reported by a remote server, re-raised on the client."""

    def __init__(self, kind: str, message: str, peer: str = "?"):
        self.kind = kind
        self.remote_message = message
        self.peer = peer
        super().__init__(f"server {peer} answered {kind}: {message}")

    @property
    def is_bad_request(self) -> bool:
        return self.kind in _BAD_REQUEST_KINDS


_BAD_REQUEST_KINDS = {cls.__name__ for cls in (BadRequestError, ProtocolVersionError, MessageTooLargeError)}
