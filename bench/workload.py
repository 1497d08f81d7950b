"""Seeded offline request sets: random token-id prompts, output lengths fixed per request.

Every method in ``bench.offline`` runs the same list, with EOS ignored, so each request
produces exactly ``max_tokens`` useful output tokens whichever way it is batched.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# Ids below this are special tokens in the SmolLM2 tokenizer (<|endoftext|>, <|im_start|>, ...).
_FIRST_PLAIN_ID = 100


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    prompt_len: tuple[int, int] = (64, 512)  # uniform, inclusive
    output_len: tuple[int, int] = (32, 256)  # uniform, inclusive
    vocab_size: int = 49152  # ids are drawn from [100, vocab_size)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if self.vocab_size <= _FIRST_PLAIN_ID:
            raise ValueError(f"vocab_size must be > {_FIRST_PLAIN_ID}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


def make_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """The same spec always gives the same requests."""
    rng = random.Random(spec.seed)
    out = []
    for _ in range(spec.num_requests):
        n_prompt = rng.randint(*spec.prompt_len)
        prompt = tuple(rng.randrange(_FIRST_PLAIN_ID, spec.vocab_size) for _ in range(n_prompt))
        out.append(BenchRequest(prompt, rng.randint(*spec.output_len)))
    return out


def useful_tokens(requests: list[BenchRequest]) -> int:
    """Output tokens the requests asked for: what counts, however many a method computed."""
    return sum(r.max_tokens for r in requests)


@dataclass(frozen=True)
class RunResult:
    """One method's run over a workload."""

    method: str
    elapsed_s: float
    useful_tokens: int  # output tokens the requests asked for
    computed_tokens: int  # output positions the method actually computed (padding waste included)
    outputs: tuple[tuple[int, ...], ...]  # each request's first max_tokens output ids, in request order

    @property
    def useful_tokens_per_s(self) -> float:
        return self.useful_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict:
        return {
            "method": self.method,
            "elapsed_s": round(self.elapsed_s, 4),
            "useful_tokens": self.useful_tokens,
            "computed_tokens": self.computed_tokens,
            "useful_tokens_per_s": round(self.useful_tokens_per_s, 2),
            "waste_fraction": round(1 - self.useful_tokens / max(1, self.computed_tokens), 4),
        }
