"""Tokenizer wrapper, chat template, and incremental detokenization with stop strings.

``Tokenizer`` hides the Hugging Face tokenizer behind the few calls the engine and the
ingress need, with clear errors (``InvalidRequestError``) for malformed chat messages.

``IncrementalDetokenizer`` turns a growing list of output token ids into text deltas:

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

import functools
from codecs import utf_8_decode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from replica.errors import InvalidRequestError

# Tokens of prompt context decoded in front of the first output token, so that a leading
# space (SentencePiece) or a merge with the prompt's last bytes decodes as in the full text.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class TokenBytes:
    """What each token id adds to a byte-level decode, whose text is the lossy UTF-8 decode
    of the ids' bytes joined: ``raw[id]`` those bytes; ``text[id]`` the same as text where
    they are complete UTF-8 on their own (most tokens), else None (part of a character)."""

    raw: list[bytes]
    text: list[str | None]

    @classmethod
    def of(cls, raw: list[bytes]) -> TokenBytes:
        return cls(raw, [_utf8_or_none(b) for b in raw])


def _utf8_or_none(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


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

    def token_bytes(self, *, skip_special_tokens: bool) -> TokenBytes | None:
        """Each id's part of ``decode(ids, skip_special_tokens=...)``, indexed by id, when
        the decoder is byte-level (so that the text of ids is the lossy UTF-8 decode of their
        bytes joined); None for any other decoder."""
        tables = self._token_bytes
        return None if tables is None else tables[skip_special_tokens]

    @functools.cached_property
    def _token_bytes(self) -> tuple[TokenBytes, TokenBytes] | None:
        """(keeping, skipping special tokens); built on first use, once per tokenizer."""
        return _byte_level_tables(self.hf, self.vocab_size)

    def render_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The chat template applied to ``messages``, as text; ``tools`` (OpenAI function
        definitions) are rendered by the template itself, as the model was trained to see them."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                f"model {self.name or '(unnamed)'} has no chat template; use a plain completion instead",
                param="messages",
            )
        normalized = _validate_messages(messages)
        try:
            return self.hf.apply_chat_template(
                normalized, add_generation_prompt=add_generation_prompt, tokenize=False, tools=tools or None
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # jinja raise_exception(...) in templates, e.g. "roles must alternate"
            raise InvalidRequestError(f"chat template rejected the messages: {e}", param="messages") from e

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of the rendered chat. Special tokens come from the template itself
        (a BOS in the template text), so none are added on top."""
        text = self.render_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and flatten OpenAI content-part lists into plain text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
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


# ----------------------------------------------------------------------------- byte-level


def _gpt2_unbyte() -> dict[int, str]:
    """``str.translate`` table from GPT-2's byte-level alphabet (one printable char per byte)
    to the bytes as latin-1 chars. Other chars below 256 go to one that latin-1 can't encode,
    so ``translate(...).encode("latin-1")`` fails exactly when a char is outside the alphabet
    (chars from 256 on already fail unless they are in it)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # stand for themselves
    shifted = [b for b in range(256) if b not in printable]  # stand as chr(256), chr(257), ...
    table = {b: "\uffff" for b in shifted}
    table.update({256 + n: chr(b) for n, b in enumerate(shifted)})
    return table


_GPT2_UNBYTE = _gpt2_unbyte()


def _byte_level_bytes(token: str) -> bytes | None:
    """The bytes a token's byte-level chars stand for; None if one is outside the alphabet."""
    try:
        return token.translate(_GPT2_UNBYTE).encode("latin-1")
    except UnicodeEncodeError:
        return None


def _byte_level_tables(hf: Any, vocab: int) -> tuple[TokenBytes, TokenBytes] | None:
    """(keeping, skipping special tokens) when the fast tokenizer ``hf`` decodes byte-level,
    else None. Per id, as a byte-level decoder does per token: the bytes its chars stand for,
    or its own UTF-8 if a char is outside the alphabet (an added token with a space); nothing
    for a skipped special token or an id with no token.

    The decision is behavioural, not by the decoder's spelling (which differs between
    tokenizers versions): the tables are used only if ``hf.decode`` agrees with them on the
    whole vocabulary, joined in two orders and one id at a time, keeping and skipping special
    tokens. Any decoder step that changes text (Strip, Replace, Metaspace, Fuse over a token
    outside the alphabet, WordPiece's spaces) shows up there and turns the fast path off."""
    rust = getattr(hf, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer as RustTokenizer
    except ImportError:
        return None
    if not isinstance(rust, RustTokenizer) or rust.decoder is None:
        return None
    if getattr(hf, "clean_up_tokenization_spaces", False):  # changes text already emitted
        return None
    tokens = [rust.id_to_token(i) for i in range(vocab)]
    raw = [b"" if t is None else (_byte_level_bytes(t) or t.encode()) for t in tokens]
    keep = TokenBytes.of(raw)
    special = {t.content for t in rust.get_added_tokens_decoder().values() if t.special}
    skip = TokenBytes(list(keep.raw), list(keep.text))
    for i, t in enumerate(tokens):
        if t in special:
            skip.raw[i], skip.text[i] = b"", ""
    ids = [i for i, t in enumerate(tokens) if t is not None]
    shuffled = ids[1::2] + ids[::2]  # other neighbours than in id order
    for table, skipping in ((keep, False), (skip, True)):
        if not _agrees_with_decode(hf, table, (ids, shuffled), skip_special_tokens=skipping):
            return None
    return keep, skip


def _agrees_with_decode(
    hf: Any, table: TokenBytes, orders: tuple[list[int], ...], *, skip_special_tokens: bool
) -> bool:
    """Whether ``hf.decode`` of each id sequence, and the decoder on every id alone, is the lossy UTF-8
    decode of the table's bytes joined (what the incremental fast path emits)."""
    for seq in orders:
        want = b"".join(table.raw[i] for i in seq).decode("utf-8", "replace")
        if hf.decode(seq, skip_special_tokens=skip_special_tokens) != want:
            return False
    # One id at a time through Rust's batch decode (parallel; hf.batch_decode loops in Python).
    singles = hf._tokenizer.decode_batch([[i] for i in orders[0]], skip_special_tokens=skip_special_tokens)
    return all(got == table.raw[i].decode("utf-8", "replace") for i, got in zip(orders[0], singles, strict=True))


# ----------------------------------------------------------------------------- detokenizer


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
