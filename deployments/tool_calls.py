"""Tool calls in generated text: parsers for the formats chat templates teach their models.

A model asked to call a tool writes the call as text in a format its chat template showed it:

* ``hermes`` (Hermes, Qwen 2/2.5/3, and any template that uses these tags)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  any number of them, with text around; a last block the model did not close (it stopped
  on EOS right after the JSON) still counts.
* ``llama3_json`` (Llama 3.1 / 3.2 / 3.3 JSON tool calling): the whole output is
  ``{"name": ..., "parameters": {...}}`` (``arguments`` is accepted too), optionally after
  ``<|python_tag|>``; several calls are separated by ``;`` or given as a JSON list.

A parser turns a whole output into ``ParsedOutput`` (``parse``) or, streamed, turns text
deltas into events (``stream``): content text to pass on, and each ``ToolCall`` once
complete. Text that may open a call is held back until it is known to be one; a call whose
JSON is malformed (or has no name) stays content, so nothing the model wrote is lost. The
streamed events, wherever the deltas split the text, give the same calls as ``parse``.

tool_choice "required" or a named function forces calls with a grammar: ``forced_calls_grammar``
writes an xgrammar structural tag that admits only calls in the parser's own format
(``CallFormat``), each to one of the given tools with arguments matching its ``parameters``
schema, so whatever the model's weights the output parses back into calls that validate.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from replica.grammar import GrammarSpec

ToolParserName = Literal["auto", "hermes", "llama3_json"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's ``function.arguments``)
    id: str = field(default_factory=new_call_id, compare=False)


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text outside the calls (stripped), None when there is none
    tool_calls: list[ToolCall]


Event = str | ToolCall  # content text, or a complete call


class ToolStream(Protocol):
    def feed(self, text: str) -> list[Event]:
        """Events made certain by ``text`` (appended to what came before)."""
        ...

    def finish(self) -> list[Event]:
        """The events still held back, once the output is complete."""
        ...


@dataclass(frozen=True)
class CallFormat:
    """How a parser's format writes one call, compactly: ``{"name": <name>, "<args_key>": <object>}``
    between ``open`` and ``close``; calls one after another are joined by ``separator``."""

    open: str
    args_key: str
    close: str
    separator: str

    def begin(self, name: str) -> str:
        return f'{self.open}{{"name": {json.dumps(name)}, "{self.args_key}": '

    @property
    def end(self) -> str:
        return "}" + self.close


class ToolParser(Protocol):
    name: str
    call_format: CallFormat

    def parse(self, text: str) -> ParsedOutput: ...

    def stream(self) -> ToolStream: ...


# Decoding is not strict: a raw control character inside a string is kept (xgrammar 0.2.9 lets a
# forced call write one in a string with maxLength), and the arguments' re-encoding escapes it.


def _call(obj: Any, arg_keys: tuple[str, ...]) -> ToolCall | None:
    """A call from a decoded JSON value: an object with a string name and object arguments."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args, strict=False)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_call(text: str, arg_keys: tuple[str, ...]) -> ToolCall | None:
    try:
        return _call(json.loads(text, strict=False), arg_keys)
    except ValueError:
        return None


def _parsed(segments: list[str], calls: list[ToolCall]) -> ParsedOutput:
    return ParsedOutput("".join(segments).strip() or None, calls)


class _Held:
    """Content events with whitespace-only pieces held back until real text follows (and dropped
    at the end), so that a stream with calls does not emit the blank lines between them."""

    def __init__(self) -> None:
        self._ws = ""

    def content(self, out: list[Event], text: str) -> None:
        if not text:
            return
        if text.isspace():
            self._ws += text
            return
        out.append(self._ws + text)
        self._ws = ""


# ----------------------------------------------------------------------------- hermes


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_ARGS = ("arguments", "parameters")


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesParser:
    name = "hermes"
    call_format = CallFormat(HERMES_OPEN + "\n", "arguments", "\n" + HERMES_CLOSE, "\n")

    def parse(self, text: str) -> ParsedOutput:
        segments: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while (i := text.find(HERMES_OPEN, pos)) >= 0:
            segments.append(text[pos:i])
            j = text.find(HERMES_CLOSE, i + len(HERMES_OPEN))
            end = len(text) if j < 0 else j + len(HERMES_CLOSE)
            call = _json_call(text[i + len(HERMES_OPEN) : len(text) if j < 0 else j], _HERMES_ARGS)
            if call is not None:
                calls.append(call)
            else:
                segments.append(text[i:end])
            pos = end
        segments.append(text[pos:])
        return _parsed(segments, calls)

    def stream(self) -> ToolStream:
        return _HermesStream()


