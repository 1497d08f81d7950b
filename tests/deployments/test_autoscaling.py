"""Queue-depth autoscaling decisions: up, down, hold, delays and bounds (no cluster)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.autoscaling import (
    KV_USAGE,
    RUNNING,
    WAITING,
    LoadSnapshot,
    QueueDepthAutoscalingPolicy,
    QueueDepthPolicyConfig,
    decide,
)

CFG = QueueDepthPolicyConfig(
    target_requests_per_replica=4,
    idle_requests_per_replica=0.5,
    kv_usage_high=0.9,
    upscale_delay_s=5,
    downscale_delay_s=20,
)


def snap(
    replicas: int,
    waiting: float,
    running: float,
    *,
    target: int | None = None,
    kv: float | None = None,
    queued: float = 0.0,
):
    return LoadSnapshot(
        num_running_replicas=replicas,
        target_replicas=replicas if target is None else target,
        total_waiting=waiting,
        total_running=running,
        queued_in_handles=queued,
        mean_kv_usage=kv,
    )


def run(snaps_at: list[tuple[float, LoadSnapshot]], *, lo: int = 1, hi: int = 8, cfg=CFG):
    """Feed ticks in order, carrying state like Serve's policy_state; returns decisions."""
    state: dict = {}
    out = []
    for now, s in snaps_at:
        d = decide(cfg, s, state, now=now, min_replicas=lo, max_replicas=hi)
        state = d.state
        out.append(d)
    return out


def test_scale_up_waits_for_upscale_delay():
    busy = snap(2, waiting=10, running=8)  # 9 per replica > 4
    ds = run([(0, busy), (2, busy), (4.9, busy), (5.0, busy)])
    assert [d.num_replicas for d in ds] == [2, 2, 2, 5]  # ceil(18 / 4) = 5
    assert [d.reason for d in ds] == ["waiting_up"] * 3 + ["up"]


def test_upscale_clock_restarts_when_load_dips():
    busy, calm = snap(2, 10, 8), snap(2, 1, 4)
    ds = run([(0, busy), (4, calm), (6, busy), (10, busy), (11, busy)])
    assert [d.reason for d in ds] == ["waiting_up", "hold", "waiting_up", "waiting_up", "up"]


def test_scale_up_bounded_by_max_replicas():
    ds = run([(0, snap(2, 100, 8)), (5, snap(2, 100, 8))], hi=3)
    assert ds[-1].num_replicas == 3


def test_kv_pressure_scales_up_with_few_requests():
    # 2 per replica is under target, but KV is 95% full and requests are waiting.
    s = snap(2, waiting=2, running=2, kv=0.95)
    ds = run([(0, s), (5, s)])
    assert ds[-1].num_replicas == 3 and ds[-1].reason == "up"
    # Full KV without anyone waiting is just a busy replica: hold.
    assert run([(0, snap(2, 0, 4, kv=0.95))])[0].reason == "hold"


def test_no_repeat_upscale_while_new_replicas_start():
    # Target already 3 but only 2 running: the same load must not push the target to 4.
    ds = run([(0, snap(2, 6, 4, target=3)), (10, snap(2, 6, 4, target=3))])
    assert [d.num_replicas for d in ds] == [3, 3]


def test_scale_down_when_idle_after_downscale_delay_one_step_at_a_time():
    idle = snap(4, 0, 1)  # 0.25 per replica <= 0.5
    ds = run([(0, idle), (10, idle), (20, idle)])
    assert [d.num_replicas for d in ds] == [4, 4, 3]
    assert ds[-1].reason == "down"
    # The next step needs its own full delay.
    idle3 = snap(3, 0, 1)
    ds = run([(20, idle3), (39, idle3), (40, idle3)])
    assert [d.num_replicas for d in ds] == [3, 3, 2]


def test_scale_down_respects_min_replicas():
    idle = snap(2, 0, 0)
    ds = run([(0, idle), (100, idle)], lo=2)
    assert [d.reason for d in ds] == ["hold", "hold"]


def test_hold_between_idle_and_target():
    ds = run([(t, snap(3, 1, 5)) for t in (0, 50, 100)])  # 2 per replica: neither busy nor idle
    assert all(d.reason == "hold" and d.num_replicas == 3 for d in ds)


def test_direction_flip_restarts_clock():
    ds = run([(0, snap(4, 0, 0)), (15, snap(4, 30, 10)), (19, snap(4, 30, 10)), (20, snap(4, 30, 10))])
    assert [d.reason for d in ds] == ["waiting_down", "waiting_up", "waiting_up", "up"]


def test_out_of_bounds_target_corrected_at_once():
    d = run([(0, snap(5, 0, 20))], hi=3)[0]
    assert (d.num_replicas, d.reason) == (3, "bounds")
    d = run([(0, snap(1, 0, 0))], lo=2)[0]
    assert (d.num_replicas, d.reason) == (2, "bounds")


def test_handle_queue_counts_as_load():
    s = snap(1, waiting=0, running=2, queued=10)
    ds = run([(0, s), (5, s)])
    assert ds[-1].num_replicas == 3  # ceil(12 / 4)


