"""The network behind a small interface of ours: ``Transport``.

- ``transport.py`` ``Transport``: serve / open byte streams, announce / look up records; ``TransportFactory``.
- ``peer.py``      ``Peer``: the real transport, one libp2p daemon + one hivemind DHT node;
                   ``RememberingValidator``: its records' owner signatures, each exact record checked once.
- ``dht_storage.py`` ``BoundedRecordStorage``: what a DHT node keeps for others (owned, signed subkeys only, bounded
                   per key and in all, for a bounded time); ``bound_node_storage`` puts it in a hivemind node.
- ``swarm_auth.py`` ``SwarmKeyAuthorizer``: a private swarm's DHT requests and replies carry HMAC proofs.
- ``records.py``   ``fetch_records``: every live server record of a model's blocks, decoded; ``fetch_models``.
- ``exchange.py``  one request/reply exchange on a stream, with the reply bounded and blamed on its sender.
- ``loop.py``      ``LoopThread``: an asyncio loop on a background thread, for synchronous callers.
- ``addresses.py`` building loopback-only multiaddrs and writing/reading address files.

Nothing else in Corolla imports hivemind; the in-memory transport for tests is ``corolla.testing.memory``.
"""
