"""OpenAI-compatible HTTP ingress: /v1/completions, /v1/chat/completions, /v1/models, /health.

The ingress tokenizes (chat template or prompt -> token ids) and checks lengths before
calling a replica: the router hashes prompt tokens by KV block, so tokens travel with
the request, and a request that can never fit is answered 400 without using a replica.

``OpenAIService`` holds the logic and talks to replicas through an ``LLMClient``;
``build_api`` wraps it in FastAPI; ``OpenAIIngress`` is the Serve deployment that
builds both at replica start (tests use the service with an in-process client).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal, NamedTuple, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deployments.auth import APIKeyMiddleware, AuthSettings, install_log_redaction
from deployments.edge import EdgeLimits, EdgeMiddleware, usable_request_id
from deployments.errors import APIError, ReplicaError, backpressure_error
from deployments.failover import FailoverClient
from deployments.front_proxy import Front, describe_front
from deployments.limits import BodySizeLimitMiddleware, DeadlineClient, RequestLimits
from deployments.llm import GenerateRequest, ModelInfo
from deployments.logprobs import CompletionLogprobsBuilder, TokenTexts, chat_logprobs
from deployments.metrics import IngressMetrics
from deployments.mux import MuxLLMClient
from deployments.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatToolCall,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunction,
    DeltaToolCall,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCallFunction,
    UsageInfo,
    validation_message,
)
from deployments.tool_calls import Event, ToolCall, ToolParser, ToolParserName, forced_calls_grammar, parser_for
from replica.errors import EngineError
from replica.outputs import ChoiceDelta, Delta, TokenLogprobs, Usage
from replica.request import FinishReason

logger = logging.getLogger("ray.serve")
HEALTH_TTL_S = 2.0  # /health asks a replica at most this often (load balancers poll it)
MODEL_INFO_TIMEOUT_S = 30.0  # the first request's fetch of the replicas' model facts

SSE_DONE = b"data: [DONE]\n\n"


# ------------------------------------------------------------- talking to replicas


class LLMClient(Protocol):
    async def model_info(self) -> ModelInfo: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[Delta | ReplicaError]:
        """Deltas of one request; closing the iterator early must abort the request."""
        ...


class HandleLLMClient:
    """LLMClient over a DeploymentHandle to LLMReplica (routing is the handle's router)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)

    async def model_info(self) -> ModelInfo:
        return await self._handle.model_info.remote()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta | ReplicaError]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        gen = self._stream.generate.remote(req)
        done = False
        try:
            async for item in gen:
                # After the request's last item the replica has nothing left to abort: a caller
                # that stops reading there must not cost a ray.cancel per request.
                done = isinstance(item, ReplicaError) or item.finished
                yield item
            done = True
        except BackPressureError as exc:  # Serve's own max_queued_requests on the handle
            done = True
            yield backpressure_error(exc)
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            done = True
            yield ReplicaError("engine_unavailable", f"model replica unavailable: {exc}")
        finally:
            if not done:
                # The HTTP client went away or we stopped reading: cancel the replica's
                # generator, whose finally aborts the engine request and frees its blocks.
                gen.cancel()


# ------------------------------------------------------------- settings


class IngressSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model source; its tokenizer is loaded in the ingress.")
    served_model_name: str | None = Field(default=None, description="Name in /v1/models (default: model).")
    default_max_tokens: int | None = Field(
        default=None, ge=1, description="Chat max_tokens when the client sends none (default: rest of the context)."
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Request limits (deployments/limits.py).")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Optional API keys (deployments/auth.py).")
    max_attempts: int = Field(
        default=3, ge=1, description="Tries of a request whose replica is unavailable before any output (then 503)."
    )
    stream_mode: Literal["mux", "per_request"] = Field(
        default="per_request",
        description="mux: one stream per LLM replica carries all of this ingress's requests (deployments/mux.py; "
        "needs a router that honours target_replica_id); per_request: one Ray stream per request.",
    )
    stream_interval: int = Field(
        default=1, ge=1, le=1024, description="mux: least tokens per SSE event after the first (1: adaptive)."
    )
    replica_transport: Literal["grpc", "ray"] = Field(
        default="grpc",
        description="How calls to LLM replicas travel: grpc, Serve's gRPC between deployments (pickled "
        "arguments and results); ray, Ray actor calls and object refs.",
    )
    tool_parser: ToolParserName = Field(
        default="auto",
        description="How tool calls are read from the output (deployments/tool_calls.py); auto: from the "
        "chat template's markers.",
    )

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model


