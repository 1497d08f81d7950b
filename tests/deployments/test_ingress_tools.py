"""Tool calls through the ingress, seen by the openai SDK: tools rendered by the model's own chat
template (a tiny Hermes-style one on the real SmolLM2 tokenizer), a scripted model output parsed
back into ``tool_calls``, streamed and not; a template without tool support answers 400."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError

from deployments.errors import ReplicaError
from deployments.ingress import IngressSettings, OpenAIService, build_api, template_supports_tools
from deployments.llm import GenerateRequest, ModelInfo
from replica.models import load_tokenizer
from replica.outputs import Delta, Usage
from replica.request import FinishReason
from replica.tokenizer import Tokenizer
from tests.deployments.fakes import FakeMetricsBackend

pytestmark = pytest.mark.timeout(60)

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

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


def hermes_tokenizer(base: Tokenizer) -> Tokenizer:
    hf = copy.deepcopy(base.hf)
    hf.chat_template = HERMES_TEMPLATE
    return Tokenizer(hf, eos_token_ids=base.eos_token_ids, name="hermes-test")


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
