"""The protocol between Corolla clients and servers.

- ``messages.py`` every request and reply as a typed dataclass with an explicit wire name; the protocol version.
- ``services.py`` the service table: each request's reply type and exchange (single, or session stream).
- ``records.py``  the DHT record format (a directory key per model, one subkey per server) and its validating decoder.
- ``codec.py``    tensors to bytes and back (dtype and shape checked), and message frames.
- ``framing.py``  reading and writing frames on an asyncio stream, with a size limit.
- ``compression.py`` wire codecs for activations (none, float16, bfloat16, int8-block64).
- ``relay.py``    the route a relayed step carries (the next servers, their sessions and relay tokens); trails
                  (the servers' outputs carried to the last one, each signed by its producer) and their checks.
- ``identity.py``  server identities (libp2p RSA keys): signing and verifying records.
- ``swarm_key.py`` a private swarm's secret: proofs for streams and records.
- ``validation.py`` checks of a request's contents, run by servers on every request and by clients before sending.

The client and the server both import this package and never import each other.
"""
from corolla.wire.messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
