"""Tool-call parsers: whole outputs, malformed calls kept as content, and streams split anywhere."""

from __future__ import annotations

import json
import random

import pytest

from deployments.tool_calls import (
    PARSERS,
    HermesParser,
    Llama3JsonParser,
    ParsedOutput,
    ToolCall,
    ToolParser,
    parser_for,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}'


def call(name: str, **args: object) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (f"<tool_call>\n{WEATHER}\n</tool_call>", None, [call("get_weather", city="Paris", unit="°C")]),
        (  # text around, two calls, the second unclosed (the model stopped on EOS)
            'Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {"x": [1, 2]}}',
            "Let me check.",
            [call("a"), call("b", x=[1, 2])],
        ),
        ("no calls here", "no calls here", []),
        ("<tool_call>{not json}</tool_call> tail", "<tool_call>{not json}</tool_call> tail", []),  # malformed
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
        (  # one good, one malformed: the malformed one stays content
            '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": 3}</tool_call>',
            '<tool_call>{"name": 3}</tool_call>',
            [call("a")],
        ),
        ('<tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call>', None, [call("a", k=1)]),  # str args
    ],
)
def test_hermes_parse(text, content, calls):
    assert HermesParser().parse(text) == ParsedOutput(content, calls)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [call("get_weather", city="Paris")]),
        ('<|python_tag|>{"name": "f", "arguments": {"a": 1}}', None, [call("f", a=1)]),
        (
            '  {"name": "f", "parameters": {}}; {"name": "g", "parameters": {"b": true}}',
            None,
            [call("f"), call("g", b=True)],
        ),
        ('[{"name": "f", "parameters": {}}]', None, [call("f")]),
        ("The answer is 4.", "The answer is 4.", []),
        ('{"answer": 4}', '{"answer": 4}', []),  # JSON, but not a call
        ('{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),  # cut short
    ],
)
def test_llama3_json_parse(text, content, calls):
    assert Llama3JsonParser().parse(text) == ParsedOutput(content, calls)


def run_stream(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    stream = parser.stream()
    events = [e for p in pieces for e in stream.feed(p)] + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if isinstance(e, ToolCall)]


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


STREAM_CASES = [
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool_call>"),
    ("hermes", 'Sure <b>now</b>.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\n<tool_call>' + WEATHER),
    ("hermes", "<tool_call>{broken</tool_call> and <tool_cal no call"),
    ("hermes", "plain text with < and <tool"),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": "x;y"}}; {"name": "g", "parameters": {}}'),
    ("llama3_json", '\n {"name": "f", "parameters": {"a": 1}}'),
    ("llama3_json", "<b>not a call</b>"),
    ("llama3_json", '{"name": "f", "parameters": '),
]


@pytest.mark.parametrize("name, text", STREAM_CASES)
def test_streaming_split_anywhere_gives_the_same_calls(name, text):
    parser = PARSERS[name]
    whole = parser.parse(text)
    rng = random.Random(0)
    splits = [[text], list(text), *(random_split(text, rng) for _ in range(50))]
    for pieces in splits:
        content, calls = run_stream(parser, pieces)
        assert calls == whole.tool_calls, pieces
        assert (content.strip() or None) == whole.content, pieces


def test_hermes_stream_passes_content_on_before_the_call_ends():
    stream = HermesParser().stream()
    assert stream.feed("Hello <tool") == ["Hello "]  # "<tool" may open a call: held back
    assert stream.feed('_call>{"name": "a", "arguments"') == []
    assert stream.feed(": {}}</tool_call>") == [call("a")]  # the call as soon as it closes
    assert stream.feed("\n") == [] and stream.finish() == []  # blank lines after calls are dropped


def test_llama3_stream_plain_text_is_not_held():
    stream = Llama3JsonParser().stream()
    assert stream.feed("  ") == [] and stream.feed("Hi") == ["  Hi"] and stream.feed(" there") == [" there"]


def test_call_ids_are_unique_and_not_part_of_equality():
    a, b = call("f"), call("f")
    assert a == b and a.id != b.id and a.id.startswith("call_")


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{% for tool in tools %}<tool_call>{% endfor %}", "hermes"),
        ("{{- '<|python_tag|>' }} ipython", "llama3_json"),
        (None, "hermes"),
    ],
)
def test_parser_for_template(template, expected):
    assert parser_for("auto", template).name == expected
    assert parser_for("llama3_json", template).name == "llama3_json"
