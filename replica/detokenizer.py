"""Incremental detokenization with stop strings: ``IncrementalDetokenizer`` turns a growing
list of output token ids into text deltas:

* it never emits a broken multi-byte character: a byte-level BPE token can carry half
  of a UTF-8 sequence, which decodes to U+FFFD until the next token completes it;
* the decode step costs little: with a byte-level decoder (GPT-2 / Qwen2 / Llama-3 /
  SmolLM2 style) each id's bytes come from a table built once per tokenizer
  (``Tokenizer.token_bytes``) and go through an incremental UTF-8 decoder that buffers an
  incomplete character; other fast tokenizers use the Rust ``DecodeStream``, and anything
  else the prefix-offset / read-offset technique (decode a small window of recent tokens
  twice, with and without the new ones, emit the difference, hold back text ending in
  U+FFFD);
* stop strings may span tokens: text that could still be the start of a stop string is
  held back; on a hit, everything from the stop string on is dropped and ``add`` reports
  the hit; ``flush`` releases what is held back once generation ends without a hit.
"""

from __future__ import annotations

from codecs import utf_8_decode
from collections.abc import Sequence
from typing import Any

from replica.tokenizer import Tokenizer

# Tokens of prompt context decoded in front of the first output token, so that a leading
# space (SentencePiece) or a merge with the prompt's last bytes decodes as in the full text.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


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
        self._num_added = 0  # counted where stop strings need it: not on add()'s plain path
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._stop_chars = frozenset("".join(self._stop))  # text held back ends in one of them
        self._out: list[str] = []  # the text emitted so far, in pieces: joined only when read
        self._text = ""  # text decoded but not emitted yet (held back), after any stop cut
        self.stopped: str | None = None  # the stop string that matched
        self._flushed = False
        # Byte-level path: each id's text or bytes from the tokenizer's table, with the bytes of
        # an incomplete character waiting in _partial (an incremental UTF-8 decoder with
        # errors="replace", inlined: codecs' own costs a Python-level call per token). It
        # needs no prompt context: ByteLevel text has no leading-space rule.
        table = None
        if isinstance(tokenizer, Tokenizer):
            table = tokenizer.token_bytes(skip_special_tokens=skip_special_tokens)
        self._pieces: list[str | None] | None = None if table is None else table.text
        self._raw: list[bytes] = [] if table is None else table.raw
        self._vocab = len(self._raw)
        self._partial = b""
        # add()'s shortest path: byte-level, nothing to hold back, not stopped nor flushed.
        self._plain = table is not None and not self._stop
        # Other tokenizers decode a window of ids: prompt context + outputs. Window
        # [prefix_offset, read_offset) is text already accounted for; tokens from read_offset
        # on are not yet turned into text.
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._stream = None if table is not None else self._make_stream(tokenizer, context, skip_special_tokens)

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
        text = "".join(self._out)
        self._out = [text]  # so that reading it again costs nothing
        return text

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed new output tokens; returns (text safe to emit now, stop string hit)."""
        if self._plain and len(token_ids) == 1:  # the decode step: one lookup, most of the time
            t = token_ids[0]
            text = self._pieces[t] if 0 <= t < self._vocab else ""  # type: ignore[index]
            if text is None or self._partial:
                text = self._bytes_text(token_ids)
            self._out.append(text)
            return text, False
        if self.stopped is not None:
            return "", True
        if self._flushed:
            raise RuntimeError("add() after flush()")
        if self._pieces is not None:
            new = self._bytes_text(token_ids)
        elif self._stream is not None:
            new = self._stream_new(token_ids)
        else:
            self._ids.extend(int(t) for t in token_ids)
            new = self._decode_new()
        self._num_added += len(token_ids)
        self._text += new
        if not self._stop or self._num_added <= self._min_tokens:  # nothing to hold back or cut
            out, self._text = self._text, ""
            self._out.append(out)
            return out, False
        return self._release()

    def _bytes_text(self, token_ids: Sequence[int]) -> str:
        """The byte-level path's text for new tokens: what their bytes, after any incomplete
        character left by earlier ones, decode to; the bytes of a character still incomplete
        wait for the next tokens. Ids outside the vocabulary add nothing, as in ``decode``."""
        raw, n = self._raw, self._vocab
        if len(token_ids) == 1 and not self._partial:  # most tokens: their text as it is
            t = token_ids[0]
            text = self._pieces[t] if 0 <= t < n else ""  # type: ignore[index]
            if text is not None:
                return text
        data = self._partial + b"".join([raw[t] for t in token_ids if 0 <= t < n])
        text, used = utf_8_decode(data, "replace", False)
        self._partial = data[used:]
        return text

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
        self._plain = False
        if self._partial:  # U+FFFD for each broken sequence, as the full (lossy) decode has
            self._text += utf_8_decode(self._partial, "replace", True)[0]
            self._partial = b""
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._prefix_offset, self._read_offset)
            self._text += self._decode(self._prefix_offset, len(self._ids))[len(prefix) :]
            self._read_offset = len(self._ids)
        hit = self._find_stop()
        out = self._text if hit is None else self._text[:hit]
        self._text = ""
        self._out.append(out)
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
        text = self._text
        best: tuple[int, int] | None = None  # (end, start)
        for s in self._stop:
            if s in text:  # cheaper than find() in the usual case: no match
                i = text.find(s)
                if best is None or (i + len(s), i) < best:
                    best = (i + len(s), i)
                    self.stopped = s
        return None if best is None else best[1]

    def _release(self) -> tuple[str, bool]:
        """Emit the unemitted text up to a stop string (then report the hit) or, without
        one, up to what could still be the start of a stop string."""
        hit = self._find_stop()
        text = self._text
        if hit is not None:
            out, self._text = text[:hit], ""
        elif text[-1:] not in self._stop_chars:  # the usual case: can't start one, all of it
            out, self._text = text, ""
        else:
            end = len(text) - self._held_back()
            out, self._text = text[:end], text[end:]
        self._out.append(out)
        return out, hit is not None

    def _held_back(self) -> int:
        """Length of the longest suffix of the unemitted text that is a proper prefix of a stop string."""
        text = self._text
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
