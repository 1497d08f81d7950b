"""What each load-test request asks for: prompt text and output length.

Lengths come from a small spec language so they fit on a command line:

- ``fixed:N``         every request uses N tokens
- ``uniform:LO:HI``   uniform integer in [LO, HI]
- ``dataset``         from the prompt set (``prompts.json`` by default): its text for the
                      input, its ``output_len`` for the output

Synthetic prompts (``fixed``/``uniform`` input) are built from common English words that
are one token each in the usual BPE vocabularies (a leading space included), so N words are
about N prompt tokens; the server's ``usage.prompt_tokens`` is recorded as the true count.
No tokenizer is needed on the load-generating machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPT_FILE = Path(__file__).with_name("prompts.json")

# One BPE token each (with the leading space) in GPT-2/Llama/SmolLM-style vocabularies.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "are",
    "be",
    "this",
    "have",
    "not",
    "but",
    "had",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "can",
    "there",
    "an",
    "their",
    "been",
    "has",
    "more",
    "if",
    "will",
    "who",
    "would",
    "so",
    "what",
    "up",
    "out",
    "about",
    "into",
    "than",
    "them",
    "some",
    "could",
    "other",
    "time",
    "these",
    "two",
    "may",
    "then",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "small",
    "house",
    "light",
    "water",
    "place",
    "city",
    "river",
    "road",
    "stone",
    "tree",
    "field",
    "music",
    "story",
    "table",
    "window",
    "garden",
    "morning",
    "night",
]


@dataclass(frozen=True)
class LengthSpec:
    """A length distribution parsed from ``fixed:N``, ``uniform:LO:HI`` or ``dataset``."""

    kind: str  # fixed | uniform | dataset
    low: int = 0
    high: int = 0

    @classmethod
    def parse(cls, spec: str, *, what: str = "length") -> LengthSpec:
        parts = spec.strip().split(":")
        kind = parts[0].lower()
        try:
            if kind == "fixed" and len(parts) == 2:
                n = int(parts[1])
                result = cls("fixed", n, n)
            elif kind == "uniform" and len(parts) == 3:
                result = cls("uniform", int(parts[1]), int(parts[2]))
            elif kind == "dataset" and len(parts) == 1:
                return cls("dataset")
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad {what} spec {spec!r}: expected fixed:N, uniform:LO:HI or dataset") from None
        if result.low < 1 or result.high < result.low:
            raise ValueError(f"bad {what} spec {spec!r}: need 1 <= LO <= HI")
        return result

    def sample(self, rng: random.Random) -> int:
        if self.kind == "dataset":
            raise ValueError("a dataset length has no distribution of its own; sample a prompt entry")
        return self.low if self.kind == "fixed" else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    output_len: int | None = None


def load_prompt_set(path: str | Path = DEFAULT_PROMPT_FILE) -> tuple[PromptEntry, ...]:
    """Read a prompt set: a JSON list of ``{"prompt": str, "output_len": int?}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read prompt set {path}: {e}") from e
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"prompt set {path} must be a non-empty JSON list")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise ValueError(f"prompt set {path}, entry {i}: needs a non-empty string 'prompt'")
        out = item.get("output_len")
        if out is not None and (not isinstance(out, int) or out < 1):
            raise ValueError(f"prompt set {path}, entry {i}: 'output_len' must be a positive int")
        unknown = set(item) - {"prompt", "output_len"}
        if unknown:
            raise ValueError(f"prompt set {path}, entry {i}: unknown keys {sorted(unknown)}")
        entries.append(PromptEntry(item["prompt"], out))
    return tuple(entries)


def synthetic_prompt(num_words: int, rng: random.Random) -> str:
    """About ``num_words`` tokens of random words (random, so prefix caches don't hit by accident)."""
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    max_tokens: int
    target_input_len: int | None  # words asked for (synthetic prompts); None for dataset prompts


class Workload:
    """Draws (prompt, max_tokens) pairs from the configured distributions."""

    def __init__(
        self,
        input_len: LengthSpec,
        output_len: LengthSpec,
        *,
        prompt_set: tuple[PromptEntry, ...] = (),
        shared_prefix_len: int = 0,
        default_output_len: int = 128,
        seed: int = 0,
    ) -> None:
        if input_len.kind == "dataset" and not prompt_set:
            raise ValueError("input length 'dataset' needs a prompt set")
        if output_len.kind == "dataset" and input_len.kind != "dataset":
            raise ValueError("output length 'dataset' needs input length 'dataset' too")
        if shared_prefix_len < 0:
            raise ValueError("shared prefix length must be >= 0")
        self.input_len = input_len
        self.output_len = output_len
        self.prompt_set = prompt_set
        self.default_output_len = default_output_len
        # The shared prefix is the same for every user (seeded apart from per-user draws), so
        # prefix caching and a KV-cache-aware router have something to find.
        self.shared_prefix = synthetic_prompt(shared_prefix_len, random.Random(seed)) if shared_prefix_len else ""

    def sample(self, rng: random.Random) -> WorkItem:
        if self.input_len.kind == "dataset":
            entry = rng.choice(self.prompt_set)
            text, target = entry.prompt, None
            if self.output_len.kind == "dataset":
                max_tokens = entry.output_len or self.default_output_len
            else:
                max_tokens = self.output_len.sample(rng)
        else:
            target = self.input_len.sample(rng)
            text = synthetic_prompt(target, rng)
            max_tokens = self.output_len.sample(rng)
        if self.shared_prefix:
            text = f"{self.shared_prefix} {text}"
        return WorkItem(text, max_tokens, target)
