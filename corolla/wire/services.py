"""The service table: the single list of what a client may ask a server, and how each exchange goes.

Each request type maps to its reply type and its exchange: ``UNARY`` (one request, one reply, then the stream
ends), ``SESSION`` (an opening request and its reply, then any number of steps and their replies on the same
stream until the client closes it) or ``PUSH`` (an opening request and its reply, then steps with no reply on
that stream: a server relaying sessions' hidden states to the next server of their chains; further sessions join
the stream with a ``join`` message, answered like the opening request). The client's ``call()`` / ``SessionStream`` and the server's dispatcher are
both built from this table; any request may instead be answered with ``ErrorReply``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from corolla.core.errors import BadRequestError
from corolla.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    RelayOpen,
    RelayOpened,
    SessionOpened,
    SessionStep,
    SessionStepReply,
)


class Exchange(enum.Enum):
    UNARY = "unary"  # one request, one reply
    SESSION = "session"  # open + opened, then steps and step replies on the same stream
    PUSH = "push"  # open + opened, then steps without replies (their results go elsewhere)


@dataclass(frozen=True)
class Service:
    name: str  # the server's method that answers it: ``handler.<name>(request[, channel])``
    request: type[Message]
    reply: type[Message]
    exchange: Exchange
    step: Optional[type[Message]] = None  # SESSION, PUSH: the messages sent after the opening reply
    step_reply: Optional[type[Message]] = None  # SESSION: the reply to each step
    join: Optional[type[Message]] = None  # PUSH: adds another session to the stream; answered with ``reply``


SERVICES: tuple[Service, ...] = (
    Service("info", InfoRequest, InfoReply, Exchange.UNARY),
    Service("forward", ForwardRequest, ForwardReply, Exchange.UNARY),
    Service("backward", BackwardRequest, BackwardReply, Exchange.UNARY),
    Service("open_session", OpenSession, SessionOpened, Exchange.SESSION, SessionStep, SessionStepReply),
    # server to server: the previous hop of a chain pushes its outputs into the next hop's session; the next hop
    # answers the session's client, on the session's own stream. One such stream carries every session the
    # sender relays to the receiver: each further session joins it with its own RelayOpen
    Service("relay", RelayOpen, RelayOpened, Exchange.PUSH, SessionStep, join=RelayOpen),
)

_BY_REQUEST = {service.request: service for service in SERVICES}


def service_for(request: Message) -> Service:
    """The service a request opens; ``BadRequestError`` for a message no service starts with."""
    service = _BY_REQUEST.get(type(request))
    if service is None:
        openers = ", ".join(s.request.WIRE_NAME for s in SERVICES)
        raise BadRequestError(f"{request.WIRE_NAME!r} does not start an exchange; a stream starts with one of {openers}")
    return service