# ------------------------------------------------------------- the service


def _finish_reason(reason: FinishReason | None, tool_calls: bool = False) -> str | None:
    if reason is None:
        return None
    # OpenAI knows stop/length/tool_calls; an abort only reaches a client that is gone.
    if reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if tool_calls else "stop"


_PROBE_MESSAGES = [{"role": "user", "content": "hi"}]
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {"name": "probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}},
    }
]


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders tools: the same conversation with and without a tool
    must differ (a template that ignores ``tools`` renders both alike), and must not raise."""
    try:
        plain = tokenizer.apply_chat_template(_PROBE_MESSAGES, add_generation_prompt=True)
        with_tools = tokenizer.apply_chat_template(_PROBE_MESSAGES, add_generation_prompt=True, tools=_PROBE_TOOLS)
    except Exception:
        return False
    return list(plain) != list(with_tools)


def _chat_template_text(tokenizer: Any) -> str | None:
    template = getattr(getattr(tokenizer, "hf", None), "chat_template", None) or getattr(
        tokenizer, "chat_template", None
    )
    return template if isinstance(template, str) else None


def _delta_calls(calls: list[ToolCall], first_index: int) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=first_index + i, id=c.id, type="function", function=DeltaFunction(name=c.name, arguments=c.arguments)
        )
        for i, c in enumerate(calls)
    ]


class _ToolChunks:
    """A streamed chat's deltas through a tool-call parser: content passes on (held back while
    it may open a call), each complete call becomes one ``delta.tool_calls`` entry."""

    def __init__(self, parser: ToolParser) -> None:
        self._stream = parser.stream()
        self.num_calls = 0

    def delta(self, text: str, finished: bool) -> ChatDelta:
        events: list[Event] = self._stream.feed(text) if text else []
        if finished:
            events += self._stream.finish()
        content = "".join(e for e in events if isinstance(e, str)) or None
        calls = [e for e in events if isinstance(e, ToolCall)]
        delta = ChatDelta(content=content, tool_calls=_delta_calls(calls, self.num_calls) if calls else None)
        self.num_calls += len(calls)
        return delta


# One choice's part of a delta: the delta itself for n = 1, else one of its ``choices``.
Part = Delta | ChoiceDelta


def _parts(d: Delta) -> Iterable[tuple[int, Part]]:
    """(choice index, part) of each choice that ``d`` carries something for."""
    return ((c.index, c) for c in d.choices) if d.choices else ((0, d),)


class _Collected(NamedTuple):
    """One choice's whole output (``OpenAIService._collect``); the logprobs empty unless asked."""

    text: str
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprobs, ...]
    prompt_logprobs: tuple[TokenLogprobs | None, ...]  # with echo


# Per choice index: how a part becomes a chunk (its finish, or text with usage) and how text does.
ChunkRender = tuple[Callable[[Part], BaseModel], Callable[[str], bytes]]


