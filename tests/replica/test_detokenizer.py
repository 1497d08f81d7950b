"""Incremental detokenization: broken characters, prompt context, stop strings, the Rust
stream against the Python path (SmolLM2 tokenizer). The byte-level path is tested with its
tables in test_tokenizer.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replica.detokenizer import IncrementalDetokenizer
from replica.models import load_tokenizer
from replica.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("default")


def stream(tok: Tokenizer, ids: list[int], stop=(), prompt=(), step: int = 1):
    """Feed ids ``step`` at a time; return (deltas, hit index or None, flushed text)."""
    d = IncrementalDetokenizer(tok, list(prompt), tuple(stop))
    deltas, hit_at = [], None
    for i in range(0, len(ids), step):
        text, hit = d.add(ids[i : i + step])
        deltas.append(text)
        if hit:
            hit_at = i
            break
    return deltas, hit_at, d.flush()


def first_completed_stop(text: str, stop) -> str:
    """Reference: cut the text at the stop string that is completed first, char by char."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            return text[: end - len(max(hits, key=len))]
    return text


def test_multibyte_characters_split_across_tokens_are_never_emitted_broken(tok):
    text = "Emoji 🎉🚀 and 世界 and é, ok 👍🏽!"
    ids = tok.encode(text)
    # The test is only meaningful if some single token is half a character.
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    deltas, hit, rest = stream(tok, ids)
    assert hit is None
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + rest == text
    assert rest == ""  # nothing needed holding back at the end


def test_incomplete_character_at_the_end_is_released_by_flush(tok):
    ids = tok.encode("ok 🎉")
    partial = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith(REPLACEMENT))
    d = IncrementalDetokenizer(tok, [], ())
    text, hit = d.add(ids[:partial])
    assert not hit and REPLACEMENT not in text
    assert text + d.flush() == tok.decode(ids[:partial])


def test_leading_space_of_first_token_kept_with_prompt_context(tok):
    prompt = tok.encode("The answer is")
    ids = tok.encode("The answer is 42 today")[len(prompt) :]
    deltas, _, rest = stream(tok, ids, prompt=prompt)
    assert "".join(deltas) + rest == " 42 today"


def test_stop_string_spanning_tokens_drops_it_and_everything_after(tok):
    text = "Hello world. The end is near."
    ids = tok.encode(text)
    stop = "lo wor"  # spans the tokens "Hello" and " world"
    assert not any(stop in tok.decode([i]) for i in ids)
    deltas, hit_at, rest = stream(tok, ids, stop=(stop,))
    assert hit_at is not None and hit_at < len(ids) - 1  # stopped early
    assert "".join(deltas) == "Hel"
    assert rest == ""  # after a hit flush releases nothing


def test_text_that_may_start_a_stop_string_is_held_back_then_released(tok):
    ids = tok.encode("Hello world? yes")
    d = IncrementalDetokenizer(tok, [], ("world!",))
    out = []
    for i in ids:
        text, hit = d.add([i])
        assert not hit
        out.append(text)
        assert not "".join(out).endswith(" world")  # held back: could become "world!"
    assert "".join(out) + d.flush() == "Hello world? yes"


def test_flush_releases_held_back_prefix_without_a_hit(tok):
    d = IncrementalDetokenizer(tok, [], ("STOP NOW",))
    text, hit = d.add(tok.encode("go STOP"))
    assert (text, hit) == ("go ", False)
    assert d.flush() == "STOP"
    assert d.text == "go STOP"


def test_stop_at_the_very_end_leaves_nothing_after(tok):
    deltas, hit_at, rest = stream(tok, tok.encode("Answer: 42</s>"), stop=("</s>",))
    assert hit_at is not None
    assert "".join(deltas) == "Answer: 42" and rest == ""


def test_add_after_stop_is_a_no_op(tok):
    d = IncrementalDetokenizer(tok, [], ("b",))
    assert d.add(tok.encode("a b c")) == ("a ", True)
    assert d.add(tok.encode(" more")) == ("", True)
    assert d.stopped == "b"


def test_special_tokens_are_skipped_in_output(tok):
    ids = tok.encode("Hi!") + [2]  # <|im_end|>
    deltas, _, rest = stream(tok, ids)
    assert "".join(deltas) + rest == "Hi!"


def test_out_of_vocab_ids_from_a_bigger_model_vocab_do_not_crash(tok):
    ids = tok.encode("ab") + [100_000] + tok.encode("cd")
    deltas, _, rest = stream(tok, ids)
    assert "".join(deltas) + rest == "abcd"


_alphabet = st.sampled_from(list("ab c.\n") + ["é", "世", "🎉", "ST", "OP"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(_alphabet, min_size=0, max_size=30),
    stop=st.lists(st.text(alphabet="ab c.é世🎉STOP", min_size=1, max_size=4), max_size=3),
    step=st.integers(1, 3),
)
def test_streamed_text_equals_reference_cut(tok, pieces, stop, step):
    text = "".join(pieces)
    ids = tok.encode(text)
    deltas, _, rest = stream(tok, ids, stop=stop, step=step)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + rest == first_completed_stop(tok.decode(ids), stop)


class _NotByteLevel(Tokenizer):
    """The same tokenizer as if its decoder were not byte-level: the detokenizer's other paths."""

    def token_bytes(self, *, skip_special_tokens: bool) -> None:
        return None


@pytest.fixture(scope="module")
def rust_tok(tok) -> Tokenizer:
    return _NotByteLevel(tok.hf, eos_token_ids=tok.eos_token_ids, name="no byte table")


def _python_path(tok: Tokenizer, prompt, stop=()) -> IncrementalDetokenizer:
    d = IncrementalDetokenizer(tok, prompt, stop)
    d._stream = None  # the reference: two Python-level decodes per step
    return d


def test_the_fast_rust_stream_is_used_for_a_real_tokenizer(rust_tok):
    d = IncrementalDetokenizer(rust_tok, rust_tok.encode("hi"))
    assert d._stream is not None and d._pieces is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.sampled_from(list("ab é€😀\n,.") + ["日本", " the", "ünï"]), max_size=25),
    extra=st.lists(st.integers(0, 60_000), max_size=6),
    stop=st.lists(st.sampled_from(["é€", " the", "b\n", "😀a"]), max_size=2),
)
def test_fast_stream_deltas_equal_the_python_path(rust_tok, pieces, extra, stop):
    """Same deltas token by token (and the same flush) as the reference algorithm, with
    multi-byte characters, stop strings and ids outside the tokenizer's vocabulary."""
    tok = rust_tok
    ids = tok.encode("".join(pieces), add_special_tokens=False) + extra
    prompt = tok.encode("Say:", add_special_tokens=False)
    fast, ref = IncrementalDetokenizer(tok, prompt, tuple(stop)), _python_path(tok, prompt, tuple(stop))
    assert fast._stream is not None
    for t in ids:
        assert fast.add([t]) == ref.add([t])
    assert fast.flush() == ref.flush()
    assert fast.text == ref.text
