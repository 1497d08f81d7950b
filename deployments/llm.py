"""LLMReplica: one Serve replica (one GPU) that owns one engine (``interfaces.ServingEngine``).

The ingress calls ``generate`` through a DeploymentHandle with ``stream=True`` and
gets ``Delta`` values back as the engine produces them. A refusal (bad parameter,
too long, queue full, draining) is yielded as a ``ReplicaError`` value instead of
raised, so it reaches the ingress typed and becomes the right HTTP status.

What the router reads: ``GenerateRequest`` is the only positional argument of
``generate`` (``pending_request.args[0]``) and carries ``prompt_token_ids``; replicas
report ``record_routing_stats()`` (free blocks, queue, cached prefix hashes).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.errors import ReplicaError
from deployments.metrics import ReplicaMetrics
from deployments.mux import AbortRequest, Outboxes, PumpRequest, Submitted
from deployments.tp_workers import TPWorkers
from replica.config import EngineConfig
from replica.errors import EngineError, EngineUnavailableError
from replica.interfaces import ServingEngine
from replica.outputs import Delta, EngineStats
from replica.request import FinishReason, SamplingParams
from router.stats import DEFAULT_MAX_PREFIX_HASHES, build_routing_stats

logger = logging.getLogger("ray.serve")


# ------------------------------------------------------------- wire types


@dataclass(frozen=True)
class GenerateRequest:
    """What the ingress sends to a replica: tokens, not text (the router hashes them by block)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0  # time.time() at the ingress


@dataclass(frozen=True)
class ModelInfo:
    name: str  # served name (/v1/models)
    model: str  # the model source (HF id, path, "default", "tiny:llama"...)
    max_model_len: int
    block_size: int


@dataclass(frozen=True)
class ReplicaStats:
    replica_id: str
    engine: EngineStats
    num_inflight: int  # generate() calls in progress on this replica
    draining: bool


