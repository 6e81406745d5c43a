"""What a DHT node of ours agrees to keep for others: signed records only, each under its owner's own subkey, for a
bounded time, and a bounded number of them.

hivemind's DHT node keeps whatever any peer asks it to store: plain values under any key, any number of subkeys
under one key, expirations years ahead, and a "cache" area any peer may write to. Anyone could then fill a node's
memory, or file thousands of subkeys under a model's key so that every reader downloads them all at every refresh.
Corolla itself only ever files one kind of record: under a key, a subkey that is the filing peer's id followed by
its owner marker (``<peer id>[owner:<its RSA key>]``), whose value hivemind's validator has checked to be signed by
that key. ``BoundedRecordStorage`` takes hivemind's storage's place in a node and refuses everything else:

- a plain value (no subkey), or a subkey that is not ``<peer id>[owner:<key>]`` with the peer id that key's own
  (so each subkey costs a key pair of its own, and only its owner can write it: the validator checks the signature);
- a value over ``max_value_bytes``; an expiration more than ``max_ttl_s`` ahead (and ``CLOCK_SLACK_S``);
- a new subkey under a key that holds ``max_subkeys`` live ones, or a record (new or refreshed) that would take the
  key's records past ``max_key_bytes`` (a lookup gets a key's records in one reply, which hivemind caps at 2 MiB: a
  key filled past that could not be read at all); a new key past ``max_keys``; a new entry past ``max_entries`` or
  ``max_bytes`` in all. When full, the records already held stay and keep being refreshed by their owners (the
  servers of the swarm before a flood keep their places); a newcomer is refused until one expires;
- a write that does not extend its subkey's expiration (a replay), without the bookkeeping hivemind would add.

The node's cache area, which only hivemind's caching options write to and which Corolla turns off, refuses every
write (``RefusingStorage``). Readers bound what they decode separately (``corolla.net.records``).
"""
from __future__ import annotations

import functools
import heapq
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils import timed_storage

from corolla.wire.identity import Identity, peer_id_of
from corolla.wire.records import MAX_RECORD_TTL_S

CLOCK_SLACK_S = 60.0  # a writer's clock may run ahead of ours: its records may expire this much past the horizon
_OWNED_SUBKEY = re.compile(r"([1-9A-HJ-NP-Za-km-z]{1,128})\[owner:(ssh-rsa [A-Za-z0-9+/=]{1,2048})\]")


