"""build_app(args) -> Application: the import_path of deployments.yaml.

    serve run deployments.yaml                         # the file's args
    serve run deployments.app:build_app model=tiny:llama num_replicas=2

The graph: OpenAIIngress (HTTP, tokenize) --DeploymentHandle--> LLMReplica x N (one GPU each).
Arguments are validated here (unknown keys rejected) and turned into the engine's frozen
EngineConfig and Serve deployment options.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from deployments.auth import AuthSettings
from deployments.ingress import INGRESS_HEADROOM, IngressSettings, OpenAIIngress
from deployments.limits import RequestLimits
from deployments.llm import LLMReplica, ReplicaUserConfig
from deployments.tool_calls import ToolParserName
from replica.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineArgs(_Args):
    """Engine settings (replica/config.py); unset fields keep the engine's defaults."""

    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] | None = Field(
        default=None, description="Weights/activations dtype."
    )
    device: str | None = Field(
        default=None, description="auto | cpu | cuda | cuda:N (auto: cuda when Ray gave the replica a GPU, else cpu)."
    )
    max_model_len: int | None = Field(default=None, gt=0, description="Context length (default: the model's own).")
    seed: int | None = Field(default=None, description="Seed for dummy weights and unseeded sampling.")
    block_size: int | None = Field(default=None, gt=0, description="Tokens per KV block.")
    num_blocks: int | None = Field(
        default=None, gt=0, description="KV blocks in the pool (default: sized from memory)."
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Fraction of GPU memory for weights + KV cache."
    )
    cpu_cache_gib: float | None = Field(default=None, gt=0, description="KV cache size on CPU.")
    enable_prefix_caching: bool | None = Field(default=None, description="Reuse KV blocks of shared prompt prefixes.")
    watermark: float | None = Field(default=None, ge=0, lt=1, description="Fraction of blocks kept free at admission.")
    max_num_seqs: int | None = Field(default=None, gt=0, description="Requests running at once per replica.")
    max_num_batched_tokens: int | None = Field(default=None, gt=0, description="Token budget of one engine step.")
    max_waiting: int | None = Field(default=None, ge=0, description="Waiting queue bound per replica; beyond it: 429.")
    async_scheduling: bool | None = Field(
        default=None, description="Launch decode step N+1 before step N's tokens reach the host."
    )
    use_cuda_graphs: bool | None = Field(default=None, description="Replay decode steps from CUDA graphs.")
    max_graph_batch_size: int | None = Field(default=None, gt=0, description="Largest captured decode batch.")
    max_prefill_graph_tokens: int | None = Field(
        default=None, ge=0, description="Largest one-prompt prefill step replayed from a CUDA graph (0: none)."
    )
    attention_backend: Literal["auto", "torch", "triton"] | None = Field(
        default=None, description="Paged attention kernels."
    )
    warmup: bool | None = Field(
        default=None, description="CUDA: run throwaway requests at start (kernel JIT, allocator)."
    )
    tensor_parallel_size: int | None = Field(
        default=None,
        gt=0,
        description="GPUs (ranks) one replica's model is split over: heads and MLP columns per rank, one "
        "placement group of that many bundles per replica.",
    )

    def _pick(self, cls: type, **extra: Any) -> Any:
        fields = {f: getattr(self, f) for f in cls.__dataclass_fields__ if f in type(self).model_fields}
        return cls(**{k: v for k, v in {**fields, **extra}.items() if v is not None})


