"""``Server``: load a span of blocks, announce it, serve it, leave cleanly.

It wires the request path together: the transport hands each stream to the ``Dispatcher`` (by the service table),
which calls ``RequestHandlers`` (validation, session table), which queue torch work on the ``Scheduler`` in front
of the one compute thread (``BlockCompute``).
"""
from __future__ import annotations

import asyncio
import math
import sys
import logging
import random
import signal
import threading
from typing import Optional

import torch

from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord, ServerState
from corolla.core.spans import choose_move, choose_span
from corolla.models.checkpoint import config_digest, load_config, model_dht_prefix, resolve_model
from corolla.models.dtypes import resolve_dtype
from corolla.models.lora import read_peft_adapter
from corolla.models.quant import resolve_quant
from corolla.core.status import StatusLine
from corolla.core.errors import CorollaError
from corolla.models.family import family_for
from corolla.models.stack import LoadAbandoned, check_checkpoint, load_block_stack
from corolla.net.addresses import write_address_file
from corolla.net.peer import Peer, PeerConfig
from corolla.net.transport import Transport, TransportFactory
from corolla.net.records import fetch_records
from corolla.server.announcer import Announcer
from corolla.server.cache import CacheBudget
from corolla.server.config import ServerConfig
from corolla.server.dispatch import Dispatcher
from corolla.server.handlers import RequestHandlers
from corolla.server.scheduler import Priority, Scheduler
from corolla.server.throughput import measure_throughput
from corolla.wire.codec import dtype_name
from corolla.wire.compression import SUPPORTED_CODECS
from corolla.wire.identity import Identity
from corolla.wire.swarm_key import load_swarm_key
from corolla.wire.messages import PROTOCOL_VERSION, RPC_PROTOCOL, InfoReply

logger = logging.getLogger(__name__)
LOCATE_PERIOD_S = 2.0  # the most often a server reads the records for a next hop it does not know
LOCATE_REFRESH_S = 15.0  # how often it reads them anyway, so that the hops it relays to are known beforehand
LOCATE_WAIT_S = 0.5  # the longest a relay waits for a read of them


