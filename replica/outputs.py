"""Results that cross a boundary: runner -> engine -> caller (the step itself is ``replica.step``)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens reached (or the context is full)
    ABORT = "abort"  # aborted by the caller (disconnect, cancel, timeout)
    ERROR = "error"  # the engine failed while running it


class TokenLogprobs(NamedTuple):
    """One token's log-probability and its most likely alternatives (replica/logprobs.py says
    which distribution). Plain ints and floats: it crosses processes and Ray as it is."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...]  # most likely first
    top_logprobs: tuple[float, ...]


class RunnerOutput:
    """The tokens a step sampled: one row per request that had ``sample`` set, in the step's
    order (``request_ids[i]`` sampled ``token_ids[i]``). A decode step reads the rows as they
    are; ``sampled`` is the same as a dict, built on first use. A dict given to the constructor
    is taken as the rows, in its order. Only for requests that asked (else None): ``logprobs``
    of the sampled tokens, and ``prompt_logprobs`` as request -> (index of the first prompt
    token scored, one entry per prompt token from there)."""

    __slots__ = ("_sampled", "logprobs", "prompt_logprobs", "request_ids", "token_ids")

    def __init__(
        self,
        sampled: Mapping[str, int] | None = None,
        *,
        request_ids: Sequence[str] | None = None,
        token_ids: Sequence[int] | None = None,
        logprobs: dict[str, TokenLogprobs] | None = None,
        prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] | None = None,
    ) -> None:
        self._sampled: dict[str, int] | None = None
        if sampled is not None:
            if request_ids is not None or token_ids is not None:
                raise ValueError("give sampled or request_ids/token_ids, not both")
            self._sampled = dict(sampled)
            request_ids, token_ids = tuple(self._sampled), list(self._sampled.values())
        if request_ids is None or token_ids is None:
            raise ValueError("RunnerOutput needs sampled, or request_ids and token_ids together")
        if len(request_ids) != len(token_ids):
            raise ValueError(f"{len(request_ids)} request ids for {len(token_ids)} tokens")
        self.request_ids = request_ids
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs

    @property
    def sampled(self) -> dict[str, int]:
        if self._sampled is None:
            self._sampled = dict(zip(self.request_ids, self.token_ids))
        return self._sampled

    def tokens_for(self, request_ids: Sequence[str]) -> Sequence[int]:
        """The tokens of ``request_ids``, in that order (KeyError for one with no token)."""
        if self.request_ids is request_ids or self.request_ids == request_ids:
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


class ChoiceDelta(NamedTuple):
    """What one choice (sequence) of an n > 1 request gained: its ``finish_reason`` is set on
    its last."""

    index: int  # type: ignore[assignment]  # OpenAI's name; shadows tuple.index, which nothing calls
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    # As ``Delta``'s (only when the request asked): this choice's tokens' logprobs, and the
    # prompt's with the choice's first token (every choice carries them, as vLLM's echo).
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


class Delta(NamedTuple):
    """What one request gained in one step: new text and token ids; the last delta
    of a request carries ``finish_reason`` and ``usage``. A NamedTuple for the same reason
    as ``step.ScheduledChunk``: one per request per step.

    An n > 1 request's deltas carry their text in ``choices`` (one per choice that gained
    something, each with its own finish), ``text`` and ``token_ids`` stay empty; its last
    delta (``finish_reason`` set: the last choice's, or abort / error of the whole request)
    comes once every choice has finished, with the usage of all (prompt counted once)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None  # set with FinishReason.ERROR
    choices: tuple[ChoiceDelta, ...] = ()
    # Only for requests that asked (SamplingParams.logprobs / prompt_logprobs), else None:
    # one entry per token of ``text`` in order (a stop token, whose text is not output, has none),
    # and the prompt's, once, in the delta of the first output token (None for the first prompt token).
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Tokens gained, over every choice."""
        if self.choices:
            return sum(len(c.token_ids) for c in self.choices)
        return len(self.token_ids)


@dataclass(frozen=True)
class CompletionOutput:
    """A finished request, as ``LLMEngine.generate`` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    usage: Usage
    # n > 1: every choice, by index (the fields above are then those of choice 0, and usage
    # the whole request's); empty for n = 1.
    choices: tuple[CompletionOutput, ...] = ()


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
    """One Delta for several consecutive deltas of the same request, in order: text, token ids
    and logprobs concatenated (the prompt's logprobs kept); ``finish_reason``, ``usage`` and ``error`` from the last one. Streams use
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
        choices=_merge_choices(deltas) if any(d.choices for d in deltas) else (),
        logprobs=_concat_logprobs(deltas),
        prompt_logprobs=_first_prompt_logprobs(deltas),
    )


def _merge_choices(deltas: Sequence[Delta]) -> tuple[ChoiceDelta, ...]:
    """Per choice, in index order: text, ids and logprobs concatenated, the finish of its last."""
    by_index: dict[int, list[ChoiceDelta]] = {}
    for d in deltas:
        for c in d.choices:
            by_index.setdefault(c.index, []).append(c)
    merged = []
    for index in sorted(by_index):
        cs = by_index[index]
        if any(c.finish_reason is not None for c in cs[:-1]):
            raise ValueError(f"choice {index}: a finished choice delta can only be its last one merged")
        merged.append(
            ChoiceDelta(
                index,
                "".join(c.text for c in cs),
                tuple(t for c in cs for t in c.token_ids),
                cs[-1].finish_reason,
                _concat_logprobs(cs),
                _first_prompt_logprobs(cs),
            )
        )
    return tuple(merged)


def _concat_logprobs(parts: Sequence[Delta] | Sequence[ChoiceDelta]) -> tuple[TokenLogprobs, ...] | None:
    """The parts' token logprobs in order; None when none asked."""
    if all(p.logprobs is None for p in parts):
        return None
    return tuple(lp for p in parts if p.logprobs for lp in p.logprobs)


def _first_prompt_logprobs(
    parts: Sequence[Delta] | Sequence[ChoiceDelta],
) -> tuple[TokenLogprobs | None, ...] | None:
    """The prompt's logprobs (carried by one part at most), kept through a merge."""
    return next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None)
