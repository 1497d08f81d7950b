"""langchain-openai against the server (ingress + replica + engine on CPU, tiny:llama with random
weights and a Hermes tool template, no Ray): ``bind_tools`` with forcing tool choices, and
``with_structured_output`` by json_schema and by function calling, invoked and streamed. The
grammar engine makes even a random model's answers parse into the client's own types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pytest
from pydantic import BaseModel, Field

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
langchain_openai = pytest.importorskip("langchain_openai")

MODEL = "tiny:llama"
QUESTION = "What is the weather in Paris?"


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=8)
    unit: Literal["C", "F"]


class Pick(BaseModel):
    """Pick a number."""

    ok: bool
    n: int = Field(ge=0, le=9)


MODELS = {"Weather": Weather, "Pick": Pick}
PERSON = {  # a plain JSON schema (not a pydantic model)
    "title": "Person",
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve (no Ray is started)
    from replica.models import load_tokenizer
    from tests.deployments.tool_fixtures import hermes_tokenizer
    from tests.loadtest.conftest import engine_server

    with engine_server(MODEL, num_blocks=128, tokenizer=hermes_tokenizer(load_tokenizer(MODEL))) as base:
        yield base


def chat(url: str, **kw):
    return langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120, **{"max_tokens": 80, **kw}
    )


def check_tool_calls(tool_calls: list[dict], allowed: set[str]) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call["name"] in allowed and call["id"].startswith("call_")
        MODELS[call["name"]].model_validate(call["args"])  # raises when the arguments do not fit


@pytest.mark.parametrize(
    "tool_choice, allowed",
    [("any", {"Weather", "Pick"}), (True, {"Weather", "Pick"}), ("Pick", {"Pick"}), ("Weather", {"Weather"})],
)
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "seeded"])
def test_bind_tools_forced_choices(url, tool_choice, allowed, sampling):
    llm = chat(url, **sampling).bind_tools([Weather, Pick], tool_choice=tool_choice, parallel_tool_calls=False)
    msg = llm.invoke(QUESTION)
    check_tool_calls(msg.tool_calls, allowed)
    assert len(msg.tool_calls) == 1 and not msg.invalid_tool_calls
    assert msg.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["any", "Weather"])
def test_bind_tools_streamed_equals_invoked_for_greedy(url, tool_choice):
    llm = chat(url, temperature=0).bind_tools([Weather, Pick], tool_choice=tool_choice, parallel_tool_calls=False)
    whole = llm.invoke(QUESTION)
    chunks = list(llm.stream(QUESTION))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    check_tool_calls(merged.tool_calls, {"Weather", "Pick"})
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 9}], ids=["greedy", "seeded"])
def test_with_structured_output_pydantic(url, method, sampling):
    out = chat(url, **sampling).with_structured_output(Weather, method=method).invoke(QUESTION)
    assert isinstance(out, Weather)  # parsed and validated by langchain


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_json_schema_dict(url, method):
    llm = chat(url, temperature=1.0, seed=2).with_structured_output(PERSON, method=method)
    out = llm.invoke("Describe a person.")
    jsonschema.validate(out, PERSON)
    streamed = list(llm.stream("Describe a person."))  # partial objects as the JSON grows; the last is whole
    assert streamed and streamed[-1] == out
