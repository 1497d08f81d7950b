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


# -- replicas that cannot be placed (too few CPUs/GPUs) ----------------------------

PLACE = QueueDepthPolicyConfig(
    target_requests_per_replica=4, upscale_delay_s=0, unplaceable_after_s=60, unplaceable_retry_s=600
)


def test_unplaceable_replica_given_up_and_not_asked_for_again_until_retry():
    busy = snap(1, waiting=20, running=4)  # wants 6 replicas, only 1 can be placed
    stuck = snap(1, waiting=20, running=4, target=6)
    ds = run(
        [(0, busy), (10, stuck), (69, stuck), (70, stuck), (100, snap(1, 20, 4)), (400, snap(1, 20, 4))], cfg=PLACE
    )
    assert [(d.num_replicas, d.reason) for d in ds] == [
        (6, "up"),
        (6, "hold"),
        (6, "hold"),
        (1, "unplaceable"),  # 60 s with target 6 and still 1 running: back to what runs
        (1, "hold"),  # the load still asks for 6: capped at what could be placed
        (1, "hold"),
    ]
    # After unplaceable_retry_s it asks again (the cluster may have grown).
    state = ds[-1].state
    d = decide(PLACE, snap(1, 20, 4), state, now=670, min_replicas=1, max_replicas=8)
    assert (d.num_replicas, d.reason) == (6, "up")


def test_slow_but_progressing_scale_up_is_not_given_up():
    ds = run(
        [(0, snap(1, 20, 4)), (50, snap(2, 20, 4, target=6)), (100, snap(3, 20, 4, target=6))],
        cfg=PLACE,
    )
    assert [d.num_replicas for d in ds] == [6, 6, 6]  # each replica that came up restarts the clock


def test_ceiling_lifted_when_more_replicas_run():
    # Given up at 1 running; then 2 run after all (the cluster grew): the cap goes at once.
    ds = run([(0, snap(1, 20, 4, target=6)), (60, snap(1, 20, 4, target=6)), (61, snap(2, 20, 4))], cfg=PLACE)
    assert [(d.num_replicas, d.reason) for d in ds] == [(6, "hold"), (1, "unplaceable"), (6, "up")]


def test_policy_warns_once_naming_the_missing_resource(caplog):
    from deployments.autoscaling import short_resources

    policy = QueueDepthAutoscalingPolicy(
        target_requests_per_replica=2, upscale_delay_s=0, unplaceable_after_s=30, replica_resources={"CPU": 2}
    )
    busy = per_replica(4, 2, 3, 2)
    state = None
    with caplog.at_level("INFO", logger="ray.serve"):
        for now in (0, 30, 100, 730, 760):
            _, state = policy(ctx(busy, target=4, state=state, now=now))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "2 replica(s) could not be placed within 30s" in msg and "Holding at 2" in msg
    assert any("could not be placed" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)  # 760
    assert short_resources({"CPU": 2, "fake_gpu": 1}, {"CPU": 1.5, "fake_gpu": 1}) == (
        "the cluster is short of CPU (needs 2, 1.5 free)"
    )
    assert "unknown" in short_resources(None)


def test_build_app_passes_replica_resources_to_the_policy():
    pytest.importorskip("ray.serve")
    from deployments.app import build_app

    app = build_app(
        {
            "model": "tiny:llama",
            "num_gpus": 0,
            "num_cpus": 1,
            "accelerator_resource": "fake_gpu",
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "policy": "deployments.autoscaling:QueueDepthAutoscalingPolicy",
                "policy_kwargs": {"target_requests_per_replica": 4},
            },
        }
    )
    deps = {d.name: d for d in _deployments(app)}
    policy = deps["LLMReplica"]._deployment_config.autoscaling_config.policy
    assert policy.policy_kwargs == {"replica_resources": {"CPU": 1, "fake_gpu": 1}, "target_requests_per_replica": 4}
    QueueDepthAutoscalingPolicy(**policy.policy_kwargs)  # accepted


def _deployments(app):
    seen, todo = [], [app._bound_deployment]
    while todo:
        d = todo.pop()
        seen.append(d)
        todo.extend(
            a._bound_deployment for a in (*d.init_args, *d.init_kwargs.values()) if hasattr(a, "_bound_deployment")
        )
    return seen
