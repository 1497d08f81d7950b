"""Results that cross a boundary: runner -> engine -> caller (the step itself is in ``step.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from replica.request import FinishReason


class RunnerOutput:
    """The token sampled for each request that had ``sample`` set, in chunk order: as a dict
    (``sampled``), or as two row-ordered sequences that a decode step reads without building
    the dict (``request_ids`` / ``token_ids``)."""

    __slots__ = ("_sampled", "request_ids", "token_ids")

    def __init__(
        self,
        sampled: dict[str, int] | None = None,
        *,
        request_ids: Sequence[str] | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> None:
        if (request_ids is None) != (token_ids is None):
            raise ValueError("give request_ids and token_ids together")
        if request_ids is not None and len(request_ids) != len(token_ids):  # type: ignore[arg-type]
            raise ValueError(f"{len(request_ids)} request ids for {len(token_ids)} tokens")  # type: ignore[arg-type]
        if sampled is None and request_ids is None:
            raise ValueError("RunnerOutput needs sampled or request_ids/token_ids")
        self._sampled = sampled
        self.request_ids = request_ids
        self.token_ids = token_ids

    @property
    def sampled(self) -> dict[str, int]:
        if self._sampled is None:
            self._sampled = dict(zip(self.request_ids, self.token_ids))  # type: ignore[arg-type]
        return self._sampled

    def tokens_for(self, request_ids: Sequence[str]) -> Sequence[int]:
        """The tokens of ``request_ids``, in that order (KeyError for one with no token)."""
        if self.token_ids is not None and (self.request_ids is request_ids or self.request_ids == request_ids):
            return self.token_ids
        sampled = self.sampled
        return [sampled[r] for r in request_ids]

    def __repr__(self) -> str:
        return f"RunnerOutput({self.sampled!r})"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Delta(NamedTuple):
    """What one request gained in one step: new text and token ids; the last delta
    of a request carries ``finish_reason`` and ``usage``. A NamedTuple for the same reason
    as ``ScheduledChunk``: one per request per step."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None  # set with FinishReason.ERROR

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class CompletionOutput:
    """A finished request, as ``LLMEngine.generate`` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine, cheap to build; what replicas report to the router."""

    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int  # blocks holding a reusable prefix (in use or evictable)
    block_size: int
    num_preemptions: int  # since start
    num_refused: int  # since start: never-fit + queue-full refusals
    prompt_tokens_total: int
    generation_tokens_total: int
    cached_prompt_tokens_total: int
    tokens_per_s: float  # output tokens/s over a recent window
    num_steps: int
    max_model_len: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


def merge_deltas(deltas: Sequence[Delta]) -> Delta:
    """One Delta for several consecutive deltas of the same request, in order: text and token
    ids concatenated; ``finish_reason``, ``usage`` and ``error`` from the last one. Streams use
    it to send what queued up while the consumer was busy as one item (fewer Ray items and SSE
    events per token at high token rates). Only the last delta may be finished."""
    if not deltas:
        raise ValueError("merge_deltas needs at least one delta")
    if len(deltas) == 1:
        return deltas[0]
    first, last = deltas[0], deltas[-1]
    for d in deltas:
        if d.request_id != first.request_id:
            raise ValueError(f"cannot merge deltas of different requests: {first.request_id!r} and {d.request_id!r}")
    if any(d.finished for d in deltas[:-1]):
        raise ValueError(f"request {first.request_id!r}: a finished delta can only be the last one merged")
    return Delta(
        request_id=first.request_id,
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        finish_reason=last.finish_reason,
        usage=last.usage,
        error=last.error,
    )
