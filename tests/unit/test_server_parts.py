"""Server pieces that need no network: cache accounting and request validation."""
from __future__ import annotations

import asyncio

import pytest
import torch

from corolla.core.blocks import BlockRange
from corolla.core.errors import BadRequestError, CacheExhaustedError
from corolla.server.cache import CacheBudget
from corolla.wire.validation import check_blocks, check_hidden, check_mask, check_positions


def test_cache_budget_holds_pages_waits_for_room_and_names_the_holders():
    async def scenario():
        budget = CacheBudget(total_tokens=256, bytes_per_token=1024, page_tokens=64, wait_s=0.2)
        first, second, third = object(), object(), object()
        assert budget.tokens_for(65, batch=2) == 256  # two pages for each of two rows
        await budget.hold(first, budget.tokens_for(100, 1))  # 128: whole pages
        await budget.hold(second, 64)
        assert budget.free_tokens == 64 and budget.held_by(first) == 128
        with pytest.raises(CacheExhaustedError, match=r"cache full: 192 of 256 tokens held by 2 other session"):
            await budget.hold(third, 128)  # waited 0.2 s, nobody freed enough
        with pytest.raises(CacheExhaustedError, match="whole cache of 256 tokens"):
            await budget.hold(third, 320)
        waiter = asyncio.ensure_future(budget.hold(third, 128))  # waits...
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await budget.hold(first, 64)  # ...until the first one shrinks (a rewind)
        await asyncio.wait_for(waiter, 1)
        assert budget.held_by(third) == 128 and budget.free_tokens == 0
        budget.release(second)
        budget.release(third)
        assert budget.free_tokens == 192

    asyncio.run(scenario())


def test_validation_messages():
    with pytest.raises(BadRequestError, match="holds blocks 0:10, not 5:15"):
        check_blocks(BlockRange(5, 15), BlockRange(0, 10))
    check_blocks(BlockRange(0, 10), BlockRange(0, 10))
    check_blocks(BlockRange(3, 7), BlockRange(0, 10))
    with pytest.raises(BadRequestError, match=r"\[batch, seq, hidden\]"):
        check_hidden("h", torch.zeros(2, 8), 8, torch.float32)
    with pytest.raises(BadRequestError, match="over this server's limit of 10"):
        check_hidden("h", torch.zeros(4, 4, 8), 8, torch.float32, max_tokens=10)
    with pytest.raises(BadRequestError, match="only 0"):
        check_mask("m", torch.full((1, 3), 2), 1, 3)
    with pytest.raises(BadRequestError, match=r"shape \[1, 3\]"):
        check_mask("m", torch.ones(1, 4, dtype=torch.long), 1, 3)
    with pytest.raises(BadRequestError, match=r"lie in \[0, 16\)"):
        check_positions(torch.tensor([[3, 16]]), 1, 2, 16)


def test_activation_store_budget_ttl_and_take():
    from corolla.server.activations import ActivationStore, Graph

    def graph(size):
        return Graph(outputs=None, wrt=[], blocks=BlockRange(0, 1), has_prompts=False, lora_keys=[], size_bytes=size)

    store = ActivationStore(budget_bytes=100, ttl_s=60)
    a, b = store.put(graph(60)), store.put(graph(30))
    assert len(store) == 2
    c = store.put(graph(50))  # over budget: the oldest goes
    assert store.take(a) is None and store.take(b) is not None and len(store) == 1
    assert store.put(graph(101)) is None  # alone larger than the budget: not kept
    assert store.take(c).size_bytes == 50 and store.take(c) is None
    store.ttl_s = -1  # everything is now too old
    d = store.put(graph(10))
    assert store.take(d) is None


