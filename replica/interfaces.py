"""The seams of the engine, as Protocols: what ``LLMEngine`` needs of a model runner and of a
detokenizer, and what a Serve replica (``deployments/llm.py``) needs of an engine.

The real implementations: ``ModelRunner`` (``model_runner.py``; a tensor-parallel group's rank 0
is one too), ``IncrementalDetokenizer`` (``detokenizer.py``), ``AsyncEngine``
(``async_engine.py``) and ``ProcessEngine`` (``engine_process.py``). Tests plug in fakes of the
same shape. Imports nothing at run time beyond typing, so the ingress may import it without torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from replica.outputs import Delta, EngineStats, RunnerOutput
    from replica.pending_step import PendingStep
    from replica.request import SamplingParams
    from replica.step import SchedulerOutput

Prompt = str | Sequence[int]


class Runner(Protocol):
    """Runs steps of a model over its own paged KV pool."""

    @property
    def block_size(self) -> int:
        """Tokens per KV block: must equal ``CacheConfig.block_size``."""
        ...

    @property
    def num_blocks(self) -> int | None:
        """Blocks in its pool (the block ids the scheduler hands out stay below it); None: no
        pool of its own (a test fake), ``CacheConfig.num_blocks`` decides."""
        ...

    @property
    def vocab_size(self) -> int:
        """Prompt token ids are checked against it."""
        ...

    @property
    def alive(self) -> bool:
        """False once it lost a part it needs (a tensor-parallel rank): no step can run any more."""
        ...

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step to completion (its inputs hold no placeholder token)."""
        ...

    def close(self) -> None:
        """Release what it holds beyond this process (tensor-parallel ranks)."""
        ...


@runtime_checkable
class PipelinedRunner(Runner, Protocol):
    """A runner that starts a step before the previous one's tokens reached the host (the engine
    uses async scheduling with one)."""

    def launch(self, out: SchedulerOutput, prev: PendingStep | None) -> PendingStep:
        """Start one step whose placeholder tokens are those ``prev`` samples; its own tokens
        reach the host at ``result()``."""
        ...


class Detokenizer(Protocol):
    """One request's incremental detokenizer: text per token, stop strings found on the way."""

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """The new text, and True when a stop string ended it (the text stops before it)."""
        ...

    def flush(self) -> str:
        """The text held back (an incomplete character, a possible stop-string prefix)."""
        ...


class ServingEngine(Protocol):
    """What a Serve replica drives: an ``AsyncEngine``, or a ``ProcessEngine`` (the same engine
    in a process of its own).

    Refusals raise ``EngineError`` subclasses (from ``add_request`` at once or from its stream's
    first item; from ``submit_checked`` when awaited); everything else about a request comes as
    ``Delta`` values, the last one with a ``finish_reason``.
    """

    @property
    def is_dead(self) -> bool:
        """True once the step loop died: every later request would fail."""
        ...

    async def start(self) -> None: ...

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Delta]:
        """Queue a request; its stream of deltas. Closing the stream aborts the request."""
        ...

    async def submit_checked(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        """Queue a request whose deltas go to ``on_delta`` on the event loop, in order. The
        caller owns the request's life: ``abort_nowait`` it when its consumer goes away."""
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if still read) ends with an ABORT delta."""
        ...

    def abort_nowait(self, request_id: str) -> None:
        """Abort a request whose consumer went away: no more deltas are delivered."""
        ...

    def stats(self) -> EngineStats: ...

    def cached_block_hashes(self, limit: int = 4096) -> list[int]: ...

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to the timeout), abort the rest."""
        ...
