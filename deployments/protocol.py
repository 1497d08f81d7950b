"""Pydantic models of the OpenAI HTTP schema: /v1/completions, /v1/chat/completions, /v1/models.

Unknown request fields are rejected (OpenAI answers 400 "Unrecognized request argument"),
and parameters this server does not implement are rejected with a clear message rather
than silently ignored (suffix, streamed best_of > n...). Logprobs: chat ``logprobs``/``top_logprobs``
and completions ``logprobs`` (with ``echo``) up to ``MAX_LOGPROBS`` alternatives, per choice
(deployments/logprobs.py builds the response objects). Engine extras used by
benchmarks are accepted: ignore_eos, min_tokens, top_k, stop_token_ids.

What vLLM-compatible load generators send by default is accepted unchanged (guidellm 0.8,
aiperf 0.13, ``vllm bench serve``; see tests/deployments/test_protocol.py for their bodies):
``stream_options.continuous_usage_stats`` (honoured: usage in every chunk), ``stop: null``,
``logprobs: null``, ``repetition_penalty: 1.0`` (no penalty), and
``max_completion_tokens`` / ``ignore_eos``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from replica.errors import InvalidRequestError
from replica.grammar import GrammarSpec
from replica.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_REPETITION_PENALTY, SamplingParams

MAX_GUIDED_CHOICES = 256


def _canonical_json(v: Any) -> str:
    """A schema as the grammar cache's key: compact JSON, the client's key order kept (it is the
    order the properties are generated in)."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------- requests


