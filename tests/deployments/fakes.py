"""Small in-process stand-ins for the engine, the tokenizer and the Serve handle.

They follow the DESIGN.md interfaces (AsyncEngine, Tokenizer) closely enough to test
the ingress and the replica logic fast, without Ray, torch or a model.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from typing import Any

from deployments.errors import ReplicaError
from deployments.llm import GenerateRequest, LLMServer, ModelInfo
from replica.config import EngineConfig
from replica.errors import EngineUnavailableError, QueueFullError, RequestTooLongError
from replica.outputs import Delta, EngineStats, Usage
from replica.request import FinishReason, SamplingParams

EOS = 2


class FakeTokenizer:
    """Byte-level: token = byte + 3; BOS 1, EOS 2."""

    eos_token_ids = frozenset({EOS})
    vocab_size = 259

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode()]
        return [1, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        if messages[-1]["role"] == "assistant" and add_generation_prompt and messages[-1]["content"] == "boom":
            raise ValueError("template refuses this conversation")
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))

    def decode(self, token_ids) -> str:
        return bytes(t - 3 for t in token_ids if t >= 3).decode(errors="replace")


class FakeEngine:
    """A ``ServingEngine`` (as AsyncEngine): random words, seeded; one token per step; blocks per request."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        max_model_len: int = 256,
        block_size: int = 4,
        num_blocks: int = 256,
        max_running: int = 2,
        max_waiting: int = 2,
    ) -> None:
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.blocks: dict[str, int] = {}  # request -> blocks held
        self.aborted: list[str] = []
        self.closed = False
        self.started = False
        self.is_dead = False
        self.shutdown_timeout: float | None = None
        self.fail_after: int | None = None  # emit an ERROR delta after this many tokens
        self.num_refused = 0
        self.gen_tokens = 0
        self.pause = asyncio.Event()  # cleared: every request waits before each token
        self.pause.set()

    async def start(self) -> None:
        self.started = True

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, *, stream_interval: int = 1
    ) -> AsyncIterator[Delta]:
        self.stream_intervals = getattr(self, "stream_intervals", []) + [stream_interval]
        if self.closed:
            raise EngineUnavailableError("engine is shutting down")
        if len(prompt) + params.max_tokens > self.max_model_len:
            self.num_refused += 1
            raise RequestTooLongError("too long", param="max_tokens")
        if len(self.blocks) >= self.max_running + self.max_waiting:
            self.num_refused += 1
            raise QueueFullError("queue full")
        self.blocks[request_id] = math.ceil(len(prompt) / self.block_size)
        return self._stream(request_id, prompt, params)

    async def _stream(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        rng = random.Random(params.seed if params.seed is not None else 0)
        n = 0
        while True:
            await self.pause.wait()
            await asyncio.sleep(0)
            if rid not in self.blocks:
                return  # aborted
            tok = rng.randrange(3 + 97, 3 + 123)  # a-z-ish bytes
            n += 1
            self.gen_tokens += 1
            if self.fail_after is not None and n > self.fail_after:
                self.blocks.pop(rid, None)
                yield Delta(rid, "", (), FinishReason.ERROR, error="device lost")
                return
            done = n >= params.max_tokens
            usage = Usage(len(prompt), n) if done else None
            yield Delta(rid, chr(tok - 3), (tok,), FinishReason.LENGTH if done else None, usage)
            if done:
                self.blocks.pop(rid, None)
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.blocks.pop(request_id, None)

    async def submit_checked(self, request_id: str, prompt: list[int], params: SamplingParams, on_delta) -> None:
        """AsyncEngine.submit_checked: the same refusals, deltas pushed to ``on_delta`` by a task."""
        stream = self.add_request(request_id, prompt, params)

        async def run() -> None:
            async for d in stream:
                on_delta(d)

        self.tasks = getattr(self, "tasks", [])
        self.tasks.append(asyncio.get_running_loop().create_task(run()))

    def abort_nowait(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.blocks.pop(request_id, None)

    def stats(self) -> EngineStats:
        used = sum(self.blocks.values())
        running = min(len(self.blocks), self.max_running)
        return EngineStats(
            num_waiting=len(self.blocks) - running,
            num_running=running,
            num_free_blocks=self.num_blocks - used,
            num_total_blocks=self.num_blocks,
            num_cached_blocks=0,
            block_size=self.block_size,
            num_preemptions=0,
            num_refused=self.num_refused,
            prompt_tokens_total=0,
            generation_tokens_total=self.gen_tokens,
            cached_prompt_tokens_total=0,
            tokens_per_s=0.0,
            num_steps=0,
            max_model_len=self.max_model_len,
        )

    def cached_block_hashes(self, limit: int) -> list[int]:
        return [11, 22, 33][:limit]

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self.closed = True
        self.shutdown_timeout = drain_timeout_s


class FakeMetric:
    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.values: list[tuple[float, dict]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        assert value > 0, "Prometheus counters only go up"
        self.values.append((value, tags or {}))

    def set(self, value: float, tags: dict | None = None) -> None:
        self.values.append((value, tags or {}))

    observe = set

    @property
    def last(self) -> float:
        return self.values[-1][0]

    @property
    def total(self) -> float:
        return sum(v for v, _ in self.values)


class FakeMetricsBackend:
    def __init__(self) -> None:
        self.metrics: dict[str, FakeMetric] = {}

    def _make(self, name: str, **kwargs: Any) -> FakeMetric:
        self.metrics[name] = FakeMetric(name, **kwargs)
        return self.metrics[name]

    Counter = Gauge = Histogram = _make


async def make_server(
    engine: FakeEngine | None = None, user_config: dict | None = None
) -> tuple[LLMServer, FakeEngine]:
    engine = engine or FakeEngine()
    server = object.__new__(LLMServer)
    await server.__init__(
        EngineConfig(), user_config, engine_factory=lambda cfg: engine, metrics_backend=FakeMetricsBackend()
    )
    return server, engine


class LocalClient:
    """LLMClient that calls an LLMServer in-process; closing the stream closes the replica's generator,
    as Serve's cancellation does."""

    def __init__(self, server: LLMServer) -> None:
        self.server = server
        self.requests: list[GenerateRequest] = []

    async def model_info(self) -> ModelInfo:
        return self.server.model_info()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta | ReplicaError]:
        self.requests.append(req)
        inner = self.server.generate(req)
        try:
            async for item in inner:
                yield item
        finally:
            await inner.aclose()
