"""The Ray glue with fake replicas: no cluster, Serve's own PendingRequest/ReplicaID types."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from replica.prefix_hash import block_hashes
from router.kv_router import KVCacheAwareRouter, parse_router_kwargs
from router.stats import build_routing_stats

DEP = DeploymentID(name="LLMReplica", app_name="cbserve")
BS = 4
SHARED = list(range(1000, 1064))  # 16 blocks


def fake_replica(name: str, *, held: list[int] = (), running: int = 0, ts: float | None = None):
    stats = build_routing_stats(
        block_size=BS,
        num_free_blocks=500,
        num_total_blocks=512,
        num_waiting=0,
        num_running=running,
        prefix_hashes=held,
        timestamp=time.time() if ts is None else ts,
    )
    return SimpleNamespace(
        replica_id=ReplicaID(unique_id=name, deployment_id=DEP), routing_stats=stats, max_ongoing_requests=100
    )


def pending(req_id: str, tokens: list[int]) -> PendingRequest:
    meta = RequestMetadata(request_id=req_id, internal_request_id=req_id, is_streaming=True)
    return PendingRequest(args=[tokens], kwargs={}, metadata=meta)


def make_router(**kwargs) -> KVCacheAwareRouter:
    r = KVCacheAwareRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(seed=0, **kwargs)
    return r


async def test_routes_to_replica_holding_prefix_then_spreads_a_burst():
    router = make_router(imbalance_threshold=2)
    a = fake_replica("a", running=1)
    b = fake_replica("b", held=block_hashes(SHARED, BS), running=1)
    sent_to = []
    for i in range(6):
        pr = pending(f"q{i}", SHARED + [i])
        ranks = await router.choose_replicas([a, b], pr)
        chosen = ranks[0][0]
        sent_to.append(chosen.replica_id.unique_id)
        router.on_request_routed(pr, chosen.replica_id, result=None)
    # The affine replica takes the burst until it is 2 requests ahead, then load wins;
    # a then also holds the prefix (router memory), so it alternates within the threshold.
    assert sent_to[:3] == ["b", "b", "b"]
    assert sent_to[3] == "a"
    assert router.decision_counts["affinity"] >= 4
    # Completions lower b's estimate again.
    for i in range(6):
        if sent_to[i] == "b":
            router.on_request_completed(b.replica_id, f"q{i}")
    ranks = await router.choose_replicas([a, b], pending("next", SHARED + [99]))
    assert ranks[0][0].replica_id.unique_id == "b"


async def test_next_turn_follows_router_memory_before_stats_refresh():
    router = make_router()
    a, b = fake_replica("a"), fake_replica("b")
    turn1 = list(range(50, 90))
    pr = pending("t1", turn1)
    first = (await router.choose_replicas([a, b], pr))[0][0]
    router.on_request_routed(pr, first.replica_id, result=None)
    router.on_request_completed(first.replica_id, "t1")
    # Stats have not changed, but this router knows where turn 1 went.
    for _ in range(5):
        ranks = await router.choose_replicas([a, b], pending("t2", turn1 + list(range(200, 230))))
        assert ranks[0][0] is first
    assert router.decision_counts["affinity"] >= 5


async def test_stale_stats_use_power_of_two():
    router = make_router(stale_after_s=2.0)
    old = time.time() - 10
    a = fake_replica("a", held=block_hashes(SHARED, BS), ts=old)
    b = fake_replica("b", ts=old)
    ranks = await router.choose_replicas([a, b], pending("q", SHARED))
    assert len(ranks) == 1 and {r.replica_id.unique_id for r in ranks[0]} == {"a", "b"}
    assert router.decision_counts == {"p2c_stale": 1}


async def test_missing_or_malformed_stats_use_power_of_two():
    router = make_router()
    a = fake_replica("a")
    b = fake_replica("b")
    b.routing_stats = {}  # replica has not reported yet
    c = fake_replica("c")
    c.routing_stats = {"v": 1, "ts": "garbage"}
    ranks = await router.choose_replicas([a, b, c], pending("q", SHARED))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    assert router.decision_counts == {"p2c_missing": 1}


async def test_request_without_token_ids_routes_by_load():
    router = make_router()
    a, b = fake_replica("a", running=3), fake_replica("b", running=0)
    pr = PendingRequest(
        args=["plain text"], kwargs={}, metadata=RequestMetadata(request_id="x", internal_request_id="x")
    )
    ranks = await router.choose_replicas([a, b], pr)
    assert ranks[0][0] is b and router.decision_counts == {"load": 1}


async def test_dependent_call_sharing_the_request_id_does_not_steal_the_prompt():
    """The ingress calls model_info() then generate() under one internal request id; the
    model_info completion may arrive after generate was chosen. The prefix must be
    remembered where generate went, not where model_info went."""
    router = make_router()
    a, b = fake_replica("a"), fake_replica("b")
    meta = RequestMetadata(request_id="h", internal_request_id="h", call_method="model_info")
    info = PendingRequest(args=[], kwargs={}, metadata=meta)
    await router.choose_replicas([a, b], info)
    router.on_request_routed(info, a.replica_id, result=None)  # model_info -> a
    gen = pending("h", SHARED)
    await router.choose_replicas([a, b], gen)
    router.on_request_completed(a.replica_id, "h")  # model_info finishes late
    router.on_request_routed(gen, b.replica_id, result=None)  # generate -> b
    assert router._tracker.outstanding("a") == 0 and router._tracker.outstanding("b") == 1
    router.on_request_completed(b.replica_id, "h")
    ranks = await router.choose_replicas([a, b], pending("next", SHARED + [5]))
    assert ranks[0][0] is b and router.decision_counts["affinity"] == 1


def test_unknown_router_kwargs_are_rejected():
    with pytest.raises(ValueError, match="imbalance_treshold"):
        parse_router_kwargs({"imbalance_treshold": 3})
    cfg, field, seed = parse_router_kwargs({"imbalance_threshold": 3, "prompt_field": "ids", "seed": 7})
    assert (cfg.imbalance_threshold, field, seed) == (3, "ids", 7)


async def test_a_call_that_names_its_replica_goes_there_only():
    from deployments.mux import AbortRequest, PumpRequest

    router = make_router()
    a = fake_replica("a")
    b = fake_replica("b", held=block_hashes(SHARED, BS))  # prefix affinity would pick b
    meta = RequestMetadata(request_id="p", internal_request_id="p", is_streaming=True)
    for target in ("a", "b"):
        for arg in (PumpRequest(target, "ingress-1"), AbortRequest(target, "req-1")):
            ranks = await router.choose_replicas([a, b], PendingRequest(args=[arg], kwargs={}, metadata=meta))
            assert [[r.replica_id.unique_id for r in g] for g in ranks] == [[target]]
    # A replica that is gone is never replaced by another one.
    gone = PendingRequest(args=[PumpRequest("c", "ingress-1")], kwargs={}, metadata=meta)
    assert await router.choose_replicas([a, b], gone) == [[]]
