"""Ranking replicas for one request: prefix affinity, then KV headroom and queue depth.

Pure Python and deterministic given its inputs (``now``, a seeded ``random.Random``),
so it is unit-tested with fake replicas; ``router.kv_router`` adapts it to Ray Serve.

Order of preference:

1. No usable stats (any candidate's stats missing, malformed or older than
   ``stale_after_s``): **power of two choices** - two random replicas, and Serve
   sends to the one with the shorter queue. Partial knowledge is not trusted: a
   replica without stats is usually a new one (empty cache, idle) or a sick one.
2. **Affinity**: the replica holding the longest run of this prompt's leading full
   blocks (reported by the replica, or placed there by this router moments ago),
   if at least ``min_match_blocks`` match and it is not overloaded: not saturated
   (draining, too many waiting, or too little free KV for this request's new blocks) and
   carrying at most ``imbalance_threshold`` more requests than the least loaded
   replica. Ties go to the lower load.
3. Otherwise (**load**, or **affinity_overloaded** when step 2 refused an affine
   replica): unsaturated replicas first, then lowest estimated queue depth, then
   most free KV, then longest match, then random.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

from replica.prefix_hash import block_hashes
from router.stats import RoutingStats


@dataclass(frozen=True)
class RouterPolicyConfig:
    """Knobs of the ranking (``request_router_kwargs`` in deployments.yaml).

    stale_after_s: stats older than this (replica clock vs router clock) count as
        missing. Keep it a few times ``request_routing_stats_period_s``.
    min_match_blocks: matched leading blocks needed before affinity counts at all.
    imbalance_threshold: how many more requests (queued + running, estimated) the
        affine replica may carry than the least loaded one before affinity yields.
    max_waiting: a replica with more requests waiting than this is saturated.
    kv_reserve_fraction: a replica is saturated if admitting this request's
        uncached blocks would leave less than this fraction of its KV blocks free.
    default_block_size: block size to hash with before any replica has reported one.
    """

    stale_after_s: float = 5.0
    min_match_blocks: int = 1
    imbalance_threshold: int = 4
    max_waiting: int = 8
    kv_reserve_fraction: float = 0.05
    default_block_size: int = 16

    def __post_init__(self) -> None:
        if not self.stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {self.stale_after_s}")
        if self.min_match_blocks < 1:
            raise ValueError(f"min_match_blocks must be >= 1, got {self.min_match_blocks}")
        if self.imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be >= 0, got {self.imbalance_threshold}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError(f"kv_reserve_fraction must be in [0, 1), got {self.kv_reserve_fraction}")
        if self.default_block_size < 1:
            raise ValueError(f"default_block_size must be >= 1, got {self.default_block_size}")


@dataclass(frozen=True)
class ReplicaView:
    """One candidate as the policy sees it.

    ``est_load`` is queued + running corrected for this router's own sends since the
    snapshot (``InflightTracker.estimated_load``); ``recent_prefixes`` are hashes this
    router placed there and the replica may not have reported yet (a live view of the
    tracker's memory: read it within the decision).
    """

    replica_id: str
    stats: RoutingStats | None
    est_load: int = 0
    recent_prefixes: Set[int] = field(default_factory=frozenset)


class Reason(str, enum.Enum):
    AFFINITY = "affinity"
    LOAD = "load"  # no replica holds enough of the prefix (or no prompt tokens)
    AFFINITY_OVERLOADED = "affinity_overloaded"  # an affine replica existed but was overloaded
    P2C_MISSING = "p2c_missing"
    P2C_STALE = "p2c_stale"


@dataclass(frozen=True)
class RoutingDecision:
    """``groups`` are ranks for Serve: it tries the first group, then the next (when a
    replica rejects at ``max_ongoing_requests``); within a group it picks the shortest
    queue. Ranked decisions use one replica per group; power of two uses one group of two.
    """

    groups: tuple[tuple[str, ...], ...]
    reason: Reason
    matched_blocks: int = 0  # leading blocks of the prompt the first choice holds

    @property
    def first(self) -> str | None:
        return self.groups[0][0] if self.groups and self.groups[0] else None


def matched_prefix_blocks(prompt_hashes: Sequence[int], *held: Set[int]) -> int:
    """How many leading blocks of the prompt are held (in any of the ``held`` sets).
    Counted from block 0, stopping at the first gap: the engine reuses only an unbroken prefix."""
    n = 0
    for h in prompt_hashes:
        if not any(h in s for s in held):
            break
        n += 1
    return n


def power_of_two(replica_ids: Sequence[str], rng: random.Random) -> tuple[tuple[str, ...], ...]:
    if not replica_ids:
        return ()
    if len(replica_ids) == 1:
        return ((replica_ids[0],),)
    return (tuple(rng.sample(list(replica_ids), 2)),)


def rank_replicas(
    replicas: Sequence[ReplicaView],
    prompt_token_ids: Sequence[int] | None,
    cfg: RouterPolicyConfig,
    *,
    now: float,
    rng: random.Random,
    hashes_by_block_size: dict[int, list[int]] | None = None,
) -> RoutingDecision:
    """Rank ``replicas`` for a request whose prompt is ``prompt_token_ids`` (None: unknown).
    ``hashes_by_block_size``: the prompt's block hashes per block size, read and filled here,
    so that a caller that needs them too does not hash the prompt again."""
    ids = [r.replica_id for r in replicas]
    if not replicas:
        return RoutingDecision((), Reason.LOAD)
    if any(r.stats is None for r in replicas):
        return RoutingDecision(power_of_two(ids, rng), Reason.P2C_MISSING)
    if any(now - r.stats.timestamp > cfg.stale_after_s for r in replicas):  # type: ignore[union-attr]
        return RoutingDecision(power_of_two(ids, rng), Reason.P2C_STALE)

    tokens = prompt_token_ids or ()
    hashes_by_bs = {} if hashes_by_block_size is None else hashes_by_block_size
    matched: dict[str, int] = {}
    needed: dict[str, int] = {}
    for r in replicas:
        s = r.stats
        assert s is not None
        if s.block_size not in hashes_by_bs:
            hashes_by_bs[s.block_size] = block_hashes(tokens, s.block_size) if tokens else []
        hashes = hashes_by_bs[s.block_size]
        m = matched_prefix_blocks(hashes, s.prefix_hashes, r.recent_prefixes) if hashes else 0
        matched[r.replica_id] = m
        needed[r.replica_id] = math.ceil(len(tokens) / s.block_size) - m

    def saturated(r: ReplicaView) -> bool:
        s = r.stats
        assert s is not None
        if s.draining or s.num_waiting > cfg.max_waiting:
            return True
        return s.num_free_blocks - needed[r.replica_id] < cfg.kv_reserve_fraction * s.num_total_blocks

    sat = {r.replica_id: saturated(r) for r in replicas}
    min_load = min(r.est_load for r in replicas)
    tiebreak = {rid: rng.random() for rid in ids}

    def load_key(r: ReplicaView) -> tuple:
        s = r.stats
        assert s is not None
        return (sat[r.replica_id], r.est_load, -s.kv_free_fraction, -matched[r.replica_id], tiebreak[r.replica_id])

    by_load = sorted(replicas, key=load_key)
    best_match = max(matched.values())
    reason = Reason.LOAD
    first: ReplicaView | None = None
    if best_match >= cfg.min_match_blocks:
        affine = [
            r
            for r in replicas
            if matched[r.replica_id] == best_match
            and not sat[r.replica_id]
            and r.est_load <= min_load + cfg.imbalance_threshold
        ]
        if affine:
            first = min(affine, key=lambda r: (r.est_load, tiebreak[r.replica_id]))
            reason = Reason.AFFINITY
        else:
            reason = Reason.AFFINITY_OVERLOADED
    if first is None:
        first = by_load[0]
    order = [first] + [r for r in by_load if r is not first]
    return RoutingDecision(tuple((r.replica_id,) for r in order), reason, matched[first.replica_id])
