"""Tokenizer wrapper, chat template, and incremental detokenization with stop strings.

``Tokenizer`` hides the Hugging Face tokenizer behind the few calls the engine and the
ingress need, with clear errors (``InvalidRequestError``) for malformed chat messages.

``IncrementalDetokenizer`` turns a growing list of output token ids into text deltas:

* it never emits a broken multi-byte character: a byte-level BPE token can carry half
  of a UTF-8 sequence, which decodes to U+FFFD until the next token completes it; text
  ending in U+FFFD is held back (the prefix-offset / read-offset technique: decode a
  small window of recent tokens twice, with and without the new ones, and emit the
  difference);
* stop strings may span tokens: text that could still be the start of a stop string is
  held back; on a hit, everything from the stop string on is dropped and ``add`` reports
  the hit; ``flush`` releases what is held back once generation ends without a hit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from replica.errors import InvalidRequestError

# Tokens of prompt context decoded in front of the first output token, so that a leading
# space (SentencePiece) or a merge with the prompt's last bytes decodes as in the full text.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin, typed wrapper around a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer: Any, *, eos_token_ids: Iterable[int] = (), name: str = "") -> None:
        self.hf = hf_tokenizer
        self.name = name
        # Some tokenizers clean up spaces around punctuation when decoding, which changes
        # text already emitted once more tokens arrive; incremental decoding needs it off.
        if getattr(hf_tokenizer, "clean_up_tokenization_spaces", False):
            hf_tokenizer.clean_up_tokenization_spaces = False
        ids = {int(i) for i in eos_token_ids}
        if hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        # len() counts added/special tokens too (vocab_size attribute does not, in HF).
        self.vocab_size: int = len(hf_tokenizer)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={sorted(self.eos_token_ids)})"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Decode ids; ids outside the tokenizer's vocabulary (a dummy model with a bigger
        vocabulary than its tokenizer) decode to nothing rather than raising."""
        vocab = self.vocab_size
        ids = [int(t) for t in token_ids if 0 <= int(t) < vocab]
        if not ids:
            return ""
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages``, as text."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                f"model {self.name or '(unnamed)'} has no chat template; use a plain completion instead",
                param="messages",
            )
        normalized = _validate_messages(messages)
        try:
            return self.hf.apply_chat_template(
                normalized, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # jinja raise_exception(...) in templates, e.g. "roles must alternate"
            raise InvalidRequestError(f"chat template rejected the messages: {e}", param="messages") from e

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat. Special tokens come from the template itself
        (a BOS in the template text), so none are added on top."""
        text = self.render_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check chat messages and flatten OpenAI content-part lists into plain text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                        param="messages",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({**{k: v for k, v in m.items() if k not in ("role", "content")}, "role": role, "content": content})
    return out


class IncrementalDetokenizer:
    """Text deltas for one request's output tokens; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: tuple[str, ...] = (),
        *,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self._tok = tokenizer
        # Like EOS and stop ids, stop strings end nothing before min_tokens outputs exist: they
        # match only in text that comes after, i.e. once more than min_tokens tokens were added.
        self._min_tokens = min_tokens
        self._num_added = 0
        self._skip_special = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context  # prompt context + outputs
        # Window [prefix_offset, read_offset) is text already accounted for; tokens from
        # read_offset on are not yet turned into text.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._text = ""  # stable text of the output (no trailing U+FFFD), after any stop cut
        self._emitted = 0  # len of self._text handed out so far
        self.stopped: str | None = None  # the stop string that matched
        self._flushed = False
        self._stream = self._make_stream(tokenizer, context, skip_special_tokens)

    @staticmethod
    def _make_stream(tokenizer: Any, context: list[int], skip_special: bool) -> tuple[Any, Any] | None:
        """A Rust ``DecodeStream`` doing the same prefix/read-offset decoding in one call per
        token (~10x cheaper than two Python-level decodes), when the tokenizer is a fast HF
        one with no decode-time clean-up; None means the Python path. Not when the prompt
        context itself ends in an incomplete character (the stream would then re-emit it)."""
        hf = getattr(tokenizer, "hf", None)
        rust = getattr(hf, "_tokenizer", None)
        if not isinstance(tokenizer, Tokenizer) or rust is None or getattr(hf, "clean_up_tokenization_spaces", False):
            return None
        try:
            from tokenizers import Tokenizer as RustTokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        if not isinstance(rust, RustTokenizer):
            return None
        vocab = tokenizer.vocab_size
        ids = [t for t in context if 0 <= t < vocab]
        if ids and rust.decode(ids, skip_special_tokens=skip_special).endswith(_REPLACEMENT_CHAR):
            return None
        return rust, DecodeStream(ids=ids, skip_special_tokens=skip_special)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._emitted]

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed new output tokens; returns (text safe to emit now, stop string hit)."""
        if self.stopped is not None:
            return "", True
        if self._flushed:
            raise RuntimeError("add() after flush()")
        if self._stream is not None:
            self._text += self._stream_new(token_ids)
        else:
            self._ids.extend(int(t) for t in token_ids)
            self._text += self._decode_new()
        self._num_added += len(token_ids)
        if not self._stop or self._num_added <= self._min_tokens:  # nothing to hold back or cut
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out, False
        return self._release()

    def _stream_new(self, token_ids: Sequence[int]) -> str:
        """The Rust stream's text for new tokens. It keeps the same window as ``_decode_new``
        (it advances ``prefix_offset`` / ``read_offset`` exactly when text comes out), mirrored
        here so that ``flush`` and the Python fallback continue from the same state. Ids
        outside the vocabulary decode to nothing, as in ``Tokenizer.decode``: skipped."""
        rust, stream = self._stream  # type: ignore[misc]
        vocab = self._tok.vocab_size
        if len(token_ids) == 1:  # the decode step: no lists
            t = int(token_ids[0])
            if 0 <= t < vocab:
                try:
                    chunk = stream.step(rust, t)
                except Exception:
                    chunk = None
                    self._stream = None
                    self._ids.append(t)
                    return self._decode_new()
                self._ids.append(t)
                if chunk is not None:
                    self._prefix_offset = self._read_offset
                    self._read_offset = len(self._ids)
                    return chunk
            return ""
        parts: list[str] = []
        ids = [int(t) for t in token_ids]
        for k, t in enumerate(ids):
            if not 0 <= t < vocab:
                continue
            try:
                chunk = stream.step(rust, t)
            except Exception:  # a decoder whose text is not prefix-stable: Python path from here
                self._stream = None
                self._ids.extend(ids[k:])
                parts.append(self._decode_new())
                return "".join(parts)
            self._ids.append(t)
            if chunk is not None:
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
                parts.append(chunk)
        return "".join(parts)

    def flush(self) -> str:
        """At the end of generation: text still held back (a possible stop-string prefix,
        or a character the last tokens left incomplete, which decodes to U+FFFD)."""
        if self.stopped is not None or self._flushed:
            return ""
        self._flushed = True
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._prefix_offset, self._read_offset)
            self._text += self._decode(self._prefix_offset, len(self._ids))[len(prefix) :]
            self._read_offset = len(self._ids)
        hit = self._find_stop()
        end = hit if hit is not None else len(self._text)
        if hit is not None:
            self._text = self._text[:hit]
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _decode_new(self) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""  # nothing yet, or an incomplete character: wait for more tokens

    def _find_stop(self) -> int | None:
        """Start of the stop string that completes first in the unemitted text (ties: the
        longer one), so the result does not depend on how text was split into tokens. A
        match can't start in emitted text: that would have been held back as a prefix."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self._stop:
            i = self._text.find(s, self._emitted)
            if i != -1 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
                self.stopped = s
        return None if best is None else best[1]

    def _release(self) -> tuple[str, bool]:
        hit = self._find_stop()
        if hit is not None:
            self._text = self._text[:hit]
            out = self._text[self._emitted : hit]
            self._emitted = hit
            return out, True
        end = len(self._text) - self._held_back()
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out, False

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        if not self._stop:
            return 0
        text = self._text
        for n in range(min(self._max_stop - 1, len(text) - self._emitted), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