class Server:
    """A running server. ``await Server.create(config)``, then ``await server.shutdown()``."""

    def __init__(self, config: ServerConfig, peer: Transport, model_prefix: str, blocks: BlockRange,
                 identity: Identity):
        self.config = config
        self.path = None  # the checkpoint directory
        self.model_config = None
        self.moves = 0  # times this server moved to other blocks
        self._rebalancer: Optional[asyncio.Task] = None
        self._janitor: Optional[asyncio.Task] = None
        self.peer = peer
        self.model_prefix = model_prefix
        self.blocks = blocks
        self.state = ServerState.JOINING
        self.throughput = 0.0
        self.dtype = resolve_dtype(config.dtype)
        self.quant = resolve_quant(config.quant, torch.device(config.device))
        self.config_digest = ""  # of the checkpoint's architecture, announced (create sets it)
        self.maddrs: list[str] = []
        self.stack = None
        self.handler: Optional[RequestHandlers] = None
        self.dispatcher: Optional[Dispatcher] = None
        self.budget: Optional[CacheBudget] = None
        self.scheduler = Scheduler(config.num_threads, max_batch=config.max_batch, max_gather_s=config.batch_gather_s,
                                   nice=config.compute_nice,
                                   idle=config.compute_idle and torch.device(config.device).type == "cpu")
        self.identity = identity
        self.abandon = threading.Event()  # set when the server stops: a load in progress ends before its next block
        self._located: dict[str, tuple[str, ...]] = {}  # servers of this model and their addresses (``_locate``)
        self._missed_at = -math.inf  # when a next hop was last not found (reads for unknown hops are spaced)
        self._locating: Optional[asyncio.Future] = None  # a read of the records under way
        self._locator: Optional[asyncio.Task] = None
        self.announcer = Announcer(peer, model_prefix, self.record, config.announce_period_s, config.record_ttl_s,
                                   identity, load_swarm_key(config.swarm_key_path))

    @classmethod
    async def create(cls, config: ServerConfig, transport_factory: TransportFactory,
                     abandon: Optional[threading.Event] = None) -> "Server":
        """Start a server on the transport ``transport_factory`` makes (``hivemind_server(config)`` for the real
        network). Cancelling it stops the start; set ``abandon`` too, and loading the blocks (on the compute thread,
        which a cancel cannot stop) ends before its next block."""
        server = None
        check_device(config.device)
        path = await asyncio.to_thread(resolve_model, config.model)
        model_config = await asyncio.to_thread(load_config, path)
        prefix = config.dht_prefix or model_dht_prefix(path if config.model is None else config.model, model_config)
        total = model_config.num_hidden_layers
        family_for(model_config)  # an unsupported family: said before anything starts
        resolve_quant(config.quant, torch.device(config.device))  # ...as is a quantization this device cannot run
        digest = config_digest(model_config)
        identity = await asyncio.to_thread(Identity.load_or_create, config.identity_path)
        peer = await transport_factory(identity)
        if peer.peer_id != identity.peer_id:
            await peer.shutdown()
            raise RuntimeError(f"the transport's peer id {peer.peer_id} is not its identity's {identity.peer_id}")
        try:
            blocks = config.blocks
            records = await fetch_records(peer, prefix, range(total), total, load_swarm_key(config.swarm_key_path))
            others = sorted({r.peer_id for r in records if r.config_digest and r.config_digest != digest})
            if others:
                raise CorollaError(
                    f"this checkpoint is not the model the swarm serves under {prefix!r}: server(s) "
                    f"{', '.join(others[:3])} announce another architecture (config digest); use the same checkpoint "
                    "or another --dht-prefix")
            if blocks is None:
                if config.num_blocks is not None and config.num_blocks > total:
                    logger.warning("--num-blocks %d: the model has %d blocks; this server takes all of them",
                                   config.num_blocks, total)
                blocks = choose_span(total, records, total if config.num_blocks is None else config.num_blocks)
            if blocks.end > total:
                raise ValueError(f"blocks {blocks} run past the model's {total} blocks")
            await asyncio.to_thread(check_checkpoint, path, model_config, blocks)  # before announcing anything
            server = cls(config, peer, prefix, blocks, identity)
            if abandon is not None:
                server.abandon = abandon
            server.config_digest = digest
            server.dtype = resolve_dtype(config.dtype, model_config)
            server.maddrs = await peer.visible_maddrs()
            await server.announcer.announce_now()  # JOINING: others see this span is being taken
            await server._start(path, model_config)
            return server
        except BaseException:
            if server is not None:
                server.abandon.set()
                await server.scheduler.close()
            await peer.shutdown()
            raise

    async def _start(self, path, model_config) -> None:
        config = self.config
        self.path, self.model_config = path, model_config
        self.stack, self.budget, adapters = await self._load(self.blocks)
        await self.scheduler.lower_priority()  # loaded and measured at the process's priority: now below it
        self.handler = RequestHandlers(self.stack, config, self.budget, self.scheduler, self.info, self.peer, adapters,
                                       self._locate)
        self.dispatcher = Dispatcher(self.handler, config.max_message_bytes, config.session_idle_timeout_s,
                                     config.first_frame_timeout_s, config.frame_timeout_s, config.max_streams_per_peer,
                                     self.handler.swarm_key, self.peer.peer_id, config.frame_budget_bytes,
                                     config.close_wait_s)
        await self.peer.serve(RPC_PROTOCOL, self.dispatcher.handle_stream)
        self.state = ServerState.ONLINE
        await self.announcer.announce_now()
        self.announcer.start()
        if config.blocks is None:  # a server that chose its span may move; one told which blocks to serve stays
            self._rebalancer = asyncio.create_task(self._rebalance_loop())
        self._janitor = asyncio.create_task(self._expire_loop())
        self._locator = asyncio.create_task(self._locate_loop())
        if config.address_file:
            write_address_file(config.address_file, self.maddrs)
        logger.info(
            "serving blocks %s of %s as %s: %.1f tokens/s, cache %d tokens",
            self.blocks, self.model_prefix, self.peer.peer_id, self.throughput, config.cache_tokens,
        )

    async def _load(self, blocks: BlockRange):
        """Load ``blocks`` and measure them; returns the stack and its cache budget."""
        config = self.config
        logger.info("loading blocks %s of %s (%s, %s, weights %s)", blocks, self.model_prefix, self.dtype,
                    config.device, self.quant)
        # Every torch call of this process runs on the one compute thread: with several intra-op threads, torch
        # work split across Python threads loses its parallelism (measured: 2 threads ran at 1-thread speed).
        run = self.scheduler.run
        progress = sys.stderr.isatty()  # progress bars on a terminal only
        stack = await run(Priority.BACKGROUND, load_block_stack, self.path, self.model_config, blocks, self.dtype,
                          torch.device(config.device), self.quant, progress, config.fast_path, config.pack_weights,
                          self.abandon)
        if stack.packed:
            logger.info("float32 weights on a grid, held packed with the same values: %s",
                        ", ".join(f"{count} layers {kind}" for kind, count in stack.packed.items()))
        self.throughput = config.throughput or await run(Priority.BACKGROUND, measure_throughput, stack, 16, 8,
                                                         progress)
        adapters = {}
        for name in config.adapters:
            path = await asyncio.to_thread(resolve_model, name, "adapter")
            adapters[name], _ = await run(Priority.BACKGROUND, read_peft_adapter, path, stack.family, blocks, self.dtype)
            logger.info("adapter %s: %d adapted layers in blocks %s", name, len(adapters[name].pairs), blocks)
        budget = CacheBudget(config.cache_tokens, stack.cache_bytes_per_token(), config.cache_page_tokens,
                             config.cache_wait_s, config.max_cache_share)
        return stack, budget, adapters

    async def _expire_loop(self) -> None:
        """Kept training activations whose backward pass never came are dropped when they expire, not later."""
        while True:
            await asyncio.sleep(min(10.0, max(0.25, self.config.activation_ttl_s / 4)))
            compute = self.handler.compute if self.handler is not None else None
            if compute is not None:
                compute.activations.expire()

    async def _rebalance_loop(self) -> None:
        total = self.model_config.num_hidden_layers
        while True:
            await asyncio.sleep(self.config.rebalance_period_s * random.uniform(0.5, 1.5))  # jitter: no herds
            try:
                records = await fetch_records(self.peer, self.model_prefix, range(total), total,
                                              self.announcer.swarm_key)
                if not any(r.peer_id == self.peer.peer_id for r in records):
                    records.append(self.record())
                target = choose_move(total, records, self.peer.peer_id, self.config.balance_quality)
                if target is not None:
                    await self.move_to(target)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("rebalancing check failed; will retry")

    async def move_to(self, blocks: BlockRange) -> None:
        """Leave the current blocks (announce offline, end sessions: their clients fail over), load ``blocks``,
        announce them."""
        old = self.blocks
        logger.warning("moving from blocks %s to %s: the swarm is weaker there", old, blocks)
        self.dispatcher.accepting = False
        self.state = ServerState.OFFLINE
        await self.announcer.announce_now()
        await self._drain(self.config.shutdown_grace_s)
        self.dispatcher.close_sessions()
        self.stack = None
        self.handler.replace_stack(None, self.budget, {})  # free the old weights before loading the new ones
        self.blocks, self.state, self.throughput = blocks, ServerState.JOINING, 0.0
        await self.announcer.announce_now()
        self.stack, self.budget, adapters = await self._load(blocks)
        self.handler.replace_stack(self.stack, self.budget, adapters)
        self.state = ServerState.ONLINE
        self.dispatcher.accepting = True
        self.moves += 1
        await self.announcer.announce_now()
        logger.warning("now serving blocks %s", blocks)

    async def _drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for requests other than open sessions to finish."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.dispatcher is not None and self.dispatcher.in_flight > self.dispatcher.open_sessions:
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("%d request(s) still running after %.0f s", self.dispatcher.in_flight, grace_s)
                return
            await asyncio.sleep(0.05)

    async def _locate(self, peer_id: str) -> Optional[tuple[str, ...]]:
        """Where the server ``peer_id`` announces it can be dialled, from its record for this model (None: it
        announces no blocks of it). The view is kept warm by ``_locate_loop``, so a relay to a server known then
        waits for no DHT read. For an unknown one a read starts (at most one every LOCATE_PERIOD_S, so routes
        naming unknown servers cannot make this server read the DHT at every step) and is awaited for at most
        LOCATE_WAIT_S: a read that takes longer (the DHT waiting out peers that died, after a failover) must not
        stall the step, which then goes to the libp2p connections the daemon already has (no address dialled)."""
        now = asyncio.get_running_loop().time()
        if peer_id not in self._located and now - self._missed_at >= LOCATE_PERIOD_S:
            self._missed_at = now
            if self._locating is None or self._locating.done():
                self._locating = asyncio.ensure_future(self._read_locations())
            try:
                await asyncio.wait_for(asyncio.shield(self._locating), LOCATE_WAIT_S)
            except asyncio.TimeoutError:
                return self._located.get(peer_id, ())
        return self._located.get(peer_id)

    async def _read_locations(self) -> None:
        total = self.model_config.num_hidden_layers
        try:
            records = await fetch_records(self.peer, self.model_prefix, range(total), total, self.handler.swarm_key)
        except Exception as error:  # noqa: BLE001 - the DHT did not answer: keep what was known
            logger.info("reading where servers can be dialled failed: %s", error)
            return
        self._located = {record.peer_id: record.maddrs for record in records}

    async def _locate_loop(self) -> None:
        """Read where the model's servers can be dialled every LOCATE_REFRESH_S (relays look them up there)."""
        while True:
            if self._locating is None or self._locating.done():
                self._locating = asyncio.ensure_future(self._read_locations())
            await asyncio.shield(self._locating)
            await asyncio.sleep(LOCATE_REFRESH_S * random.uniform(0.8, 1.2))

    def record(self) -> ServerRecord:
        return ServerRecord(
            peer_id=self.peer.peer_id,
            blocks=self.blocks,
            state=self.state,
            throughput=self.throughput,
            dtype=dtype_name(self.dtype),
            protocol_version=PROTOCOL_VERSION,
            cache_tokens_free=self.budget.free_tokens if self.budget else 0,
            maddrs=tuple(self.maddrs),
            adapters=tuple(self.config.adapters),
            codecs=SUPPORTED_CODECS,
            quant=self.quant,
            config_digest=self.config_digest,
        )

    def info(self) -> InfoReply:
        return InfoReply(
            model=self.model_prefix,
            blocks=self.blocks,
            hidden_size=self.stack.hidden_size,
            dtype=dtype_name(self.dtype),
            state=self.state.value,
            throughput=self.throughput,
            cache_tokens_free=self.budget.free_tokens,
            cache_tokens_total=self.budget.total_tokens,
            max_message_bytes=self.config.max_message_bytes,
            protocol_version=PROTOCOL_VERSION,
            activations_kept=self.handler.activations_kept(),
            sessions_open=len(self.handler.sessions),
            steps_run=self.scheduler.batched_jobs,
            step_batches=self.scheduler.batched_calls,
            step_compute_s=self.scheduler.batched_cpu_s,
            step_wall_s=self.scheduler.batched_wall_s,
            step_gather_s=self.scheduler.gather_s,
            tokens_run=self.tokens_run,
        )

    @property
    def tokens_run(self) -> int:
        compute = self.handler.compute if self.handler is not None else None
        return 0 if compute is None else compute.tokens_run

    async def shutdown(self) -> None:
        """Announce offline, refuse new work, give in-flight work ``shutdown_grace_s``, then stop."""
        self.abandon.set()  # a move loading its new blocks stops
        for task in (self._rebalancer, self._janitor, self._locator, self._locating):
            if task is not None:
                task.cancel()
        self.state = ServerState.OFFLINE
        if self.dispatcher is not None:
            self.dispatcher.accepting = False
        await self.announcer.stop()
        if self.peer.reachable:
            await self.announcer.announce_now(ttl_s=self.config.record_ttl_s)
            await self._drain(self.config.shutdown_grace_s)
        if not self.peer.reachable:
            logger.warning("the libp2p daemon stopped with this server (a signal to its whole process group or "
                           "cgroup; under systemd, KillMode=mixed signals the server alone): the swarm may not have "
                           "heard it leave; its record expires within %g s", self.config.record_ttl_s)
        await self.peer.shutdown()
        await self.scheduler.close()


