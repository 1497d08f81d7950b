"""Structured outputs (constrained decoding) through xgrammar.

A request's ``SamplingParams.guided`` (a ``GrammarSpec``: a JSON schema, any JSON object, a regex,
a list of choices, or an xgrammar structural tag: how tool_choice "required" or a named function
forces the model's own tool-call format) is compiled once per distinct spec by the engine's
``GrammarCache`` when the request is made (off the step loop; an LRU keyed by the spec's
canonical text), and the request gets its own ``GrammarState`` (an ``xgrammar.GrammarMatcher``).
At each sampling step the sampler masks that row's logits with the matcher's token bitmask (rows
without a grammar cost nothing); the scheduler's ``update`` accepts the sampled token into the
matcher and finishes the request (``stop``) once the matcher terminates.

The bitmask of step N+1 needs step N's token accepted first: grammar rows never take the CUDA-graph
decode path (see ``DecodeBatch.needs_host``), and an eager step is computed at ``result()``,
after the previous step's ``update`` (``pending_step.DeferredStep``). ``GrammarState.fill`` checks
that order (the matcher must have accepted exactly the row's earlier outputs).

xgrammar is imported lazily: a replica that never sees a grammar never loads it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from replica.errors import InvalidRequestError

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. ``spec``: the canonical JSON of a schema (``json_schema``),
    ``""`` (``json_object``: any JSON object), a regex (``regex``), the canonical JSON list of
    allowed strings (``choice``), or an xgrammar structural tag's JSON (``structural_tag``).
    ``param``: the request field it came from, named in a 400."""

    kind: str
    spec: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequestError(f"unknown grammar kind {self.kind!r}", param=self.param)
        if not isinstance(self.spec, str):
            raise InvalidRequestError("a grammar spec must be a string", param=self.param)


def _xgr() -> Any:
    import xgrammar

    return xgrammar


class GrammarState:
    """One request's matcher, and how many tokens it has accepted."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.num_accepted = 0
        self.closed = False  # the request finished: its rows still in flight are not masked
        self.rejected = False  # a token the grammar does not allow was sampled (the request stops)

    def accept(self, token: int) -> bool:
        if self.closed or self.rejected or self.matcher.is_terminated():
            return False
        ok = bool(self.matcher.accept_token(int(token)))
        if ok:
            self.num_accepted += 1
        else:
            self.rejected = True
        return ok

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int, num_output_tokens: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]``; False when the row is not to be
        masked (the request finished: its token is dropped by the scheduler)."""
        if self.closed or self.rejected or self.matcher.is_terminated():
            return False
        if self.num_accepted != num_output_tokens:
            raise RuntimeError(
                f"grammar out of step: the matcher accepted {self.num_accepted} tokens, "
                f"the row samples output {num_output_tokens}"
            )
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True


class GrammarCache:
    """Compiles grammar specs for one tokenizer and model vocabulary; an LRU of compiled
    grammars keyed by (kind, canonical spec). JSON is compact (no free whitespace: a model cannot
    pad its output with blanks until max_tokens) and strict (no properties the schema omits). Thread-safe (requests are made on the replica's
    event loop, steps run on the engine thread)."""

    def __init__(
        self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], *, max_entries: int = 256
    ) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = int(vocab_size)
        self._stop = sorted({int(t) for t in stop_token_ids})
        self.max_entries = max_entries
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = xgr.TokenizerInfo.from_huggingface(
                self._hf, vocab_size=self.vocab_size, stop_token_ids=self._stop or None
            )
            # Our own LRU bounds the memory; xgrammar's cache would grow without one.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, spec: GrammarSpec) -> Any:
        key = (spec.kind, spec.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
            compiler = self._get_compiler()
            try:
                if spec.kind == "json_schema":
                    compiled = compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=True)
                elif spec.kind == "json_object":
                    compiled = compiler.compile_json_schema(
                        '{"type": "object"}', any_whitespace=False, strict_mode=False
                    )
                elif spec.kind == "regex":
                    compiled = compiler.compile_regex(spec.spec)
                elif spec.kind == "structural_tag":
                    compiled = compiler.compile_structural_tag(spec.spec)
                else:
                    compiled = compiler.compile_regex(_choice_regex(spec.spec))
            except Exception as e:  # xgrammar raises RuntimeError / ValueError with its parser's message
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise InvalidRequestError(f"the {spec.kind} grammar cannot be compiled: {msg}", param=spec.param) from e
            self._cache[key] = compiled
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            return compiled

    def state(self, spec: GrammarSpec) -> GrammarState:
        """A fresh matcher for one request (raises InvalidRequestError if ``spec`` does not compile)."""
        return GrammarState(_xgr().GrammarMatcher(self.compile(spec)))


def _choice_regex(spec: str) -> str:
    import json
    import re

    try:
        choices = json.loads(spec)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("choices must be a non-empty list of strings")
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def apply_grammar_masks(
    logits: torch.Tensor, rows: Sequence[tuple[int, GrammarState]], num_output_tokens: Sequence[int]
) -> None:
    """Mask (to -inf, in place) the tokens each grammar row may not sample next. ``rows``:
    (row index in ``logits``, its state); ``num_output_tokens``: each one's output index."""
    xgr = _xgr()
    n, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(n, vocab)  # all allowed
    masked = [i for (i, g), k in zip(rows, num_output_tokens) if g.fill(bitmask, i, k)]
    if not masked:
        return
    bm = bitmask.to(logits.device, non_blocking=True)
    if logits.dtype in (torch.float32, torch.float16, torch.bfloat16):
        xgr.apply_token_bitmask_inplace(logits, bm, indices=masked)
        return
    # Other dtypes (float64 on CPU in tests): unpack the 32-bit words in torch.
    idx = torch.tensor(masked, device=logits.device)
    words = bm.index_select(0, idx)
    bits = (words[:, :, None] >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
    allowed = bits.reshape(len(masked), -1)[:, :vocab].bool()
    logits[idx] = logits.index_select(0, idx).masked_fill(~allowed, -torch.inf)
