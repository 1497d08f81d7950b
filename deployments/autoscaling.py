"""Queue-depth autoscaling for LLMReplica, fed by the engines' own queues.

Ray Serve's default policy counts requests in flight to a replica. An LLM replica
accepts far more requests than it runs (its engine queues them), and what hurts is
the engine's waiting queue and KV pressure, so this policy reads what each engine
reports through ``LLMReplica.record_autoscaling_stats()``: waiting, running and KV
usage, averaged by Serve over ``look_back_period_s``.

Decision, each controller tick (``decide``):

- load = sum over replicas of (waiting + running) + requests queued in handles;
  per_replica = load / running replicas.
- **up** when per_replica > ``target_requests_per_replica``, or when the mean KV usage
  is at least ``kv_usage_high`` while requests wait (KV, not count, is the limit):
  to max(running + 1, ceil(load / target)).
- **down** when per_replica <= ``idle_requests_per_replica`` (replicas idle): to
  max(ceil(load / target), running - ``max_downscale_step``); one step at a time
  keeps warm prefix caches.
- **hold** in between (hysteresis), and when no replica has reported yet and Serve
  counts no requests.
- A wish to move must persist for ``upscale_delay_s`` / ``downscale_delay_s``
  (continuously, in the same direction) before it is returned; the result is
  clamped to [min_replicas, max_replicas] of the deployment's autoscaling_config.

deployments.yaml::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      look_back_period_s: 10
      upscale_delay_s: 0      # this policy applies its own delays (below); Serve's
      downscale_delay_s: 0    # would otherwise be added on top
      policy:
        policy_function: deployments.autoscaling:QueueDepthAutoscalingPolicy
        policy_kwargs: {target_requests_per_replica: 8, upscale_delay_s: 10, downscale_delay_s: 120}

No Ray import: the controller unpickles this module, and the decision is a pure
function tested without a cluster.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Any

logger = logging.getLogger("ray.serve")

# Names of the custom metrics LLMReplica.record_autoscaling_stats() reports
# (deployments/llm.py; tests/deployments/test_autoscaling.py checks they agree).
WAITING = "num_waiting"
RUNNING = "num_running"
KV_USAGE = "kv_usage"

# Keys this policy keeps in Serve's policy_state between ticks.
_STATE_DIRECTION = "cbserve_pending_direction"
_STATE_SINCE = "cbserve_pending_since"


@dataclass(frozen=True)
class QueueDepthPolicyConfig:
    """Knobs (``policy_kwargs``).

    target_requests_per_replica: waiting + running per replica to aim for; above it, scale up.
    idle_requests_per_replica: at or below this per replica (averaged), replicas count as idle.
    kv_usage_high: mean KV usage that, with requests waiting, also means scale up.
    upscale_delay_s / downscale_delay_s: how long a wish must persist before it is acted on.
    max_downscale_step: replicas removed per decision at most.
    """

    target_requests_per_replica: float = 8.0
    idle_requests_per_replica: float = 0.5
    kv_usage_high: float = 0.9
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    max_downscale_step: int = 1

    def __post_init__(self) -> None:
        if not self.target_requests_per_replica > 0:
            raise ValueError(f"target_requests_per_replica must be > 0, got {self.target_requests_per_replica}")
        if not 0 <= self.idle_requests_per_replica < self.target_requests_per_replica:
            raise ValueError(
                "idle_requests_per_replica must be in [0, target_requests_per_replica), "
                f"got {self.idle_requests_per_replica}"
            )
        if not 0 < self.kv_usage_high <= 1:
            raise ValueError(f"kv_usage_high must be in (0, 1], got {self.kv_usage_high}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.max_downscale_step < 1:
            raise ValueError(f"max_downscale_step must be >= 1, got {self.max_downscale_step}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> QueueDepthPolicyConfig:
        known = {f.name for f in fields(cls)}
        extra = set(kwargs) - known
        if extra:
            raise ValueError(
                f"unknown policy_kwargs for QueueDepthAutoscalingPolicy: {sorted(extra)}; allowed: {sorted(known)}"
            )
        return cls(**kwargs)


@dataclass(frozen=True)
class LoadSnapshot:
    """The deployment's load as one tick sees it."""

    num_running_replicas: int
    target_replicas: int  # the target Serve currently holds (decisions move it)
    total_waiting: float
    total_running: float
    queued_in_handles: float = 0.0
    mean_kv_usage: float | None = None
    reported: bool = True  # False: no replica has reported engine stats

    @property
    def load(self) -> float:
        return self.total_waiting + self.total_running + self.queued_in_handles


@dataclass(frozen=True)
class Decision:
    num_replicas: int
    state: dict[str, Any]  # this policy's keys for Serve's policy_state
    reason: str  # up | down | hold | waiting_up | waiting_down | bounds


