"""Engine configuration: one frozen dataclass per layer, derived values as properties.

Pydantic lives only at the edges (HTTP, Serve arguments); inside the engine every
config is a frozen dataclass validated in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how.

    ``model`` is a Hugging Face id or local path, ``"default"`` (the embedded
    SmolLM2-135M-Instruct), or ``"dummy:<shape>"`` (real architecture, random
    weights; see ``replica.models``).
    """

    model: str = "default"
    dtype: str = "auto"  # auto | float32 | float64 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0  # seed for dummy weights and for unseeded sampling
    served_name: str | None = None  # name reported by /v1/models

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must be a non-empty string")
        _require(
            self.dtype in {"auto", "float32", "float64", "bfloat16", "float16"},
            f"dtype must be one of auto, float32, float64, bfloat16, float16; got {self.dtype!r}",
        )
        _require(self.max_model_len is None or self.max_model_len > 0, "max_model_len must be > 0")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache.

    ``num_blocks`` fixes the pool size (tests, CPU); when None the pool is sized from
    free accelerator memory times ``gpu_memory_utilization`` (CUDA) or from
    ``cpu_cache_gib`` (CPU).
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    # Fraction of all blocks kept free when admitting a new request, so running
    # requests can grow a little before anyone must be preempted.
    watermark: float = 0.01

    def __post_init__(self) -> None:
        _require(self.block_size > 0, "block_size must be > 0")
        _require(self.num_blocks is None or self.num_blocks > 0, "num_blocks must be > 0")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]")
        _require(self.cpu_cache_gib > 0, "cpu_cache_gib must be > 0")
        _require(0 <= self.watermark < 1, "watermark must be in [0, 1)")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 1024  # bounded waiting queue; beyond it add_request raises QueueFullError
    # Schedule and launch step N+1 before step N's tokens reach the host (decode steps only),
    # so the host's bookkeeping for step N runs while the GPU computes N+1. Same outputs.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "max_num_seqs must be > 0")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens must be > 0")
        _require(self.max_waiting >= 0, "max_waiting must be >= 0")


@dataclass(frozen=True)
class RunnerConfig:
    """Model runner knobs that do not change results."""

    use_cuda_graphs: bool = True  # CUDA only; decode steps replayed from captured graphs
    max_graph_batch_size: int = 512
    # A step of one prompt chunk up to this many tokens replays a CUDA graph of its forward
    # (padded to a power of two, at most 1024; replica.prefill_graphs). Below 16: eager.
    max_prefill_graph_tokens: int = 512
    attention_backend: str = "auto"  # auto | torch | triton
    # CUDA: run throwaway requests at start (kernel JIT, cuBLAS heuristics, allocator growth)
    # so the first user request does not pay for them.
    warmup: bool = True

    def __post_init__(self) -> None:
        _require(
            self.attention_backend in {"auto", "torch", "triton"},
            "attention_backend must be auto, torch or triton",
        )
        _require(self.max_prefill_graph_tokens >= 0, "max_prefill_graph_tokens must be >= 0")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism inside one replica (``replica.tensor_parallel``).

    With ``tensor_parallel_size`` N > 1 the engine is rank 0 of N processes, each holding 1/N of
    every attention and MLP layer and its own paged KV cache of 1/N of the KV heads.
    ``init_method`` (``tcp://host:port``) names a rendezvous whose ranks 1..N-1 were started by
    someone else (Ray actors of the replica's placement group); None: the engine starts them as
    local processes. ``timeout_s`` bounds every collective, so a dead rank fails a step instead
    of hanging it.
    """

    tensor_parallel_size: int = 1
    init_method: str | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1")
        _require(self.timeout_s > 0, "timeout_s must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
