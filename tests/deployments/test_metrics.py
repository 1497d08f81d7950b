"""Replica metrics: gauges mirror the snapshot; counters advance by the change between snapshots."""

from __future__ import annotations

from dataclasses import replace

from deployments.metrics import IngressMetrics, ReplicaMetrics
from replica.outputs import EngineStats
from tests.deployments.fakes import FakeMetricsBackend

STATS = EngineStats(
    num_waiting=3,
    num_running=2,
    num_free_blocks=90,
    num_total_blocks=100,
    num_cached_blocks=5,
    block_size=16,
    num_preemptions=1,
    num_refused=0,
    prompt_tokens_total=50,
    generation_tokens_total=20,
    cached_prompt_tokens_total=16,
    tokens_per_s=1.0,
    num_steps=10,
    max_model_len=512,
)


def test_gauges_and_counter_deltas():
    backend = FakeMetricsBackend()
    m = ReplicaMetrics("tiny", backend=backend)
    m.update(STATS)
    g = backend.metrics
    assert g["cbserve_num_waiting_requests"].last == 3 and g["cbserve_num_running_requests"].last == 2
    assert g["cbserve_kv_blocks_used"].last == 10 and abs(g["cbserve_kv_cache_usage_ratio"].last - 0.1) < 1e-9
    assert g["cbserve_preemptions_total"].total == 1 and g["cbserve_generation_tokens_total"].total == 20
    assert g["cbserve_refusals_total"].values == []  # nothing refused yet: no zero increments
    m.update(replace(STATS, num_preemptions=4, num_refused=2, generation_tokens_total=25, num_running=0))
    assert g["cbserve_preemptions_total"].total == 4  # 1 + 3, not 1 + 4
    assert g["cbserve_generation_tokens_total"].total == 25
    assert g["cbserve_refusals_total"].values == [(2, {"model": "tiny", "code": "engine"})]
    assert g["cbserve_num_running_requests"].last == 0
    m.update(replace(STATS, num_preemptions=0))  # a restarted engine counts from 0 again: no negative inc
    assert g["cbserve_preemptions_total"].total == 4


def test_request_level_metrics_are_tagged():
    backend = FakeMetricsBackend()
    m = ReplicaMetrics("tiny", backend=backend)
    m.observe_ttft(0.2)
    m.observe_tpot(0.01)
    m.refused("engine_unavailable")
    g = backend.metrics
    assert g["cbserve_time_to_first_token_seconds"].values == [(0.2, {"model": "tiny"})]
    assert g["cbserve_time_per_output_token_seconds"].values == [(0.01, {"model": "tiny"})]
    assert g["cbserve_refusals_total"].values == [(1, {"model": "tiny", "code": "engine_unavailable"})]
    ingress = IngressMetrics(backend=backend)
    ingress.response("/v1/completions", 429)
    assert g["cbserve_http_responses_total"].values == [(1, {"endpoint": "/v1/completions", "status": "429"})]


def test_ingress_endpoint_tag_is_bounded():
    # 401/413 are counted for whatever path a client sends: those must not each become a series.
    backend = FakeMetricsBackend()
    ingress = IngressMetrics(backend=backend)
    for path in ("/x1", "/v1/x2", "/api/v1/models", "/v1/chat/completions"):
        ingress.response(path, 401)
    tags = [t["endpoint"] for _, t in backend.metrics["cbserve_http_responses_total"].values]
    assert tags == ["other", "other", "/v1/models", "/v1/chat/completions"]


def test_real_serve_metrics_accept_our_definitions():
    # Ray's metric classes validate names, tag keys and boundaries at construction.
    m = ReplicaMetrics("tiny")
    m.update(STATS)
    m.observe_ttft(0.1)
