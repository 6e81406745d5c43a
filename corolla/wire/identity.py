"""``Identity``: the key pair that names a server, signs its DHT records and is its libp2p identity.

A peer id is derived from the public key by libp2p's rule (the SHA-256 multihash of the protobuf-encoded public
key, in base58), so a record signed by a key can only name the peer that key is: nobody can announce records for
another server, and a server's libp2p connections (authenticated by the same key) prove who answers.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

logger = logging.getLogger(__name__)

_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
MAX_PUBLIC_KEY_BYTES = 1024  # DER of an RSA key up to 4096 bits fits
KEY_BITS = 2048


class Identity:
    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._private_key = private_key
        self.public_der = private_key.public_key().public_bytes(
            encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo)
        self.peer_id = peer_id_of(self.public_der)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS))

    @classmethod
    def load_or_create(cls, path: Optional[str]) -> "Identity":
        """The identity kept in ``path`` (created there on first use, and said so), or a new one for this run if None.
        ``ValueError`` naming the file if it holds no key."""
        if path is None:
            return cls.generate()
        file = Path(path).expanduser()
        if file.is_dir():
            raise ValueError(f"the identity {file} is a folder, not a key file")
        if file.exists():
            try:
                return cls.from_libp2p(file.read_bytes())
            except ValueError as error:
                raise ValueError(f"the identity {file} holds no key: {error}") from None
        identity = cls.generate()
        created = [folder for folder in (file.parent, *file.parent.parents) if not folder.exists()]
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(identity.to_libp2p())
        os.chmod(file, 0o600)
        logger.info("created a new identity (peer id %s) in %s%s", identity.peer_id, file,
                    f" and its folder {created[-1]}" if created else "")
        return identity

    def private_der(self) -> bytes:
        return self._private_key.private_bytes(encoding=serialization.Encoding.DER,
                                               format=serialization.PrivateFormat.TraditionalOpenSSL,
                                               encryption_algorithm=serialization.NoEncryption())

    def to_libp2p(self) -> bytes:
        """libp2p's protobuf ``PrivateKey`` (type RSA, DER data): the file format of a daemon identity."""
        return _protobuf_key(self.private_der())

    @classmethod
    def from_libp2p(cls, data: bytes) -> "Identity":
        key_type, der = _parse_protobuf_key(data)
        if key_type != 0:
            raise ValueError("only RSA identities are supported")
        return cls(serialization.load_der_private_key(der, password=None))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._private_key.sign(data, _PADDING, hashes.SHA256())).decode()


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments: the same record is checked once
def verify(public_der: bytes, data: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) of ``data`` was made by the key whose DER public key is ``public_der``.

    Verdicts are remembered (a client re-reads the same signed records every few seconds, each under every block it
    announces); the arguments are the whole question, so a record that differs in any byte is checked afresh."""
    try:
        key = serialization.load_der_public_key(public_der)
        if not isinstance(key, rsa.RSAPublicKey) or not 1024 <= key.key_size <= 4096:
            return False
        key.verify(base64.b64decode(signature, validate=True), data, _PADDING, hashes.SHA256())
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_der: bytes) -> str:
    """libp2p's peer id of an RSA public key (DER, SubjectPublicKeyInfo)."""
    digest = hashlib.sha256(_protobuf_key(public_der)).digest()
    return _base58(bytes([0x12, 0x20]) + digest)  # multihash: sha2-256, 32 bytes


def _protobuf_key(der: bytes) -> bytes:
    """``{Type: RSA (0), Data: der}`` in protobuf encoding (field 1 varint, field 2 bytes)."""
    return bytes([0x08, 0x00, 0x12]) + _varint(len(der)) + der


def _parse_protobuf_key(data: bytes) -> tuple[int, bytes]:
    key_type, der, index = 0, b"", 0
    while index < len(data):
        tag = data[index]
        index += 1
        if tag == 0x08:
            key_type, index = _read_varint(data, index)
        elif tag == 0x12:
            length, index = _read_varint(data, index)
            der, index = data[index:index + length], index + length
        else:
            raise ValueError("not a libp2p private key")
    return key_type, der


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, index: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index


def _base58(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = ""
    while number:
        number, rest = divmod(number, 58)
        out = _ALPHABET[rest] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out
