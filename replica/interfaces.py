"""The seams between the engine's parts, as Protocols: what the engine needs of a model runner
and a detokenizer, and what the Serve replica (``deployments/llm.py``) needs of an engine.

Signatures live here, not in DESIGN.md. The real implementations are ``ModelRunner``
(``model_runner.py``), ``IncrementalDetokenizer`` (``tokenizer.py``) and ``AsyncEngine``
(``async_engine.py``); tests plug in fakes of the same shape (``tests/replica/fakes.py``).
Imports nothing at run time beyond typing, so the ingress may use these without torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from replica.outputs import Delta, EngineStats, RunnerOutput
    from replica.pending_step import PendingStep
    from replica.request import SamplingParams
    from replica.step import SchedulerOutput

Prompt = str | Sequence[int]


class Runner(Protocol):
    """Runs steps on a model with its own paged KV pool."""

    @property
    def block_size(self) -> int:
        """Tokens per KV block: must equal CacheConfig.block_size."""
        ...

    @property
    def num_blocks(self) -> int | None:
        """Blocks in the runner's pool (block ids handed out must be below it); None: no pool
        of its own (a test fake), the engine takes CacheConfig.num_blocks."""
        ...

    @property
    def vocab_size(self) -> int:
        """Prompt token ids are checked against it."""
        ...

    @property
    def device(self) -> torch.device:
        """Where its KV pool lives (the engine warms up a CUDA runner)."""
        ...

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step to completion (no placeholder tokens)."""
        ...

    def launch(self, out: SchedulerOutput, prev: PendingStep | None) -> PendingStep:
        """Start one step whose placeholder tokens are the ones ``prev`` samples; its tokens
        reach the host at ``result()`` (the pipelined step)."""
        ...


class Detokenizer(Protocol):
    """One request's incremental detokenizer: text per token, stop strings found on the way."""

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """The new text; True when a stop string ended it (the text stops before it)."""
        ...

    def flush(self) -> str:
        """Text held back (an incomplete character, a possible stop-string prefix)."""
        ...


class ServingEngine(Protocol):
    """What a Serve replica drives: ``AsyncEngine``, or a fake in deployment tests.

    Refusals raise ``EngineError`` subclasses synchronously; everything else about a request
    comes as ``Delta`` values, the last one with ``finish_reason``.
    """

    @property
    def max_model_len(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def model_name(self) -> str: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def is_dead(self) -> bool: ...

    async def start(self) -> None: ...
    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Delta]: ...
    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None: ...
    async def abort(self, request_id: str) -> None: ...
    def abort_nowait(self, request_id: str) -> None: ...
    def stats(self) -> EngineStats: ...
    def cached_block_hashes(self, limit: int = 4096) -> list[int]: ...
    async def shutdown(self, drain_timeout_s: float = 30.0) -> None: ...
