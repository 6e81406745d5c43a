"""``corolla dht``: a bootstrap DHT node that others join."""
from __future__ import annotations

import asyncio
import signal
from typing import Optional

from corolla.net.addresses import write_address_file
from corolla.net.peer import Peer, PeerConfig


def run_dht(host: str, port: int, address_file: Optional[str], initial_peers: tuple[str, ...] = (),
            swarm_key: Optional[bytes] = None) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        peer = await Peer.create(PeerConfig(initial_peers=initial_peers, host=host, port=port, swarm_key=swarm_key))
        maddrs = await peer.visible_maddrs()
        print("corolla DHT node running; pass these as --initial-peers:", flush=True)
        for addr in maddrs:
            print(f"  {addr}", flush=True)
        if address_file:
            write_address_file(address_file, maddrs)
        await stop.wait()
        await peer.shutdown()
        return 0

    return asyncio.run(main())
