"""Signed records on the real DHT: a stranger can neither overwrite a server's record nor plant one naming it."""
from __future__ import annotations

import logging

import pytest
import torch

from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord, ServerState
from corolla.net.loop import LoopThread
from corolla.net.peer import Peer, PeerConfig
from corolla.net.records import fetch_records
from corolla.server.announcer import Announcer
from corolla.testing.local_swarm import LocalSwarm
from corolla.wire.identity import Identity
from corolla.wire.records import decode_record, encode_record, servers_key


@pytest.fixture(scope="module")
def one_server(tiny_llama_dir):
    with LocalSwarm(model=str(tiny_llama_dir), spans=[BlockRange(0, 4)], dht_prefix="trust") as swarm:
        yield swarm


def test_a_stranger_cannot_overwrite_or_impersonate_a_server(one_server, tiny_llama_dir):
    loop = LoopThread("attacker")
    try:
        attacker_identity = Identity.generate()
        attacker = loop.run(Peer.create(PeerConfig(initial_peers=tuple(one_server.initial_peers),
                                                   identity=attacker_identity)), 60)
        try:
            honest = loop.run(fetch_records(attacker, "trust", range(4), 4), 30)
            assert len(honest) == 1 and honest[0].state is ServerState.ONLINE
            victim = honest[0]
            key = servers_key("trust")
            raw = loop.run(attacker._dht.get(key, latest=True), 30)  # the raw subkeys, owner markers included
            victim_subkey = next(s for s in raw.value if s.startswith(victim.peer_id))
            assert "[owner:" in victim_subkey
            # 1. overwrite the victim's record with one that says it serves float16 (every request would fail)
            forged = dict(raw.value[victim_subkey].value, dtype="float16")
            stored = loop.run(attacker._dht.store(key, forged, attacker.now() + 600, subkey=victim_subkey), 30)
            assert not stored  # the DHT nodes refuse: the subkey is the victim's and the write is not signed by it
            # 2. plant a record naming the victim under the attacker's own subkey, signed with the attacker's key
            record = decode_record(raw.value[victim_subkey].value, 4, "trust", attacker.now())
            planted = encode_record(record.__class__(**{**record.__dict__, "peer_id": attacker_identity.peer_id,
                                                        "dtype": "float16"}),
                                    attacker_identity, "trust", attacker.now() + 600)
            planted["peer_id"] = victim.peer_id
            loop.run(attacker.announce_many([(key, attacker.peer_id, planted)], attacker.now() + 600), 30)
            seen = loop.run(fetch_records(attacker, "trust", range(4), 4), 30)
            assert [(r.peer_id, r.dtype) for r in seen] == [(victim.peer_id, "float32")]
        finally:
            loop.run(attacker.shutdown(), 30)
    finally:
        loop.stop()
    from corolla import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), initial_peers=one_server.initial_peers,
                                                            dht_prefix="trust")
    try:
        assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    finally:
        model.close()


def test_a_private_swarm_refuses_strangers_at_the_dht(tiny_llama_dir, tmp_path):
    """With --swarm-key on the DHT node and the server, a peer without the key (or with another key) cannot join
    the DHT, and the DHT nodes answer none of its pings, stores or lookups; a peer with the key joins and works."""
    from corolla import AutoDistributedModelForCausalLM, ClientConfig
    from hivemind.dht.routing import DHTID
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    key_path = tmp_path / "swarm.key"
    key_path.write_bytes(b"a private swarm key of 32 bytes!")
    with LocalSwarm(model=str(tiny_llama_dir), spans=[BlockRange(0, 4)], dht_prefix="private",
                    swarm_key_path=str(key_path)) as swarm:
        loop = LoopThread("strangers")
        try:
            for stranger_key in (None, b"another swarm's key, 32 bytes.."):
                with pytest.raises(ConnectionError, match="none of the initial peers"):
                    loop.run(Peer.create(PeerConfig(initial_peers=tuple(swarm.initial_peers), client_mode=True,
                                                    swarm_key=stranger_key)), 60)
            # a stranger that connects anyway (a DHT node of its own) and talks to the swarm's DHT node directly
            stranger = loop.run(Peer.create(PeerConfig()), 60)
            try:
                dht_peer = PeerID.from_base58(swarm.initial_peers[0].rsplit("/p2p/", 1)[1])
                loop.run(stranger._p2p._client.connect(dht_peer, [Multiaddr(swarm.initial_peers[0].rsplit("/p2p/", 1)[0])]),
                         30)  # the libp2p link is open: only the swarm proof is missing
                protocol = stranger._dht.protocol
                assert loop.run(protocol.call_ping(dht_peer), 30) is None
                key = DHTID.generate(source=servers_key("private"))
                assert loop.run(protocol.call_find(dht_peer, [key]), 30) is None
                stored = loop.run(protocol.call_store(dht_peer, [key], [b"forged"], [stranger.now() + 600]), 30)
                assert not stored
            finally:
                loop.run(stranger.shutdown(), 30)
            # a member with the key joins: the client generates through the private swarm
            member = loop.run(Peer.create(PeerConfig(initial_peers=tuple(swarm.initial_peers), client_mode=True,
                                                     swarm_key=key_path.read_bytes())), 60)
            try:
                assert len(loop.run(fetch_records(member, "private", range(4), 4, key_path.read_bytes()), 30)) == 1
            finally:
                loop.run(member.shutdown(), 30)
        finally:
            loop.stop()
        config = ClientConfig(swarm_key=key_path.read_bytes())
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), initial_peers=swarm.initial_peers,
                                                                dht_prefix="private", client_config=config)
        try:
            assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
        finally:
            model.close()