def _usage(usage: Usage | None, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    if usage is None:
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _with_chat_logprobs(content: Callable[[Part], BaseModel], texts: TokenTexts) -> Callable[[Part], BaseModel]:
    def with_logprobs(d: Part) -> BaseModel:
        chunk = content(d)
        assert isinstance(chunk, ChatCompletionChunk)
        chunk.choices[0].logprobs = chat_logprobs(d.logprobs or (), texts)
        return chunk

    return with_logprobs


def _sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


_TEXT_MARK = "\x00cbserve-text\x00"


class _TextChunk:
    """SSE bytes of a request's text chunks from one template: the chunk model is rendered
    once with a marker for the text, and each chunk splices the JSON-encoded text in (a
    pydantic model and its serialisation per token were a large part of the ingress's work)."""

    __slots__ = ("_head", "_tail")

    def __init__(self, render: Callable[[str], BaseModel]) -> None:
        mark = json.dumps(_TEXT_MARK).encode()
        head, sep, tail = _sse(render(_TEXT_MARK)).partition(mark)
        if not sep:
            raise ValueError("the chunk template lost its text marker")
        self._head, self._tail = head, tail

    def __call__(self, text: str) -> bytes:
        return self._head + json.dumps(text, ensure_ascii=False).encode() + self._tail


def _generation_failed(delta: Delta) -> APIError:
    return APIError.from_code("internal_error", f"generation failed: {delta.error}")


def _error_event(err: APIError, rid: str) -> bytes:
    """An error after the 200 went out: one SSE event with the OpenAI error body."""
    logger.error("request %s: error mid-stream: %s", rid, err.message)
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends. Starlette leaves it suspended when
    send() fails (ASGI 2.4 servers report a gone client that way), so the replica request
    would run on until garbage collection; closing it aborts the request now.

    It streams without a disconnect listener of its own: under ASGI servers below spec 2.4
    (uvicorn, so Serve) Starlette starts a task group and a listener task per response, ~40 us
    between the first token and its write; the edge middleware (``deployments/edge.py``, in
    front of every route) already watches the connection and cancels the app when the client
    leaves, which closes this body and aborts the request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.stream_response(send)
        except (OSError, ClientDisconnect):
            logger.info("client went away mid-stream")  # nothing left to answer
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class OpenAIService:
    def __init__(
        self, client: LLMClient, tokenizer: Any, settings: IngressSettings, *, metrics_backend: Any = None
    ) -> None:
        # Deadline over all attempts; a replica that is gone before any output is retried elsewhere.
        self._client = DeadlineClient(FailoverClient(client, settings.max_attempts), settings.limits.request_timeout_s)
        self._tokenizer = tokenizer
        self._settings = settings
        self.api_keys = settings.auth.load()  # fails closed at start on a broken key source
        if self.api_keys.enabled:
            install_log_redaction(self.api_keys)
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()
        self._healthy_at = -HEALTH_TTL_S
        self._tools_supported: bool | None = None  # probed on the first request with tools
        self._token_texts: TokenTexts | None = None  # built on the first request with logprobs
        self._metrics = IngressMetrics(backend=metrics_backend)

    @property
    def served_name(self) -> str:
        return self._settings.served_name

    async def model_info(self) -> ModelInfo:
        """The replicas' model facts (context length), fetched once."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    # Bounded like a request: a stuck replica must not hold the first request forever.
                    timeout = min(self._settings.limits.request_timeout_s or MODEL_INFO_TIMEOUT_S, MODEL_INFO_TIMEOUT_S)
                    try:
                        self._info = await asyncio.wait_for(self._client.model_info(), timeout)
                    except Exception as exc:  # no replica answered (e.g. none running): 503, not 500
                        why = f"no answer within {timeout:g}s" if isinstance(exc, asyncio.TimeoutError) else exc
                        raise APIError.from_code("engine_unavailable", f"model replicas unavailable: {why}") from exc
        return self._info

    def record(self, endpoint: str, status: int) -> None:
        self._metrics.response(endpoint, status)

    # ---------------------------------------------------------------- models / health

    async def models(self) -> ModelList:
        info = await self.model_info()
        return ModelList(data=[ModelCard(id=self.served_name, max_model_len=info.max_model_len)])

    async def model(self, model_id: str) -> ModelCard:
        """GET /v1/models/{id} (the SDK's ``models.retrieve``): the served name or the model source."""
        self._check_model(model_id)
        return (await self.models()).data[0]

    async def health(self) -> dict[str, str]:
        """200 only if a model replica answered within the last ``HEALTH_TTL_S`` (a live round
        trip, not the cached model info): a load balancer polling it sees replicas go away."""
        now = time.monotonic()
        if now - self._healthy_at > HEALTH_TTL_S:
            try:
                info = await asyncio.wait_for(self._client.model_info(), timeout=5)
            except Exception as exc:
                raise APIError.from_code("engine_unavailable", f"model replicas not ready: {exc}") from exc
            self._info = self._info or info
            self._healthy_at = time.monotonic()
        return {"status": "ok", "model": self.served_name}

    # ---------------------------------------------------------------- endpoints

    async def completions(self, body: CompletionRequest, request_id: str | None = None) -> Response:
        """``request_id``: the request's x-request-id, reused as the response id (deployments/edge.py)."""
        self._check_model(body.model)
        rid = usable_request_id(request_id) or f"cmpl-{uuid.uuid4().hex}"
        prompt = body.prompt
        if isinstance(prompt, str):
            token_ids = self._tokenizer.encode(prompt, add_special_tokens=True)
        else:
            token_ids = self._check_token_ids(prompt)
        greq = await self._request(rid, token_ids, body, body.max_tokens, "prompt")
        echo = (prompt if isinstance(prompt, str) else self._tokenizer.decode(token_ids)) if body.echo else None
        if body.stream:
            return await self._stream(
                greq, body.include_usage, self._completion_chunks(greq, body.continuous_usage, echo)
            )
        choices, final = await self._collect(greq)
        if body.ranks_candidates():  # best_of: the n with the highest cumulative logprob, in that order
            choices = sorted(choices, key=lambda c: -sum(t.logprob for t in c.logprobs))[: body.n or 1]
        builder = CompletionLogprobsBuilder if body.logprobs is not None else None
        resp = CompletionResponse(
            id=rid,
            model=self.served_name,
            choices=[
                CompletionChoice(
                    index=i,
                    text=(echo or "") + c.text,
                    # with echo and n > 1 every choice has the prompt's logprobs too (as vLLM)
                    logprobs=builder(self.token_texts)(c.prompt_logprobs + c.logprobs, token_ids) if builder else None,
                    finish_reason=_finish_reason(c.finish_reason),
                )
                for i, c in enumerate(choices)
            ],
            usage=_usage(final.usage, len(token_ids), 0),
        )
        return JSONResponse(resp.model_dump(), headers={"x-request-id": rid})

    async def chat(self, body: ChatCompletionRequest, request_id: str | None = None) -> Response:
        self._check_model(body.model)
        rid = usable_request_id(request_id) or f"chatcmpl-{uuid.uuid4().hex}"
        tools = body.template_tools
        parser = self._tool_parser() if tools else None
        try:
            if tools:
                token_ids = self._tokenizer.apply_chat_template(
                    body.template_messages(), add_generation_prompt=True, tools=tools
                )
            else:
                token_ids = self._tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True)
        except EngineError:
            raise
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise APIError.invalid(
                f"messages could not be formatted by the chat template: {exc}", param="messages"
            ) from exc
        greq = await self._request(rid, list(token_ids), body, body.requested_max_tokens, "messages")
        if parser is not None and (forced := body.forced_tools):
            # tool_choice "required" / a named function: a grammar writes the calls in the parser's format.
            guided = forced_calls_grammar(
                parser.call_format, [(f.name, f.parameters) for f in forced], parallel=body.parallel_forced_calls
            )
            greq = dataclasses.replace(greq, params=dataclasses.replace(greq.params, guided=guided))
        if body.stream:
            return await self._stream(greq, body.include_usage, self._chat_chunks(greq, body.continuous_usage, parser))
        collected, final = await self._collect(greq)
        choices = []
        for i, c in enumerate(collected):
            message = ChatResponseMessage(content=c.text)
            if parser is not None:
                parsed = parser.parse(c.text)
                calls = [
                    ChatToolCall(id=t.id, function=ToolCallFunction(name=t.name, arguments=t.arguments))
                    for t in parsed.tool_calls
                ]
                if calls:
                    message = ChatResponseMessage(content=parsed.content, tool_calls=calls)
            finish = _finish_reason(c.finish_reason, tool_calls=bool(message.tool_calls))
            logprobs = chat_logprobs(c.logprobs, self.token_texts) if body.logprobs else None
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=finish))
        resp = ChatCompletionResponse(
            id=rid, model=self.served_name, choices=choices, usage=_usage(final.usage, len(token_ids), 0)
        )
        return JSONResponse(resp.model_dump(), headers={"x-request-id": rid})

    @property
    def token_texts(self) -> TokenTexts:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self._tokenizer)
        return self._token_texts

    # ---------------------------------------------------------------- validation

    def _tool_parser(self) -> ToolParser:
        """The tool-call parser for this model; 400 (param tools) when its chat template
        cannot show tools to the model."""
        if self._tools_supported is None:
            self._tools_supported = template_supports_tools(self._tokenizer)
        if not self._tools_supported:
            raise APIError.invalid(
                "this model's chat template does not support tools; send the request without tools", param="tools"
            )
        return parser_for(self._settings.tool_parser, _chat_template_text(self._tokenizer))

    def _check_model(self, model: str) -> None:
        if model not in (self.served_name, self._settings.model):
            raise APIError.from_code(
                "model_not_found",
                f"The model `{model}` does not exist. This server serves `{self.served_name}`.",
                param="model",
            )

    def _check_token_ids(self, ids: list[int]) -> list[int]:
        vocab = self._tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError.invalid(f"prompt token ids must be in [0, {vocab}); got {bad[0]}", param="prompt")
        return list(ids)

    async def _request(
        self, rid: str, token_ids: list[int], body: Any, max_tokens: int | None, what: str
    ) -> GenerateRequest:
        if not token_ids:
            raise APIError.invalid("the prompt is empty after tokenization", param=what)
        info = await self.model_info()
        n_prompt, limit = len(token_ids), info.max_model_len
        limits = self._settings.limits
        sent = max_tokens is not None and bool(body.model_fields_set & {"max_tokens", "max_completion_tokens"})
        limits.check(n_prompt=n_prompt, max_tokens=max_tokens if sent else None, stop=body.stop, what=what)
        if max_tokens is None:
            max_tokens = limit - n_prompt
            if self._settings.default_max_tokens is not None:
                max_tokens = min(max_tokens, self._settings.default_max_tokens)
        if not sent:  # a default (rest of the context, or completions' 16) stays within the limit
            max_tokens = limits.default_max_tokens(max_tokens)
        if n_prompt >= limit or n_prompt + max_tokens > limit:
            raise APIError.from_code(
                "context_length_exceeded",
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 0)} tokens ({n_prompt} in the {what}, {max(max_tokens, 0)} in the "
                "completion). Please reduce the length of the prompt or the completion.",
                param=what,
            )
        params = body.sampling_params(max_tokens)  # InvalidRequestError -> 400 by the handler
        if params.logit_bias and params.logit_bias[-1][0] >= self._tokenizer.vocab_size:
            raise APIError.invalid(
                f"logit_bias token ids must be in [0, {self._tokenizer.vocab_size}); got {params.logit_bias[-1][0]}",
                param="logit_bias",
            )
        # DEBUG: per-request lines are opt-in (the replica's log_requests). At INFO each request paid
        # Serve's formatter and a stderr write here (~25 us on a CPU core) before its call to a
        # replica, and Ray's log monitor then copied the line to the driver.
        logger.debug("request %s: %d prompt tokens, max_tokens=%d, stream=%s", rid, n_prompt, max_tokens, body.stream)
        return GenerateRequest(rid, tuple(token_ids), params, time.time())

    # ---------------------------------------------------------------- generation

    async def _collect(self, greq: GenerateRequest) -> tuple[list[_Collected], Delta]:
        """Each choice's whole output (with its logprobs, when asked), and the request's last
        delta (its usage)."""
        n = greq.params.n
        texts: list[list[str]] = [[] for _ in range(n)]
        reasons: list[FinishReason | None] = [None] * n
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        prompts: list[tuple[TokenLogprobs | None, ...]] = [()] * n
        agen = self._client.generate(greq)
        try:
            async for item in agen:
                if isinstance(item, ReplicaError):
                    raise APIError.from_replica(item)
                if item.finish_reason is FinishReason.ERROR:
                    raise _generation_failed(item)
                for i, part in _parts(item):
                    texts[i].append(part.text)
                    reasons[i] = part.finish_reason or reasons[i]
                    if part.logprobs:
                        logprobs[i].extend(part.logprobs)
                    if part.prompt_logprobs is not None:
                        prompts[i] = part.prompt_logprobs
                if item.finished:
                    choices = [
                        _Collected("".join(texts[i]), reasons[i] or item.finish_reason, tuple(logprobs[i]), prompts[i])
                        for i in range(n)
                    ]
                    return choices, item
        finally:
            await agen.aclose()  # on cancel (client gone) this cancels the replica call
        raise APIError.from_code("internal_error", "the replica ended the stream without finishing the request")

    async def _stream(self, greq: GenerateRequest, include_usage: bool, chunks: Any) -> Response:
        """Start the stream; refusals before the first token still get a proper HTTP status."""
        agen = self._client.generate(greq)
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            raise APIError.from_code("internal_error", "the replica returned no output") from None
        except BaseException:
            await agen.aclose()
            raise
        if isinstance(first, ReplicaError):
            await agen.aclose()
            raise APIError.from_replica(first)
        if first.finish_reason is FinishReason.ERROR:  # failed before any output: no 200 sent yet
            await agen.aclose()
            raise _generation_failed(first)
        return _ClosingStreamingResponse(
            chunks(first, agen, include_usage),
            media_type="text/event-stream",
            headers={"x-request-id": greq.request_id, "Cache-Control": "no-cache"},
        )

    async def _deltas(
        self, first: Delta, agen: AsyncIterator[Delta | ReplicaError]
    ) -> AsyncIterator[Delta | ReplicaError]:
        yield first
        if first.finished:
            return
        async for item in agen:
            yield item
            if isinstance(item, ReplicaError) or item.finished:
                return

    def _completion_chunks(self, greq: GenerateRequest, continuous_usage: bool = False, echo: str | None = None):
        rid, name, created = greq.request_id, self.served_name, int(time.time())
        asked = greq.params.logprobs is not None

        def render(index: int) -> ChunkRender:
            logprobs = CompletionLogprobsBuilder(self.token_texts) if asked else None  # text_offset per choice
            echoing = [echo]  # the prompt goes out once per choice, in front of its first chunk

            def chunk(
                text: str, finish_reason: str | None = None, lp: CompletionLogprobs | None = None
            ) -> CompletionResponse:
                choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason)
                return CompletionResponse(id=rid, created=created, model=name, choices=[choice])

            def content(d: Part) -> BaseModel:
                text, entries = d.text, d.logprobs or ()
                if echoing[0] is not None:
                    text, echoing[0] = echoing[0] + text, None
                    entries = (d.prompt_logprobs or ()) + entries
                lp = logprobs(entries, greq.prompt_token_ids) if logprobs is not None else None
                return chunk(text, _finish_reason(d.finish_reason), lp)

            return content, _TextChunk(chunk)

        return self._chunk_stream(
            greq,
            render=render,
            every_delta=echo is not None or asked,
            usage=lambda u: CompletionResponse(id=rid, created=created, model=name, choices=[], usage=u),
            continuous_usage=continuous_usage,
        )

    def _chat_chunks(self, greq: GenerateRequest, continuous_usage: bool = False, parser: ToolParser | None = None):
        rid, name, created = greq.request_id, self.served_name, int(time.time())

        def chunk(delta: ChatDelta, finish_reason: str | None = None, index: int = 0) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(id=rid, created=created, model=name, choices=[choice])

        def render(index: int) -> ChunkRender:
            content: Callable[[Part], BaseModel]
            text: Callable[[str], bytes]
            if parser is None:
                content = lambda d: chunk(ChatDelta(content=d.text or None), _finish_reason(d.finish_reason), index)
                text = _TextChunk(lambda t: chunk(ChatDelta(content=t), index=index))
            else:
                tools = _ToolChunks(parser)  # one parser stream per choice

                def content(d: Part) -> BaseModel:
                    delta = tools.delta(d.text, d.finish_reason is not None)
                    return chunk(delta, _finish_reason(d.finish_reason, tool_calls=tools.num_calls > 0), index)

                def text(t: str) -> bytes:
                    delta = tools.delta(t, False)
                    return _sse(chunk(delta, index=index)) if delta.content is not None or delta.tool_calls else b""

            if greq.params.logprobs is not None:  # every chunk carries its tokens' logprobs
                content = _with_chat_logprobs(content, self.token_texts)
            return content, text

        return self._chunk_stream(
            greq,
            head=lambda index: chunk(ChatDelta(role="assistant", content=""), index=index),
            render=render,
            usage=lambda u: ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=u),
            every_delta=greq.params.logprobs is not None,
            continuous_usage=continuous_usage,
        )

    def _chunk_stream(
        self,
        greq: GenerateRequest,
        *,
        render: Callable[[int], ChunkRender],
        usage: Callable[[UsageInfo], BaseModel],
        head: Callable[[int], BaseModel] | None = None,
        every_delta: bool = False,
        continuous_usage: bool = False,
    ):
        """SSE bytes for one request: an optional head chunk per choice, a chunk per choice's
        delta with text (or its finish; each chunk names its choice's ``index``), the usage
        chunk when asked, then [DONE]; an error ends it with an error event.
        ``continuous_usage`` (vLLM's stream_options.continuous_usage_stats): usage so far in every chunk.
        ``every_delta``: each part with tokens is a ``content`` chunk (logprobs, echo), none the fast text path."""

        async def gen(first: Delta, agen: Any, include_usage: bool) -> AsyncIterator[bytes]:
            # One body message per delta (its choices' chunks joined; the head chunks in the first,
            # the usage chunk and [DONE] in the last): each message is a write to the client and a
            # relay by the proxy, and the head's own write used to sit before the first token's.
            out: list[bytes] = []
            try:
                n_prompt, n_out = len(greq.prompt_token_ids), 0
                renders = [render(i) for i in range(greq.params.n)]
                if head is not None:
                    for i in range(greq.params.n):
                        h = head(i)
                        if continuous_usage:
                            h.usage = _usage(None, n_prompt, 0)
                        out.append(_sse(h))
                async for d in self._deltas(first, agen):
                    if isinstance(d, ReplicaError):
                        out.append(_error_event(APIError.from_replica(d), greq.request_id))
                        break
                    if d.finish_reason is FinishReason.ERROR:
                        out.append(_error_event(_generation_failed(d), greq.request_id))
                        break
                    n_out += d.num_tokens
                    for i, part in _parts(d):
                        content, text = renders[i]
                        if (
                            part.finish_reason is not None
                            or (part.text and continuous_usage)
                            or (every_delta and (part.text or part.token_ids))
                        ):
                            chunk = content(part)
                            if continuous_usage:
                                chunk.usage = _usage(d.usage, n_prompt, n_out)
                            out.append(_sse(chunk))
                        elif part.text and (data := text(part.text)):  # a tool-call parser may hold text back
                            out.append(data)
                    if d.finished and include_usage:
                        out.append(_sse(usage(_usage(d.usage, len(greq.prompt_token_ids), n_out))))
                    if out and not d.finished:  # the last delta's go out with [DONE]
                        data, out = b"".join(out), []
                        yield data
                out.append(SSE_DONE)
                yield b"".join(out)
            except Exception as exc:  # e.g. the replica raised: an error event, not a cut connection
                logger.exception("request %s: stream failed", greq.request_id)
                err = APIError.from_code("internal_error", f"internal error: {type(exc).__name__}")
                yield b"".join([*out, _error_event(err, greq.request_id), SSE_DONE])
            finally:
                await agen.aclose()

        return gen


