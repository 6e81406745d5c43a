"""A private swarm's DHT: every DHT request and reply proves the swarm key, so a peer without it cannot join.

hivemind's DHT calls an *authorizer* around every RPC (ping, store, find): the caller signs the request, the
callee validates it before doing anything (an invalid request gets no answer, so the sender is neither added to
routing tables nor told anything), and the callee signs its reply, which the caller validates (a reply without a
valid proof is treated as no reply, so a stranger's node never enters our routing table). Corolla's proof is an
HMAC under the swarm key (``corolla.wire.swarm_key``):

- request: ``auth.time`` (DHT time), ``auth.nonce`` (16 random bytes), ``auth.signature`` = HMAC(key, the request
  serialized with an empty signature). A request older or newer than ``MAX_SKEW_S`` or carrying a nonce already
  seen is refused (replays; libp2p encrypts the link, so only a member could have captured one).
- reply: ``auth.nonce`` = the request's nonce, ``auth.signature`` = HMAC(key, the reply serialized with an empty
  signature): bound to the request it answers.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Optional

from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.crypto import RSAPublicKey
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

logger = logging.getLogger(__name__)

MAX_SKEW_S = 60.0  # a request's time may differ from ours by this much
NONCE_BYTES = 16


def _mac(key: bytes, purpose: bytes, message) -> bytes:
    return hmac.new(key, purpose + message.SerializeToString(), hashlib.sha256).digest()


class SwarmKeyAuthorizer(AuthorizerBase):
    """Signs and checks hivemind DHT RPCs with a private swarm's key."""

    def __init__(self, key: bytes):
        if not key:
            raise ValueError("a swarm key must not be empty")
        self._key = key
        self._recent_nonces = TimedStorage()  # only nonces of valid requests enter, so strangers cannot fill it
        self.refused = 0  # requests and replies refused so far (for tests and logs)

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key: Optional[RSAPublicKey]) -> None:
        auth = request.auth
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(NONCE_BYTES)
        auth.signature = b""
        auth.signature = _mac(self._key, b"corolla-dht-request|", request)

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        signature = auth.signature
        auth.signature = b""
        valid = hmac.compare_digest(signature, _mac(self._key, b"corolla-dht-request|", request))
        auth.signature = signature
        now = get_dht_time()
        if not valid:
            return self._refuse("a DHT request without a valid swarm proof (a peer outside the private swarm)")
        if not abs(auth.time - now) <= MAX_SKEW_S:
            return self._refuse(f"a DHT request dated {auth.time - now:+.0f} s from now (clock skew or a replay)")
        if len(auth.nonce) != NONCE_BYTES or auth.nonce in self._recent_nonces:
            return self._refuse("a replayed DHT request")
        self._recent_nonces.store(auth.nonce, None, now + 3 * MAX_SKEW_S)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = _mac(self._key, b"corolla-dht-reply|", response)

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        signature = auth.signature
        auth.signature = b""
        valid = hmac.compare_digest(signature, _mac(self._key, b"corolla-dht-reply|", response))
        auth.signature = signature
        if not valid:
            return self._refuse("a DHT reply without a valid swarm proof (a peer outside the private swarm)")
        if not hmac.compare_digest(auth.nonce, request.auth.nonce):
            return self._refuse("a DHT reply to another request")
        return True

    def _refuse(self, why: str) -> bool:
        self.refused += 1
        logger.debug("refused %s", why)
        return False
