"""What a request is: its sampling parameters, its state, and its counters."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from replica.errors import InvalidRequestError
from replica.grammar import GrammarSpec
from replica.outputs import FinishReason as FinishReason  # defined with the results; imported from here too

if TYPE_CHECKING:
    from replica.grammar import GrammarState
    from replica.outputs import TokenLogprobs

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_REPETITION_PENALTY = 10.0
MAX_N = 128  # sequences per request, as OpenAI
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs (and vLLM's default max_logprobs)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were freed; will recompute
    FORKED = "forked"  # n > 1: its prompt is computed; its n children (the choices) run on
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
    # Sequences sampled from the prompt (OpenAI's n). They share the prompt's KV blocks; choice i
    # samples with seed + i (vLLM's rule), so it reproduces a single request with that seed.
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Logit processing (replica/penalties.py). OpenAI's presence/frequency penalties count output
    # tokens; HF's repetition penalty, prompt and output tokens (divides a positive logit, multiplies
    # a negative one); logit_bias adds to the logits (token id -> bias in [-100, 100], given as a
    # mapping or pairs); min_p keeps tokens with at least min_p times the top token's probability.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    # Structured output (replica/grammar.py): the output must match this grammar; its rows are
    # masked by the request's matcher and take the eager path.
    guided: GrammarSpec | None = None
    # Log-probabilities (replica/logprobs.py): None = not asked; N = the sampled token's and the N most
    # likely alternatives' (0..MAX_LOGPROBS). ``prompt_logprobs``: the same for every prompt token
    # (OpenAI's echo), which turns prefix-cache reuse off for the request (its prompt logits are needed).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Derived: needs the token history (penalties) / changes the logits at all. Set on construction.
    uses_penalties: bool = field(default=False, init=False, repr=False, compare=False)
    processes_logits: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("max_tokens", "min_tokens", "top_k", "n"):
            if isinstance(getattr(self, name), bool):  # bool is an int subclass; True is no count
                raise _invalid(f"{name} must be an integer, got {getattr(self, name)!r}", name)
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise _invalid(f"{name} must be a number, got {getattr(self, name)!r}", name)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise _invalid(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise _invalid(f"n must be an integer in [1, {MAX_N}], got {self.n!r}", "n")
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
        if self.guided is not None and not isinstance(self.guided, GrammarSpec):
            raise _invalid("guided must be a GrammarSpec", "response_format")
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
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise _invalid(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}", name)
        if self.prompt_logprobs is not None and self.logprobs is None:
            raise _invalid("prompt_logprobs needs logprobs (the output's) as well", "prompt_logprobs")
        self._check_processing()

    def _check_processing(self) -> None:
        for name, lo, hi in (
            ("presence_penalty", -2.0, 2.0),
            ("frequency_penalty", -2.0, 2.0),
            ("min_p", 0.0, 1.0),
            ("repetition_penalty", 0.0, MAX_REPETITION_PENALTY),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise _invalid(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}", name)
        if self.repetition_penalty == 0:
            raise _invalid("repetition_penalty must be > 0 (1 is no penalty)", "repetition_penalty")
        bias = self.logit_bias
        pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
        if len(pairs) > MAX_LOGIT_BIAS:
            raise _invalid(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}", "logit_bias")
        norm: dict[int, float] = {}
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise _invalid("logit_bias must map token ids to numbers", "logit_bias")
            t, b = pair
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise _invalid(f"logit_bias keys must be non-negative token ids, got {t!r}", "logit_bias")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise _invalid(f"logit_bias values must be numbers in [-100, 100], got {b!r}", "logit_bias")
            norm[t] = float(b)
        object.__setattr__(self, "logit_bias", tuple(sorted((t, b) for t, b in norm.items() if b != 0)))
        penalties = self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
        object.__setattr__(self, "uses_penalties", penalties)
        processes = penalties or bool(self.logit_bias) or self.min_p > 0 or self.guided is not None
        object.__setattr__(self, "processes_logits", processes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of an n > 1 request: one sequence, seed + index."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)


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
    grammar: GrammarState | None = None  # the matcher of ``params.guided`` (set by the engine)
    # n > 1 (``params.n``): this request computes the prompt's full blocks, then forks into
    # ``children``, one per choice, which share those blocks (see Scheduler). A child knows its
    # ``parent`` and its choice ``index``.
    children: tuple[Request, ...] = field(default=(), repr=False)
    parent: Request | None = field(default=None, repr=False)
    index: int = 0
    # With ``params.prompt_logprobs``: entry i for prompt token i (None for the first, which nothing
    # predicts), filled chunk by chunk during prefill (set by the engine).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

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

    def make_children(self) -> None:
        """Build the n choices of an n > 1 request (not yet scheduled): same prompt (the same
        list, never mutated), ``params.for_choice(i)``, ids ``"<id> #<i>"`` (a space: never an
        id the ingress makes)."""
        if self.params.n > 1 and not self.children:
            self.children = tuple(
                Request(
                    request_id=f"{self.request_id} #{i}",
                    prompt_token_ids=self.prompt_token_ids,
                    params=self.params.for_choice(i),
                    arrival_time=self.arrival_time,
                    eos_token_ids=self.eos_token_ids,
                    parent=self,
                    index=i,
                )
                for i in range(self.params.n)
            )