# ------------------------------------------------------------- HTTP


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def _not_json(request: Request) -> str | None:
    """The request's Content-Type when a POST body is not declared as JSON, else None."""
    ctype = request.headers.get("content-type", "")
    if request.method != "POST" or ctype.split(";")[0].strip().lower() == "application/json":
        return None
    return ctype or "none"


def build_api(service: OpenAIService, *, behind_serve_proxy: bool = False, behind_haproxy: bool = False) -> FastAPI:
    """The FastAPI app around ``service``: routes plus OpenAI-shaped error handlers.

    ``behind_serve_proxy``: Serve adds x-request-id to every response itself. ``behind_haproxy``:
    every client has HAProxy's address, so there is no per-client upload bound (HAProxy's
    client timeout bounds uploads instead)."""
    api = FastAPI(title="cbserve", description="OpenAI-compatible LLM service")
    # Outermost last: the key check runs first, so a request without a key is never read.
    settings = service._settings
    api.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.limits.max_body_bytes, on_reject=service.record)
    if service.api_keys.enabled:
        api.add_middleware(
            APIKeyMiddleware, keys=service.api_keys, open_paths=settings.auth.open_paths, on_reject=service.record
        )
    lim = settings.limits
    api.add_middleware(
        EdgeMiddleware,  # outermost: bounds every request, including those refused by a key
        limits=EdgeLimits(
            lim.body_timeout_s, lim.max_concurrent_requests, None if behind_haproxy else lim.max_uploads_per_client
        ),
        on_outcome=service.record,
        proxy_adds_request_id=behind_serve_proxy,
    )

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        service.record(request.url.path, exc.status)
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return _error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI (and its clients) expect 400 for a bad body.
        message, param = validation_message(list(exc.errors()))
        if (ctype := _not_json(request)) is not None:
            message, param = (
                f"The request body must be JSON sent with Content-Type: application/json (got {ctype}).",
                None,
            )
        service.record(request.url.path, 400)
        return _error_response(APIError.invalid(message, param=param))

    @api.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        # e.g. SamplingParams validation (InvalidRequestError) raised in the ingress.
        err = APIError.from_code(exc.code, exc.message, param=exc.param)
        service.record(request.url.path, err.status)
        return _error_response(err)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error", code=code)
        return _error_response(err)

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        service.record(request.url.path, 500)
        return _error_response(APIError.from_code("internal_error", f"internal error: {type(exc).__name__}"))

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        resp = await service.completions(body, request.headers.get("x-request-id"))
        service.record("/v1/completions", resp.status_code)
        return resp

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        resp = await service.chat(body, request.headers.get("x-request-id"))
        service.record("/v1/chat/completions", resp.status_code)
        return resp

    @api.get("/v1/models")
    async def models() -> ModelList:
        return await service.models()

    @api.get("/v1/models/{model_id:path}")  # :path: model sources like org/name contain a slash
    async def model(model_id: str) -> ModelCard:
        return await service.model(model_id)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return await service.health()

    return api


