"""Ranking with fake replicas: affinity, headroom, staleness, missing stats."""

from __future__ import annotations

import random

import pytest

from replica.prefix_hash import block_hashes
from router.policy import (
    Reason,
    ReplicaView,
    RouterPolicyConfig,
    matched_prefix_blocks,
    power_of_two,
    rank_replicas,
)
from router.stats import RoutingStats

BS = 4
NOW = 1_000.0
CFG = RouterPolicyConfig(stale_after_s=5.0, imbalance_threshold=2, max_waiting=4, kv_reserve_fraction=0.1)
PROMPT = list(range(100, 140))  # 10 full blocks of 4
PROMPT_HASHES = block_hashes(PROMPT, BS)


def stats(
    *,
    held: int = 0,
    free: int = 100,
    total: int = 100,
    waiting: int = 0,
    running: int = 0,
    ts: float = NOW - 0.5,
    extra: tuple[int, ...] = (),
) -> RoutingStats:
    return RoutingStats(
        timestamp=ts,
        block_size=BS,
        num_free_blocks=free,
        num_total_blocks=total,
        num_waiting=waiting,
        num_running=running,
        prefix_hashes=frozenset(PROMPT_HASHES[:held]) | frozenset(extra),
    )


def view(
    rid: str, s: RoutingStats | None, *, load: int | None = None, recent: frozenset[int] = frozenset()
) -> ReplicaView:
    est = load if load is not None else (s.load if s else 0)
    return ReplicaView(rid, s, est_load=est, recent_prefixes=recent)


def rank(views, prompt=PROMPT, cfg=CFG, seed=0):
    return rank_replicas(views, prompt, cfg, now=NOW, rng=random.Random(seed))


def test_affinity_wins_when_load_is_balanced():
    views = [
        view("a", stats(held=0, running=2)),
        view("b", stats(held=8, running=2)),
        view("c", stats(held=3, running=2)),
    ]
    for seed in range(20):  # no random tie-break may override affinity
        d = rank(views, seed=seed)
        assert d.reason is Reason.AFFINITY
        assert d.first == "b"
        assert d.matched_blocks == 8
    assert next(g[0] for g in d.groups) == "b" and len(d.groups) == 3


def test_affinity_tolerates_load_within_threshold():
    # b holds the prefix and carries 2 more requests: within imbalance_threshold=2.
    d = rank([view("a", stats(running=1)), view("b", stats(held=10, running=3))])
    assert (d.reason, d.first) == (Reason.AFFINITY, "b")


def test_affinity_yields_beyond_imbalance_threshold():
    d = rank([view("a", stats(running=1)), view("b", stats(held=10, running=4))])
    assert (d.reason, d.first) == (Reason.AFFINITY_OVERLOADED, "a")


def test_headroom_wins_when_affine_replica_kv_is_saturated():
    # b holds 4 blocks; the request needs 6 new blocks; b has 10 free of 100 -> 4 left < 10% reserve.
    views = [
        view("a", stats(held=0, free=80, running=1)),
        view("b", stats(held=4, free=10, running=1)),
        view("c", stats(held=0, free=30, running=1)),
    ]
    d = rank(views)
    assert d.reason is Reason.AFFINITY_OVERLOADED
    assert [g[0] for g in d.groups] == ["a", "c", "b"]  # most free KV first, saturated last


def test_headroom_wins_when_affine_replica_queue_is_saturated():
    views = [view("a", stats(running=2)), view("b", stats(held=10, waiting=5, running=0))]
    d = rank(views)
    assert (d.reason, d.first) == (Reason.AFFINITY_OVERLOADED, "a")


def test_draining_replica_is_never_affine_and_ranked_last():
    from dataclasses import replace

    views = [view("a", stats(running=3)), view("b", replace(stats(held=10), draining=True))]
    d = rank(views)
    assert (d.reason, [g[0] for g in d.groups]) == (Reason.AFFINITY_OVERLOADED, ["a", "b"])


def test_queue_depth_orders_replicas_without_affinity():
    views = [view("a", stats(running=5)), view("b", stats(running=1)), view("c", stats(running=3))]
    d = rank(views, prompt=[7, 8, 9])  # shorter than a block: nothing to match
    assert d.reason is Reason.LOAD
    assert [g[0] for g in d.groups] == ["b", "c", "a"]


def test_inflight_estimate_spreads_a_burst():
    # Same snapshot for both, but this router already sent 3 more to b since: a goes first.
    d = rank([view("a", stats(running=1), load=1), view("b", stats(running=1), load=4)], prompt=None)
    assert d.first == "a"


def test_recent_prefixes_count_as_affinity_before_stats_refresh():
    recent = frozenset(PROMPT_HASHES[:6])
    d = rank([view("a", stats(running=1)), view("b", stats(running=1), recent=recent)])
    assert (d.reason, d.first, d.matched_blocks) == (Reason.AFFINITY, "b", 6)


def test_stale_stats_fall_back_to_power_of_two():
    views = [
        view("a", stats(held=10)),
        view("b", stats(ts=NOW - 6.0)),  # older than stale_after_s
        view("c", stats()),
    ]
    seen = set()
    for seed in range(50):
        d = rank(views, seed=seed)
        assert d.reason is Reason.P2C_STALE
        assert len(d.groups) == 1 and len(d.groups[0]) == 2  # one group: Serve picks the shorter queue
        assert len(set(d.groups[0])) == 2
        seen.update(d.groups[0])
    assert seen == {"a", "b", "c"}  # the affine replica gets no special treatment


def test_missing_stats_fall_back_to_power_of_two():
    d = rank([view("a", stats(held=10)), view("b", None)])
    assert d.reason is Reason.P2C_MISSING
    assert set(d.groups[0]) == {"a", "b"}


def test_single_replica_and_empty_candidate_list():
    assert rank([view("a", None)]).groups == (("a",),)
    assert rank([]).groups == ()


def test_matched_prefix_stops_at_first_gap():
    held = frozenset(PROMPT_HASHES[:3]) | frozenset(PROMPT_HASHES[5:8])
    assert matched_prefix_blocks(PROMPT_HASHES, held) == 3
    assert matched_prefix_blocks(PROMPT_HASHES, frozenset()) == 0
    # Reported and router-remembered blocks combine into one prefix.
    assert matched_prefix_blocks(PROMPT_HASHES, frozenset(PROMPT_HASHES[:2]), frozenset(PROMPT_HASHES[2:4])) == 4


def test_other_prompts_blocks_do_not_match():
    other = block_hashes([t + 1 for t in PROMPT], BS)
    d = rank([view("a", stats(running=0)), view("b", stats(running=0, extra=tuple(other)))])
    assert d.reason is Reason.LOAD and d.matched_blocks == 0


def test_power_of_two_picks_two_distinct():
    rng = random.Random(1)
    for _ in range(20):
        (group,) = power_of_two(["x", "y", "z"], rng)
        assert len(set(group)) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stale_after_s": 0},
        {"min_match_blocks": 0},
        {"imbalance_threshold": -1},
        {"max_waiting": -1},
        {"kv_reserve_fraction": 1.0},
        {"default_block_size": 0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        RouterPolicyConfig(**kwargs)