class _HermesStream:
    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._held = _Held()

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while True:
            if not self._in_call:
                i = self._buf.find(HERMES_OPEN)
                if i < 0:
                    keep = _partial_suffix(self._buf, HERMES_OPEN)
                    self._held.content(out, self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                self._held.content(out, self._buf[:i])
                self._buf = self._buf[i + len(HERMES_OPEN) :]
                self._in_call = True
            j = self._buf.find(HERMES_CLOSE)
            if j < 0:
                return out
            self._close(out, self._buf[:j], HERMES_CLOSE)
            self._buf = self._buf[j + len(HERMES_CLOSE) :]

    def _close(self, out: list[Event], body: str, close: str) -> None:
        self._in_call = False
        call = _json_call(body, _HERMES_ARGS)
        if call is not None:
            out.append(call)
        else:
            self._held.content(out, HERMES_OPEN + body + close)

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._in_call:
            self._close(out, self._buf, "")
        else:
            self._held.content(out, self._buf)
        self._buf = ""
        return out


# ----------------------------------------------------------------------------- llama 3 JSON


PYTHON_TAG = "<|python_tag|>"
_LLAMA_ARGS = ("parameters", "arguments")


class Llama3JsonParser:
    name = "llama3_json"
    call_format = CallFormat("", "parameters", "", "; ")

    def parse(self, text: str) -> ParsedOutput:
        calls = self._calls(text)
        return ParsedOutput(None, calls) if calls else _parsed([text], [])

    @staticmethod
    def _calls(text: str) -> list[ToolCall]:
        s = text.strip().removeprefix(PYTHON_TAG).strip()
        if not s.startswith(("{", "[")):
            return []
        dec = json.JSONDecoder(strict=False)
        objs: list[Any] = []
        pos = 0
        try:
            while pos < len(s):
                obj, pos = dec.raw_decode(s, pos)
                objs.extend(obj if isinstance(obj, list) else [obj])
                while pos < len(s) and (s[pos].isspace() or s[pos] == ";"):
                    pos += 1
        except ValueError:
            return []
        calls = [_call(o, _LLAMA_ARGS) for o in objs]
        if not calls or any(c is None for c in calls):
            return []
        return [c for c in calls if c is not None]

    def stream(self) -> ToolStream:
        return _Llama3Stream(self)


class _Llama3Stream:
    """Content passes through unless the output starts like a call (``{``, ``[`` or the
    python tag); then it is all held and parsed at the end."""

    def __init__(self, parser: Llama3JsonParser) -> None:
        self._parser = parser
        self._buf = ""
        self._mode: Literal["undecided", "content", "call"] = "undecided"

    def feed(self, text: str) -> list[Event]:
        if self._mode == "content":
            return [text] if text else []
        self._buf += text
        if self._mode == "call":
            return []
        head = self._buf.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            return []  # blank so far, or possibly the start of the tag
        if head.startswith(("{", "[", PYTHON_TAG)):
            self._mode = "call"
            return []
        self._mode = "content"
        out, self._buf = self._buf, ""
        return [out]

    def finish(self) -> list[Event]:
        text, self._buf = self._buf, ""
        if self._mode == "content":
            return []
        calls = self._parser._calls(text)
        if calls:
            return list(calls)
        return [text] if text.strip() else []


# ----------------------------------------------------------------------------- choice


PARSERS: dict[str, ToolParser] = {"hermes": HermesParser(), "llama3_json": Llama3JsonParser()}


def parser_for(name: ToolParserName, chat_template: str | None) -> ToolParser:
    """The parser ``name``; for "auto", the one whose markers the chat template uses
    (Hermes tags by default: the most common format among open models)."""
    if name != "auto":
        return PARSERS[name]
    template = chat_template or ""
    if HERMES_OPEN in template:
        return PARSERS["hermes"]
    if PYTHON_TAG in template or "ipython" in template:
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]


# ----------------------------------------------------------------------------- forced calls

# Blanks in a row allowed inside forced arguments: a random-weight model could otherwise pad the
# JSON with whitespace until max_tokens (xgrammar needs at least 1).
MAX_ARGUMENT_WHITESPACE = 1
# A function without parameters has an empty parameter list (OpenAI's definition).
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def forced_calls_grammar(
    fmt: CallFormat, tools: Sequence[tuple[str, dict[str, Any] | None]], *, parallel: bool
) -> GrammarSpec:
    """An xgrammar structural tag admitting only calls written in ``fmt`` to ``tools``
    ((name, parameters schema) pairs; no schema: no arguments), each call's arguments matching its
    tool's schema: one call, or with ``parallel`` one or more joined by the format's separator."""
    tags = [
        {
            "type": "tag",
            "begin": fmt.begin(name),
            "content": {
                "type": "json_schema",
                "json_schema": NO_PARAMETERS if params is None else params,
                "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE,
            },
            "end": fmt.end,
        }
        for name, params in tools
    ]
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": fmt.separator,
            "at_least_one": True,
            "stop_after_first": not parallel,
        },
    }
    # A schema that cannot be compiled is a 400 naming the tools (raised on the replica).
    return GrammarSpec("structural_tag", json.dumps(tag, separators=(",", ":"), ensure_ascii=False), param="tools")
