"""Route planning and bans: pure functions over made-up swarms."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from corolla.core.blocks import BlockRange
from corolla.core.errors import BlocksNotServedError
from corolla.core.records import ServerRecord, ServerState
from corolla.core.routing import BanList, SpeedMeter, block_time_s, plan_batch_route, plan_inference_route


def rec(peer, start, end, throughput=100.0):
    return ServerRecord(peer, BlockRange(start, end), ServerState.ONLINE, throughput, "float32", 1, 1000)


def spans(chain):
    return [(r.peer_id, str(s)) for r, s in chain]


def test_block_time_from_throughput():
    assert block_time_s(rec("a", 0, 10, throughput=50)) == pytest.approx(1 / 500)
    assert block_time_s(rec("a", 0, 10, throughput=0)) == 1.0


def test_inference_route_prefers_low_latency_and_fast_servers():
    records = [rec("near", 0, 30), rec("far", 0, 30)]
    chain = plan_inference_route(records, BlockRange(0, 30), {"near": 0.001, "far": 0.1})
    assert spans(chain) == [("near", "0:30")]
    records = [rec("slow", 0, 30, throughput=1), rec("fast", 0, 30, throughput=100)]
    assert spans(plan_inference_route(records, BlockRange(0, 30), {})) == [("fast", "0:30")]


def test_inference_route_switches_at_any_boundary_when_it_pays():
    # "big" is slow but holds everything; "quick" holds 10:20 and is 100x faster per block
    records = [rec("big", 0, 30, throughput=1.0), rec("quick", 10, 20, throughput=30.0)]
    chain = plan_inference_route(records, BlockRange(0, 30), {"big": 0.001, "quick": 0.001})
    assert spans(chain) == [("big", "0:10"), ("quick", "10:20"), ("big", "20:30")]
    # when a hop costs more than the compute it saves, one server does it all
    chain = plan_inference_route(records, BlockRange(0, 30), {"big": 0.001, "quick": 5.0})
    assert spans(chain) == [("big", "0:30")]


def test_inference_route_uses_parts_of_overlapping_spans():
    records = [rec("a", 0, 12), rec("b", 10, 30)]
    chain = plan_inference_route(records, BlockRange(0, 30), {})
    assert [s for _, s in chain][0].start == 0 and [s for _, s in chain][-1].end == 30
    assert len(chain) == 2
    assert spans(plan_inference_route(records, BlockRange(5, 11), {})) == [("a", "5:11")]


def test_inference_route_names_missing_blocks():
    with pytest.raises(BlocksNotServedError, match="blocks 10:20 are served by nobody"):
        plan_inference_route([rec("a", 0, 10), rec("c", 20, 30)], BlockRange(0, 30), {})


def test_batch_route_spreads_load_by_throughput():
    records = [rec("a", 0, 30, throughput=300), rec("b", 0, 30, throughput=100)]
    rng = random.Random(0)
    counts = Counter(plan_batch_route(records, BlockRange(0, 30), rng)[0][0].peer_id for _ in range(4000))
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    chain = plan_batch_route([rec("a", 0, 10), rec("b", 5, 30)], BlockRange(0, 30), rng)
    assert chain[-1][1].end == 30 and chain[0][1].start == 0
    with pytest.raises(BlocksNotServedError, match="10:30"):
        plan_batch_route([rec("a", 0, 10)], BlockRange(0, 30), rng)


def test_ban_list_backs_off_and_forgives():
    now = [0.0]
    bans = BanList(base_s=1.0, max_s=5.0, clock=lambda: now[0])
    assert bans.ban("x") == 1.0 and bans.is_banned("x")
    now[0] = 1.5
    assert not bans.is_banned("x")
    assert bans.ban("x") == 2.0 and bans.ban("x") == 4.0 and bans.ban("x") == 5.0
    assert [r.peer_id for r in bans.filter([rec("x", 0, 1), rec("y", 0, 1)])] == ["y"]
    bans.succeeded("x")
    assert not bans.is_banned("x") and bans.ban("x") == 1.0


def test_measured_speed_replaces_a_boastful_claim():
    """A server announcing a million tokens/s but delivering 10 is ranked by what it delivers, once measured."""
    records = [rec("boaster", 0, 10, throughput=1e6), rec("honest", 0, 10, throughput=100.0)]
    assert spans(plan_inference_route(records, BlockRange(0, 10), {})) == [("boaster", "0:10")]
    meter = SpeedMeter(min_samples=3)
    for _ in range(2):
        meter.observe("boaster", 10, 1.0)  # 10 tokens/s through its blocks
    assert meter.block_s() == {}  # not trusted yet: two samples
    meter.observe("boaster", 10, 1.0)
    assert meter.block_s() == {"boaster": pytest.approx(0.1)}
    assert spans(plan_inference_route(records, BlockRange(0, 10), {}, measured_block_s=meter.block_s())) == \
        [("honest", "0:10")]
    rng = random.Random(0)
    picks = Counter(plan_batch_route(records, BlockRange(0, 10), rng, meter.block_s())[0][0].peer_id
                    for _ in range(200))
    assert picks["honest"] > 150  # batches go by measured throughput too (100 against 10)
    meter.observe("x", 5, float("nan"))
    meter.observe("x", 0, 1.0)
    assert "x" not in meter.block_s()