def test_no_reports_holds():
    s = LoadSnapshot(num_running_replicas=2, target_replicas=2, total_waiting=0, total_running=0, reported=False)
    assert run([(0, s), (1000, s)])[-1].reason == "hold"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_requests_per_replica": 0},
        {"idle_requests_per_replica": 5, "target_requests_per_replica": 4},
        {"kv_usage_high": 0},
        {"upscale_delay_s": -1},
        {"max_downscale_step": 0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        QueueDepthPolicyConfig(**kwargs)


def test_unknown_policy_kwargs_rejected():
    with pytest.raises(ValueError, match="target_requests"):
        QueueDepthAutoscalingPolicy(target_request_per_replica=3)


# -- the Serve-facing callable, with a fake AutoscalingContext --------------------


def ctx(metrics, *, running=("r1", "r2"), target=2, state=None, now=0.0, total_num_requests=0.0, queued=0.0):
    return SimpleNamespace(
        aggregated_metrics=metrics,
        running_replicas=list(running),
        current_num_replicas=len(running),
        target_num_replicas=target,
        total_num_requests=total_num_requests,
        total_queued_requests=queued,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state=state or {},
        current_time=now,
        config=SimpleNamespace(upscale_delay_s=0, downscale_delay_s=0),
    )


def per_replica(w1, r1, w2, r2, kv=0.5):
    return {WAITING: {"r1": w1, "r2": w2}, RUNNING: {"r1": r1, "r2": r2}, KV_USAGE: {"r1": kv, "r2": kv}}


def test_policy_callable_scales_up_then_down_carrying_state():
    policy = QueueDepthAutoscalingPolicy(target_requests_per_replica=2, upscale_delay_s=1, downscale_delay_s=3)
    n, state = policy(ctx(per_replica(4, 2, 3, 2), state={"serve_internal": 7}, now=0))
    assert n == 2 and state["serve_internal"] == 7  # Serve's keys survive
    n, state = policy(ctx(per_replica(4, 2, 3, 2), state=state, now=1.0))
    assert n == 4  # ceil(11 / 2) = 6, bounded by max_replicas 4
    n, state = policy(ctx(per_replica(4, 2, 3, 2), running=("r1", "r2", "r3", "r4"), target=4, state=state, now=2))
    assert n == 4
    idle = {WAITING: {"r1": 0, "r2": 0, "r3": 0}, RUNNING: {"r1": 0, "r2": 0, "r3": 0}}
    n, state = policy(ctx(idle, running=("r1", "r2", "r3"), target=3, state=state, now=10))
    assert n == 3
    n, state = policy(ctx(idle, running=("r1", "r2", "r3"), target=3, state=state, now=13))
    assert n == 2


def test_policy_ignores_metrics_of_stopped_replicas():
    policy = QueueDepthAutoscalingPolicy(target_requests_per_replica=2, upscale_delay_s=0)
    metrics = per_replica(0, 1, 0, 1)
    metrics[WAITING]["gone"] = 100.0
    n, _ = policy(ctx(metrics))
    assert n == 2


def test_policy_falls_back_to_serve_request_count_without_engine_metrics():
    policy = QueueDepthAutoscalingPolicy(target_requests_per_replica=2, upscale_delay_s=0)
    n, _ = policy(ctx({}, total_num_requests=9.0))
    assert n == 4  # ceil(9 / 2) = 5, bounded by max 4
    n, _ = policy(ctx(None, total_num_requests=0.0))
    assert n == 2


async def test_replica_reports_the_metrics_the_policy_reads():
    from deployments.llm import GenerateRequest
    from replica.request import SamplingParams
    from tests.deployments.fakes import make_server

    server, _ = await make_server()
    gen = server.generate(GenerateRequest("r", tuple(range(3, 11)), SamplingParams(max_tokens=50)))
    await gen.__anext__()  # one request running
    stats = server.record_autoscaling_stats()
    assert {WAITING, RUNNING, KV_USAGE} <= set(stats)
    assert stats[RUNNING] + stats[WAITING] == 1.0 and 0.0 < stats[KV_USAGE] <= 1.0
    await gen.aclose()


def test_serve_wrapper_passes_decisions_through_when_its_delays_are_zero():
    """Serve wraps custom policies with its own delay/bounds logic; with its delays at 0
    (as deployments.yaml sets them) our decision is what Serve applies."""
    pytest.importorskip("ray.serve")
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    policy = QueueDepthAutoscalingPolicy(target_requests_per_replica=2, upscale_delay_s=1, downscale_delay_s=1)
    wrapped = _apply_autoscaling_config(policy)
    serve_cfg = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0)
    c = ctx(per_replica(1, 2, 1, 2), now=0)  # 3 per replica > 2
    c.config = serve_cfg
    n, state = wrapped(c)
    assert n == 2  # our upscale delay has not passed
    c = ctx(per_replica(1, 2, 1, 2), state=state, now=1.0)
    c.config = serve_cfg
    n, state = wrapped(c)
    assert n == 3  # ceil(6 / 2), applied by Serve without a second delay
