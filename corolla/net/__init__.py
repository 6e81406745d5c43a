"""hivemind's DHT and libp2p transport behind a small interface of ours.

- ``peer.py``   ``Peer``: one libp2p daemon + one DHT node; announce/lookup records, open/serve streams.
- ``loop.py``   ``LoopThread``: an asyncio loop on a background thread, for synchronous callers.
- ``addresses.py`` building loopback-only multiaddrs and writing/reading address files.

Nothing else in Corolla imports hivemind, so the data path can be replaced without touching the client
or the server.
"""