class AutoscalingArgs(_Args):
    """Serve autoscaling bounds for LLMReplica (replaces num_replicas)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float | None = Field(default=None, gt=0, description="Serve's default policy target.")
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)
    metrics_interval_s: float | None = Field(default=None, gt=0)
    look_back_period_s: float | None = Field(default=None, gt=0)
    policy: str | None = Field(
        default=None, description="Import path module:function of a custom policy (default: Serve's)."
    )
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= max_replicas")
        return self

    def serve_config(self) -> dict[str, Any]:
        cfg = self.model_dump(exclude={"policy", "policy_kwargs"}, exclude_none=True)
        if self.policy is not None:
            cfg["policy"] = {"policy_function": self.policy, "policy_kwargs": self.policy_kwargs}
        return cfg


class RouterArgs(_Args):
    """Serve request router of LLMReplica (default: Serve's power-of-two-choices)."""

    request_router_class: str = Field(description="Import path of a RequestRouter subclass.")
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: float | None = Field(default=None, gt=0)
    request_routing_stats_timeout_s: float | None = Field(default=None, gt=0)

    def serve_config(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class AppArgs(_Args):
    """Arguments of build_app (the ``args`` of an application in deployments.yaml)."""

    model: str = Field(
        default="default",
        description='"default" (embedded SmolLM2-135M-Instruct), "dummy:<shape>", "tiny:<arch>", HF id or path.',
    )
    served_model_name: str | None = Field(
        default=None, description="Model name clients send and /v1/models lists (default: model)."
    )
    engine: EngineArgs = Field(default_factory=EngineArgs)
    num_replicas: int = Field(default=1, ge=1, description="Fixed LLMReplica count (ignored with autoscaling).")
    autoscaling: AutoscalingArgs | None = Field(default=None, description="Autoscaling bounds instead of num_replicas.")
    num_gpus: float | Literal["auto"] = Field(
        default="auto", description='GPUs per replica; "auto": 1 where the cluster has GPUs, else 0.'
    )
    num_cpus: float = Field(default=1, ge=0, description="CPUs reserved per LLMReplica.")
    accelerator_resource: str | None = Field(
        default=None,
        description="Custom Ray resource (1 per replica, per rank with tensor parallelism) for placement, "
        "e.g. fake_gpu in tests.",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK",
        description="Placement group strategy of a tensor-parallel replica's bundles (STRICT_PACK: one node; "
        "PACK lets ranks spill onto other nodes).",
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        gt=0,
        description="Serve's per-replica cap (default: max_num_seqs + max_waiting + 1: one over the engine's capacity, so the engine's own queue-full refusal answers 429).",
    )
    replica: ReplicaUserConfig = Field(
        default_factory=ReplicaUserConfig, description="Live settings (user_config, no restart)."
    )
    router: RouterArgs | None = Field(default=None, description="Custom request router (KV-cache aware).")
    ingress_replicas: int = Field(default=1, ge=1, description="OpenAIIngress replicas.")
    ingress_num_cpus: float = Field(default=1, ge=0)
    replica_transport: Literal["grpc", "ray"] = Field(
        default="grpc",
        description="How the ingress calls LLM replicas: grpc (Serve's gRPC between deployments, the "
        "lower latency) or ray (Ray actor calls).",
    )
    serve_fast_path: bool = Field(
        default=True,
        description="Run each replica's code on Serve's own event loop (no per-message thread hop) and buffer its "
        "access log: Serve's throughput-optimised replica settings, set per deployment by the app.",
    )
    default_max_tokens: int | None = Field(
        default=None, ge=1, description="Chat max_tokens when a client sends none (default: rest of the context)."
    )
    tool_parser: ToolParserName = Field(
        default="auto", description="How tool calls are read from chat outputs (auto: from the chat template)."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=60, ge=0, description="How long Serve waits for in-flight requests before stopping a replica."
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="Request limits: body size, prompt tokens, max_tokens, stop strings, timeout.",
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings, description="Optional API keys (list, file or environment variable)."
    )

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> AppArgs:
        # A replica's engine drives one GPU per rank: more would be reserved and sit idle.
        if self.num_gpus != "auto" and self.num_gpus > 1:
            raise ValueError(
                f"num_gpus {self.num_gpus:g} is per rank and a rank uses one GPU; to spread one replica over "
                "several GPUs set engine.tensor_parallel_size (num_gpus: 1)"
            )
        return self

    def resolved_num_gpus(self) -> float:
        if self.num_gpus != "auto":
            return float(self.num_gpus)
        return 1.0 if _cluster_has_gpus() else 0.0

    def engine_config(self) -> EngineConfig:
        """The replica resolves device "auto" from the GPUs Ray gives it (see llm._placed), so
        a Serve config that overrides ray_actor_options still gets the right device."""
        e = self.engine
        return EngineConfig(
            model=ModelConfig(
                **{
                    k: v
                    for k, v in dict(
                        model=self.model,
                        dtype=e.dtype,
                        device=e.device,
                        max_model_len=e.max_model_len,
                        seed=e.seed,
                        served_name=self.served_model_name,
                    ).items()
                    if v is not None
                }
            ),
            cache=e._pick(CacheConfig),
            scheduler=e._pick(SchedulerConfig),
            runner=e._pick(RunnerConfig),
            parallel=e._pick(ParallelConfig),
        )


WORKER_NUM_CPUS = 1.0  # per tensor-parallel worker rank: its own process drives its GPU


def tp_bundles(actor_options: dict[str, Any], tensor_parallel_size: int) -> list[dict[str, float]]:
    """Placement group bundles of one tensor-parallel replica: the replica's own resources, then
    one bundle per worker rank with the same accelerator share and ``WORKER_NUM_CPUS``."""
    accel = {"GPU": float(actor_options.get("num_gpus") or 0), **actor_options.get("resources", {})}
    accel = {k: float(v) for k, v in accel.items() if v}
    first = {"CPU": float(actor_options.get("num_cpus") or 0), **accel}
    worker = {"CPU": WORKER_NUM_CPUS, **accel}
    return [{k: v for k, v in first.items() if v}] + [worker] * (tensor_parallel_size - 1)


def _cluster_has_gpus() -> bool:
    import ray

    try:
        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        pass
    return False


# Serve's replica-side throughput settings (what RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns on for
# replicas), read when a replica process starts: set here so that users need not know them.
# User code on Serve's own loop saves a cross-thread hand-off per streamed message.
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}
# Serve's gRPC between deployments caps a message at 4 MiB (both ends read this variable); a pump
# item carries every delta queued for one ingress (with logprobs, behind a slow consumer) and can
# be larger: a 6 MiB stream item failed with AioRpcError at the default.
GRPC_TRANSPORT_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(1024 * 2**20)}


