"""Structured outputs end to end (ingress + replica + engine on CPU, tiny:llama, no Ray):
response_format json_schema / json_object and the guided_* extras through xgrammar."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny:llama"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "owner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
            "required": ["ok", "kind"],
        },
    },
    "required": ["id", "owner"],
}
FLAGS = {
    "type": "object",
    "properties": {"on": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
    "required": ["on", "level"],
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve (no Ray is started)
    from tests.loadtest.conftest import engine_server

    with engine_server(MODEL, num_blocks=128) as base:
        yield base


def _chat(url: str, schema: dict | None = None, **extra) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "max_tokens": 60,
        **extra,
    }
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _stream_text(url: str, body: dict) -> tuple[str, str | None]:
    text, reason = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                text += ch["delta"].get("content") or ""
                reason = ch.get("finish_reason") or reason
    return text, reason


@pytest.mark.parametrize("schema", [PERSON, NESTED, FLAGS], ids=["person", "nested", "flags"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}], ids=["greedy", "seeded"])
def test_json_schema_outputs_validate(url, schema, sampling):
    r = _chat(url, schema, **sampling)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    out = json.loads(choice["message"]["content"])
    jsonschema.validate(out, schema)
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("schema", [PERSON, NESTED, FLAGS], ids=["person", "nested", "flags"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}], ids=["greedy", "seeded"])
def test_streamed_outputs_validate_and_equal_non_streamed(url, schema, sampling):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "JSON please"}],
        "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        **sampling,
    }
    text, reason = _stream_text(url, body)
    jsonschema.validate(json.loads(text), schema)
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    assert text == whole["message"]["content"] and reason == whole["finish_reason"] == "stop"


def test_json_object_parses(url):
    from replica.models import load_tokenizer

    # A random model writes keys forever: bias "{}" and "}" so the object closes at its first
    # chance (the grammar still decides where they may go).
    tok = load_tokenizer(MODEL)
    bias = {str(tok.encode(s)[-1]): 100 for s in ("{}", "}")}
    r = _chat(url, response_format={"type": "json_object"}, temperature=0, logit_bias=bias)
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


def test_guided_extras(url):
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "Pick:", "max_tokens": 20, "guided_choice": ["yes", "no", "maybe"]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in {"yes", "no", "maybe"}
    r = _chat(url, guided_regex="[0-9]{3}-[a-c]{2}", temperature=0)
    assert r.status_code == 200, r.text
    import re

    assert re.fullmatch("[0-9]{3}-[a-c]{2}", r.json()["choices"][0]["message"]["content"])
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 40, "temperature": 0, "guided_json": FLAGS},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), FLAGS)


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
        ),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)
def test_bad_grammar_is_a_400(url, extra, param):
    r = _chat(url, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
