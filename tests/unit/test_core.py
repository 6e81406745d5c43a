"""Pure logic: block ranges, records, chain planning, span choice, splitting."""
from __future__ import annotations

import pytest

from corolla.testing.local_swarm import split_blocks
from corolla.core.blocks import BlockRange
from corolla.core.records import ServerRecord, ServerState
from corolla.wire.records import decode_record, encode_record
from corolla.core.spans import choose_move, choose_span, describe_blocks, unserved_blocks


def rec(peer, start, end, throughput=10.0, state=ServerState.ONLINE):
    return ServerRecord(peer, BlockRange(start, end), state, throughput, "float32", 1, 1000)


def test_block_range_parse_and_contains():
    r = BlockRange.parse("3:7")
    assert (r.start, r.end, len(r)) == (3, 7, 4)
    assert 3 in r and 6 in r and 7 not in r
    assert list(r) == [3, 4, 5, 6]
    assert str(r) == "3:7"
    for bad in ("7:3", "3", "a:b", "-1:2", "2:2"):
        with pytest.raises(ValueError, match="START:END"):
            BlockRange.parse(bad)


def test_record_roundtrip_and_malformed():
    record = rec("peer", 0, 10)
    assert decode_record(encode_record(record)) == record
    assert decode_record({"blocks": [0, 1]}) is None
    assert decode_record("garbage") is None
    assert decode_record({**encode_record(record), "state": "bogus"}) is None
    assert decode_record({**encode_record(record), "adapters": "not-a-list"}) is None


@pytest.mark.parametrize("field, value", [
    ("throughput", float("inf")), ("throughput", float("nan")), ("throughput", 1e12), ("throughput", -1.0),
    ("blocks", [0, 10**15]), ("blocks", [5, 5]), ("blocks", [True, 3]), ("dtype", "float8"), ("dtype", 7),
    ("cache_tokens_free", -5), ("cache_tokens_free", 2**50), ("peer_id", ""), ("peer_id", "p" * 500),
    ("maddrs", ["x" * 1000]), ("maddrs", ["a"] * 100), ("protocol_version", "5"),
])
def test_implausible_records_are_dropped(field, value):
    """Records come from strangers: a field out of its sane range drops the record (and only that record)."""
    value_dict = {**encode_record(rec("peer", 0, 10)), field: value}
    assert decode_record(value_dict, num_blocks=30) is None
    assert decode_record(encode_record(rec("peer", 0, 10)), num_blocks=30) is not None
    assert decode_record(encode_record(rec("peer", 20, 31)), num_blocks=30) is None  # past the model's end


def test_unserved_and_describe():
    assert unserved_blocks([rec("a", 0, 3), rec("b", 5, 6)], BlockRange(0, 8)) == [3, 4, 6, 7]
    assert describe_blocks([0, 1, 2, 7, 9, 10]) == "0:3, 7:8, 9:11"


def test_choose_span_first_gap_then_weakest():
    assert choose_span(30, [], 10) == BlockRange(0, 10)
    assert choose_span(30, [rec("a", 0, 10)], 10) == BlockRange(10, 20)
    assert choose_span(30, [rec("a", 0, 10), rec("b", 10, 20)], 15) == BlockRange(15, 30)  # covers the gap fully
    full = [rec("a", 0, 30), rec("b", 0, 10), rec("c", 20, 30)]
    assert choose_span(30, full, 10) == BlockRange(10, 20)
    assert choose_span(30, [rec("a", 0, 30, state=ServerState.OFFLINE)], 10) == BlockRange(0, 10)
    assert choose_span(5, [], 10) == BlockRange(0, 5)
    # by throughput, not by count: one fast server outweighs two slow ones
    weighted = [rec("fast", 0, 10, throughput=100), rec("s1", 10, 20, throughput=5), rec("s2", 10, 20, throughput=5),
                rec("m", 20, 30, throughput=50)]
    assert choose_span(30, weighted, 10) == BlockRange(10, 20)
    # a server still joining (no throughput yet) counts as a typical one, so simultaneous joiners spread out
    assert choose_span(30, [rec("a", 0, 10), rec("j", 10, 20, throughput=0, state=ServerState.JOINING)], 10) == BlockRange(20, 30)


def test_choose_move_fills_holes_and_ignores_small_gains():
    # blocks 20:30 are served by nobody: the over-served span's server moves there
    records = [rec("a", 0, 10), rec("b", 10, 20), rec("c", 0, 10)]
    assert choose_move(30, records, "c") == BlockRange(20, 30)
    assert choose_move(30, records, "b") is None  # moving b would open a hole of its own
    # balanced swarm: nobody moves
    balanced = [rec("a", 0, 10), rec("b", 10, 20), rec("c", 20, 30)]
    assert all(choose_move(30, balanced, p) is None for p in "abc")
    # a small improvement is not worth a move; a large one is
    skew = [rec("a", 0, 15, throughput=10), rec("b", 15, 30, throughput=9), rec("c", 0, 15, throughput=10)]
    assert choose_move(30, skew, "c") is None
    skew = [rec("a", 0, 15, throughput=10), rec("b", 15, 30, throughput=2), rec("c", 0, 15, throughput=10)]
    assert choose_move(30, skew, "c") == BlockRange(15, 30)
    assert choose_move(30, skew, "unknown") is None


def test_split_blocks():
    assert [str(s) for s in split_blocks(30, 3)] == ["0:10", "10:20", "20:30"]
    assert [len(s) for s in split_blocks(7, 3)] == [2, 3, 2]
    with pytest.raises(ValueError):
        split_blocks(2, 3)