def test_serve_flags_reach_the_server_config():
    from corolla.cli.main import build_parser, serve_config

    defaults = serve_config(build_parser().parse_args(["serve", "smollm2"]))
    assert defaults.fast_path and defaults.pack_weights and defaults.max_batch == 64 and defaults.batch_gather_s == 0.2
    args = build_parser().parse_args(["serve", "smollm2", "--no-weight-packing", "--no-fast-path", "--max-batch", "4",
                                      "--batch-gather", "0"])
    config = serve_config(args)
    assert not config.pack_weights and not config.fast_path and config.max_batch == 4 and config.batch_gather_s == 0
    with pytest.raises(ValueError, match="--max-batch"):
        serve_config(build_parser().parse_args(["serve", "smollm2", "--max-batch", "0"]))
    assert (defaults.announce_period_s, defaults.record_ttl_s) == (10.0, 30.0)
    config = serve_config(build_parser().parse_args(["serve", "smollm2", "--announce-period", "2", "--record-ttl", "6"]))
    assert (config.announce_period_s, config.record_ttl_s) == (2.0, 6.0)
    assert defaults.close_wait_s == 10.0
    assert serve_config(build_parser().parse_args(["serve", "smollm2", "--close-wait", "0"])).close_wait_s == 0.0
    for wait in ("-1", "inf", "nan"):
        with pytest.raises(ValueError, match="--close-wait must be finite and at least 0"):
            serve_config(build_parser().parse_args(["serve", "smollm2", "--close-wait", wait]))
    # a record must be refreshed before it expires, and expire once its server is gone (DHT nodes refuse later ones)
    assert serve_config(build_parser().parse_args(["serve", "smollm2", "--record-ttl", "3600"])).record_ttl_s == 3600
    for throughput in ("nan", "-5", "0", "1e9"):  # records readers would drop: a server nobody finds
        with pytest.raises(ValueError, match="--throughput must be above 0"):
            serve_config(build_parser().parse_args(["serve", "smollm2", "--throughput", throughput]))
    assert serve_config(build_parser().parse_args(["serve", "smollm2", "--throughput", "50"])).throughput == 50
    with pytest.raises(ValueError, match="not both"):
        serve_config(build_parser().parse_args(["serve", "smollm2", "--blocks", "0:2", "--num-blocks", "2"]))
    for period, ttl in (("0", "6"), ("6", "6"), ("10", "5"), ("nan", "6"), ("2", "inf"), ("10", "3601")):
        with pytest.raises(ValueError, match="--announce-period must be positive and below --record-ttl"):
            serve_config(build_parser().parse_args(["serve", "smollm2", "--announce-period", period,
                                                    "--record-ttl", ttl]))


def test_an_announcer_refuses_record_lifetimes_the_dht_nodes_would_refuse():
    from corolla.server.announcer import Announcer

    for period, ttl in ((10.0, 3601.0), (10.0, 10.0), (0.0, 30.0)):
        with pytest.raises(ValueError, match="DHT nodes take up to 3600 s"):
            Announcer(None, "model", lambda: None, period, ttl, identity=None)
    assert Announcer(None, "model", lambda: None, 10.0, 3600.0, identity=None).ttl_s == 3600.0


def test_corolla_serve_without_flags_gives_the_default_server_config():
    import dataclasses

    from corolla.cli.main import build_parser, serve_config
    from corolla.server.config import ServerConfig

    parsed, default = serve_config(build_parser().parse_args(["serve"])), ServerConfig()
    differing = {field.name: (getattr(parsed, field.name), getattr(default, field.name))
                 for field in dataclasses.fields(ServerConfig)
                 if getattr(parsed, field.name) != getattr(default, field.name)}
    assert differing == {}  # the flags take their defaults from ServerConfig (cli/main.py's _SERVER)


def test_the_list_of_models_is_spread_over_its_keys_and_read_whole():
    """Every server files its record under one key of the list of models (by its peer id, the same in every
    process), so that the list holds ~8x what one DHT node keeps under a key; the swarm page reads all of them."""
    from corolla.core.records import ServerRecord, ServerState
    from corolla.net.records import fetch_models
    from corolla.server.announcer import Announcer
    from corolla.testing.memory import MemoryNetwork
    from corolla.wire.identity import Identity
    from corolla.wire.messages import PROTOCOL_VERSION
    from corolla.wire.records import MODELS_KEYS, models_key

    identities = [Identity.generate() for _ in range(12)]
    assert len({models_key(identity.peer_id) for identity in identities}) > 1  # 12 peers land on several keys
    assert all(models_key(identity.peer_id) == models_key(identity.peer_id) in MODELS_KEYS for identity in identities)

    async def scenario():
        network = MemoryNetwork()
        transport = await network.create_transport("page")
        for index, identity in enumerate(identities):
            model = f"model-{index % 3}"
            record = ServerRecord(identity.peer_id, BlockRange(0, 10), ServerState.ONLINE, 50.0, "float32",
                                  PROTOCOL_VERSION, 4096)
            announcer = Announcer(transport, model, lambda record=record: record, 10.0, 60.0, identity)
            assert await announcer.announce_now()
        filed = {key: network.lookup(key) for key in MODELS_KEYS}
        assert sum(len(entries) for entries in filed.values()) == 12
        assert sum(bool(entries) for entries in filed.values()) > 1
        return await fetch_models(transport)

    models = asyncio.run(scenario())
    assert sorted(models) == ["model-0", "model-1", "model-2"]
    assert sorted(r.peer_id for found in models.values() for r in found) == sorted(i.peer_id for i in identities)
    assert all(len(found) == 4 for found in models.values())