def test_a_dht_node_keeps_a_bounded_number_of_records_per_key_and_its_incumbents_through_a_flood(caplog):
    """A stranger files signed records under a model's key, each under a key pair of its own (the owner rule holds),
    straight at the swarm's DHT node: past the node's bound per key it refuses them, the servers already there keep
    refreshing theirs, a reader gets at most the bound, and plain values and cache writes are refused outright."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.p2p import PeerID
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.serializer import MSGPackSerializer

    from corolla.net.dht_storage import DHTLimits, subkey_of

    def signed(identity: Identity, key: str, value, expires: float, subkey: str = "") -> bytes:
        """``value`` signed by ``identity`` for ``key`` and ``subkey`` (by default, its own subkey)."""
        private = RSAPrivateKey.__new__(RSAPrivateKey)
        private.__setstate__({"_private_key": identity.private_der()})
        record = DHTRecord(DHTID.generate(source=key).to_bytes(),
                           MSGPackSerializer.dumps(subkey or subkey_of(identity)), MSGPackSerializer.dumps(value),
                           expires)
        return RSASignatureValidator(private).sign_value(record)

    loop = LoopThread("flood")
    peers = []
    try:
        node = loop.run(Peer.create(PeerConfig(dht_limits=DHTLimits(max_subkeys=3))), 60)
        peers.append(node)
        initial = tuple(loop.run(node.visible_maddrs(), 30))
        honest = loop.run(Peer.create(PeerConfig(initial_peers=initial, client_mode=True)), 60)
        stranger = loop.run(Peer.create(PeerConfig(initial_peers=initial, client_mode=True)), 60)
        peers += [honest, stranger]
        key = servers_key("flood")
        assert loop.run(honest.announce_many([(key, honest.peer_id, {"honest": 1})], honest.now() + 30), 30)
        node_id = PeerID.from_base58(node.peer_id)
        protocol = stranger._dht.protocol
        flooders = [Identity.generate() for _ in range(5)]
        stored = []
        for identity in flooders:
            expires = stranger.now() + 30
            result = loop.run(protocol.call_store(node_id, [DHTID.generate(source=key)],
                                                  [signed(identity, key, {"flood": 1}, expires)], [expires],
                                                  subkeys=[subkey_of(identity)]), 30)
            stored.append(result)
        assert stored == [[True], [True], [False], [False], [False]]  # the honest record and two of the flood
        assert loop.run(honest.announce_many([(key, honest.peer_id, {"honest": 2})], honest.now() + 40), 30)
        seen = loop.run(honest.lookup_many([key]), 30)[key]
        assert len(seen) == 3 and seen[honest.peer_id] == {"honest": 2}
        # a plain value, a validly signed subkey naming another peer's id, and a write to the cache area: refused
        plain_key = DHTID.generate(source="plain")
        assert loop.run(protocol.call_store(node_id, [plain_key], [MSGPackSerializer.dumps("x")],
                                            [stranger.now() + 30]), 30) == [False]
        flooder, expires = flooders[0], stranger.now() + 30
        foreign = honest.peer_id + subkey_of(flooder)[len(flooder.peer_id):]
        assert loop.run(protocol.call_store(node_id, [DHTID.generate(source="other")],
                                            [signed(flooder, "other", {"x": 1}, expires, foreign)], [expires],
                                            subkeys=[foreign]), 30) == [False]
        assert loop.run(protocol.call_store(node_id, [DHTID.generate(source="cached")],
                                            [signed(flooder, "cached", {"x": 1}, expires)], [expires],
                                            subkeys=[subkey_of(flooder)], in_cache=True), 30) == [False]
        assert node._dht.protocol.storage.refused >= 5
        # a server that comes after the flood is refused too, and says so in its log
        newcomer_identity = Identity.generate()
        newcomer = loop.run(Peer.create(PeerConfig(initial_peers=initial, client_mode=True,
                                                   identity=newcomer_identity)), 60)
        peers.append(newcomer)
        record = ServerRecord(peer_id=newcomer.peer_id, blocks=BlockRange(0, 4), state=ServerState.ONLINE,
                              throughput=10.0, dtype="float32", protocol_version=1, cache_tokens_free=100)
        announcer = Announcer(newcomer, "flood", lambda: record, 10.0, 30.0, newcomer_identity)
        with caplog.at_level(logging.WARNING, logger="corolla.server.announcer"):
            for _ in range(3):  # (one refusal may be one node's: the operator is warned at the third in a row)
                assert not loop.run(announcer.announce_now(), 30)
        assert "the DHT nodes refused this server's record (blocks 0:4) under its model's key 3 times" in caplog.text
        assert "list of models" not in caplog.text  # that key has room: the swarm page lists it
        assert len(loop.run(honest.lookup_many([key]), 30)[key]) == 3  # and the node still answers
    finally:
        for peer in peers:
            loop.run(peer.shutdown(), 30)
        loop.stop()
