"""Tool calls through the ingress, seen by the openai SDK: tools rendered by the model's own chat
template (tiny Hermes and Llama 3 style ones on the real SmolLM2 tokenizer), a scripted model output
parsed back into ``tool_calls``, streamed and not; tool_choice "required" / named sends the grammar of
the template's call format; a template without tool support answers 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError

from deployments.errors import ReplicaError
from deployments.ingress import IngressSettings, OpenAIService, build_api, template_supports_tools
from deployments.llm import GenerateRequest, ModelInfo
from deployments.tool_calls import NO_PARAMETERS
from replica.models import load_tokenizer
from replica.outputs import Delta, Usage
from replica.request import FinishReason
from replica.tokenizer import Tokenizer
from tests.deployments.fakes import FakeMetricsBackend
from tests.deployments.tool_fixtures import hermes_tokenizer, llama3_tokenizer

pytestmark = pytest.mark.timeout(60)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
OUTPUT = (
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
)


class ScriptedClient:
    """LLMClient whose model writes ``output``, a few characters per delta."""

    def __init__(self, output: str, piece: int = 3) -> None:
        self.output, self.piece = output, piece
        self.requests: list[GenerateRequest] = []

    async def model_info(self) -> ModelInfo:
        return ModelInfo(name="m", model="m", max_model_len=4096, block_size=16)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta | ReplicaError]:
        self.requests.append(req)
        pieces = [self.output[i : i + self.piece] for i in range(0, len(self.output), self.piece)]
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            yield Delta(
                req.request_id,
                p,
                (5,),
                FinishReason.STOP if last else None,
                Usage(len(req.prompt_token_ids), len(pieces)) if last else None,
            )


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return load_tokenizer("default")


def sdk(tokenizer: Tokenizer, client: ScriptedClient) -> AsyncOpenAI:
    service = OpenAIService(client, tokenizer, IngressSettings(model="m"), metrics_backend=FakeMetricsBackend())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t")
    return AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http, max_retries=0)


def test_tokenizer_renders_tools_and_tool_messages(smollm2):
    tok = hermes_tokenizer(smollm2)
    assert template_supports_tools(tok) and not template_supports_tools(smollm2)
    text = tok.render_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS)
    assert '"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")


async def test_tool_calls_non_streamed_with_the_openai_sdk(smollm2):
    client = ScriptedClient(OUTPUT)
    oa = sdk(hermes_tokenizer(smollm2), client)
    r = await oa.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Weather in Paris and Zürich?"}],
        tools=TOOLS,  # type: ignore[arg-type]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Zürich"}]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    # The tools reached the model through its template.
    prompt = smollm2.decode(client.requests[-1].prompt_token_ids)
    assert "<tools>" in prompt and "Weather in a city" in prompt


@pytest.mark.parametrize("piece", [1, 3, 7])
async def test_tool_calls_streamed_with_the_openai_sdk(smollm2, piece):
    oa = sdk(hermes_tokenizer(smollm2), ScriptedClient(OUTPUT, piece))
    stream = await oa.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="auto",
        stream=True,
    )
    content, calls, finish = "", {}, None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        assert "<tool_call>" not in (delta.content or "")
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content.strip() == "Checking."
    assert [json.loads(calls[i]["arguments"]) for i in sorted(calls)] == [{"city": "Paris"}, {"city": "Zürich"}]
    assert all(c["id"].startswith("call_") and c["name"] == "get_weather" for c in calls.values())


async def test_tool_choice_none_renders_without_tools_and_parses_nothing(smollm2):
    client = ScriptedClient(OUTPUT)
    oa = sdk(hermes_tokenizer(smollm2), client)
    r = await oa.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == OUTPUT
    assert r.choices[0].finish_reason == "stop"
    assert "<tools>" not in smollm2.decode(client.requests[-1].prompt_token_ids)


async def test_a_conversation_with_tool_calls_and_results_is_rendered(smollm2):
    client = ScriptedClient("It is sunny in Paris.")
    oa = sdk(hermes_tokenizer(smollm2), client)
    r = await oa.chat.completions.create(
        model="m",
        tools=TOOLS,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        ],
    )
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    prompt = smollm2.decode(client.requests[-1].prompt_token_ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<tool_response>sunny, 21C</tool_response>" in prompt


async def test_a_template_without_tool_support_is_a_400_on_tools(smollm2):
    client = ScriptedClient(OUTPUT)
    oa = sdk(smollm2, client)  # SmolLM2's ChatML template ignores tools
    with pytest.raises(BadRequestError) as e:
        await oa.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,  # type: ignore[arg-type]
        )
    assert e.value.body["param"] == "tools" and "does not support tools" in e.value.body["message"]  # type: ignore[index]
    assert client.requests == []
    # Without tools (or with tool_choice none) the same model serves the request.
    r = await oa.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,
        tool_choice="none",  # type: ignore[arg-type]
    )
    assert r.choices[0].message.content == OUTPUT


FORCED_OUTPUT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time"}}


def forced_grammar(client: ScriptedClient) -> dict:
    guided = client.requests[-1].params.guided
    assert guided is not None and guided.kind == "structural_tag" and guided.param == "tools"
    return json.loads(guided.spec)["format"]


@pytest.mark.parametrize(
    "tool_choice, parallel, names, one_call",
    [
        ("required", None, ["get_weather", "get_time"], False),
        ("required", False, ["get_weather", "get_time"], True),
        ({"type": "function", "function": {"name": "get_weather"}}, None, ["get_weather"], True),
        ({"type": "function", "function": {"name": "get_time"}}, True, ["get_time"], True),  # named: one call
    ],
)
async def test_forcing_choices_send_a_grammar_of_the_models_call_format(
    smollm2, tool_choice, parallel, names, one_call
):
    client = ScriptedClient(FORCED_OUTPUT)
    oa = sdk(hermes_tokenizer(smollm2), client)
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = await oa.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[*TOOLS, CLOCK],  # type: ignore[list-item]
        tool_choice=tool_choice,
        **extra,
    )
    fmt = forced_grammar(client)
    assert fmt["type"] == "tags_with_separator" and fmt["at_least_one"] and fmt["stop_after_first"] == one_call
    assert [t["begin"] for t in fmt["tags"]] == [f'<tool_call>\n{{"name": "{n}", "arguments": ' for n in names]
    schemas = [t["content"]["json_schema"] for t in fmt["tags"]]
    by_name = {"get_weather": TOOLS[0]["function"]["parameters"], "get_time": NO_PARAMETERS}
    assert schemas == [by_name[n] for n in names]
    # Every tool is still shown to the model; the (scripted) call comes back as tool_calls.
    prompt = smollm2.decode(client.requests[-1].prompt_token_ids)
    assert "get_weather" in prompt and "get_time" in prompt
    calls = r.choices[0].message.tool_calls
    assert calls is not None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


async def test_forcing_uses_the_llama3_format_for_a_llama3_template(smollm2):
    client = ScriptedClient('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    oa = sdk(llama3_tokenizer(smollm2), client)
    r = await oa.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
    )
    fmt = forced_grammar(client)
    assert [t["begin"] for t in fmt["tags"]] == ['{"name": "get_weather", "parameters": '] and fmt["separator"] == "; "
    calls = r.choices[0].message.tool_calls
    assert calls is not None and json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls"


async def test_auto_and_none_send_no_grammar(smollm2):
    client = ScriptedClient("Hello.")
    oa = sdk(hermes_tokenizer(smollm2), client)
    for choice in ("auto", "none"):
        await oa.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=choice,  # type: ignore[arg-type]
        )
        assert client.requests[-1].params.guided is None


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"guided_regex": "a+"}, "guided_regex"),
    ],
)
async def test_a_forced_call_with_another_grammar_is_a_400(smollm2, extra, param):
    client = ScriptedClient(FORCED_OUTPUT)
    oa = sdk(hermes_tokenizer(smollm2), client)
    with pytest.raises(BadRequestError) as e:
        await oa.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            extra_body=extra,
        )
    assert e.value.body["param"] == param and "forces a call" in e.value.body["message"]  # type: ignore[index]
    assert client.requests == []
