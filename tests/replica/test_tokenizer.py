"""Tokenizer wrapper, chat template, and the byte-level tables with the detokenizer's path over
them (SmolLM2 tokenizer and a plain ByteLevel variant of it)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replica.detokenizer import IncrementalDetokenizer
from replica.errors import InvalidRequestError
from replica.models import load_tokenizer
from replica.tokenizer import Tokenizer
from tests.replica.test_detokenizer import REPLACEMENT, first_completed_stop


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("default")


# ----------------------------------------------------------------------------- Tokenizer


def test_round_trip_and_eos(tok):
    text = "Hello, wörld! 世界 🎉 tabs\tand\nnewlines"
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == frozenset({2})  # <|im_end|>, not the GGUF's wrong <|im_start|>
    assert tok.decode([2]) == "<|im_end|>"
    assert tok.vocab_size == 49152


def test_decode_ids_outside_vocab_is_empty_not_an_error(tok):
    hello = tok.encode("hello")
    assert tok.decode([tok.vocab_size, 151935, -1]) == ""
    assert tok.decode([*hello, tok.vocab_size + 5, *hello]) == "hellohello"


def test_encode_rejects_non_strings(tok):
    with pytest.raises(InvalidRequestError):
        tok.encode(["not", "a", "string"])  # type: ignore[arg-type]


def test_chat_template_is_chatml_and_matches_encode(tok):
    msgs = [{"role": "user", "content": "Hi there"}]
    text = tok.render_chat_template(msgs)
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    ids = tok.apply_chat_template(msgs)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)


def test_chat_content_parts_are_flattened(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "Hi there"}])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"content": "no role"}],
        [{"role": "", "content": "empty role"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        ["not a dict"],
    ],
)
def test_malformed_chat_messages_raise_invalid_request(tok, messages):
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template(messages)
    assert e.value.param == "messages"


def test_model_without_chat_template_raises_invalid_request(tok):
    import copy

    hf = copy.deepcopy(tok.hf)
    hf.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(hf, name="plain").apply_chat_template([{"role": "user", "content": "x"}])


# ----------------------------------------------------------------------------- byte-level path


@pytest.fixture(scope="module")
def plain_tok(tok) -> Tokenizer:
    """SmolLM2's vocabulary with a plain ByteLevel decoder (as GPT-2 / Qwen2 / Llama-3 have)
    and added tokens the per-token rule treats apart: one with a char outside the byte-level
    alphabet (its own UTF-8), one inside it that stands for broken UTF-8, one special."""
    from tokenizers import AddedToken, decoders
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer.from_str(tok.hf._tokenizer.to_str())
    rust.decoder = decoders.ByteLevel()
    rust.add_tokens([AddedToken(t, special=False) for t in ("<sp ace>", "ïï", "日本")])
    rust.add_special_tokens([AddedToken("<|special x|>", special=True)])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust), eos_token_ids=[2], name="plain ByteLevel")


@pytest.mark.parametrize("which", ["tok", "plain_tok"])
def test_token_bytes_decode_as_rust_does_for_every_id(request, which):
    tok = request.getfixturevalue(which)
    rust = tok.hf._tokenizer
    for skip in (False, True):
        table = tok.token_bytes(skip_special_tokens=skip)
        assert table is not None and len(table.raw) == len(table.text) == tok.vocab_size
        for i in range(tok.vocab_size):
            text = table.raw[i].decode("utf-8", "replace")
            assert text == rust.decode([i], skip_special_tokens=skip), i
            assert table.text[i] == (None if text.encode() != table.raw[i] else text), i  # None: not UTF-8
    assert tok.token_bytes(skip_special_tokens=True).raw[2] == b""  # <|im_end|> is special
    assert tok.token_bytes(skip_special_tokens=False).raw[2] == b"<|im_end|>"
    assert tok.token_bytes(skip_special_tokens=True) is tok.token_bytes(skip_special_tokens=True)  # built once


def test_added_tokens_outside_the_byte_alphabet_keep_their_utf8(plain_tok):
    table = plain_tok.token_bytes(skip_special_tokens=True)
    ids = {t: plain_tok.hf.convert_tokens_to_ids(t) for t in ("<sp ace>", "ïï", "日本", "<|special x|>")}
    assert table.raw[ids["<sp ace>"]] == b"<sp ace>" and table.raw[ids["日本"]] == "日本".encode()
    assert table.raw[ids["ïï"]] == b"\xef\xef" and table.text[ids["ïï"]] is None  # chars stand for bytes
    assert table.raw[ids["<|special x|>"]] == b""


def test_byte_level_path_follows_what_the_decoder_does(tok):
    """The fast path is on exactly when the decoder's text is the tokens' bytes joined: decided
    by decoding, not by how a tokenizers version spells the decoder."""
    import random

    from tokenizers import AddedToken, decoders
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    def with_decoder(decoder=None, added=()) -> Tokenizer:
        rust = RustTokenizer.from_str(tok.hf._tokenizer.to_str())
        if decoder is not None:
            rust.decoder = decoder
        rust.add_tokens([AddedToken(a, special=False) for a in added])
        return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust))

    def streamed(t: Tokenizer, ids: list[int]) -> str:
        d = IncrementalDetokenizer(t, [])
        return "".join(d.add([i])[0] for i in ids) + d.flush()

    rng = random.Random(0)
    samples = [[rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(20)]
    samples.append(tok.encode("héllo wörld 日本語 🙂 <sp ace> done"))

    # Same text as a plain byte-level decoder: the fast path is on, and it is right.
    same = [None, decoders.ByteLevel(), decoders.Sequence([decoders.ByteLevel(), decoders.Strip(left=0, right=0)])]
    for decoder in same:
        t = with_decoder(decoder)
        assert t.token_bytes(skip_special_tokens=True) is not None, decoder
        assert IncrementalDetokenizer(t, [])._pieces is not None
        for ids in samples:
            assert streamed(t, ids) == t.decode(ids, skip_special_tokens=True)

    # Fuse hands ByteLevel the whole text: one token outside the alphabet changes all of it.
    fused = with_decoder(decoders.Sequence([decoders.Fuse(), decoders.ByteLevel()]), added=["<sp ace>"])
    ids = fused.encode("hi <sp ace> yo")
    assert "Ġ" in fused.decode(ids)  # indeed: not the text that the tokens' bytes make
    changing = [
        fused,
        with_decoder(decoders.Metaspace()),
        with_decoder(decoders.WordPiece()),
        with_decoder(decoders.Sequence([decoders.ByteLevel(), decoders.Strip(content=" ", left=1, right=0)])),
        with_decoder(decoders.Sequence([decoders.Replace("a", "b"), decoders.ByteLevel()])),  # "a" occurs in tokens
    ]
    for t in changing:
        assert t.token_bytes(skip_special_tokens=True) is None
        assert IncrementalDetokenizer(t, [])._stream is not None
        if t is fused:  # its text depends on a token far ahead: no incremental decode gives it
            continue
        for sample in [*samples[:3], ids]:
            assert streamed(t, sample) == t.decode(sample, skip_special_tokens=True)


def test_the_byte_level_path_is_used_for_a_byte_level_tokenizer(tok, plain_tok):
    for t in (tok, plain_tok):
        d = IncrementalDetokenizer(t, t.encode("hi"))
        assert d._pieces is not None and d._stream is None


def _ids_strategy(tok: Tokenizer):
    table = tok.token_bytes(skip_special_tokens=False)
    partial = [i for i, text in enumerate(table.text) if text is None]  # part of a character
    special = sorted(tok.hf._tokenizer.get_added_tokens_decoder())
    words = st.sampled_from(list("ab é€😀\n,.") + ["日本", " the", "👍🏽", "STOP", "Hello world"])
    encoded = st.lists(words, max_size=8).map(lambda p: tok.encode("".join(p), add_special_tokens=False))
    one = st.one_of(
        st.sampled_from(partial),
        st.sampled_from(special),
        st.integers(0, tok.vocab_size - 1),
        st.integers(tok.vocab_size, tok.vocab_size + 1000),  # a model vocabulary bigger than the tokenizer's
        st.just(-1),
    ).map(lambda i: [i])
    return st.lists(st.one_of(encoded, one), max_size=12).map(lambda chunks: [i for c in chunks for i in c])


def _check_byte_level_stream(tok, ids, stop, step, skip, min_tokens=0) -> None:
    d = IncrementalDetokenizer(tok, [], tuple(stop), skip_special_tokens=skip, min_tokens=min_tokens)
    assert d._pieces is not None
    full = tok.decode(ids, skip_special_tokens=skip)
    # Stop strings match only in text after min_tokens tokens: after what was emitted by then.
    # The stop check starts with the first add() after which more than min_tokens were added.
    boundary = len(ids) if len(ids) <= min_tokens else min_tokens // step * step
    before = tok.decode(ids[:boundary], skip_special_tokens=skip)
    if before.endswith(REPLACEMENT) and not full.startswith(before):
        before = before[:-1]  # a character the next tokens complete: not emitted yet
    want = before + first_completed_stop(full[len(before) :], stop) if min_tokens else first_completed_stop(full, stop)
    out = ""
    for i in range(0, len(ids), step):
        text, hit = d.add(ids[i : i + step])
        out += text
        assert want.startswith(out)  # never a character that later tokens change
        if hit:
            break
    out += d.flush()
    assert out == want == d.text
    if d.stopped:
        assert d.add(ids[:1]) == ("", True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    stop=st.lists(
        st.sampled_from(["é€", " the", "b\n", "😀a", "lo wor", "STOP", "<|im", REPLACEMENT, "a"]), max_size=3
    ),
    step=st.integers(1, 3),
    skip=st.booleans(),
)
@pytest.mark.parametrize("which", ["tok", "plain_tok"])
def test_byte_level_text_equals_the_full_decode_cut_at_the_first_stop(request, which, data, stop, step, skip):
    """Multi-byte characters split across tokens, lone halves of characters, special tokens,
    ids outside the vocabulary, stop strings: the streamed text is the full decode cut at the
    first stop string, and no delta ever holds a character that a later token changes."""
    tok = request.getfixturevalue(which)
    _check_byte_level_stream(tok, data.draw(_ids_strategy(tok)), stop, step, skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.sampled_from([*"ab é€😀\n,.", "日本", " the", "👍🏽", "Hello world"]), max_size=20),
    stop=st.lists(st.sampled_from(["é", "a", " the", "😀", "b\n", "lo wor"]), min_size=1, max_size=2),
    min_tokens=st.integers(0, 12),
    step=st.integers(1, 3),
)
def test_byte_level_stop_strings_wait_for_min_tokens(tok, pieces, stop, min_tokens, step):
    _check_byte_level_stream(tok, tok.encode("".join(pieces), add_special_tokens=False), stop, step, True, min_tokens)


def test_byte_level_incomplete_character_becomes_u_fffd_on_flush_only(tok):
    ids = tok.encode("ok 🎉", add_special_tokens=False)
    partial = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith(REPLACEMENT))
    d = IncrementalDetokenizer(tok, [])
    outs = [d.add([t])[0] for t in ids[:partial]]
    assert outs[-1] == "" and "".join(outs) == "ok "
    assert d.flush() == REPLACEMENT == tok.decode(ids[:partial])[-1]
    assert d.text == tok.decode(ids[:partial])
    with pytest.raises(RuntimeError):
        d.add([ids[0]])


ENCODE_TEXTS = [
    "",
    " ",
    "Hello, wörld! 世界 🎉 tabs\tand\nnewlines",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",  # special tokens inside the text
    "a<|im_end|>b <|endoftext|>  trailing   spaces   ",
    "\u00ff\ufffd\U0001f600 e\u0301 " * 5,
    "1234567890 3.14159 x=y+z;\r\n\r\n",
]


@pytest.mark.parametrize("which", ["tok", "plain_tok"])
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_gives_the_hf_tokenizers_ids(request, which, add_special_tokens):
    """encode asks the Rust tokenizer directly (no offsets): exactly hf.encode's ids."""
    t = request.getfixturevalue(which)
    assert t._rust is not None  # the fast path is the one under test
    for text in ENCODE_TEXTS:
        assert t.encode(text, add_special_tokens=add_special_tokens) == t.hf.encode(
            text, add_special_tokens=add_special_tokens
        ), text


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_encode_gives_the_hf_tokenizers_ids_for_any_text(tok, text):
    assert tok.encode(text, add_special_tokens=False) == tok.hf.encode(text, add_special_tokens=False)


def test_encode_leaves_a_tokenizer_with_truncation_set_to_hf(tok):
    """A truncation left on the Rust tokenizer (by another caller) must not cut a prompt:
    encode goes through hf.encode then, which turns it off for the call."""
    text = "one two three four five six seven eight"
    full = tok.encode(text)
    tok.hf.backend_tokenizer.enable_truncation(max_length=3)
    try:
        assert tok.encode(text) == full
    finally:
        tok.hf.backend_tokenizer.no_truncation()