@dataclass(frozen=True)
class DHTLimits:
    """What one DHT node keeps for others (see the module docstring). The defaults hold a swarm of thousands of
    servers (a record and its subkey are ~2 KB, one per server under its model's key and one under the list of
    models; a key's 1.5 MiB holds ~750 of them) and bound what a node keeps for others to 256 MiB of records
    whatever is sent to it."""

    max_keys: int = 4096
    max_subkeys: int = 2048  # live subkeys under one key
    max_entries: int = 16384  # live subkeys under all keys together
    max_value_bytes: int = 65536  # one record (a server's with many adapters is the largest)
    max_key_bytes: int = 3 * 2**19  # one key's subkeys and values: 1.5 MiB, under hivemind's 2 MiB for a reply
    max_bytes: int = 2**28  # all keys' subkeys and values together: 256 MiB
    max_ttl_s: float = MAX_RECORD_TTL_S  # how far ahead an expiration may be

    def __post_init__(self):
        for name in ("max_keys", "max_subkeys", "max_entries", "max_value_bytes", "max_key_bytes", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DHTLimits.{name} must be a positive integer, got {value!r}")
        if not 0 < self.max_ttl_s < float("inf"):
            raise ValueError(f"DHTLimits.max_ttl_s must be positive and finite, got {self.max_ttl_s!r}")


@functools.lru_cache(maxsize=4096)
def _peer_id_of_ssh_key(ssh_key: str) -> Optional[str]:
    try:
        key = serialization.load_ssh_public_key(ssh_key.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return peer_id_of(der)


def owned_subkey(subkey: Any) -> bool:
    """Whether ``subkey`` is ``<peer id>[owner:<RSA key>]`` naming the peer id of that very key."""
    if not isinstance(subkey, str):
        return False
    match = _OWNED_SUBKEY.fullmatch(subkey)
    return match is not None and _peer_id_of_ssh_key(match.group(2)) == match.group(1)


def subkey_of(identity: Identity) -> str:
    """The subkey a peer with ``identity`` files its records under: its peer id, then its owner marker."""
    key = serialization.load_der_private_key(identity.private_der(), None).public_key()
    ssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{identity.peer_id}[owner:{ssh}]"


def _size(subkey: str, value: bytes) -> int:
    """What a record adds to a lookup's reply: its subkey and value (and a few bytes of framing)."""
    return len(subkey) + len(value) + 16


def _compact(storage) -> None:
    """Drop the stale heap entries hivemind's ``TimedStorage`` leaves behind on every refresh (they would otherwise
    stay until their old expiration comes round): rebuild the heap from the live entries once it is 4x their size."""
    if len(storage.expiration_heap) > 4 * len(storage.key_to_heap) + 64:
        storage.expiration_heap = list(storage.key_to_heap.values())
        heapq.heapify(storage.expiration_heap)


class BoundedRecordStorage(DHTLocalStorage):
    """A DHT node's storage under ``DHTLimits`` (see the module docstring). Every refusal returns False, which the
    node reports to the peer that asked, as hivemind does for a record it would not keep."""

    RECOUNT_INTERVAL_S = 1.0  # when full, the entries (or a key's bytes) are counted again at most this often

    def __init__(self, limits: DHTLimits = DHTLimits()):
        super().__init__()
        self.limits = limits
        self._entries_bound = 0  # upper bounds on the live entries and their bytes, made exact (at most once a
        self._bytes_bound = 0  # RECOUNT_INTERVAL_S) whenever one reaches its limit: expired records leave them high
        self._recounted_at = float("-inf")
        self._key_bytes: dict = {}  # key -> [an upper bound on its records' bytes, when last counted exactly]
        self.refused = 0  # writes refused so far (for tests and logs)

    def store(self, key, value, expiration_time, subkey=None) -> bool:
        if subkey is None:  # a plain value: Corolla files none
            self.refused += 1
            return False
        return self.store_subkey(key, subkey, value, expiration_time)

    def store_subkey(self, key, subkey, value, expiration_time) -> bool:
        limits = self.limits
        now = timed_storage.get_dht_time()
        if (not owned_subkey(subkey) or not isinstance(value, bytes) or len(value) > limits.max_value_bytes
                or not isinstance(expiration_time, (int, float))
                or not now <= expiration_time <= now + limits.max_ttl_s + CLOCK_SLACK_S):
            self.refused += 1
            return False
        current = self.get(key)
        held = current.value if current is not None else None
        if isinstance(held, DictionaryDHTValue):
            previous = held.get(subkey)
            if previous is not None:
                grows = len(value) - len(previous.value)
                if (expiration_time <= previous.expiration_time or not self._room_in_key(key, held, grows)
                        or not self._room_in_all(0, grows)):
                    self.refused += 1  # a replay or an older write; or a bigger record than the key has room for
                    return False
                return self._stored(key, subkey, value, expiration_time, grows, new=False)
            size = _size(subkey, value)
            if (len(held) >= limits.max_subkeys or not self._room_in_key(key, held, size)
                    or not self._room_in_all(1, size)):
                self.refused += 1
                return False
            return self._stored(key, subkey, value, expiration_time, size, new=True)
        size = _size(subkey, value)
        if held is not None or len(self) >= limits.max_keys or not self._room_in_all(1, size):
            # a plain value cannot be here (store refuses them); a new key needs room for it and its entry
            self.refused += 1
            return False
        if len(self._key_bytes) > 2 * limits.max_keys:  # forget the byte counts of keys gone since
            self._key_bytes = {k: count for k, count in self._key_bytes.items() if k in self.data}
        self._key_bytes[key] = [0, float("-inf")]
        return self._stored(key, subkey, value, expiration_time, size, new=True)

    def _room_in_key(self, key, held: DictionaryDHTValue, grows: int) -> bool:
        """Whether ``key``'s records can grow by ``grows`` bytes within ``max_key_bytes`` (counted again, at most
        once a ``RECOUNT_INTERVAL_S``, when the running bound says no: records that expired leave it high)."""
        count = self._key_bytes[key]  # set when the key's first record was kept (kept while the key lives)
        if count[0] + grows <= self.limits.max_key_bytes:
            return True
        now = time.monotonic()
        if now - count[1] >= self.RECOUNT_INTERVAL_S:
            count[:] = [self._bytes_of(held), now]
        return count[0] + grows <= self.limits.max_key_bytes

    @staticmethod
    def _bytes_of(held: DictionaryDHTValue) -> int:
        return sum(_size(subkey, item.value) for subkey, item in held.items())

    def _stored(self, key, subkey, value, expiration_time, grows: int, new: bool) -> bool:
        stored = super().store_subkey(key, subkey, value, expiration_time)
        if stored:
            self._key_bytes[key][0] += grows
            self._bytes_bound += grows
            self._entries_bound += int(new)
        _compact(self)
        held = self.get(key)
        if held is not None and isinstance(held.value, DictionaryDHTValue):
            _compact(held.value)
        return stored

    def _room_in_all(self, entries: int, grows: int) -> bool:
        """Whether all keys together can take ``entries`` more entries and ``grows`` more bytes."""
        def fits() -> bool:
            return (self._entries_bound + entries <= self.limits.max_entries
                    and self._bytes_bound + grows <= self.limits.max_bytes)

        if fits():
            return True
        now = time.monotonic()
        if now - self._recounted_at >= self.RECOUNT_INTERVAL_S:
            self._recounted_at = now
            self._entries_bound, self._bytes_bound = self.live_entries(), self.live_bytes()
        return fits()

    def _dictionaries(self) -> list:
        return [item.value for _, item in self.items() if isinstance(item.value, DictionaryDHTValue)]

    def live_entries(self) -> int:
        """Live subkeys under all keys (counted: O(keys))."""
        return sum(len(held) for held in self._dictionaries())

    def live_bytes(self) -> int:
        """Bytes of the live records under all keys, as ``max_bytes`` counts them (counted: O(entries))."""
        return sum(self._bytes_of(held) for held in self._dictionaries())


class RefusingStorage(DHTLocalStorage):
    """The DHT node's cache area: every write is refused (Corolla's nodes cache nothing, so nothing is lost), and a
    lookup finds nothing there."""

    def store(self, key, value, expiration_time, subkey=None) -> bool:
        return False

    def store_subkey(self, key, subkey, value, expiration_time) -> bool:
        return False


def bound_node_storage(node, limits: DHTLimits) -> None:
    """Put ``BoundedRecordStorage`` and ``RefusingStorage`` in place of a fresh hivemind ``DHTNode``'s storage and
    cache (hivemind 1.1.12 builds both in ``DHTProtocol.__init__`` and reaches them as ``node.protocol.storage`` and
    ``.cache`` on every use). Whatever the node already keeps (its own records filed while it joined) moves over
    under the same rules."""
    protocol = node.protocol
    bounded = BoundedRecordStorage(limits)
    for key, item in list(protocol.storage.items()):
        if isinstance(item.value, DictionaryDHTValue):
            for subkey, entry in list(item.value.items()):
                bounded.store_subkey(key, subkey, entry.value, entry.expiration_time)
    protocol.storage = bounded
    protocol.cache = RefusingStorage()
