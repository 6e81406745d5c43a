"""``InProcessSwarm``: real servers (real model code, real protocol) on a ``MemoryNetwork``, all in this process.

For tests of logic that need no processes: routing, failover and replay, retries, bans, moves, bad input. The
servers share one event-loop thread; each has its own compute thread. Clients made by ``client()`` reach them
through the same network. ``kill(server)`` and ``freeze(server)`` stand in for SIGKILL and SIGSTOP.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional, Sequence

from corolla.core.blocks import BlockRange
from corolla.net.loop import LoopThread
from corolla.server.config import ServerConfig
from corolla.server.scheduler import Priority
from corolla.server.server import Server
from corolla.testing.memory import MemoryNetwork


class InProcessSwarm:
    def __init__(self, model: Optional[str], spans: Sequence[BlockRange] = (), dht_prefix: str = "inprocess",
                 network: Optional[MemoryNetwork] = None, **server_settings):
        self.model = model
        self.spans = list(spans)
        self.dht_prefix = dht_prefix
        self.network = network or MemoryNetwork()
        self.server_settings = {"num_threads": 1, "throughput": 100.0, "shutdown_grace_s": 0.5, **server_settings}
        self.servers: list[Server] = []
        self.loop: Optional[LoopThread] = None

    def __enter__(self) -> "InProcessSwarm":
        self.loop = LoopThread("inprocess-servers")
        try:
            for span in self.spans:
                self.start_server(span)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_server(self, span: Optional[BlockRange] = None, **settings) -> Server:
        """Start one more server of ``span`` (or one choosing its own, with ``num_blocks=...``)."""
        config = ServerConfig(**{"model": self.model, "blocks": span, "dht_prefix": self.dht_prefix, "new_swarm": True,
                                 **self.server_settings, **settings})
        name = f"server{len(self.servers)}"
        server = self.loop.run(Server.create(config, self.network.factory(name)), 300)
        self.servers.append(server)
        return server

    def client(self, model_class=None, **kwargs):
        """A distributed model (``AutoDistributedModelForCausalLM`` by default) connected to this swarm."""
        if model_class is None:
            from corolla.client.model import AutoDistributedModelForCausalLM as model_class
        kwargs.setdefault("dht_prefix", self.dht_prefix)
        return model_class.from_pretrained(self.model, transport_factory=self.network.factory("client"), **kwargs)

    def server_by_peer(self, peer_id: str) -> Server:
        for server in self.servers:
            if server.peer.peer_id == peer_id:
                return server
        raise KeyError(f"no server of this swarm has peer id {peer_id}")

    def hold_compute(self, server: Server, seconds: float) -> None:
        """Keep ``server``'s compute thread busy for ``seconds`` (a training-priority job), without waiting for it:
        steps arriving meanwhile queue up, and run as batches once it frees."""
        asyncio.run_coroutine_threadsafe(server.scheduler.run(Priority.TRAINING, time.sleep, seconds), self.loop.loop)

    def kill(self, server: Server) -> None:
        """Like SIGKILL: the server's streams break and nobody can reach it (its records expire)."""
        server.peer.kill()

    def freeze(self, server: Server) -> None:
        server.peer.freeze()

    def thaw(self, server: Server) -> None:
        server.peer.thaw()

    def close(self) -> None:
        if self.loop is None:
            return
        for server in self.servers:
            try:
                self.loop.run(_stop_dead(server) if server.peer.dead else server.shutdown(), 30)
            except Exception:
                pass
        self.servers = []
        self.loop.stop()
        self.loop = None


async def _stop_dead(server: Server) -> None:
    """What is left of a killed server: its background tasks and compute thread."""
    for task in (server._rebalancer, server._janitor):
        if task is not None:
            task.cancel()
    await server.announcer.stop()
    await server.scheduler.close()
