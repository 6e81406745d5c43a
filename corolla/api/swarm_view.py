"""What the swarm page shows: every server of a model (from the DHT, as a client sees it), the blocks nobody serves,
servers per block, round trips measured from this host, and the models the DHT knows. As JSON (``/api/swarm``) and
as a table for the terminal (``corolla health``)."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

from corolla.core.records import ServerRecord, ServerState
from corolla.core.spans import describe_blocks
from corolla.net.records import fetch_models, fetch_records

CACHE_S = 1.0  # many pages open at once read the DHT once a second at most


class SwarmView:
    def __init__(self, swarm, model_name: str):
        self.swarm = swarm  # a corolla.client.swarm.RemoteSwarm
        self.model_name = model_name
        self._lock = threading.Lock()
        self._cached: Optional[tuple[float, dict]] = None

    def snapshot(self) -> dict:
        """The swarm now (read at most once per ``CACHE_S``; blocking: call it from a worker thread)."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            data = self.swarm.run(self._read(), 30)
            self._cached = (time.monotonic(), data)
            return data

    async def _read(self) -> dict:
        swarm = self.swarm
        key = swarm.config.swarm_key
        records = await fetch_records(swarm.transport, swarm.model_prefix, range(swarm.num_blocks), swarm.num_blocks, key)
        online = [r for r in records if r.state is ServerState.ONLINE]
        unmeasured = [r for r in online if r.peer_id not in swarm.latency_s]
        if unmeasured:
            await asyncio.gather(*(swarm.ping(r) for r in unmeasured))
        models = await fetch_models(swarm.transport, key)
        counts = [0] * swarm.num_blocks
        for record in online:
            if swarm.bans.is_banned(record.peer_id):  # announced online, but did not answer (dead until its record
                continue                               # expires, say): it serves nobody
            for block in record.blocks:
                counts[block] += 1
        missing = [b for b, count in enumerate(counts) if count == 0]
        return {
            "model": self.model_name,
            "dht_prefix": swarm.model_prefix,
            "num_blocks": swarm.num_blocks,
            "servers": [self._server(r) for r in sorted(records, key=lambda r: (r.blocks.start, r.peer_id))],
            "servers_per_block": counts,
            "missing_blocks": missing,
            "missing": describe_blocks(missing),
            "models": sorted(({"name": name, "servers": sum(r.state is ServerState.ONLINE for r in found)}
                              for name, found in models.items()), key=lambda m: m["name"]),
            "time": time.time(),
        }

    def _server(self, record: ServerRecord) -> dict:
        latency = self.swarm.latency_s.get(record.peer_id)
        return {
            "peer_id": record.peer_id,
            "blocks": [record.blocks.start, record.blocks.end],
            "state": record.state.value,  # as announced ("banned": it did not answer lately)
            "throughput": round(record.throughput, 2),
            "cache_tokens_free": record.cache_tokens_free,
            "quant": record.quant,
            "dtype": record.dtype,
            "version": record.protocol_version,
            "rtt_ms": None if latency is None else round(latency * 1000, 2),
            "adapters": list(record.adapters),
            "banned": self.swarm.bans.is_banned(record.peer_id),
        }


def format_table(data: dict) -> str:
    """The snapshot as text for a terminal."""
    width = 30
    online = sum(server["state"] == ServerState.ONLINE.value and not server["banned"] for server in data["servers"])
    lines = [f"model {data['model']} (DHT name {data['dht_prefix']}), {data['num_blocks']} blocks, "
             f"{len(data['servers'])} server(s), {online} online and answering"]
    header = f"{'peer id':<16} {'blocks':<9} {'coverage':<{width}} {'state':<9} {'tok/s':>8} {'cache':>7} " \
             f"{'quant':<5} {'rtt ms':>7}"
    lines += [header, "-" * len(header)]
    total = max(1, data["num_blocks"])
    for server in data["servers"]:
        start, end = server["blocks"]
        bar = "".join("#" if start * width // total <= i < max(start * width // total + 1, end * width // total)
                      else "." for i in range(width))
        rtt = "-" if server["rtt_ms"] is None else f"{server['rtt_ms']:.1f}"
        state = "no answer" if server["banned"] and server["state"] == ServerState.ONLINE.value else server["state"]
        lines.append(f"{server['peer_id'][-16:]:<16} {f'{start}:{end}':<9} {bar} {state:<9} "
                     f"{server['throughput']:>8.1f} {server['cache_tokens_free']:>7} {server['quant']:<5} {rtt:>7}")
    lines.append("servers per block: " + " ".join(str(c) for c in data["servers_per_block"]))
    lines.append(f"blocks served by nobody: {data['missing'] or 'none'}")
    if data["models"]:
        lines.append("models in the DHT: " + ", ".join(f"{m['name']} ({m['servers']})" for m in data["models"]))
    return "\n".join(lines)
