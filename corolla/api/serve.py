"""``corolla api``: the OpenAI-compatible API of a swarm's model, served by uvicorn."""
from __future__ import annotations

import logging
from typing import Optional

logger = logging.getLogger(__name__)


def run_api(model: Optional[str], initial_peers: tuple[str, ...], host: str, port: int, *,
            dht_prefix: Optional[str] = None, max_sessions: int = 8, max_waiting: int = 64,
            wait_for_blocks_s: float = 10.0, swarm_key: Optional[bytes] = None, num_threads: Optional[int] = None,
            address_file: Optional[str] = None, max_context: Optional[int] = None) -> int:
    import torch

    from corolla.api.app import create_app
    from corolla.api.engine import Engine
    from corolla.cli.chatting import load_tokenizer
    from corolla.client.config import ClientConfig
    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import is_embedded_name, model_dht_prefix, resolve_model
    from corolla.models.embedded import EMBEDDED_MODEL_NAME

    if num_threads:
        torch.set_num_threads(num_threads)
    tokenizer = load_tokenizer(model)
    config = ClientConfig(wait_for_blocks_s=wait_for_blocks_s, swarm_key=swarm_key)
    distributed = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers,
                                                                  dht_prefix=dht_prefix, client_config=config)
    name = dht_prefix or model_dht_prefix(model if model is not None else resolve_model(None), distributed.config)
    # the names a request's "model" may use: the DHT name, the one given, and the embedded model's short name
    names = tuple(dict.fromkeys([name] + ([model] if model else [])
                                + ([EMBEDDED_MODEL_NAME] if is_embedded_name(model) else [])))
    engine = Engine(distributed, tokenizer, name, max_sessions=max_sessions, max_waiting=max_waiting,
                    max_context=max_context)
    from corolla.api.page import page_routes
    from corolla.api.swarm_view import SwarmView

    app = create_app(engine, names, page_routes(SwarmView(distributed.swarm, name)))
    try:
        # on SIGINT/SIGTERM, requests still generating end at their next token and those waiting give up, so that
        # the server's graceful shutdown (which waits for every open request) ends at once
        _serve(app, host, port, address_file, lambda url: f"corolla API for {name} on {url}/v1 (swarm page at /)",
               stopping=engine.close)
    finally:
        engine.close()
        distributed.close()
    return 0


def _serve(app, host: str, port: int, address_file: Optional[str], listening, stopping=None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; once it listens, print ``listening(url)`` and write the URL to
    ``address_file`` (a port already taken is uvicorn's error, and nothing is printed before it); ``stopping()`` is
    called as the shutdown begins."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    original, original_shutdown = server.startup, server.shutdown

    async def shutdown(sockets=None):
        if stopping is not None:
            stopping()
        await original_shutdown(sockets)

    async def startup(sockets=None):
        await original(sockets)
        bound = [s.getsockname() for srv in (server.servers or ()) for s in srv.sockets]
        urls = [f"http://{h if ':' not in h else f'[{h}]'}:{p}" for h, p, *_ in bound]
        print(listening(urls[0]), flush=True)
        if address_file:
            with open(address_file, "w") as file:
                file.write("".join(f"{url}\n" for url in urls))

    server.startup, server.shutdown = startup, shutdown
    server.run()


def run_health(model: Optional[str], initial_peers: tuple[str, ...], *, host: str = "127.0.0.1",
               port: Optional[int] = None, dht_prefix: Optional[str] = None, swarm_key: Optional[bytes] = None,
               address_file: Optional[str] = None) -> int:
    """``corolla health``: the swarm's table on the terminal, or (with ``port``) the swarm page alone."""
    from starlette.applications import Starlette

    from corolla.api.page import page_routes
    from corolla.api.swarm_view import SwarmView, format_table
    from corolla.client.config import ClientConfig
    from corolla.client.swarm import RemoteSwarm, hivemind_client
    from corolla.models.checkpoint import load_config, model_dht_prefix, resolve_model

    path = resolve_model(model)
    config = load_config(path)
    name = dht_prefix or model_dht_prefix(model if model is not None else path, config)
    client_config = ClientConfig(initial_peers=tuple(initial_peers), swarm_key=swarm_key)
    swarm = RemoteSwarm(client_config, name, config.num_hidden_layers, hivemind_client(client_config))
    view = SwarmView(swarm, name)
    try:
        if port is None:
            print(format_table(view.snapshot()), flush=True)
            return 0
        _serve(Starlette(routes=page_routes(view)), host, port, address_file,
               lambda url: f"corolla swarm page for {name} on {url}/")
        return 0
    finally:
        swarm.close()
