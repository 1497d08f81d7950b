"""SamplingParams validation: every bad value is an InvalidRequestError naming its parameter."""

from __future__ import annotations

import pytest

from replica.errors import InvalidRequestError
from replica.request import MAX_STOP_STRINGS, Request, SamplingParams


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": "1"}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": False}, "top_k"),
        ({"seed": "7"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
    ],
)
def test_bad_values_are_refused_with_their_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**kwargs)
    assert exc.value.param == param
    assert param in exc.value.message


def test_good_values_and_normalisation():
    p = SamplingParams(max_tokens=8, temperature=0, top_p=1, top_k=-1, stop="END", stop_token_ids=[3])
    assert p.greedy and p.stop == ("END",) and p.stop_token_ids == (3,)
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize("n", [0, 129, True, 2.0])
def test_n_must_be_an_integer_in_range(n):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(n=n)
    assert e.value.param == "n"


def test_choice_i_has_seed_plus_i_and_one_sequence():
    p = SamplingParams(n=3, seed=10, temperature=0.5)
    assert [(c.n, c.seed, c.temperature) for c in (p.for_choice(i) for i in range(3))] == [
        (1, 10, 0.5),
        (1, 11, 0.5),
        (1, 12, 0.5),
    ]
    assert SamplingParams(n=2).for_choice(1).seed is None
    r = Request("r", [1, 2, 3], p)
    r.make_children()
    assert [c.request_id for c in r.children] == ["r #0", "r #1", "r #2"]
    assert all(c.parent is r and c.prompt_token_ids is r.prompt_token_ids for c in r.children)
    assert [c.index for c in r.children] == [0, 1, 2]
