"""KVCacheAwareRouter: the Ray Serve glue around ``router.policy``.

Configured on the replica deployment (deployments.yaml)::

    request_router_config:
      request_router_class: router.kv_router:KVCacheAwareRouter
      request_router_kwargs: {stale_after_s: 5.0, imbalance_threshold: 4, ...}
      request_routing_stats_period_s: 1.0

Every handle that calls the deployment (the ingress) builds one instance. Serve
calls ``choose_replicas`` for each pending request; each replica's
``record_routing_stats()`` dict (``router.stats``) arrives as
``RunningReplica.routing_stats``. The lifecycle hooks feed the in-flight tracker.
All hooks run on the router's event loop, so no locking is needed.

``request_router_kwargs``: every field of ``RouterPolicyConfig``, plus
``prompt_field`` (where the prompt's token ids are, see ``router.prompt_tokens``)
and ``seed`` (random tie-breaks and power-of-two sampling; tests).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, OrderedDict
from dataclasses import fields
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from replica.prefix_hash import block_hashes
from router.inflight import InflightTracker
from router.policy import ReplicaView, RouterPolicyConfig, RoutingDecision, rank_replicas
from router.prompt_tokens import DEFAULT_FIELD, extract_prompt_token_ids
from router.stats import RoutingStats

logger = logging.getLogger("ray.serve")

_MAX_TRACKED_REQUESTS = 10_000  # prompt hashes kept per request id until it completes


def parse_router_kwargs(kwargs: dict[str, Any]) -> tuple[RouterPolicyConfig, str, int | None]:
    """Split ``request_router_kwargs`` into the policy config, the prompt field and a seed;
    unknown keys are an error (a typo would otherwise silently keep a default)."""
    known = {f.name for f in fields(RouterPolicyConfig)}
    extra = set(kwargs) - known - {"prompt_field", "seed"}
    if extra:
        raise ValueError(
            f"unknown request_router_kwargs for KVCacheAwareRouter: {sorted(extra)}; "
            f"allowed: {sorted(known | {'prompt_field', 'seed'})}"
        )
    cfg = RouterPolicyConfig(**{k: v for k, v in kwargs.items() if k in known})
    return cfg, str(kwargs.get("prompt_field", DEFAULT_FIELD)), kwargs.get("seed")


class KVCacheAwareRouter(RequestRouter):
    """Prefix affinity first, then KV headroom and queue depth; power of two without stats."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()  # Serve calls it again with request_router_kwargs

    def initialize_state(self, **kwargs: Any) -> None:
        self._cfg, self._prompt_field, seed = parse_router_kwargs(kwargs)
        self._rng = random.Random(seed)
        # Finished-request records only matter while a snapshot could still be fresh.
        self._tracker = InflightTracker(horizon_s=max(30.0, 2 * self._cfg.stale_after_s))
        self._prompt_hashes: OrderedDict[str, list[int]] = OrderedDict()
        self._parsed: dict[ReplicaID, tuple[float | None, RoutingStats | None]] = {}
        self.decision_counts: Counter[str] = Counter()  # by Reason value, for debugging

    # -- routing ---------------------------------------------------------------

    def _stats(self, replica: RunningReplica) -> RoutingStats | None:
        raw = replica.routing_stats
        ts = raw.get("ts") if isinstance(raw, dict) else None
        cached = self._parsed.get(replica.replica_id)
        if cached is not None and cached[0] == ts:
            return cached[1]
        stats = RoutingStats.from_wire(raw)
        self._parsed[replica.replica_id] = (ts, stats)
        return stats

    def _view(self, replica: RunningReplica, now: float) -> ReplicaView:
        rid = replica.replica_id.unique_id
        stats = self._stats(replica)
        if stats is None:
            return ReplicaView(rid, None)
        return ReplicaView(
            rid,
            stats,
            est_load=self._tracker.estimated_load(rid, stats.load, stats.timestamp),
            recent_prefixes=self._tracker.recent_prefixes(rid, now),
        )

    def decide(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> RoutingDecision:
        now = time.time()
        views = [self._view(r, now) for r in candidate_replicas]
        tokens = None
        if pending_request is not None:
            tokens = extract_prompt_token_ids(pending_request.args, pending_request.kwargs, self._prompt_field)
        hashes: dict[int, list[int]] = {}
        decision = rank_replicas(views, tokens, self._cfg, now=now, rng=self._rng, hashes_by_block_size=hashes)
        if tokens and pending_request is not None:
            self._remember_prompt(pending_request.metadata.internal_request_id, tokens, views, hashes)
        self.decision_counts[decision.reason.value] += 1
        return decision

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = _target_replica_id(pending_request)
        if target is not None:  # a call for one replica (deployments.mux: its stream, an abort)
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        decision = self.decide(candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "kv router: %s -> %s (%d blocks matched)",
                decision.reason.value,
                decision.first,
                decision.matched_blocks,
            )
        return [[by_id[rid] for rid in group] for group in decision.groups]

    def _remember_prompt(
        self, request_id: str, tokens: list[int], views: list[ReplicaView], hashed: dict[int, list[int]]
    ) -> None:
        if request_id in self._prompt_hashes:  # routing retries call choose_replicas again
            return
        block_size = next((v.stats.block_size for v in views if v.stats is not None), self._cfg.default_block_size)
        hashes = hashed.get(block_size)  # the policy's, when it ranked by stats
        self._prompt_hashes[request_id] = block_hashes(tokens, block_size) if hashes is None else hashes
        while len(self._prompt_hashes) > _MAX_TRACKED_REQUESTS:
            self._prompt_hashes.popitem(last=False)

    # -- lifecycle hooks -------------------------------------------------------

    # Only calls that carried prompt token ids are tracked. Dependent handle calls share one
    # internal request id (the ingress's model_info() and generate() for the same HTTP
    # request), so a completion counts only for the replica the tracked call went to.

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = pending_request.metadata.internal_request_id
        hashes = self._prompt_hashes.get(rid)
        if (
            hashes is None
            or extract_prompt_token_ids(pending_request.args, pending_request.kwargs, self._prompt_field) is None
        ):
            return
        self._tracker.on_sent(replica_id.unique_id, rid, time.time(), hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._tracker.routed_to(internal_request_id) != replica_id.unique_id:
            return  # an untracked call, or a rejected attempt elsewhere
        hashes = self._prompt_hashes.pop(internal_request_id, ())
        self._tracker.on_finished(replica_id.unique_id, internal_request_id, time.time(), hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._tracker.retain(r.replica_id.unique_id for r in replicas)
        live = {r.replica_id for r in replicas}
        for dead in [k for k in self._parsed if k not in live]:
            del self._parsed[dead]


def _target_replica_id(pending_request: PendingRequest | None) -> str | None:
    """``target_replica_id`` of the call's first argument, when it names one."""
    if pending_request is None or not pending_request.args:
        return None
    target = getattr(pending_request.args[0], "target_replica_id", None)
    return target if isinstance(target, str) else None
