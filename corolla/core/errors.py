"""Errors a Corolla user can meet. Each message names the cause and, where it can, what to do.

Errors raised by a server travel to the client as a ``RemoteError`` whose ``kind`` is the server-side
class name, so a client can tell a bad request (its own fault) from a broken server.

The caller's own mistakes (a bad argument, a step past a session's ``max_length``, an adapter nobody serves) are
also ``ValueError`` subclasses, as in Petals and transformers, so ``except ValueError`` code keeps working.
"""
from __future__ import annotations


class CorollaError(Exception):
    """Base class of every error Corolla raises on purpose."""


class BadRequestError(CorollaError, ValueError):
    """The request itself is wrong (shape, dtype, values, sizes, unknown session...)."""


class ProtocolVersionError(BadRequestError):
    """The peer speaks a protocol version this side does not."""


class MessageTooLargeError(BadRequestError):
    """A message is larger than the receiver's configured limit."""


class FrameTimeoutError(BadRequestError):
    """A frame was begun but did not arrive whole in time (a sender stalled half-way)."""


class CacheExhaustedError(CorollaError):
    """The server cannot reserve the attention cache a session asks for."""


class SessionEvictedError(CorollaError):
    """The server closed a session that stayed idle past its limit; the client opens it again elsewhere or there."""


class BlocksNotServedError(CorollaError):
    """Some blocks of the model are served by nobody reachable."""


class AdapterNotServedError(BlocksNotServedError, ValueError):
    """The servers of some blocks are reachable, but none of them holds the LoRA adapter the caller asked for."""


SEEN_NOT_SAID = frozenset({"ConnectionClosed", "Timeout", "ProtocolError", "MalformedReply"})


class RemoteError(CorollaError):
    """An error reported by a remote server, re-raised on the client."""

    def __init__(self, kind: str, message: str, peer: str = "?"):
        self.kind = kind
        self.remote_message = message
        self.peer = peer
        # what the client saw of the server (a stream cut, a reply it could not read), not what the server said
        super().__init__(f"server {peer}: {kind}: {message}" if kind in SEEN_NOT_SAID else
                         f"server {peer} answered {kind}: {message}")

    @property
    def is_bad_request(self) -> bool:
        return self.kind in _BAD_REQUEST_KINDS

    @staticmethod
    def from_reply(kind: str, message: str, peer: str = "?") -> "RemoteError":
        """The error for a server's answer: a ``RemoteBadRequestError`` (also a ``ValueError``) for a bad request."""
        cls = RemoteBadRequestError if kind in _BAD_REQUEST_KINDS else RemoteError
        return cls(kind, message, peer)


class RemoteBadRequestError(RemoteError, ValueError):
    """A server refused the request itself (shape, sizes, unknown adapter...): the caller's mistake."""


_BAD_REQUEST_KINDS = {cls.__name__ for cls in (BadRequestError, ProtocolVersionError, MessageTooLargeError,
                                               FrameTimeoutError)}