def check_device(name: str) -> None:
    """A ``CorollaError`` naming why this machine cannot compute on device ``name`` (before anything starts)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise CorollaError(f"device {name!r} is not one torch knows: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CorollaError(f"device {name!r}: this machine has no CUDA device torch can use (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CorollaError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                               f"numbered from 0")


def hivemind_server(config: ServerConfig) -> TransportFactory:
    """The real transport of a server: a libp2p peer with a DHT node, joined to ``config.initial_peers``."""
    if not config.initial_peers and not config.new_swarm:
        raise ValueError("a server needs --initial-peers of a running swarm, or --new-swarm to start its own")
    for addr in config.initial_peers if config.port else ():
        parts = str(addr).split("/")  # /ip4/HOST/tcp/PORT/p2p/ID
        if len(parts) > 4 and parts[3] == "tcp" and parts[4] == str(config.port) and parts[2] in (config.host,
                                                                                                  "127.0.0.1"):
            # (libp2p would bind it anyway, then fail to reach the peer it took the port from, saying only that)
            raise ValueError(f"--port {config.port} is the port of initial peer {addr} on this host: two peers "
                             "cannot share a port; choose another, or 0 for any free one")
    swarm_key = load_swarm_key(config.swarm_key_path)
    return lambda identity=None: Peer.create(PeerConfig(initial_peers=config.initial_peers, host=config.host,
                                                        port=config.port, identity=identity, swarm_key=swarm_key))


def _quiet_daemon_loss(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's handler of errors nobody awaited: hivemind's reader of its daemon's control connection ends
    with a ConnectionError when the daemon is stopped under it (a signal to the server's whole process group): that
    is said once, in the server's own words (``Server.shutdown``), not as a traceback."""
    error, task = context.get("exception"), context.get("future")
    coroutine = getattr(task, "get_coro", lambda: None)() if task is not None else None
    if isinstance(error, ConnectionError) and "persistent_conn" in getattr(coroutine, "__qualname__", ""):
        logger.debug("the libp2p daemon's control connection ended: %s", error)
        return
    loop.default_exception_handler(context)


