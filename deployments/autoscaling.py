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
- **unplaceable**: when target > running replicas for ``unplaceable_after_s`` with no
  new replica coming up meanwhile, the missing replicas are taken as unplaceable (too
  few CPUs/GPUs in the cluster): the target drops back to the running count and is
  held there for ``unplaceable_retry_s`` before one more try. Serve would otherwise
  keep the pending replica and log "has N replicas that have taken more than 30s to
  be scheduled" every 30 s; this policy says it once, as a WARNING naming the
  resource that is short (``replica_resources``, which build_app passes, against
  ``ray.available_resources()``).
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
_STATE_SHORT_SINCE = "cbserve_short_since"  # target > running since (with _STATE_SHORT_RUNNING running)
_STATE_SHORT_RUNNING = "cbserve_short_running"
_STATE_CEILING = "cbserve_ceiling"  # replicas that could be placed; no more asked until ...
_STATE_CEILING_SINCE = "cbserve_ceiling_since"  # ... unplaceable_retry_s after this
_STATE_KEYS = (
    _STATE_DIRECTION,
    _STATE_SINCE,
    _STATE_SHORT_SINCE,
    _STATE_SHORT_RUNNING,
    _STATE_CEILING,
    _STATE_CEILING_SINCE,
)


@dataclass(frozen=True)
class QueueDepthPolicyConfig:
    """Knobs (``policy_kwargs``).

    target_requests_per_replica: waiting + running per replica to aim for; above it, scale up.
    idle_requests_per_replica: at or below this per replica (averaged), replicas count as idle.
    kv_usage_high: mean KV usage that, with requests waiting, also means scale up.
    upscale_delay_s / downscale_delay_s: how long a wish must persist before it is acted on.
    max_downscale_step: replicas removed per decision at most.
    unplaceable_after_s: target above running this long, with no replica coming up, means the
        extra replicas cannot be placed; the target falls back to the running count. Longer than
        a replica's start (model load) takes, which also counts here.
    unplaceable_retry_s: how long the target stays at what could be placed before one more try.
    replica_resources: one replica's Ray resources (build_app fills it in), named in the warning.
    """

    target_requests_per_replica: float = 8.0
    idle_requests_per_replica: float = 0.5
    kv_usage_high: float = 0.9
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    max_downscale_step: int = 1
    unplaceable_after_s: float = 300.0
    unplaceable_retry_s: float = 600.0
    replica_resources: dict[str, float] | None = None

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
        if not self.unplaceable_after_s > 0 or self.unplaceable_retry_s < 0:
            raise ValueError("unplaceable_after_s must be > 0 and unplaceable_retry_s >= 0")

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
    reason: str  # up | down | hold | waiting_up | waiting_down | bounds | unplaceable


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

    # Replicas asked for but not coming up: after unplaceable_after_s without progress, give
    # them up and ask for no more than could be placed until unplaceable_retry_s has passed.
    running = snap.num_running_replicas
    placement: dict[str, Any] = {}
    ceiling = state.get(_STATE_CEILING)
    ceiling_since = state.get(_STATE_CEILING_SINCE)
    # The ceiling lapses at retry time, or at once when more replicas run than it allowed.
    if (
        isinstance(ceiling, int)
        and isinstance(ceiling_since, (int, float))
        and running <= ceiling
        and now - ceiling_since < cfg.unplaceable_retry_s
    ):
        placement = {_STATE_CEILING: ceiling, _STATE_CEILING_SINCE: ceiling_since}
        max_replicas = max(min_replicas, min(max_replicas, ceiling))
    short_since = state.get(_STATE_SHORT_SINCE)
    if cur > running:
        if state.get(_STATE_SHORT_RUNNING) != running or not isinstance(short_since, (int, float)):
            short_since = now  # newly short, or a replica came up meanwhile: start again
        if now - short_since >= cfg.unplaceable_after_s and running >= min_replicas:
            return Decision(running, {_STATE_CEILING: running, _STATE_CEILING_SINCE: now}, "unplaceable")
        placement.update({_STATE_SHORT_SINCE: short_since, _STATE_SHORT_RUNNING: running})
    if cur > max_replicas:  # capped by the ceiling
        return Decision(max_replicas, placement, "hold")

    d = _decide_load(cfg, snap, state, now=now, min_replicas=min_replicas, max_replicas=max_replicas)
    return Decision(d.num_replicas, {**d.state, **placement}, d.reason)


def _decide_load(
    cfg: QueueDepthPolicyConfig,
    snap: LoadSnapshot,
    state: dict[str, Any],
    *,
    now: float,
    min_replicas: int,
    max_replicas: int,
) -> Decision:
    cur = snap.target_replicas
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
        self._warned_unplaceable = False

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
        for k in _STATE_KEYS:  # keep Serve's own keys, replace ours
            state.pop(k, None)
        state.update(d.state)
        if d.reason == "unplaceable":
            self._log_unplaceable(ctx, d.num_replicas)
        if d.reason in ("up", "down"):
            logger.info("QueueDepthAutoscalingPolicy: %s %d -> %d", d.reason, ctx.target_num_replicas, d.num_replicas)
        return d.num_replicas, state

    def _log_unplaceable(self, ctx: Any, placed: int) -> None:
        cfg = self.config
        name = f"{getattr(ctx, 'app_name', None) or ''}#{getattr(ctx, 'deployment_name', 'LLMReplica')}".lstrip("#")
        msg = (
            f"QueueDepthAutoscalingPolicy: {name}: {ctx.target_num_replicas - placed} replica(s) could not be "
            f"placed within {cfg.unplaceable_after_s:g}s; {short_resources(cfg.replica_resources)}. "
            f"Holding at {placed} replica(s); trying again every {cfg.unplaceable_retry_s:g}s."
        )
        if self._warned_unplaceable:
            logger.info(msg)
        else:
            logger.warning(msg + " (said once; later retries log at INFO)")
            self._warned_unplaceable = True


def short_resources(need: dict[str, float] | None, available: dict[str, float] | None = None) -> str:
    """What one replica needs that the cluster has not free, in words. ``available`` defaults to
    ``ray.available_resources()`` (in the Serve controller, where Ray is up)."""
    if not need:
        return "each replica's resources are unknown to the policy; see `ray status`"
    if available is None:
        try:
            import ray

            available = ray.available_resources()
        except Exception:  # no Ray here (tests) or not connected
            available = None
    wants = ", ".join(f"{k}={v:g}" for k, v in sorted(need.items()) if v)
    if available is None:
        return f"each needs {wants}; see `ray status`"
    short = [
        f"{k} (needs {v:g}, {available.get(k, 0.0):g} free)"
        for k, v in sorted(need.items())
        if v > available.get(k, 0.0)
    ]
    if not short:
        return f"each needs {wants}, free now but fragmented across nodes or taken meanwhile; see `ray status`"
    return "the cluster is short of " + ", ".join(short)
