"""Tokenizer wrapper, chat template, and the byte-level tables of the detokenizer.

``Tokenizer`` hides the Hugging Face tokenizer behind the few calls the engine and the
ingress need, with clear errors (``InvalidRequestError``) for malformed chat messages.
``Tokenizer.token_bytes`` gives, for a byte-level BPE tokenizer, each id's bytes and text
(``TokenBytes``, built once per tokenizer, checked against the tokenizer's own decode):
``replica.detokenizer`` uses them to turn output tokens into text at little cost per token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from replica.errors import InvalidRequestError


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
        # The Rust tokenizer's batch encode without character offsets: the same ids as
        # ``hf.encode`` (which asks the same tokenizer, offsets included, through a Python
        # layer) at about 2/3 of its time, ~0.2 ms of a 200-token chat prompt on a request's path.
        self._rust = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not hasattr(self._rust, "encode_batch_fast"):
            self._rust = None

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={sorted(self.eos_token_ids)})"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
        rust = self._rust
        # hf.encode turns off truncation, padding and split special tokens for the call; the Rust
        # tokenizer is asked directly only when none of them is set on it.
        if rust is not None and rust.truncation is None and rust.padding is None and not rust.encode_special_tokens:
            return rust.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
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
