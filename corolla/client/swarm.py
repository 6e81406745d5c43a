"""``RemoteSwarm``: the client's own peer and its live view of the swarm.

It refreshes the servers' DHT records in the background, measures round trips to the servers it may use,
keeps a ban list of servers that failed, and plans chains with ``corolla.core.routing``.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable, Optional, TypeVar

from corolla.client.config import ClientConfig
from corolla.client.rpc import call
from corolla.core.blocks import BlockRange
from corolla.core.errors import AdapterNotServedError, BadRequestError, BlocksNotServedError
from corolla.core.records import QUANT_BITS, ServerRecord
from corolla.core.routing import BanList, Chain, SpeedMeter, plan_batch_route, plan_inference_route
from corolla.core.spans import describe_blocks, one_quantization, unserved_blocks, usable
from corolla.net.loop import LoopThread
from corolla.net.peer import Peer, PeerConfig
from corolla.net.transport import Transport, TransportFactory
from corolla.net.records import fetch_records
from corolla.wire.compression import parse_codec
from corolla.wire.messages import PROTOCOL_VERSION, InfoRequest
from corolla.wire.validation import check_hidden, check_mask, check_positions

logger = logging.getLogger(__name__)
T = TypeVar("T")

LATENCY_SMOOTHING = 0.3  # weight of a new round-trip sample in the moving average
PINGS_PER_REFRESH = 16  # new servers one refresh measures at most (all at once); a flood of records waits its turn


def hivemind_client(config: ClientConfig) -> TransportFactory:
    """The real transport of a client: a client-mode libp2p peer joined to ``config.initial_peers``."""
    if not config.initial_peers:
        raise ValueError("a client needs initial_peers: the multiaddrs of any peer of the swarm")
    return lambda: Peer.create(PeerConfig(initial_peers=tuple(config.initial_peers), client_mode=True,
                                          swarm_key=config.swarm_key))


class RemoteSwarm:
    """Owns a background event loop and a transport made on it by ``transport_factory`` (the caller builds the
    real one, ``hivemind_client(config)``, or an in-memory one); plans chains of servers for block spans."""

    def __init__(self, config: ClientConfig, model_prefix: str, num_blocks: int, transport_factory: TransportFactory,
                 hidden_size: Optional[int] = None, max_positions: Optional[int] = None, config_digest: str = ""):
        parse_codec(config.wire_codec)  # a wrong name fails here, not at the first request
        if config.min_quant not in QUANT_BITS:
            raise ValueError(f"min_quant {config.min_quant!r} is not one of {', '.join(QUANT_BITS)}")
        self.config = config
        self.model_prefix = model_prefix
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size  # what requests are checked against before they are sent
        self.max_positions = max_positions
        self.config_digest = config_digest  # of the client's checkpoint: servers announcing another are not used
        self.bans = BanList(base_s=config.ban_base_s, max_s=config.ban_max_s)
        self.speeds = SpeedMeter()  # measured speed of servers, which replaces what they announce
        self.latency_s: dict[str, float] = {}
        self._full_until: dict[str, float] = {}  # servers that said they had no cache for a session, until when
        self._records: list[ServerRecord] = []
        self._records_time = -float("inf")
        self._left_out: dict[str, int] = {}  # servers the last refresh found but did not keep, by reason
        self._rng = random.Random()
        self._verify_rng = random.Random(config.verify_seed)
        self.loop = LoopThread("corolla-client")
        try:
            self.transport: Transport = self.loop.run(transport_factory(), config.connect_timeout_s)
        except BaseException:
            self.loop.stop()
            raise
        self._refresher = self.loop.run(self._start_refresher())
        self._closed = False

    def run(self, coro: Awaitable[T], timeout_s: float | None = None) -> T:
        return self.loop.run(coro, timeout_s)

    # ---------------------------------------------------------------- the view

    async def _start_refresher(self) -> asyncio.Task:
        return asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the DHT may be briefly unreachable; the next round retries
                logger.debug("refreshing the swarm view failed: %s", exc)
            await asyncio.sleep(self.config.refresh_period_s)

    async def refresh(self) -> list[ServerRecord]:
        """Read every server's record for this model's blocks, and measure round trips to new servers (at most
        ``PINGS_PER_REFRESH`` of them, chosen at random)."""
        known = set(self.latency_s)  # servers that answered: under a flood they stay read, the rest re-drawn each time
        found = await fetch_records(self.transport, self.model_prefix, range(self.num_blocks), self.num_blocks,
                                    self.config.swarm_key, known)
        left_out: dict[str, int] = {}  # why servers found were not kept (told when blocks are missing)

        def keep(kept: list[ServerRecord], why: str) -> list[ServerRecord]:
            if len(kept) < len(found):
                left_out[why] = len(found) - len(kept)
            return kept

        if self.config.allowed_servers is not None:
            found = keep([r for r in found if r.peer_id in self.config.allowed_servers], "not in allowed_servers")
        found = keep([r for r in found if QUANT_BITS[r.quant] >= QUANT_BITS[self.config.min_quant]],
                     f"quantized below min_quant={self.config.min_quant}")
        if self.config_digest:  # another model under the same name (or a server lying about it) is not ours
            found = keep([r for r in found if not r.config_digest or r.config_digest == self.config_digest],
                         "another architecture under this name")
        found = keep(usable(found, PROTOCOL_VERSION), "another protocol version, or not online")
        if not self.config.mixed_quant:
            found = keep(one_quantization(found, BlockRange(0, self.num_blocks)), "another quantization")
        self._records = found
        self._left_out = left_out
        self._records_time = time.monotonic()
        unmeasured = [r for r in self._records if r.peer_id not in self.latency_s and not self.bans.is_banned(r.peer_id)]
        if len(unmeasured) > PINGS_PER_REFRESH:  # a flood of records: the rest are measured by later refreshes
            unmeasured = self._rng.sample(unmeasured, PINGS_PER_REFRESH)
        if unmeasured:
            await asyncio.gather(*(self.ping(r) for r in unmeasured))
        return self._records

    async def records(self, max_age_s: float | None = None) -> list[ServerRecord]:
        """Known online servers, not banned; re-read from the DHT if the view is older than ``max_age_s``."""
        max_age_s = self.config.refresh_period_s if max_age_s is None else max_age_s
        if time.monotonic() - self._records_time > max_age_s:
            await self.refresh()
        return self.bans.filter(self._records)

    async def ping(self, record: ServerRecord) -> float | None:
        """Round trip of an ``info`` request to ``record``'s server, folded into its latency estimate."""
        start = time.perf_counter()
        try:
            await call(self.transport, record, InfoRequest(), self.config.ping_timeout_s, swarm_key=self.config.swarm_key)
        except Exception as exc:
            logger.debug("ping of %s failed: %s", record.peer_id, exc)
            self.report_failure(record.peer_id)
            return None
        sample = time.perf_counter() - start
        previous = self.latency_s.get(record.peer_id)
        self.latency_s[record.peer_id] = (
            sample if previous is None else (1 - LATENCY_SMOOTHING) * previous + LATENCY_SMOOTHING * sample
        )
        return sample

    def check_inputs(self, hidden, mask=None, positions=None, what: str = "hidden_states") -> None:
        """The caller's inputs, checked before anything is sent: a mistake here is the caller's (``ValueError``),
        while whatever a server refuses is that server's failure."""
        if not hidden.is_floating_point():
            raise BadRequestError(f"{what} must be floating point, got {hidden.dtype}")
        check_hidden(what, hidden, self.hidden_size or hidden.shape[-1], hidden.dtype)
        batch, length = hidden.shape[:2]
        check_mask("attention_mask", mask, batch, length)
        check_positions(positions, batch, length, self.max_positions)

    def codec_for(self, record: ServerRecord) -> str:
        """The wire codec to use with ``record``'s server: the configured one if it announces it, else none."""
        return self.config.wire_codec if self.config.wire_codec in record.codecs else "none"

    def report_failure(self, peer_id: str) -> float:
        duration = self.bans.ban(peer_id)
        self.latency_s.pop(peer_id, None)
        logger.info("server %s failed; banned for %.0f s", peer_id, duration)
        return duration

    def report_full(self, peer_id: str) -> None:
        """``peer_id`` had no cache for a session: later sessions try other servers first for ``full_avoid_s`` (so
        a server that answers every open with a refusal, after however long, costs one session that wait, not all)."""
        self._full_until[peer_id] = time.monotonic() + self.config.full_avoid_s

    def recently_full(self) -> frozenset:
        """Servers that said they had no cache within ``full_avoid_s``."""
        now = time.monotonic()
        self._full_until = {peer: until for peer, until in self._full_until.items() if until > now}
        return frozenset(self._full_until)

    def report_success(self, peer_id: str) -> None:
        self.bans.succeeded(peer_id)

    # ---------------------------------------------------------------- planning

    async def _plan(self, blocks: BlockRange, planner: Callable[[list[ServerRecord]], Chain],
                    adapter: Optional[str] = None, exclude: frozenset = frozenset(), wait: bool = True,
                    like: Optional[ServerRecord] = None, max_age_s: Optional[float] = None) -> Chain:
        """Plan with ``planner`` over the servers (holding ``adapter``, if given; not in ``exclude``), waiting up to
        ``wait_for_blocks_s`` for the blocks to be served (not at all with ``wait=False``). The first try plans on
        a view at most ``max_age_s`` old (default: the refresh period); later tries re-read the DHT."""
        deadline = time.monotonic() + (self.config.wait_for_blocks_s if wait else 0.0)
        while True:
            records = [r for r in await self.records(max_age_s) if r.peer_id not in exclude]
            if like is not None:  # servers whose outputs must equal ``like``'s: same dtype and quantization
                records = [r for r in records if r.dtype == like.dtype and r.quant == like.quant]
            holders = records if adapter is None else [r for r in records if adapter in r.adapters]
            try:
                return planner(holders)
            except BlocksNotServedError:
                if adapter is not None and not unserved_blocks(records, blocks):
                    self._raise_adapter_not_served(blocks, adapter)
                if time.monotonic() >= deadline:
                    everyone = self._records
                    missing = unserved_blocks(holders, blocks)
                    banned = [r.peer_id for r in everyone if self.bans.is_banned(r.peer_id)]
                    raise BlocksNotServedError(
                        f"blocks {describe_blocks(missing)} of {self.model_prefix} are served by nobody "
                        + ("" if adapter is None else f"with adapter {adapter!r} ")
                        + f"(waited {self.config.wait_for_blocks_s:.0f} s; {len(everyone)} online server(s) known"
                        + (f", {len(banned)} of them banned after failures" if banned else "")
                        + "".join(f"; {count} left out: {why}" for why, count in self._left_out.items())
                        + f"; needed blocks {blocks})"
                    ) from None
            max_age_s = 0.0  # re-read the DHT on every further try
            await asyncio.sleep(self.config.lookup_period_s)

    def _raise_adapter_not_served(self, blocks: BlockRange, adapter: str) -> None:
        """Every block is served, but some only by servers without ``adapter``: unless a banned server holds it
        (it may come back), that is the caller's mistake, reported at once."""
        everyone = [r for r in self._records if blocks.start < r.blocks.end and r.blocks.start < blocks.end]
        missing = unserved_blocks([r for r in everyone if adapter in r.adapters], blocks)
        if not missing:
            return  # the holders are banned for now: wait for them like for any missing block
        offered = sorted({name for r in everyone for name in r.adapters})
        raise AdapterNotServedError(
            f"no server of blocks {describe_blocks(missing)} of {self.model_prefix} holds adapter {adapter!r}; "
            f"adapters offered there: {', '.join(map(repr, offered)) or 'none'}"
        )

    async def plan_inference(self, blocks: BlockRange, adapter: Optional[str] = None,
                             exclude: frozenset = frozenset(), wait: bool = True,
                             like: Optional[ServerRecord] = None, max_age_s: Optional[float] = None) -> Chain:
        """The chain with the least expected time per step (latency + compute), for inference sessions."""
        return await self._plan(
            blocks,
            lambda records: plan_inference_route(records, blocks, self.latency_s, self.config.default_latency_s,
                                                 self.speeds.block_s()),
            adapter,
            exclude,
            wait,
            like,
            max_age_s,
        )

    async def plan_batch(self, blocks: BlockRange, adapter: Optional[str] = None, exclude: frozenset = frozenset(),
                         wait: bool = True) -> Chain:
        """A chain that spreads forward/backward load over servers by throughput (none of ``exclude``)."""
        return await self._plan(blocks, lambda records: plan_batch_route(records, blocks, self._rng,
                                                                         self.speeds.block_s()), adapter, exclude, wait)

    def verify_now(self) -> bool:
        """Whether to check the request just answered (at the ``verify_fraction`` rate)."""
        return self._verify_rng.random() < self.config.verify_fraction

    def ban_liar(self, peer_id: str) -> None:
        """A server caught returning wrong outputs: banned for the longest time, and named in the log."""
        for _ in range(16):  # bans double with each failure: go straight to the longest
            duration = self.bans.ban(peer_id)
            if duration >= self.config.ban_max_s:
                break
        self.latency_s.pop(peer_id, None)
        logger.warning("server %s returned outputs that other servers contradict: banned for %.0f s", peer_id,
                       self.config.ban_max_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.run(self.transport.shutdown(), 10)
        except Exception as exc:
            logger.debug("client peer shutdown: %s", exc)
        self.loop.stop()
