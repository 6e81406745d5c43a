"""The protocol between Corolla clients and servers: one module for every message, one for tensors.

- ``messages.py`` every request and reply as a typed dataclass, with the protocol version.
- ``codec.py``    tensors to bytes and back (dtype and shape checked), and message frames.
- ``framing.py``  reading and writing frames on an asyncio stream, with a size limit.

The client and the server both import this package and never import each other.
"""
from corolla.wire.messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
