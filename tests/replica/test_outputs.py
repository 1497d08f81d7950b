"""replica/outputs.py: merging consecutive deltas of one request; RunnerOutput's two forms."""

from __future__ import annotations

import pytest

from replica.outputs import Delta, RunnerOutput, TokenLogprobs, Usage, merge_deltas
from replica.request import FinishReason


def test_merge_concatenates_in_order_and_keeps_the_last_finish():
    usage = Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)
    merged = merge_deltas(
        [
            Delta("r", "Hel", (1,)),
            Delta("r", "", (2,)),  # a token whose text is still held back by the detokenizer
            Delta("r", "lo!", (3,), FinishReason.LENGTH, usage),
        ]
    )
    assert merged == Delta("r", "Hello!", (1, 2, 3), FinishReason.LENGTH, usage)
    assert merged.finished


def test_merge_of_unfinished_deltas_stays_unfinished():
    merged = merge_deltas([Delta("r", "a", (1,)), Delta("r", "b", (2,))])
    assert merged == Delta("r", "ab", (1, 2))
    assert not merged.finished and merged.usage is None


def test_merge_carries_the_error_of_the_last_delta():
    merged = merge_deltas([Delta("r", "a", (1,)), Delta("r", "", (), FinishReason.ERROR, Usage(1, 1), "boom")])
    assert (merged.text, merged.token_ids, merged.finish_reason, merged.error) == (
        "a",
        (1,),
        FinishReason.ERROR,
        "boom",
    )


def test_merge_of_one_delta_is_that_delta():
    d = Delta("r", "x", (7,))
    assert merge_deltas([d]) is d


@pytest.mark.parametrize(
    "deltas, message",
    [
        ([], "at least one"),
        ([Delta("a", "x", (1,)), Delta("b", "y", (2,))], "different requests"),
        ([Delta("a", "", (), FinishReason.STOP, Usage(1, 0)), Delta("a", "y", (2,))], "only be the last"),
    ],
)
def test_merge_refuses_what_cannot_be_one_delta(deltas, message):
    with pytest.raises(ValueError, match=message):
        merge_deltas(deltas)


def test_runner_output_rows_and_dict_agree():
    ids = ("a", "b", "c")
    res = RunnerOutput(request_ids=ids, token_ids=[5, 6, 7])
    assert res.tokens_for(ids) == [5, 6, 7]  # the same rows: no dict built
    assert res._sampled is None
    assert res.tokens_for(("c", "a")) == [7, 5]
    assert res.sampled == {"a": 5, "b": 6, "c": 7}
    assert RunnerOutput({"x": 1}).tokens_for(("x",)) == [1]
    with pytest.raises(KeyError):
        RunnerOutput({"x": 1}).tokens_for(("y",))


@pytest.mark.parametrize("kwargs", [dict(request_ids=("a",)), dict(request_ids=("a",), token_ids=[1, 2]), dict()])
def test_runner_output_refuses_inconsistent_rows(kwargs):
    with pytest.raises(ValueError):
        RunnerOutput(**kwargs)


def test_merge_of_n_choice_deltas_merges_per_choice():
    from replica.outputs import ChoiceDelta

    stop, length = FinishReason.STOP, FinishReason.LENGTH
    a = Delta("g", "", (), choices=(ChoiceDelta(0, "a", (1,)), ChoiceDelta(1, "x", (5,))))
    b = Delta("g", "", (), choices=(ChoiceDelta(1, "y", (6,), stop),))
    c = Delta("g", "", (), length, Usage(3, 4), choices=(ChoiceDelta(0, "b", (2,), length),))
    m = merge_deltas([a, b, c])
    assert m.finish_reason is length and m.usage == Usage(3, 4) and m.num_tokens == 4
    assert m.choices == (ChoiceDelta(0, "ab", (1, 2), length), ChoiceDelta(1, "xy", (5, 6), stop))
    with pytest.raises(ValueError, match="choice 1"):
        merge_deltas([b, Delta("g", "", (), choices=(ChoiceDelta(1, "z", (7,)),))])


def test_merge_concatenates_logprobs_and_keeps_the_prompts():
    a, b = TokenLogprobs(1, -0.5, (1,), (-0.5,)), TokenLogprobs(2, -1.0, (3,), (-0.2,))
    prompt = (None, TokenLogprobs(9, -3.0, (), ()))
    merged = merge_deltas(
        [
            Delta("r", "x", (1,), logprobs=(a,), prompt_logprobs=prompt),
            Delta("r", "", (2,), logprobs=(b,)),
            Delta("r", "", (7,), FinishReason.STOP, Usage(2, 3), logprobs=()),  # a stop token: no entry
        ]
    )
    assert merged.logprobs == (a, b) and merged.prompt_logprobs == prompt and merged.token_ids == (1, 2, 7)
    assert merge_deltas([Delta("r", "a", (1,)), Delta("r", "b", (2,))]).logprobs is None  # nobody asked


def test_merge_of_n_choice_deltas_keeps_each_choices_logprobs():
    from replica.outputs import ChoiceDelta

    a, b, c = (TokenLogprobs(t, -float(t), (t,), (-float(t),)) for t in (1, 2, 5))
    prompt = (None, TokenLogprobs(9, -3.0, (), ()))
    first = Delta(
        "g",
        "",
        (),
        choices=(
            ChoiceDelta(0, "a", (1,), logprobs=(a,), prompt_logprobs=prompt),
            ChoiceDelta(1, "x", (5,), logprobs=(c,), prompt_logprobs=prompt),
        ),
    )
    last = Delta("g", "", (), FinishReason.LENGTH, Usage(2, 3), choices=(ChoiceDelta(0, "b", (2,), logprobs=(b,)),))
    m = merge_deltas([first, last])
    assert m.logprobs is None and m.prompt_logprobs is None  # the request's own fields: n > 1 uses its choices
    assert [(x.index, x.logprobs, x.prompt_logprobs) for x in m.choices] == [(0, (a, b), prompt), (1, (c,), prompt)]
    plain = merge_deltas([Delta("g", "", (), choices=(ChoiceDelta(0, "a", (1,)),))] * 2)
    assert plain.choices[0].logprobs is None  # nobody asked
