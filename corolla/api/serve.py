"""``corolla api``: the OpenAI-compatible API of a swarm's model, served by uvicorn."""
from __future__ import annotations

import logging
from typing import Optional

logger = logging.getLogger(__name__)


def run_api(model: Optional[str], initial_peers: tuple[str, ...], host: str, port: int, *,
            dht_prefix: Optional[str] = None, max_sessions: int = 8, max_waiting: int = 64,
            wait_for_blocks_s: float = 10.0, swarm_key: Optional[bytes] = None, num_threads: Optional[int] = None,
            address_file: Optional[str] = None) -> int:
    import torch
    import uvicorn

    from corolla.api.app import create_app
    from corolla.api.engine import Engine
    from corolla.cli.chatting import load_tokenizer
    from corolla.client.config import ClientConfig
    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import model_dht_prefix, resolve_model

    if num_threads:
        torch.set_num_threads(num_threads)
    tokenizer = load_tokenizer(model)
    config = ClientConfig(wait_for_blocks_s=wait_for_blocks_s, swarm_key=swarm_key)
    distributed = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers,
                                                                  dht_prefix=dht_prefix, client_config=config)
    name = dht_prefix or model_dht_prefix(model if model is not None else resolve_model(None))
    names = tuple(dict.fromkeys([name] + ([model] if model else [])))
    engine = Engine(distributed, tokenizer, name, max_sessions=max_sessions, max_waiting=max_waiting)
    app = create_app(engine, names)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    if address_file:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            bound = [s.getsockname() for srv in server.servers for s in srv.sockets]
            with open(address_file, "w") as file:
                file.write("".join(f"http://{h}:{p}\n" for h, p, *_ in bound))

        server.startup = startup
    print(f"corolla API for {name} on http://{host}:{port}/v1", flush=True)
    try:
        server.run()
    finally:
        distributed.close()
    return 0
