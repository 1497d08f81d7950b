"""What a request is: its sampling parameters, its state, and its counters."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from replica.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens reached (or the context is full)
    ABORT = "abort"  # aborted by the caller (disconnect, cancel, timeout)
    ERROR = "error"  # the engine failed while running it


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were freed; will recompute
    FINISHED = "finished"


def _invalid(msg: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(msg, param=param)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None  # per-request RNG: same seed, same output, whatever shares the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("max_tokens", "min_tokens", "top_k"):
            if isinstance(getattr(self, name), bool):  # bool is an int subclass; True is no count
                raise _invalid(f"{name} must be an integer, got {getattr(self, name)!r}", name)
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise _invalid(f"{name} must be a number, got {getattr(self, name)!r}", name)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise _invalid(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise _invalid(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", "min_tokens")
        if self.min_tokens > self.max_tokens:
            raise _invalid(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise _invalid(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise _invalid(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise _invalid(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}", "top_k")
        if self.seed is not None and not isinstance(self.seed, int):
            raise _invalid(f"seed must be an integer, got {self.seed!r}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _invalid(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _invalid("stop strings must be non-empty strings", "stop")
            if len(s) > MAX_STOP_STRING_LEN:
                raise _invalid(f"stop strings must be at most {MAX_STOP_STRING_LEN} characters", "stop")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise _invalid(f"stop_token_ids must be non-negative integers, got {t!r}", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    """One generation request as the scheduler and engine see it.

    ``all_token_ids`` is prompt + output; the tokens still to be computed are
    ``all_token_ids[num_computed_tokens:]``. Preemption resets
    ``num_computed_tokens`` (and frees ``block_table``) but keeps the outputs, so a
    recompute is lossless.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_total_tokens(self) -> int:
        """Tokens this request may occupy in the KV cache at its longest."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
