from __future__ import annotations

from dataclasses import dataclass

from router.prompt_tokens import extract_prompt_token_ids


@dataclass
class Req:
    prompt_token_ids: list[int]


def test_kwarg_wins():
    assert extract_prompt_token_ids([[9, 9]], {"prompt_token_ids": [1, 2]}) == [1, 2]


def test_first_positional_list_object_or_dict():
    assert extract_prompt_token_ids([(1, 2, 3)], {}) == [1, 2, 3]
    assert extract_prompt_token_ids([Req([4, 5])], {}) == [4, 5]
    assert extract_prompt_token_ids([{"prompt_token_ids": [6]}], None) == [6]
    assert extract_prompt_token_ids([{"ids": [6]}], None, field="ids") == [6]


def test_unusable_shapes_give_none():
    assert extract_prompt_token_ids([], {}) is None
    assert extract_prompt_token_ids(["hello"], {}) is None
    assert extract_prompt_token_ids([[1, "x"]], {}) is None
    assert extract_prompt_token_ids([[True, False]], {}) is None
    assert extract_prompt_token_ids([[]], {}) is None
    assert extract_prompt_token_ids(None, {"prompt_token_ids": "text"}) is None