def _valid_unicode(s: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they cannot be encoded, so the tokenizer would fail.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains {s[exc.start]!r}, a lone surrogate, which is not valid Unicode") from None
    return s


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = list[StrictInt]  # strict: JSON true/false or 1.0 are not token ids


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk (guidellm, aiperf send it)
    include_obfuscation: bool | None = None  # newer clients send it; nothing to obfuscate here


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)  # choices; seed + i for choice i (replica/request.py)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's (HF semantics: over prompt and output, 1 is none); `vllm bench serve` sends 1.0
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # vLLM's
    # engine extras (not OpenAI; vLLM-compatible names) for benchmarking
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    # Bounded: the sampler packs top_k into an int64 array; a larger value failed the whole engine step.
    top_k: int = Field(default=0, ge=-1, le=2**63 - 1)
    stop_token_ids: TokenIds | None = None
    # Structured output, vLLM's extras (at most one; on chat, not together with response_format)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, min_length=1, max_length=4096)
    guided_choice: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_GUIDED_CHOICES)

    @field_validator("guided_json")
    @classmethod
    def _guided_json(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError("guided_json must be a JSON schema (an object, or its JSON text)") from None
            if not isinstance(v, dict):
                raise ValueError("guided_json must be a JSON schema object")
        return v

    def grammar_spec(self) -> GrammarSpec | None:
        """The grammar the output must match, if any; raises InvalidRequestError when several are given."""
        given = [
            (name, spec)
            for name, spec in (
                (
                    "guided_json",
                    None
                    if self.guided_json is None
                    else GrammarSpec("json_schema", _canonical_json(self.guided_json), "guided_json"),
                ),
                (
                    "guided_regex",
                    None if self.guided_regex is None else GrammarSpec("regex", self.guided_regex, "guided_regex"),
                ),
                (
                    "guided_choice",
                    None
                    if self.guided_choice is None
                    else GrammarSpec("choice", _canonical_json(self.guided_choice), "guided_choice"),
                ),
            )
            if spec is not None
        ]
        if len(given) > 1:
            raise InvalidRequestError("give at most one of guided_json, guided_regex, guided_choice", param=given[1][0])
        return given[0][1] if given else None

    # Field validators, not a model validator: the 400 then names the parameter (``param``).
    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(v)}")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias!r} for token {key}")
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk; as in vLLM, only together with include_usage."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def logprob_params(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) for the engine: alternatives per output / prompt token, None = none."""
        return None, None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine sampling parameters; raises InvalidRequestError on a bad combination."""
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        logprobs, prompt_logprobs = self.logprob_params()
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            n=self.n or 1,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            min_p=self.min_p or 0.0,
            guided=self.grammar_spec(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool | None = False  # the prompt text (and with logprobs, its tokens' logprobs) first
    # The sampled token's logprob and the N most likely alternatives' (vLLM's cap, not legacy OpenAI's 5).
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def logprob_params(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    @field_validator("suffix")
    @classmethod
    def _completion_unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v:  # null, false, 0 and "" mean "not asked for"
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        """best_of candidates, the n with the highest cumulative logprob returned (not streamed, as OpenAI)."""
        n = info.data.get("n") or 1
        if v is None or v == n:
            return v
        if v < n:
            raise ValueError(f"best_of must be >= n (got best_of={v}, n={n})")
        if v > MAX_N:
            raise ValueError(f"best_of must be at most {MAX_N} (got {v})")
        if info.data.get("stream"):
            raise ValueError("best_of > n cannot be streamed: the best candidates are known only at the end")
        return v

    def ranks_candidates(self) -> bool:
        return self.best_of is not None and self.best_of > (self.n or 1)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        params = super().sampling_params(max_tokens)
        if not self.ranks_candidates():
            return params
        # best_of candidates (choice i: seed + i), each with its sampled tokens' logprobs to rank them by.
        logprobs = 0 if params.logprobs is None else params.logprobs
        return dataclasses.replace(params, n=self.best_of, logprobs=logprobs)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, p: Any) -> str | list[int]:
        """One prompt, as text or token ids; a batch of one is unwrapped."""
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"batches of prompts are not supported; send one prompt per request (got {len(p)})")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ValueError("prompt must not be empty")
        return p


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends and expects it


class ChatToolCall(_Strict):
    """A call in an assistant message a client sends back (and in a response)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    # Fields a client echoes back when it appends a previous assistant message.
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it: "developer" is OpenAI's new name for
        "system", which is all templates know; tool calls carry their arguments as an object
        (what Hugging Face templates expect), and a tool result its call id."""
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            msg["name"] = self.name
        return msg


def _args(call: ChatToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments  # as sent: the template shows what the model wrote


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute: stored as schema_, sent and read as "schema".
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # accepted; the grammar is always strict (no properties the schema omits)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_with_type(cls, v: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        if v is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema is only allowed with type json_schema")
        return v

    def grammar_spec(self) -> GrammarSpec | None:
        if self.type == "json_object":
            return GrammarSpec("json_object")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequestError(
                    "response_format of type json_schema needs json_schema", param="response_format"
                )
            return GrammarSpec("json_schema", _canonical_json(self.json_schema.schema_))
        return None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; the parsers return every call the model wrote

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v == "none":
            return v
        tools: list[ChatTool] | None = info.data.get("tools")
        if not tools:
            raise ValueError("tool_choice is only allowed when tools are given")
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names the function {v.function.name!r}, which is not among the tools")
        return v

    @property
    def forced_tools(self) -> list[FunctionDefinition] | None:
        """The functions the output must call (a grammar forces it): any of the tools for
        tool_choice "required", the named one for a named choice; None when text may answer."""
        if not self.tools:
            return None
        if self.tool_choice == "required":
            return [t.function for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t.function for t in self.tools if t.function.name == self.tool_choice.function.name][:1]
        return None

    @property
    def parallel_forced_calls(self) -> bool:
        """Whether a forced output may hold several calls: only for "required", and unless
        parallel_tool_calls is false (a named choice is one call to that function, as OpenAI's)."""
        return self.tool_choice == "required" and self.parallel_tool_calls is not False

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools to render into the prompt (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return v

    def logprob_params(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0, None) if self.logprobs else (None, None)

    def grammar_spec(self) -> GrammarSpec | None:
        extra = super().grammar_spec()
        fmt = self.response_format.grammar_spec() if self.response_format is not None else None
        if fmt is not None and extra is not None:
            raise InvalidRequestError(f"{extra.param} and response_format cannot both be given", param=extra.param)
        spec = fmt or extra
        if spec is not None and self.forced_tools:
            # Both would constrain the whole output; the ingress adds the tool-call grammar itself.
            raise InvalidRequestError(
                f"{spec.param} cannot be given with a tool_choice that forces a call (the call is the whole output)",
                param=spec.param,
            )
        return spec

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens supersedes the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (an echoed prompt's first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


def _none(v: Any) -> bool:
    return v is None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = Field(default=None, exclude_if=_none)


class DeltaFunction(BaseModel):
    name: str | None = Field(default=None, exclude_if=_none)
    arguments: str | None = Field(default=None, exclude_if=_none)


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_none)
    function: DeltaFunction


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "cbserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the offending parameter) from pydantic/FastAPI errors."""
    if not errors:
        return "invalid request body", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch tags (e.g. "str", "list[int]") from the location.
    loc = [
        p for p in loc if not (p.startswith(("list[", "dict[", "function-")) or p in {"str", "int", "float", "bool"})
    ]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if err.get("type") == "json_invalid":
        return f"Request body is not valid JSON: {err.get('msg', '')}", None
    if err.get("type") == "missing":
        return f"Missing required parameter: {param}", param
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param
