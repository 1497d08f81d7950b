from __future__ import annotations

import pytest

from router.stats import RoutingStats, build_routing_stats


def test_round_trip_and_bound():
    d = build_routing_stats(
        block_size=16,
        num_free_blocks=30,
        num_total_blocks=40,
        num_waiting=2,
        num_running=3,
        prefix_hashes=iter(range(10)),
        max_prefix_hashes=4,
        timestamp=123.5,
        draining=True,
    )
    assert d["prefix_hashes"] == [0, 1, 2, 3]  # most recently used first, truncated
    s = RoutingStats.from_wire(d)
    assert s is not None
    assert (s.timestamp, s.block_size, s.load, s.kv_free_fraction) == (123.5, 16, 5, 0.75)
    assert s.prefix_hashes == {0, 1, 2, 3} and s.draining
    assert RoutingStats.from_wire(s.to_wire()) == s


def test_large_unsigned_hashes_survive():
    h = 2**64 - 1
    s = RoutingStats.from_wire(
        build_routing_stats(
            block_size=1, num_free_blocks=0, num_total_blocks=1, num_waiting=0, num_running=0, prefix_hashes=[h]
        )
    )
    assert s is not None and h in s.prefix_hashes


GOOD = {
    "v": 1,
    "ts": 1.0,
    "block_size": 1,
    "num_free_blocks": 1,
    "num_total_blocks": 1,
    "num_waiting": 0,
    "num_running": 0,
}


def test_minimal_dict_parses():
    assert RoutingStats.from_wire(GOOD) is not None


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {},
        {"v": 99},
        {"v": 1, "ts": 1.0},  # fields missing
        {**GOOD, "ts": "x"},
        {**GOOD, "block_size": 0},
        {**GOOD, "num_total_blocks": 0},
        {**GOOD, "num_waiting": -1},
        {**GOOD, "prefix_hashes": ["not a hash"]},
    ],
)
def test_malformed_stats_read_as_missing(raw):
    assert RoutingStats.from_wire(raw) is None


def test_negative_bound_rejected():
    with pytest.raises(ValueError):
        build_routing_stats(
            block_size=1,
            num_free_blocks=0,
            num_total_blocks=1,
            num_waiting=0,
            num_running=0,
            prefix_hashes=[],
            max_prefix_hashes=-1,
        )
