"""``Peer``: the real ``Transport``, and our whole use of hivemind: a libp2p daemon, a DHT node on it, and raw
byte streams."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

from corolla.net.addresses import listen_maddrs
from corolla.net.dht_storage import DHTLimits, bound_node_storage
from corolla.net.swarm_auth import SwarmKeyAuthorizer
from corolla.net.transport import StreamHandler, Transport
from corolla.wire.identity import Identity

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _batch_children(enabled: bool):
    """While inside, the calling thread, and so every process it starts (the libp2p daemon: its policy passes to its
    threads), runs under Linux's ``SCHED_BATCH``; the thread's own policy is restored on the way out.

    Why: a daemon's thread wakes ~37 times per token of a 3-server chain (every message crosses two daemons), runs
    ~22 us and, under the default policy, preempts whatever runs on its core. With eight sessions on two cores that
    was ~3,500 preemptions a second, and a Python thread preempted on one core waits there while the other core
    goes idle (a scheduler trace found such a waiter in 61% of the idle time). A ``SCHED_BATCH`` thread gets the
    same share of the CPU but never preempts on waking: it runs at the next switch of its core (a blocking call or
    the end of a slice). Messages wait that long more. On two busy cores, eight sessions gained 5-12% with this and
    the compute threads' lower priority (README, Performance, Many sessions at once), and one session did not lose.
    Only a switch from the default policy is made (it needs no privilege); any other policy, or a platform without
    ``SCHED_BATCH``, is left alone."""
    if not enabled or not hasattr(os, "SCHED_BATCH"):
        yield
        return
    try:
        switched = os.sched_getscheduler(0) == os.SCHED_OTHER
        if switched:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as error:
        logger.debug(f"libp2p daemon keeps the default scheduling policy: {error}")
        switched = False
    try:
        yield
    finally:
        if switched:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


class RememberingValidator(RSASignatureValidator):
    """hivemind's check that a protected record is signed by its owner, remembering its verdict on records it has
    seen: a client that refreshes its view every few seconds gets the same signed records again until their owners
    re-announce, and checking each signature again cost ~36 ms of CPU per refresh of a 3-server swarm. The verdict
    is kept for the whole record (key, subkey, value with its signature, expiration), so a record that differs in
    any byte is checked afresh; at most ``capacity`` verdicts are kept (least recently used go first)."""

    def __init__(self, private_key, capacity: int = 4096):
        super().__init__(private_key)
        self._remembered = functools.lru_cache(maxsize=capacity)(super().validate)

    def validate(self, record: DHTRecord) -> bool:
        try:
            return self._remembered(record)
        except TypeError:  # a field that cannot be hashed: check it, remember nothing
            return super().validate(record)

    @property
    def checked(self) -> int:
        """Signatures actually verified (the rest were remembered)."""
        return self._remembered.cache_info().misses


@dataclass(frozen=True)
class PeerConfig:
    initial_peers: tuple[str, ...] = ()  # multiaddrs of peers already in the swarm; empty = a new swarm
    host: str = "127.0.0.1"  # IP address to listen on and announce
    port: int = 0  # TCP port; 0 picks a free one
    client_mode: bool = False  # True: does not store DHT records for others and is not dialled
    startup_timeout_s: float = 30.0
    identity: Optional[Identity] = None  # the libp2p identity (a server's key, which signs its records); None: new
    swarm_key: Optional[bytes] = None  # a private swarm's secret: DHT requests and replies must prove it
    daemon_batch: bool = True  # start the libp2p daemon under Linux's SCHED_BATCH (see _batch_children)
    dht_limits: DHTLimits = DHTLimits()  # what this peer's DHT node keeps for others (see corolla.net.dht_storage)


class Peer(Transport):
    """A running libp2p daemon with a DHT node. Create with ``await Peer.create(config)``."""

    def __init__(self, p2p: P2P, dht: DHTNode, config: PeerConfig, owner_marker: str):
        self._p2p = p2p
        self._dht = dht
        self.config = config
        self.peer_id: str = p2p.peer_id.to_base58()
        self._owner_marker = owner_marker  # appended to our own subkeys: DHT nodes then accept only our writes

    @classmethod
    async def create(cls, config: PeerConfig) -> "Peer":
        host_maddrs = listen_maddrs(config.host, config.port)
        identity = config.identity or Identity.generate()
        key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's wrapper around the same key
        key.__setstate__({"_private_key": identity.private_der()})
        validator = RememberingValidator(key)  # as a DHT node: refuse writes to a protected subkey by others
        with tempfile.TemporaryDirectory(prefix="corolla-identity-") as folder:
            identity_path = os.path.join(folder, "identity.key")
            with open(identity_path, "wb") as file:
                file.write(identity.to_libp2p())
            with _batch_children(config.daemon_batch):
                p2p = await P2P.create(
                    identity_path=identity_path,
                    check_if_identity_free=False,
                    initial_peers=list(config.initial_peers),
                    host_maddrs=host_maddrs,
                    announce_maddrs=host_maddrs if config.port else None,
                    nat_port_map=False,  # never probe the local network for UPnP/NAT-PMP
                    auto_nat=False,
                    use_relay=False,
                    use_auto_relay=False,
                    use_ipfs=False,  # no public bootstrap peers
                    dht_mode="client" if config.client_mode else "server",
                    startup_timeout=config.startup_timeout_s,
                )
        try:
            dht = await DHTNode.create(
                p2p=p2p,
                initial_peers=list(config.initial_peers),
                client_mode=config.client_mode,
                num_workers=4,
                cache_locally=False,  # a lookup must see fresh records, not an old local copy
                cache_nearest=0,  # nor write what it found to other nodes (each of which must check its signatures)
                cache_on_store=False,
                ensure_bootstrap_success=bool(config.initial_peers),
                record_validator=validator,
                authorizer=SwarmKeyAuthorizer(config.swarm_key) if config.swarm_key is not None else None,
            )
            bound_node_storage(dht, config.dht_limits)
        except BaseException as error:
            await p2p.shutdown()
            if isinstance(error, RuntimeError) and "bootstrap failed" in str(error):
                hint = ("this peer has a swarm key: is it the swarm's?" if config.swarm_key is not None
                        else "if the swarm is private, pass its --swarm-key")
                raise ConnectionError(f"none of the initial peers {list(config.initial_peers)} answered as DHT nodes "
                                      f"({hint})") from None
            raise
        return cls(p2p, dht, config, validator.local_public_key.decode())

    async def visible_maddrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) that others pass as initial peers."""
        maddrs = await self._p2p.get_visible_maddrs()
        return [str(addr) for addr in maddrs]

    # ---------------------------------------------------------------- DHT

    def now(self) -> float:
        return get_dht_time()

    async def announce_many(self, items: Sequence[tuple[str, str, Any]], expiration_time: float) -> bool:
        keys = [key for key, _, _ in items]
        # our own subkeys carry our key's owner marker: DHT nodes then refuse anyone else's writes to them
        subkeys = [subkey + self._owner_marker if subkey == self.peer_id else subkey for _, subkey, _ in items]
        values = [value for _, _, value in items]
        results = await self._dht.store_many(keys, values, [expiration_time] * len(keys), subkeys=subkeys)
        return all(results.values())

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """For each key, the live values under it: ``{key: {subkey: value}}`` (empty dict if none)."""
        found = await self._dht.get_many(list(keys), sufficient_expiration_time=float("inf"))
        now = get_dht_time()
        result: dict[str, dict[str, Any]] = {}
        for key in keys:
            entry = found.get(key)
            values: dict[str, Any] = {}
            if entry is not None and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    if item.expiration_time >= now and isinstance(subkey, str):
                        values[subkey.split("[owner:", 1)[0]] = item.value  # the peer id the subkey names
            result[key] = values
        return result

    # ---------------------------------------------------------------- streams

    async def serve(self, name: str, handler: StreamHandler) -> None:
        """Serve protocol ``name``: ``handler(reader, writer, remote_peer_id)`` runs for each incoming stream."""

        async def _on_stream(stream_info, reader, writer):
            try:
                await handler(reader, writer, stream_info.peer_id.to_base58())
            except Exception:  # a handler must never take the daemon connection down
                logger.exception("stream handler %s failed", name)
            finally:
                writer.close()

        await self._p2p.add_binary_stream_handler(name, _on_stream)

    async def open_stream(
        self, peer_id: str, name: str, maddrs: Optional[Sequence[str]] = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to ``peer_id``'s protocol ``name`` (dialling ``maddrs`` first if given)."""
        remote = PeerID.from_base58(peer_id)
        if maddrs:
            try:
                await self._p2p._client.connect(remote, [Multiaddr(addr) for addr in maddrs])
            except Exception as exc:  # fall back to the daemon's own peer routing
                logger.debug("direct dial of %s failed: %s", peer_id, exc)
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(remote, name)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            raise
        except Exception as exc:  # hivemind's daemon errors (dial failures, ...) surface as ConnectionError
            raise ConnectionError(f"cannot open a stream to {peer_id}: {exc}") from exc
        return reader, writer

    @property
    def daemon_pid(self) -> Optional[int]:
        """The process id of this peer's libp2p daemon (None once it is gone)."""
        child = getattr(self._p2p, "_child", None)
        return child.pid if child is not None and child.returncode is None else None

    @property
    def reachable(self) -> bool:
        return self.daemon_pid is not None

    async def shutdown(self) -> None:
        if self.reachable:  # (without its daemon, the DHT's goodbyes would only wait out their timeout)
            try:
                await asyncio.wait_for(self._dht.shutdown(), timeout=5)
            except Exception as exc:
                logger.debug("DHT shutdown: %s", exc)
        await self._p2p.shutdown()
