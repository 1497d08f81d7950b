"""Forced tool calls end to end (ingress + replica + engine on CPU, tiny:llama with random weights,
no Ray): tool_choice "required" and a named function, through the openai SDK, streamed and not.
Whatever the random model prefers, the grammar makes it write calls in its template's format
(Hermes tags, Llama 3 JSON) whose arguments validate against the tool's parameters schema."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.deployments.tool_fixtures import PICK_PARAMS, WEATHER_PARAMS, hermes_tokenizer, llama3_tokenizer

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

MODEL = "tiny:llama"
EOS = "2"  # SmolLM2's <|im_end|>: biased up, a call is followed by the end as soon as the grammar allows

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "pick", "description": "Pick", "parameters": PICK_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "pick": PICK_PARAMS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["hermes", "llama3"])
def client(request) -> Iterator[openai.OpenAI]:
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve (no Ray is started)
    from replica.models import load_tokenizer
    from tests.loadtest.conftest import engine_server

    base = load_tokenizer(MODEL)
    tokenizer = hermes_tokenizer(base) if request.param == "hermes" else llama3_tokenizer(base)
    with engine_server(MODEL, num_blocks=128, tokenizer=tokenizer) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def create(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, **{"max_tokens": 120, **kw})


def check_calls(calls: list[tuple[str, str]], allowed: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in allowed
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def streamed(client: openai.OpenAI, **kw) -> tuple[str, list[tuple[str, str]], list[str], str | None]:
    """(content, calls as (name, arguments), call ids, finish reason) of a streamed request."""
    content, calls, finish = "", {}, None
    for chunk in create(client, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    ordered = [calls[i] for i in sorted(calls)]
    assert sorted(calls) == list(range(len(calls)))  # indexes 0, 1, ...
    return content, [(c["name"], c["arguments"]) for c in ordered], [c["id"] for c in ordered], finish


@pytest.mark.parametrize(
    "tool_choice, allowed",
    [
        ("required", {"get_weather", "pick"}),
        ({"type": "function", "function": {"name": "pick"}}, {"pick"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ],
    ids=["required", "named-pick", "named-weather"],
)
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seeded"])
def test_forced_calls_parse_and_validate(client, tool_choice, allowed, sampling):
    r = create(client, tool_choice=tool_choice, parallel_tool_calls=False, **sampling)
    choice = r.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    check_calls(calls, allowed)
    assert len(calls) == 1 and choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].id.startswith("call_")


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_streamed_forced_calls_equal_non_streamed_for_greedy(client, tool_choice):
    kw = {"tool_choice": tool_choice, "temperature": 0, "logit_bias": {EOS: 100}}
    r = create(client, **kw).choices[0]
    content, calls, ids, finish = streamed(client, **kw)
    assert calls == [(c.function.name, c.function.arguments) for c in r.message.tool_calls or []]
    check_calls(calls, {"get_weather", "pick"})
    assert finish == r.finish_reason == "tool_calls" and not content
    assert all(i and i.startswith("call_") for i in ids)


def test_required_may_call_several_tools(client):
    # Parallel calls allowed: sampled runs end once the model picks the end over another call. Each
    # run that ends on its own is calls only, all valid; some run makes several.
    most = 0
    for seed in range(6):
        r = create(client, tool_choice="required", temperature=1.0, seed=seed, max_tokens=200).choices[0]
        if r.finish_reason == "length":  # still calling when max_tokens ran out
            continue
        calls = [(c.function.name, c.function.arguments) for c in r.message.tool_calls or []]
        check_calls(calls, {"get_weather", "pick"})
        assert r.finish_reason == "tool_calls" and r.message.content is None
        most = max(most, len(calls))
    assert most >= 2


def test_a_tool_schema_the_grammar_cannot_compile_is_a_400(client):
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[*TOOLS, bad], tool_choice="required", max_tokens=20
        )
    assert e.value.body["param"] == "tools" and "cannot be compiled" in e.value.body["message"]
    # The same tools with tool_choice auto need no grammar: the request is served.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[*TOOLS, bad], max_tokens=5)
    assert r.choices[0].finish_reason in {"length", "stop", "tool_calls"}
