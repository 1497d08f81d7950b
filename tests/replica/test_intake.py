"""Request intake on its own (no engine, no step): what a request becomes, and what is refused."""

from __future__ import annotations

import pytest

from replica.admission import AdmissionController
from replica.errors import InvalidRequestError, RequestTooLongError
from replica.grammar import GrammarSpec
from replica.intake import RequestIntake
from replica.kv_cache import KVCacheManager
from replica.request import SamplingParams
from tests.replica.test_engine import VOCAB, CharTokenizer


def intake(max_model_len: int = 32) -> RequestIntake:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    return RequestIntake(CharTokenizer(), VOCAB, AdmissionController(kv, max_model_len=max_model_len, watermark=0.0))


def test_a_request_is_tokenized_and_its_choices_share_one_prompt_logprobs_list():
    req = intake().make("r", "abc", SamplingParams(max_tokens=4, n=3, logprobs=1, prompt_logprobs=1))
    assert req.prompt_token_ids == [97, 98, 99] and req.eos_token_ids == frozenset({3})
    assert [c.index for c in req.children] == [0, 1, 2]
    assert all(c.prompt_logprobs is req.prompt_logprobs for c in req.children) and req.prompt_logprobs == [None]


def test_refusals_name_their_parameter():
    it = intake(max_model_len=8)
    with pytest.raises(RequestTooLongError):
        it.make("r", "abcdefg", SamplingParams(max_tokens=4))
    for prompt, match in (([VOCAB], "token ids must be in"), ([1.5], "integer token ids"), ("", "at least one")):
        with pytest.raises(InvalidRequestError, match=match) as e:
            it.make("r", prompt, SamplingParams(max_tokens=1))
        assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        it.make("", "abc", SamplingParams(max_tokens=1))
    assert e.value.param == "request_id"
    with pytest.raises(InvalidRequestError, match="Hugging Face tokenizer") as e:
        it.make("r", "abc", SamplingParams(max_tokens=1, guided=GrammarSpec("json_object")))
    assert e.value.param == "response_format"