def decide(
    cfg: QueueDepthPolicyConfig,
    snap: LoadSnapshot,
    state: dict[str, Any],
    *,
    now: float,
    min_replicas: int,
    max_replicas: int,
) -> Decision:
    """Replica count for this tick (pure; ``state`` is the previous tick's ``Decision.state``)."""
    cur = snap.target_replicas
    if cur < min_replicas or cur > max_replicas:  # bounds apply at once, no delay
        return Decision(min(max(cur, min_replicas), max_replicas), {}, "bounds")
    n = max(1, snap.num_running_replicas)
    per_replica = snap.load / n
    kv_pressure = snap.mean_kv_usage is not None and snap.mean_kv_usage >= cfg.kv_usage_high and snap.total_waiting > 0
    wanted_by_load = math.ceil(snap.load / cfg.target_requests_per_replica)
    want = cur
    if not snap.reported:
        want = cur
    elif per_replica > cfg.target_requests_per_replica or kv_pressure:
        # Steps count from the replicas actually running, so a scale-up whose replicas
        # are still starting (target > running) is not repeated.
        want = max(cur, n + 1, wanted_by_load)
    elif per_replica <= cfg.idle_requests_per_replica:
        want = min(cur, max(wanted_by_load, n - cfg.max_downscale_step))
    want = min(max(want, min_replicas), max_replicas)

    if want == cur:
        return Decision(cur, {}, "hold")
    direction = "up" if want > cur else "down"
    since = state.get(_STATE_SINCE)
    if state.get(_STATE_DIRECTION) != direction or not isinstance(since, (int, float)):
        since = now  # a new wish, or the direction flipped: start the clock again
    delay = cfg.upscale_delay_s if direction == "up" else cfg.downscale_delay_s
    if now - since >= delay:
        return Decision(want, {}, direction)  # acted on: the next move waits its own delay
    return Decision(cur, {_STATE_DIRECTION: direction, _STATE_SINCE: since}, f"waiting_{direction}")


def snapshot_from_context(ctx: Any) -> LoadSnapshot:
    """Read Serve's AutoscalingContext (duck-typed: no Ray import here).

    Per-replica custom metrics are Serve's aggregates over ``look_back_period_s``;
    only replicas still running count. Without any engine metrics yet, fall back to
    Serve's own count of requests at the replicas (``total_num_requests``).
    """
    metrics = ctx.aggregated_metrics or {}
    running_ids = set(ctx.running_replicas)

    def total(name: str) -> tuple[float, int]:
        per = {rid: v for rid, v in (metrics.get(name) or {}).items() if rid in running_ids}
        return float(sum(per.values())), len(per)

    waiting, n_w = total(WAITING)
    running, n_r = total(RUNNING)
    kv_sum, n_kv = total(KV_USAGE)
    queued = float(ctx.total_queued_requests or 0.0)
    reported = n_w > 0 or n_r > 0
    if not reported:
        # Serve's count of requests at replicas (queued or running there) stands in.
        running = max(0.0, float(ctx.total_num_requests or 0.0) - queued)
        reported = running > 0 or queued > 0
    return LoadSnapshot(
        num_running_replicas=ctx.current_num_replicas,
        target_replicas=ctx.target_num_replicas,
        total_waiting=waiting,
        total_running=running,
        queued_in_handles=queued,
        mean_kv_usage=kv_sum / n_kv if n_kv else None,
        reported=reported,
    )


class QueueDepthAutoscalingPolicy:
    """Serve's class-callable policy: built once with ``policy_kwargs``, called each tick."""

    def __init__(self, **policy_kwargs: Any) -> None:
        self.config = QueueDepthPolicyConfig.from_kwargs(policy_kwargs)
        self._warned_serve_delays = False

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        serve_cfg = ctx.config
        if not self._warned_serve_delays and serve_cfg is not None:
            if getattr(serve_cfg, "upscale_delay_s", 0) or getattr(serve_cfg, "downscale_delay_s", 0):
                logger.warning(
                    "QueueDepthAutoscalingPolicy applies its own delays; autoscaling_config "
                    "upscale_delay_s/downscale_delay_s are non-zero and add to them. Set them to 0."
                )
            self._warned_serve_delays = True
        state = dict(ctx.policy_state or {})
        now = ctx.current_time if ctx.current_time is not None else time.time()
        d = decide(
            self.config,
            snapshot_from_context(ctx),
            state,
            now=now,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
        )
        for k in (_STATE_DIRECTION, _STATE_SINCE):  # keep Serve's own keys, replace ours
            state.pop(k, None)
        state.update(d.state)
        if d.reason in ("up", "down"):
            logger.info("QueueDepthAutoscalingPolicy: %s %d -> %d", d.reason, ctx.target_num_replicas, d.num_replicas)
        return d.num_replicas, state