def _routes_by_target(router_class: str) -> bool:
    """Whether the router sends a call that names ``target_replica_id`` to that replica only,
    which the multiplexed streams need (deployments/mux.py)."""
    from router.kv_router import KVCacheAwareRouter

    module, _, name = router_class.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, KVCacheAwareRouter)


def build_app(args: dict[str, Any] | None = None) -> Application:
    a = AppArgs.model_validate(args or {})
    num_gpus = a.resolved_num_gpus()
    engine_config = a.engine_config()

    actor_options: dict[str, Any] = {"num_cpus": a.num_cpus, "num_gpus": num_gpus}
    env = {
        **(SERVE_FAST_PATH_ENV if a.serve_fast_path else {}),
        **(GRPC_TRANSPORT_ENV if a.replica_transport == "grpc" else {}),
    }
    runtime_env = {"env_vars": env} if env else None
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    if a.accelerator_resource:
        actor_options["resources"] = {a.accelerator_resource: 1}
    sched = engine_config.scheduler
    options: dict[str, Any] = dict(
        ray_actor_options=actor_options,
        max_ongoing_requests=a.max_ongoing_requests or sched.max_num_seqs + sched.max_waiting + 1,
        user_config=a.replica.model_dump(),
        graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
    )
    tp = engine_config.parallel.tensor_parallel_size
    if tp > 1:
        # One placement group per replica: bundle 0 holds the replica (rank 0), bundles 1..N-1
        # the worker ranks it starts (deployments/tp_workers.py); Serve replaces the group as one.
        options["placement_group_bundles"] = tp_bundles(actor_options, tp)
        options["placement_group_strategy"] = a.placement_strategy
    if a.autoscaling is not None:
        options["autoscaling_config"] = a.autoscaling.serve_config()
        policy = options["autoscaling_config"].get("policy")
        if policy and policy["policy_function"].endswith(":QueueDepthAutoscalingPolicy"):
            # Named in its warning when replicas cannot be placed (too few CPUs/GPUs).
            # A tensor-parallel replica needs all its bundles (every rank's accelerator).
            need: dict[str, float] = {}
            for bundle in tp_bundles(actor_options, tp):
                for k, v in bundle.items():
                    need[k] = need.get(k, 0.0) + v
            policy["policy_kwargs"] = {
                "replica_resources": need,
                **policy["policy_kwargs"],
            }
    else:
        options["num_replicas"] = a.num_replicas
    if a.router is not None:
        options["request_router_config"] = a.router.serve_config()
    llm = LLMReplica.options(**options).bind(engine_config)

    settings = IngressSettings(
        model=a.model,
        served_model_name=a.served_model_name,
        default_max_tokens=a.default_max_tokens,
        tool_parser=a.tool_parser,
        limits=a.limits,
        auth=a.auth,
        stream_mode="mux"
        if a.router is not None and _routes_by_target(a.router.request_router_class)
        else "per_request",
        stream_interval=a.replica.stream_interval,
        replica_transport=a.replica_transport,
    )
    ingress_options: dict[str, Any] = dict(
        num_replicas=a.ingress_replicas,
        ray_actor_options={"num_cpus": a.ingress_num_cpus, **({"runtime_env": runtime_env} if runtime_env else {})},
    )
    if a.limits.max_concurrent_requests is not None:
        # Serve must let the excess reach the ingress, which answers 503 at once (the proxy would queue it).
        ingress_options["max_ongoing_requests"] = a.limits.max_concurrent_requests + INGRESS_HEADROOM
    ingress = OpenAIIngress.options(**ingress_options).bind(llm, settings.model_dump())
    return ingress
