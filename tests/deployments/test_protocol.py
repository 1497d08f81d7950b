"""OpenAI request models: what is accepted, what is rejected, and what reaches SamplingParams."""

from __future__ import annotations

import pydantic
import pytest

from deployments.protocol import ChatCompletionRequest, CompletionRequest, validation_message
from replica.errors import InvalidRequestError

MSGS = [{"role": "user", "content": "hi"}]


def test_completion_defaults_follow_openai():
    r = CompletionRequest(model="m", prompt="x")
    assert r.max_tokens == 16 and r.n == 1 and not r.stream and not r.include_usage
    p = r.sampling_params(r.max_tokens)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos) == (1.0, 1.0, 0, None, (), False)


def test_chat_max_completion_tokens_supersedes_max_tokens():
    assert ChatCompletionRequest(model="m", messages=MSGS).requested_max_tokens is None
    assert ChatCompletionRequest(model="m", messages=MSGS, max_tokens=5).requested_max_tokens == 5
    r = ChatCompletionRequest(model="m", messages=MSGS, max_tokens=5, max_completion_tokens=7)
    assert r.requested_max_tokens == 7


def test_stop_and_engine_extras_reach_sampling_params():
    r = ChatCompletionRequest(
        model="m",
        messages=MSGS,
        stop="END",
        seed=4,
        temperature=0,
        ignore_eos=True,
        min_tokens=2,
        top_k=5,
        stop_token_ids=[7],
        stream=True,
        stream_options={"include_usage": True},
    )
    p = r.sampling_params(10)
    assert (p.stop, p.seed, p.greedy, p.ignore_eos, p.min_tokens, p.top_k, p.stop_token_ids) == (
        ("END",),
        4,
        True,
        True,
        2,
        5,
        (7,),
    )
    assert r.include_usage


def test_sampling_params_errors_stay_typed():
    r = CompletionRequest(model="m", prompt="x", min_tokens=20)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        r.sampling_params(10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"frequency_penalty": 2.5},
        {"logit_bias": {"5": -101.0}},
        {"logit_bias": {"-5": 1.0}},
        {"stream_options": {"include_usage": True}},  # without stream
        {"functions": []},  # unknown to this server: rejected, not ignored
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},  # no function
        {"response_format": {"type": "yaml"}},
        {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
    ],
)
def test_unsupported_chat_fields_are_rejected(kwargs):
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest(**{"model": "m", "messages": MSGS, **kwargs})


def test_echoed_assistant_message_is_accepted():
    # What openai clients send back when a previous reply is appended to the conversation.
    msg = {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None}
    r = ChatCompletionRequest(model="m", messages=[*MSGS, msg, *MSGS])
    assert [m["role"] for m in r.template_messages()] == ["user", "assistant", "user"]


@pytest.mark.parametrize("prompt, expected", [("abc", "abc"), (["abc"], "abc"), ([1, 2], [1, 2]), ([[1, 2]], [1, 2])])
def test_prompt_forms(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"best_of": 3, "stream": True},
        {"n": 3, "best_of": 2},
        {"best_of": 129},
        {"suffix": "x"},
        {"prompt": [[1], [2]]},
        {"logprobs": 21},
        {"logprobs": -1},
        {"logprobs": True},
    ],
)
def test_unsupported_completion_fields_are_rejected(kwargs):
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(**{"model": "m", "prompt": "x", **kwargs})


def test_n_reaches_the_sampling_params_and_best_of_equal_to_n_is_accepted():
    r = CompletionRequest(model="m", prompt="x", n=3, best_of=3, seed=5)
    assert r.sampling_params(4).n == 3 and r.sampling_params(4).seed == 5
    assert ChatCompletionRequest(model="m", messages=MSGS, n=2).sampling_params(4).n == 2
    assert ChatCompletionRequest(model="m", messages=MSGS, n=None).sampling_params(4).n == 1
    ranked = CompletionRequest(model="m", prompt="x", n=2, best_of=4).sampling_params(4)
    assert ranked.n == 4 and ranked.logprobs == 0  # candidates, with the logprobs that rank them
    assert CompletionRequest(model="m", prompt="x", best_of=3, logprobs=2).sampling_params(4).logprobs == 2
    with pytest.raises(pydantic.ValidationError, match="cannot be streamed"):
        CompletionRequest(model="m", prompt="x", n=2, best_of=4, stream=True)
    with pytest.raises(pydantic.ValidationError, match="best_of must be >= n"):
        CompletionRequest(model="m", prompt="x", n=3, best_of=2)


def test_logprob_fields_map_to_the_engine():
    def params(cls, **kw):
        return cls(model="m", **kw).sampling_params(4)

    chat = dict(messages=[{"role": "user", "content": "x"}])
    assert (params(ChatCompletionRequest, **chat).logprobs, params(ChatCompletionRequest, **chat).prompt_logprobs) == (
        None,
        None,
    )
    assert params(ChatCompletionRequest, **chat, logprobs=True).logprobs == 0
    p = params(ChatCompletionRequest, **chat, logprobs=True, top_logprobs=20)
    assert (p.logprobs, p.prompt_logprobs) == (20, None)
    p = params(CompletionRequest, prompt="x", logprobs=3)
    assert (p.logprobs, p.prompt_logprobs) == (3, None)
    p = params(CompletionRequest, prompt="x", logprobs=3, echo=True)
    assert (p.logprobs, p.prompt_logprobs) == (3, 3)
    p = params(CompletionRequest, prompt="x", echo=True)  # echo alone: the ingress prepends the text
    assert (p.logprobs, p.prompt_logprobs) == (None, None)


def test_top_k_beyond_int64_is_rejected():
    # The engine's sampler holds top_k in an int64 array; 2**63 used to fail every request of its step.
    assert CompletionRequest(model="m", prompt="x", top_k=2**63 - 1).top_k == 2**63 - 1
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        CompletionRequest(model="m", prompt="x", top_k=2**63)


def test_validation_message_names_the_parameter():
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest(model="m", prompt="x", temperature=5)
    message, param = validation_message(e.value.errors())
    assert param == "temperature" and message.startswith("temperature: ")
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest(model="m", prompt="x", bogus=1)
    assert validation_message(e.value.errors()) == ("Unrecognized request argument supplied: bogus", "bogus")
