"""Tool-call parsers: whole outputs, malformed calls kept as content, and streams split anywhere;
the grammar that forces calls (tool_choice "required" / named): whatever tokens it lets through,
the output parses into calls to the allowed tools whose arguments validate."""

from __future__ import annotations

import json
import random

import pytest

from deployments.tool_calls import (
    NO_PARAMETERS,
    PARSERS,
    HermesParser,
    Llama3JsonParser,
    ParsedOutput,
    ToolCall,
    ToolParser,
    forced_calls_grammar,
    parser_for,
)
from tests.deployments.tool_fixtures import PICK_PARAMS, WEATHER_PARAMS

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
        ('<tool_call>{"name": "a", "arguments": {"k": "x\x08"}}</tool_call>', None, [call("a", k="x\x08")]),  # raw ctrl
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


# ----------------------------------------------------------------------------- forced calls

FORCED_TOOLS = [("get_weather", WEATHER_PARAMS), ("pick", PICK_PARAMS), ("no_args", None)]


@pytest.fixture(scope="module")
def grammars():
    pytest.importorskip("xgrammar")
    from replica.grammar import GrammarCache
    from replica.models import load_tokenizer

    tok = load_tokenizer("tiny:llama")
    return tok, GrammarCache(tok.hf, tok.hf.vocab_size, tok.eos_token_ids)


def random_walk(cache, spec, rng: random.Random, max_steps: int = 400) -> list[int]:
    """Tokens drawn uniformly from those the grammar allows, until it terminates (the EOS it
    ended on dropped): the worst a random-weight model can do under the mask."""
    import numpy as np
    import xgrammar

    state = cache.state(spec)
    bitmask = xgrammar.allocate_token_bitmask(1, cache.vocab_size)
    out: list[int] = []
    for _ in range(max_steps):
        if state.is_terminated():
            return out[:-1]
        assert state.fill(bitmask, 0, len(out))
        bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")  # bit i: token i
        allowed = np.flatnonzero(bits[: cache.vocab_size])
        token = int(allowed[rng.randrange(len(allowed))])
        assert state.accept(token)
        out.append(token)
    raise AssertionError("the grammar did not terminate")


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
@pytest.mark.parametrize("choice", ["required", "required_single", "named"])
def test_forced_calls_always_parse_and_validate(grammars, parser_name, choice):
    jsonschema = pytest.importorskip("jsonschema")
    tok, cache = grammars
    parser = PARSERS[parser_name]
    tools = FORCED_TOOLS[:1] if choice == "named" else FORCED_TOOLS
    spec = forced_calls_grammar(parser.call_format, tools, parallel=choice == "required")
    assert spec.kind == "structural_tag" and spec.param == "tools"
    schemas = dict(tools)
    rng = random.Random(f"{parser_name}-{choice}")
    counts = set()
    for _ in range(12):
        text = tok.decode(random_walk(cache, spec, rng))
        parsed = parser.parse(text)
        assert parsed.content is None and parsed.tool_calls, text
        for c in parsed.tool_calls:
            assert c.name in schemas, text
            jsonschema.validate(json.loads(c.arguments), schemas[c.name] or NO_PARAMETERS)
        content, streamed = run_stream(parser, random_split(text, rng))
        assert streamed == parsed.tool_calls and not content.strip()
        counts.add(len(parsed.tool_calls))
    if choice == "required":
        assert max(counts) > 1  # several calls are reachable
    else:
        assert counts == {1}
    if choice == "named":
        assert {c.name for c in parsed.tool_calls} == {"get_weather"}


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
def test_forced_calls_grammar_rejects_other_tools_text_and_bad_arguments(grammars, parser_name):
    _, cache = grammars
    fmt = PARSERS[parser_name].call_format
    spec = forced_calls_grammar(fmt, FORCED_TOOLS[:2], parallel=True)

    def accepts(text: str) -> bool:
        return bool(cache.state(spec).matcher.accept_string(text))

    good = fmt.begin("get_weather") + '{"city": "Paris", "unit": "C"}' + fmt.end
    assert accepts(good) and accepts(good + fmt.separator + fmt.begin("pick") + '{"ok": true, "tags": []}' + fmt.end)
    assert not accepts("Sure! " + good)  # no text before the call
    assert not accepts(fmt.begin("no_args") + "{}")  # not among the forced tools
    no_args = forced_calls_grammar(fmt, FORCED_TOOLS[2:], parallel=True)
    assert cache.state(no_args).matcher.accept_string(fmt.begin("no_args") + "{}" + fmt.end)
    assert not cache.state(no_args).matcher.accept_string(fmt.begin("no_args") + '{"a"')  # no parameters
    assert not accepts(fmt.begin("get_weather") + '{"city": "Paris", "unit": "K"}')  # not in the enum
    assert not accepts(fmt.begin("get_weather") + '{"city": "Paris", "unit": "C", "x": 1}')  # no extra keys
    assert not accepts(fmt.begin("get_weather") + '{"city": "Paris"}')  # "unit" is required