class ReplicaUserConfig(BaseModel):
    """Settings that change without a restart (Serve ``user_config`` -> ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")

    drain_timeout_s: float = Field(default=30.0, ge=0, description="How long shutdown waits for running requests.")
    metrics_interval_s: float = Field(default=1.0, gt=0, description="Period of engine-stats gauges.")
    routing_num_block_hashes: int = Field(
        default=DEFAULT_MAX_PREFIX_HASHES,
        ge=0,
        description="Cached prefix block hashes reported to the router per stats call.",
    )
    log_requests: bool = Field(default=False, description="Log each request's start and finish at INFO.")
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Tokens per stream item after the first token (1: every step's tokens at once). Larger "
        "values cut per-token work in the replica, the ingress and the proxy; the first token is never held.",
    )


async def _default_engine(config: EngineConfig) -> ServingEngine:
    # Imported here: torch and the engine load only inside replicas, not in the ingress or router.
    from replica.async_engine import AsyncEngine
    from replica.tensor_parallel import load_engine_model

    if config.model.device != "cpu" and _engine_process_wanted(config):
        # The step loop in its own process (replica/engine_process.py): no GIL shared with
        # Serve's per-request and per-item work. It loads the model itself.
        from replica.engine_process import ProcessEngine

        return ProcessEngine(config)

    loaded = await asyncio.to_thread(load_engine_model, config)  # slow (weights); keep the loop alive
    if config.parallel.tensor_parallel_size > 1:  # waits for the worker ranks to load theirs
        return await asyncio.to_thread(AsyncEngine, config, loaded=loaded)
    return AsyncEngine(config, loaded=loaded)


def _engine_process_wanted(config: EngineConfig) -> bool:
    """A separate engine process where the replica drives a GPU (CBSERVE_ENGINE_PROCESS=0|1 overrides)."""
    import os

    forced = os.environ.get("CBSERVE_ENGINE_PROCESS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        import ray

        return bool(ray.is_initialized() and ray.get_gpu_ids())
    except Exception:
        return False


class LLMServer:
    """The replica's logic, independent of Serve (tests build it with a fake engine)."""

    async def __init__(
        self,
        engine_config: EngineConfig,
        user_config: dict[str, Any] | None = None,
        *,
        engine_factory: Callable[[EngineConfig], ServingEngine | Awaitable[ServingEngine]] | None = None,
        metrics_backend: Any = None,
    ) -> None:
        engine_config = _placed(engine_config)
        # Tensor parallelism: worker ranks in this replica's placement group (rank 0 is the engine).
        self._tp_workers = TPWorkers.start(engine_config)
        if self._tp_workers is not None:
            engine_config = self._tp_workers.config
        self._config = engine_config
        self._settings = ReplicaUserConfig.model_validate(user_config or {})
        factory = engine_factory or _default_engine
        try:
            engine = factory(engine_config)
            self._engine: ServingEngine = await engine if inspect.isawaitable(engine) else engine
            await self._engine.start()
        except BaseException:
            if self._tp_workers is not None:
                self._tp_workers.stop()
            raise
        stats = self._engine.stats()
        model_cfg = engine_config.model
        self._info = ModelInfo(
            name=model_cfg.served_name or model_cfg.model,
            model=model_cfg.model,
            max_model_len=stats.max_model_len,
            block_size=stats.block_size,
        )
        self._metrics = ReplicaMetrics(self._info.name, backend=metrics_backend)
        self._draining = False
        self._inflight = 0
        self._replica_id = _replica_id()
        self._live: set[str] = set()  # submitted (multiplexed) requests not finished yet
        self._outboxes = Outboxes(self._abort_live)
        self._metrics_task = asyncio.get_running_loop().create_task(self._metrics_loop())
        logger.info("LLM replica %s ready: %s", self._replica_id, self._info)

    # ---------------------------------------------------------------- serving

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta | ReplicaError]:
        """Stream the request's deltas; yields one ReplicaError instead of raising on refusal.

        If the caller goes away (disconnect, cancel), Serve cancels this generator:
        the engine request is aborted in ``finally`` so its KV blocks are freed at once.
        """
        if self._draining:
            self._metrics.refused(EngineUnavailableError.code)
            yield ReplicaError(EngineUnavailableError.code, "replica is draining; retry on another replica")
            return
        try:
            stream = self._engine.add_request(
                req.request_id, list(req.prompt_token_ids), req.params, stream_interval=self._settings.stream_interval
            )
        except EngineError as exc:
            # Engine refusals are counted by the engine itself (EngineStats.num_refused).
            yield ReplicaError.from_exception(exc)
            return
        self._inflight += 1
        watch = _Watch(self, req)
        finished = False
        if self._settings.log_requests:
            logger.info("request %s: %d prompt tokens, %s", req.request_id, len(req.prompt_token_ids), req.params)
        try:
            async for delta in _refusals_as_errors(stream):
                if isinstance(delta, ReplicaError):  # refused by an engine process (its ack)
                    finished = True
                    yield delta
                    return
                watch.observe(delta)
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            self._inflight -= 1
            if not finished:
                # Disconnect / cancel (CancelledError, GeneratorExit) or an engine failure.
                logger.info("request %s: aborted by the caller", req.request_id)
                await self._abort(req.request_id)

    # ---------------------------------------------------------------- multiplexed serving (deployments/mux.py)

    async def submit(self, req: GenerateRequest, channel: str) -> Submitted | ReplicaError:
        """Admit a request whose deltas go out on ``channel``'s pump; a refusal is returned."""
        if self._draining:
            self._metrics.refused(EngineUnavailableError.code)
            return ReplicaError(EngineUnavailableError.code, "replica is draining; retry on another replica")
        sink = self._outboxes.sink(channel, req.request_id)
        watch = _Watch(self, req)

        def on_delta(delta: Delta) -> None:
            watch.observe(delta)
            if delta.finish_reason is not None:
                self._live.discard(req.request_id)
            sink(delta)

        self._live.add(req.request_id)  # before any await: its finish may arrive with the ack
        try:
            await self._engine.submit_checked(req.request_id, list(req.prompt_token_ids), req.params, on_delta)
        except EngineError as exc:
            self._live.discard(req.request_id)
            self._outboxes.forget(channel, req.request_id)
            return ReplicaError.from_exception(exc)
        if self._settings.log_requests:
            logger.info("request %s: %d prompt tokens, %s", req.request_id, len(req.prompt_token_ids), req.params)
        return Submitted(self._replica_id)

    async def pump(self, target: PumpRequest) -> AsyncIterator[list[Delta] | ReplicaError]:
        """The stream of every delta for ``target.channel``, batched per wake-up."""
        if target.target_replica_id != self._replica_id:  # a router that ignored the target
            yield ReplicaError(
                EngineUnavailableError.code,
                f"pump for replica {target.target_replica_id} reached {self._replica_id}: the router must "
                "honour target_replica_id (router.kv_router.KVCacheAwareRouter does)",
            )
            return
        async for batch in self._outboxes.pump(target.channel):
            yield batch

    async def abort_request(self, target: AbortRequest) -> None:
        """The ingress's client went away: free the request's blocks now."""
        if target.request_id in self._live:
            logger.info("request %s: aborted by the caller", target.request_id)
        self._abort_live(target.request_id)

    def _abort_live(self, request_id: str) -> None:
        self._live.discard(request_id)
        self._engine.abort_nowait(request_id)

    def _on_finish(self, req: GenerateRequest, delta: Delta, first_at: float | None) -> None:
        assert delta.finish_reason is not None
        self._metrics.request_finished(delta.finish_reason.value)
        n_out = (delta.usage.completion_tokens if delta.usage else 0) // req.params.n  # per sequence
        if first_at is not None and n_out > 1:
            self._metrics.observe_tpot((time.perf_counter() - first_at) / (n_out - 1))
        if delta.finish_reason is FinishReason.ERROR:
            logger.error("request %s failed in the engine: %s", req.request_id, delta.error)
        elif self._settings.log_requests:
            logger.info("request %s: finished (%s), %s", req.request_id, delta.finish_reason.value, delta.usage)

    async def _abort(self, request_id: str) -> None:
        try:
            # Shielded: a second cancellation must not leave the blocks held.
            await asyncio.shield(self._engine.abort(request_id))
        except asyncio.CancelledError:
            pass
        except Exception:  # abort is best effort; never mask the caller's own exit
            logger.exception("request %s: abort failed", request_id)

    # ---------------------------------------------------------------- info and stats

    def model_info(self) -> ModelInfo:
        return self._info

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            replica_id=self._replica_id,
            engine=self._engine.stats(),
            num_inflight=self._inflight + len(self._live),
            draining=self._draining,
        )

    def record_routing_stats(self) -> dict[str, Any]:
        """Pulled by Serve every ``request_routing_stats_period_s``; read by router.kv_router.
        The dict's shape (keys, timestamp, bounded prefix summary) is router.stats'."""
        s = self._engine.stats()
        n = self._settings.routing_num_block_hashes
        return build_routing_stats(
            block_size=s.block_size,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            draining=self._draining,
            prefix_hashes=self._engine.cached_block_hashes(n),
            max_prefix_hashes=n,
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Pulled by Serve for custom autoscaling policies: numbers only."""
        s = self._engine.stats()
        return {
            "num_waiting": float(s.num_waiting),
            "num_running": float(s.num_running),
            "queue_depth": float(s.num_waiting + s.num_running),
            "kv_usage": float(s.kv_usage),
        }

    # ---------------------------------------------------------------- lifecycle

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with ``user_config`` at start and on every change (no restart)."""
        self._settings = ReplicaUserConfig.model_validate(user_config or {})

    def check_health(self) -> None:
        """Serve restarts the replica if this raises: the engine's step loop died (a bug or a
        broken device), so every request would fail."""
        if self._engine.is_dead:
            raise RuntimeError(f"engine step loop is dead on replica {self._replica_id}")
        if self._tp_workers is not None:
            self._tp_workers.check()

    async def shutdown(self) -> None:
        """Refuse new requests, let running ones finish (bounded), stop the engine."""
        if self._draining:
            return
        self._draining = True
        self._metrics_task.cancel()
        logger.info("replica %s draining (%d in flight)", self._replica_id, self._inflight + len(self._live))
        await self._engine.shutdown(drain_timeout_s=self._settings.drain_timeout_s)
        if self._tp_workers is not None:
            self._tp_workers.stop()

    async def _metrics_loop(self) -> None:
        while True:
            try:
                self._outboxes.reap()
                self._metrics.update(self._engine.stats())
            except Exception:
                logger.exception("metrics update failed")
            await asyncio.sleep(self._settings.metrics_interval_s)


class _Watch:
    """One request's TTFT and TPOT metrics and finish log, observed from its deltas in order
    (the same for a streamed ``generate`` and a multiplexed ``submit``)."""

    __slots__ = ("_first_at", "_req", "_server", "_start")

    def __init__(self, server: LLMServer, req: GenerateRequest) -> None:
        self._server, self._req = server, req
        self._start = time.perf_counter()
        self._first_at: float | None = None

    def observe(self, delta: Delta) -> None:
        if self._first_at is None and delta.num_tokens:
            self._first_at = time.perf_counter()
            self._server._metrics.observe_ttft(self._first_at - self._start)
        if delta.finish_reason is not None:
            self._server._on_finish(self._req, delta, self._first_at)


async def _refusals_as_errors(stream: AsyncIterator[Delta]) -> AsyncIterator[Delta | ReplicaError]:
    try:
        async for d in stream:
            yield d
    except EngineError as exc:
        yield ReplicaError.from_exception(exc)


def _placed(config: EngineConfig) -> EngineConfig:
    """device "auto" inside Ray: CUDA only if Ray assigned this replica a GPU. Ray leaves
    CUDA_VISIBLE_DEVICES alone for actors with num_gpus=0, so "auto" alone would grab GPU 0."""
    if config.model.device != "auto":
        return config
    try:
        import ray

        if not ray.is_initialized() or ray.get_gpu_ids():
            return config
    except Exception:
        return config
    return replace(config, model=replace(config.model, device="cpu"))


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests)
        return f"local-{uuid.uuid4().hex[:12]}"


class _ServeLLMServer(LLMServer):
    async def __del__(self) -> None:
        # Serve calls this after it stopped routing here and waited for ongoing requests
        # (graceful_shutdown_timeout_s); kept off LLMServer so plain objects GC quietly.
        await self.shutdown()


# Serve deployment; app.py sets replicas, resources and the router through .options().
LLMReplica = serve.deployment(
    name="LLMReplica",
    health_check_period_s=10,
    graceful_shutdown_timeout_s=60,
)(_ServeLLMServer)
