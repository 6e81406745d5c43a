"""Server identities and signed records: nobody can forge, alter, replay or re-file another server's record."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord, ServerState
from corolla.wire.identity import Identity, peer_id_of, verify
from corolla.wire.records import decode_record, encode_record


@pytest.fixture(scope="module")
def server():
    return Identity.generate()


@pytest.fixture(scope="module")
def attacker():
    return Identity.generate()


def _record(identity, **changes):
    record = ServerRecord(identity.peer_id, BlockRange(0, 10), ServerState.ONLINE, 50.0, "float32", 5, 4096,
                          ("/ip4/127.0.0.1/tcp/1",))
    return dataclasses.replace(record, **changes)


def test_identity_is_a_libp2p_identity(server, tmp_path, caplog):
    from hivemind.p2p import PeerID

    assert PeerID.from_identity(server.to_libp2p()).to_base58() == server.peer_id == peer_id_of(server.public_der)
    path = tmp_path / "keys" / "id.key"
    with caplog.at_level(logging.INFO, logger="corolla.wire.identity"):
        created = Identity.load_or_create(str(path))
    assert f"created a new identity (peer id {created.peer_id}) in {path} and its folder {path.parent}" in caplog.text
    assert Identity.load_or_create(str(path)).peer_id == created.peer_id  # kept across runs
    (tmp_path / "bad.key").write_text("garbage")
    for bad, reason in ((tmp_path / "bad.key", "holds no key"), (tmp_path, "is a folder")):
        with pytest.raises(ValueError, match=f"identity {bad} {reason}"):
            Identity.load_or_create(str(bad))
    signature = server.sign(b"data")
    assert verify(server.public_der, b"data", signature)
    assert not verify(server.public_der, b"other", signature)
    assert not verify(b"not a key", b"data", signature) and not verify(server.public_der, b"data", "!!")


def test_signed_records_are_accepted_and_every_forgery_is_dropped(server, attacker):
    now = 1000.0
    value = encode_record(_record(server), server, "model", now + 30)
    assert decode_record(value, 30, "model", now) == _record(server)
    assert decode_record(value, 30, "model", now + 31) is None  # expired: a replay of an old record
    assert decode_record(value, 30, "other-model", now) is None  # filed under another model
    assert decode_record({**value, "throughput": 1e6}, 30, "model", now) is None  # altered after signing
    assert decode_record({**value, "expires": now + 3600}, 30, "model", now) is None  # its lifetime stretched
    unsigned = {k: v for k, v in value.items() if k not in ("signature", "public_key")}
    assert decode_record(unsigned, 30, "model", now) is None
    # the attacker signs a record naming the server: its key does not derive the server's peer id
    forged = encode_record(_record(attacker), attacker, "model", now + 30)
    forged = {**forged, "peer_id": server.peer_id}
    assert decode_record(forged, 30, "model", now) is None
    with pytest.raises(ValueError, match="cannot sign"):
        encode_record(_record(server), attacker, "model", now + 30)
    # the attacker's own honest-looking record is fine: it names itself
    assert decode_record(encode_record(_record(attacker), attacker, "model", now + 30), 30, "model", now) is not None


def test_swarm_key_authorizer_signs_and_checks_dht_rpcs():
    """The private swarm's DHT proofs: a request signed with the key passes once; a replay, another key, an
    altered request, a stale time and a reply to another request are refused."""
    import asyncio

    from hivemind.proto import dht_pb2

    from corolla.net.swarm_auth import MAX_SKEW_S, SwarmKeyAuthorizer

    async def scenario():
        ours, theirs = SwarmKeyAuthorizer(b"k" * 32), SwarmKeyAuthorizer(b"x" * 32)
        request = dht_pb2.FindRequest(keys=[b"a" * 20])
        await ours.sign_request(request, None)
        copy = dht_pb2.FindRequest.FromString(request.SerializeToString())
        assert not await theirs.validate_request(copy)  # another swarm's key
        assert await ours.validate_request(copy)
        assert not await ours.validate_request(dht_pb2.FindRequest.FromString(request.SerializeToString()))  # replay
        altered = dht_pb2.FindRequest(keys=[b"b" * 20])
        altered.auth.CopyFrom(request.auth)
        assert not await ours.validate_request(altered)
        stale = dht_pb2.FindRequest(keys=[b"a" * 20])
        await ours.sign_request(stale, None)
        stale.auth.time -= 2 * MAX_SKEW_S
        stale.auth.signature = b""
        from corolla.net.swarm_auth import _mac

        stale.auth.signature = _mac(b"k" * 32, b"corolla-dht-request|", stale)  # well signed, but too old
        assert not await ours.validate_request(stale)
        unsigned = dht_pb2.FindRequest(keys=[b"a" * 20])
        assert not await ours.validate_request(unsigned)

        reply = dht_pb2.FindResponse()
        await ours.sign_response(reply, request)
        assert await ours.validate_response(reply, request)
        assert not await theirs.validate_response(reply, request)
        other = dht_pb2.FindRequest(keys=[b"a" * 20])
        await ours.sign_request(other, None)
        assert not await ours.validate_response(reply, other)  # answers another request
        assert ours.refused == 5 and theirs.refused == 2

    asyncio.run(scenario())


def test_dht_validator_remembers_verdicts_on_exact_records_only():
    """The DHT node's owner-signature check (hivemind's) runs once per distinct record: the same signed record again
    is answered from memory, a record differing in one byte is checked afresh (and a forged one refused), and at
    most ``capacity`` verdicts are kept."""
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.crypto import RSAPrivateKey

    from corolla.net.peer import RememberingValidator

    validator = RememberingValidator(RSAPrivateKey(), capacity=2)
    owner = validator.local_public_key
    unsigned = DHTRecord(b"key", b"peer" + owner, b"value", 123.0)
    record = dataclasses.replace(unsigned, value=validator.sign_value(unsigned))
    assert validator.validate(record) and validator.checked == 1
    assert validator.validate(DHTRecord(*dataclasses.astuple(record))) and validator.checked == 1  # remembered
    forged = dataclasses.replace(record, value=record.value.replace(b"value", b"valuf", 1))
    assert not validator.validate(forged) and validator.checked == 2
    later = dataclasses.replace(record, expiration_time=124.0)  # the signature covers the expiration too
    assert not validator.validate(later) and validator.checked == 3
    assert validator.validate(record) and validator.checked == 4  # pushed out by the capacity of 2: checked again
    assert validator._remembered.cache_info().currsize == 2
