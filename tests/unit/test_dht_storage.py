"""What a DHT node keeps for others (``BoundedRecordStorage``), tested on the storage itself: the node hands it every
write after hivemind's validator has checked the owner's signature (the real path over libp2p is in
tests/integration/test_trust.py)."""
from __future__ import annotations

import pytest
from hivemind.dht.routing import DHTID
from hivemind.utils import timed_storage

from corolla.net.dht_storage import CLOCK_SLACK_S, BoundedRecordStorage, DHTLimits, RefusingStorage, owned_subkey, subkey_of
from corolla.wire.identity import Identity

IDENTITIES = [Identity.generate() for _ in range(30)]


owned = subkey_of


@pytest.fixture
def clock(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(timed_storage, "get_dht_time", lambda: now[0])
    return now


KEY, OTHER_KEY, THIRD_KEY = (DHTID.generate(source=name) for name in ("model key", "models", "third"))


def test_only_a_subkey_naming_its_owner_key_s_own_peer_id_is_owned():
    assert owned_subkey(owned(IDENTITIES[0]))
    marker = owned(IDENTITIES[1]).split("[", 1)[1]
    assert not owned_subkey(f"{IDENTITIES[0].peer_id}[{marker}")  # another key's marker: anyone could file it
    assert not owned_subkey(f"anything[{marker}")
    assert not owned_subkey(IDENTITIES[0].peer_id)  # no marker: unsigned
    assert not owned_subkey(owned(IDENTITIES[0]) + "x")
    assert not owned_subkey(f"{IDENTITIES[0].peer_id}[owner:ssh-rsa AAAAnotakey]")
    assert not owned_subkey(b"bytes") and not owned_subkey(None) and not owned_subkey(7)


def test_plain_values_foreign_subkeys_big_values_and_far_expirations_are_refused(clock):
    storage = BoundedRecordStorage(DHTLimits(max_value_bytes=100, max_ttl_s=60))
    now, mine = clock[0], owned(IDENTITIES[0])
    assert not storage.store(KEY, b"plain", now + 10)
    assert not storage.store_subkey(KEY, IDENTITIES[0].peer_id, b"unsigned", now + 10)
    assert not storage.store_subkey(KEY, mine, b"x" * 101, now + 10)
    assert not storage.store_subkey(KEY, mine, b"v", now + 60 + CLOCK_SLACK_S + 0.5)
    assert not storage.store_subkey(KEY, mine, b"v", now - 1)
    assert not storage.store_subkey(KEY, mine, "not bytes", now + 10)
    assert storage.refused == 6 and storage.get(KEY) is None
    assert storage.store_subkey(KEY, mine, b"x" * 100, now + 60 + CLOCK_SLACK_S)  # a writer's clock a bit ahead
    assert storage.get(KEY).value.get(mine).value == b"x" * 100


def test_a_full_key_keeps_its_records_refreshing_and_refuses_newcomers_until_one_expires(clock):
    storage = BoundedRecordStorage(DHTLimits(max_subkeys=3))
    now = clock[0]
    subkeys = [owned(identity) for identity in IDENTITIES[:4]]
    for index, subkey in enumerate(subkeys[:3]):
        assert storage.store_subkey(KEY, subkey, b"v", now + 10 + index)
    assert not storage.store_subkey(KEY, subkeys[3], b"v", now + 30)  # full: the newcomer waits
    assert storage.store_subkey(KEY, subkeys[0], b"refreshed", now + 40)  # an incumbent refreshes
    assert storage.get(KEY).value.get(subkeys[0]).value == b"refreshed"
    assert storage.store_subkey(OTHER_KEY, subkeys[3], b"v", now + 30)  # the bound is per key
    clock[0] = now + 11.5  # subkeys[1] has expired
    assert storage.store_subkey(KEY, subkeys[3], b"v", now + 30)
    held = sorted(subkey for subkey, _ in storage.get(KEY).value.items())
    assert held == sorted([subkeys[0], subkeys[2], subkeys[3]])


def test_new_keys_and_entries_stop_at_their_limits(clock, monkeypatch):
    monkeypatch.setattr(BoundedRecordStorage, "RECOUNT_INTERVAL_S", 0.0)
    storage = BoundedRecordStorage(DHTLimits(max_keys=2, max_entries=3))
    now = clock[0]
    a, b, c, d = (owned(identity) for identity in IDENTITIES[:4])
    assert storage.store_subkey(KEY, a, b"v", now + 10)
    assert storage.store_subkey(OTHER_KEY, a, b"v", now + 20)
    assert not storage.store_subkey(THIRD_KEY, a, b"v", now + 20)  # a third key
    assert storage.store_subkey(KEY, b, b"v", now + 20)
    assert not storage.store_subkey(OTHER_KEY, c, b"v", now + 20)  # a fourth entry
    assert storage.live_entries() == 3
    assert storage.store_subkey(KEY, a, b"v2", now + 30)  # refreshing is not a new entry
    clock[0] = now + 25  # OTHER_KEY's entry and b's are gone; KEY holds a
    assert storage.store_subkey(OTHER_KEY, c, b"v", now + 40)
    assert storage.store_subkey(THIRD_KEY, d, b"v", now + 40) is False  # two keys again
    assert storage.live_entries() == 2


def test_a_key_s_records_stay_within_its_byte_budget_and_all_keys_within_theirs(clock, monkeypatch):
    monkeypatch.setattr(BoundedRecordStorage, "RECOUNT_INTERVAL_S", 0.0)
    a, b, c = (owned(identity) for identity in IDENTITIES[:3])
    record = len(a) + 1000 + 16  # what one record of 1000 bytes counts
    storage = BoundedRecordStorage(DHTLimits(max_key_bytes=2 * record + 10, max_bytes=3 * record + 10))
    now = clock[0]
    assert storage.store_subkey(KEY, a, b"v" * 1000, now + 10)
    assert storage.store_subkey(KEY, b, b"v" * 1000, now + 20)
    assert not storage.store_subkey(KEY, c, b"v" * 1000, now + 20)  # past the key's budget
    assert storage.store_subkey(KEY, a, b"w" * 1005, now + 11)  # an incumbent refreshes, a little bigger
    assert not storage.store_subkey(KEY, a, b"w" * 1020, now + 12)  # but not past the budget
    assert storage.store_subkey(OTHER_KEY, c, b"v" * 1000, now + 20)
    assert not storage.store_subkey(THIRD_KEY, a, b"v" * 100, now + 20)  # past all keys' budget
    clock[0] = now + 11.5  # a's record under KEY has expired: the counts made exact again make room
    assert storage.store_subkey(KEY, c, b"v" * 1000, now + 30)
    assert storage.live_bytes() == 3 * record


def test_with_the_default_limits_a_full_key_is_read_in_one_reply(clock):
    """A lookup gets a key's records in one reply, which hivemind caps: a key filled with the largest records a node
    accepts must still fit in it (else the key could not be read at all from that node)."""
    from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE
    from hivemind.utils.serializer import MSGPackSerializer

    storage = BoundedRecordStorage()
    largest = b"v" * storage.limits.max_value_bytes
    stored = [storage.store_subkey(KEY, owned(identity), largest, clock[0] + 10) for identity in IDENTITIES]
    assert stored.count(True) >= 20 and not stored[-1]  # the key's budget ran out, not the identities
    reply = MSGPackSerializer.dumps(storage.get(KEY).value)  # what rpc_find sends for the key
    assert len(reply) < MAX_UNARY_PAYLOAD_SIZE - 64 * 1024  # with room for the reply's other fields


def test_replays_are_refused_without_growing_the_node_s_bookkeeping(clock):
    storage = BoundedRecordStorage()
    now, mine = clock[0], owned(IDENTITIES[0])
    assert storage.store_subkey(KEY, mine, b"v", now + 10)
    for _ in range(1000):
        assert not storage.store_subkey(KEY, mine, b"v", now + 10)
    held = storage.get(KEY).value
    assert len(held.expiration_heap) == 1 and len(storage.expiration_heap) == 1
    for step in range(1000):  # refreshes that each extend the expiration: old heap entries are dropped as they pile
        assert storage.store_subkey(KEY, mine, b"v", now + 10 + step * 0.001 + 0.001)
    assert len(held.expiration_heap) <= 4 * 1 + 64 + 1 and len(storage.expiration_heap) <= 4 * 1 + 64 + 1
    assert held.get(mine).expiration_time == pytest.approx(now + 11)


def test_the_cache_area_refuses_everything(clock):
    cache = RefusingStorage()
    assert not cache.store(KEY, b"v", clock[0] + 10)
    assert not cache.store_subkey(KEY, owned(IDENTITIES[0]), b"v", clock[0] + 10)
    assert cache.get(KEY) is None


@pytest.mark.parametrize("field, value", [("max_keys", 0), ("max_subkeys", -1), ("max_entries", 1.5),
                                          ("max_value_bytes", True), ("max_ttl_s", 0), ("max_ttl_s", float("inf"))])
def test_limits_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        DHTLimits(**{field: value})