def run_server(config: ServerConfig, log_format: str = "text") -> int:
    """Run a server in this process until SIGTERM/SIGINT; returns the exit code."""

    async def main() -> int:
        stop = asyncio.Event()
        abandon = threading.Event()
        loop = asyncio.get_running_loop()

        def _stop() -> None:
            stop.set()
            abandon.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop)
        loop.set_exception_handler(_quiet_daemon_loss)
        # a signal while the server starts (joining the swarm, loading blocks: minutes for a large model) ends the
        # start, rather than waiting for the server to come online only to leave
        starting = asyncio.ensure_future(Server.create(config, hivemind_server(config), abandon))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            logger.warning("stopped while starting")
            starting.cancel()
            try:
                await starting
            except (asyncio.CancelledError, LoadAbandoned):
                pass
            return 0
        stopped.cancel()
        server = starting.result()
        banner = f"corolla server {server.peer.peer_id} serving blocks {server.blocks}"
        if log_format == "json":  # every line one JSON object: the banner too
            logging.getLogger("corolla.status").info(banner, extra={"status": {
                "event": "serving", "peer_id": server.peer.peer_id, "blocks": str(server.blocks),
                "addrs": list(server.maddrs)}})
        else:
            print(banner, flush=True)
            for addr in server.maddrs:
                print(f"  {addr}", flush=True)
        status = StatusLine(log_format=log_format)
        while not stop.is_set():
            sessions = len(server.handler.sessions) if server.handler is not None else 0
            rate = status.rate(server.tokens_run)
            status.show(f"blocks {server.blocks} [{server.quant}] | {server.state.value} | {sessions} session(s) | "
                        f"{rate:.1f} tokens/s", blocks=str(server.blocks), state=server.state.value,
                        sessions=sessions, tokens_per_s=round(rate, 2))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        status.close()
        logger.info("stopping: announcing offline")
        await server.shutdown()
        return 0

    return asyncio.run(main())
