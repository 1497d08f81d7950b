"""OpenAI's logprobs objects from the engine's ``TokenLogprobs`` (ids and floats): token text and
bytes come from the ingress's tokenizer, once per id.

Chat: ``choices[].logprobs.content[] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``.
Completions: ``choices[].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``;
with echo the prompt's tokens come first, the first with ``null`` logprob and alternatives. A masked
token's ``-inf`` is sent as ``-9999.0`` (JSON has no infinity; OpenAI and vLLM send the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deployments.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from replica.outputs import TokenLogprobs

MASKED_LOGPROB = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MASKED_LOGPROB


class TokenTexts:
    """Each id's text and UTF-8 bytes as a single token, cached (special tokens keep their text)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        table = getattr(tokenizer, "token_bytes", None)
        self._raw = table(skip_special_tokens=False) if callable(table) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            if self._raw is not None and 0 <= token_id < len(self._raw.raw):
                raw = self._raw.raw[token_id]
                text = raw.decode("utf-8", errors="replace")  # part of a character: U+FFFD, bytes exact
            else:
                text = self._tokenizer.decode([token_id])
                raw = text.encode()
            hit = self._cache[token_id] = (text, list(raw))
        return hit


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts) -> ChatLogprobs:
    content = []
    for e in entries:
        token, raw = texts(e.token_id)
        top = []
        for t, x in zip(e.top_ids, e.top_logprobs):
            alt, alt_raw = texts(t)
            top.append(TopLogprob(token=alt, logprob=_finite(x), bytes=alt_raw))
        content.append(TokenLogprob(token=token, logprob=_finite(e.logprob), bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


class CompletionLogprobsBuilder:
    """A completion's logprobs, chunk by chunk: ``text_offset`` runs on across calls (a stream's
    chunks), from where the echoed prompt (if any) begins."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._offset = 0

    def __call__(self, entries: Sequence[TokenLogprobs | None], prompt_ids: Sequence[int] = ()) -> CompletionLogprobs:
        """``prompt_ids``: the echoed prompt's first token ids, those ``entries`` has None for."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for i, e in enumerate(entries):
            token = self._texts(e.token_id if e is not None else prompt_ids[i])[0]
            out.tokens.append(token)
            out.text_offset.append(self._offset)
            self._offset += len(token)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(e.logprob))
            top = {self._texts(t)[0]: _finite(x) for t, x in zip(e.top_ids, e.top_logprobs)}
            top.setdefault(token, _finite(e.logprob))  # the sampled token is always there, as in vLLM
            out.top_logprobs.append(top)
        return out