# ------------------------------------------------------------- Serve deployment


def replica_handle(handle: DeploymentHandle, transport: Literal["grpc", "ray"]) -> DeploymentHandle:
    """The handle to LLM replicas over ``transport``. gRPC: each call goes straight to the
    replica's gRPC server, with plain pickle (no cloudpickle, no object refs); on 2 CPU cores
    (bench, idle TTFT) a submit reached the replica ~1.5 ms sooner and a pump item the ingress
    ~1.1 ms sooner than as Ray actor calls and streamed object refs. A replica gone mid-call
    raises ActorUnavailableError, a RayActorError, as over Ray."""
    if transport == "grpc":
        return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")
    return handle


# Above limits.max_concurrent_requests (2000 by default; build_app sets it from the limits):
# the ingress answers the excess 503 itself, and /health still finds a slot.
INGRESS_HEADROOM = 48


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=2048)
@serve.ingress()
class OpenAIIngress:
    def __init__(self, llm: DeploymentHandle, settings: dict[str, Any]) -> None:
        from replica.models import load_tokenizer  # no weights: just the tokenizer

        cfg = IngressSettings.model_validate(settings)
        llm = replica_handle(llm, cfg.replica_transport)
        client: LLMClient
        if cfg.stream_mode == "mux":
            client = MuxLLMClient(llm, stream_interval=cfg.stream_interval)
        else:
            client = HandleLLMClient(llm)
        self.service = OpenAIService(client, load_tokenizer(cfg.model), cfg)
        front = Front.of(os.environ)  # this process inherits the environment Ray started with
        as_configured, message = describe_front(cfg.limits, front)
        (logger.info if as_configured else logger.warning)(message)
        self.behind_haproxy = front.haproxy

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.service, behind_serve_proxy=True, behind_haproxy=self.behind_haproxy)
