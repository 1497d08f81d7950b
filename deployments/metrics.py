"""Prometheus metrics through Ray Serve's metrics API (ray.serve.metrics -> Ray's metrics agent).

Replica gauges mirror the latest ``EngineStats`` snapshot; engine counters are
cumulative in the snapshot, so the Prometheus counters are advanced by the difference
between two snapshots. Per-request timings (TTFT, TPOT) are observed as they happen.
"""

from __future__ import annotations

from typing import Any, Protocol

from replica.outputs import EngineStats

# Seconds. TTFT spans queueing + prefill; TPOT is per decoded token.
TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]


class _MetricsBackend(Protocol):
    def Counter(self, name: str, *, description: str, tag_keys: tuple[str, ...] = ()) -> Any: ...
    def Gauge(self, name: str, *, description: str, tag_keys: tuple[str, ...] = ()) -> Any: ...
    def Histogram(
        self, name: str, *, description: str, boundaries: list[float], tag_keys: tuple[str, ...] = ()
    ) -> Any: ...


def _serve_metrics() -> _MetricsBackend:
    from ray.serve import metrics  # Serve adds deployment/replica/application tags itself

    return metrics  # type: ignore[return-value]


class ReplicaMetrics:
    """Metrics of one LLM replica; ``backend`` is injectable for tests."""

    def __init__(self, model: str, backend: _MetricsBackend | None = None) -> None:
        m = backend or _serve_metrics()
        tags = ("model",)
        self._tags = {"model": model}
        self.ttft = m.Histogram(
            "cbserve_time_to_first_token_seconds",
            description="Time from the replica receiving a request to its first output token.",
            boundaries=TTFT_BOUNDARIES,
            tag_keys=tags,
        )
        self.tpot = m.Histogram(
            "cbserve_time_per_output_token_seconds",
            description="Mean time between output tokens of a finished request (after the first).",
            boundaries=TPOT_BOUNDARIES,
            tag_keys=tags,
        )
        self.waiting = m.Gauge(
            "cbserve_num_waiting_requests", description="Requests in the engine queue.", tag_keys=tags
        )
        self.running = m.Gauge(
            "cbserve_num_running_requests", description="Requests in the running batch.", tag_keys=tags
        )
        self.kv_used = m.Gauge("cbserve_kv_blocks_used", description="KV cache blocks in use.", tag_keys=tags)
        self.kv_total = m.Gauge("cbserve_kv_blocks_total", description="KV cache blocks in the pool.", tag_keys=tags)
        self.kv_usage = m.Gauge(
            "cbserve_kv_cache_usage_ratio", description="Fraction of KV blocks in use.", tag_keys=tags
        )
        self.preemptions = m.Counter(
            "cbserve_preemptions_total", description="Requests preempted (recomputed later).", tag_keys=tags
        )
        self.refusals = m.Counter(
            "cbserve_refusals_total",
            description="Requests refused by the engine or the replica, by error code.",
            tag_keys=("model", "code"),
        )
        self.finished = m.Counter(
            "cbserve_requests_finished_total",
            description="Requests finished, by finish reason.",
            tag_keys=("model", "finish_reason"),
        )
        self.prompt_tokens = m.Counter("cbserve_prompt_tokens_total", description="Prompt tokens.", tag_keys=tags)
        self.cached_tokens = m.Counter(
            "cbserve_cached_prompt_tokens_total",
            description="Prompt tokens served from the prefix cache.",
            tag_keys=tags,
        )
        self.generation_tokens = m.Counter(
            "cbserve_generation_tokens_total", description="Generated tokens.", tag_keys=tags
        )
        self._last: EngineStats | None = None

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds, tags=self._tags)

    def observe_tpot(self, seconds: float) -> None:
        self.tpot.observe(seconds, tags=self._tags)

    def request_finished(self, finish_reason: str) -> None:
        self.finished.inc(1, tags={**self._tags, "finish_reason": finish_reason})

    def refused(self, code: str) -> None:
        """A refusal the engine does not count itself (e.g. the replica is draining)."""
        self.refusals.inc(1, tags={**self._tags, "code": code})

    def update(self, stats: EngineStats) -> None:
        """Set gauges from a snapshot and advance counters by the change since the last one."""
        t = self._tags
        self.waiting.set(stats.num_waiting, tags=t)
        self.running.set(stats.num_running, tags=t)
        self.kv_used.set(stats.num_total_blocks - stats.num_free_blocks, tags=t)
        self.kv_total.set(stats.num_total_blocks, tags=t)
        self.kv_usage.set(stats.kv_usage, tags=t)
        last = self._last
        for counter, field, tags in (
            (self.preemptions, "num_preemptions", t),
            (self.refusals, "num_refused", {**t, "code": "engine"}),
            (self.prompt_tokens, "prompt_tokens_total", t),
            (self.cached_tokens, "cached_prompt_tokens_total", t),
            (self.generation_tokens, "generation_tokens_total", t),
        ):
            now = getattr(stats, field)
            before = getattr(last, field) if last is not None else 0
            if now > before:  # counters only go up; a restarted engine starts again from 0
                counter.inc(now - before, tags=tags)
        self._last = stats


# The ingress's routes; any other path is tagged OTHER_ENDPOINT.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")
OTHER_ENDPOINT = "other"


class IngressMetrics:
    """HTTP-side counters of the ingress."""

    def __init__(self, backend: _MetricsBackend | None = None) -> None:
        m = backend or _serve_metrics()
        self.responses = m.Counter(
            "cbserve_http_responses_total",
            description="HTTP responses of the OpenAI ingress, by endpoint and status.",
            tag_keys=("endpoint", "status"),
        )

    def response(self, endpoint: str, status: int | str) -> None:
        """``status``: the HTTP status sent, or "client_disconnected" when the client left before one."""
        # The path comes from the client (401 and 413 are counted for any path): unknown ones
        # share one tag, so random paths cannot add Prometheus series without bound. Suffix
        # match: behind a Serve route prefix the path still starts with it.
        tag = next((e for e in ENDPOINTS if endpoint.endswith(e)), OTHER_ENDPOINT)
        self.responses.inc(1, tags={"endpoint": tag, "status": str(status)})
