"""The OpenAI ingress (FastAPI app + service) over an in-process replica with a fake engine.

httpx's ASGITransport buffers a response, so SSE format is checked over HTTP and the
incremental / disconnect behaviour on the StreamingResponse's body iterator directly.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

import deployments.ingress as ingress_mod
from deployments.errors import ReplicaError
from deployments.ingress import HandleLLMClient, IngressSettings, OpenAIService, build_api, replica_handle
from deployments.llm import GenerateRequest
from deployments.protocol import ChatCompletionRequest
from replica.outputs import Delta, Usage
from replica.request import FinishReason, SamplingParams
from tests.deployments.fakes import FakeEngine, FakeMetricsBackend, FakeTokenizer, LocalClient, make_server

pytestmark = pytest.mark.timeout(60)

MODEL = "tiny:llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 3}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
async def env():
    server, engine = await make_server(FakeEngine(max_model_len=128, max_running=2, max_waiting=1))
    client = LocalClient(server)
    service = OpenAIService(
        client,
        FakeTokenizer(),
        IngressSettings(model=MODEL, served_model_name="tiny"),
        metrics_backend=FakeMetricsBackend(),
    )
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t")
    yield http, service, engine, client
    await http.aclose()


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


async def test_chat_non_streaming(env):
    http, _, _, client = env
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["id"] == client.requests[-1].request_id  # the same id in the engine (and its logs)
    msg = body["choices"][0]
    assert msg["message"]["role"] == "assistant" and len(msg["message"]["content"]) == 6
    assert msg["finish_reason"] == "length"
    prompt_len = len(FakeTokenizer().apply_chat_template([{"role": "user", "content": "hi"}]))
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 6,
        "total_tokens": prompt_len + 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # The ingress tokenized: tokens (not text) travel to the replica.
    assert list(client.requests[-1].prompt_token_ids) == FakeTokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )


async def test_completion_text_and_token_prompts(env):
    http, _, _, client = env
    r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"][0]["text"]) == 4
    assert client.requests[-1].prompt_token_ids == (1, 100, 101, 102)
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6, 7]]})  # batch of one
    assert r.status_code == 200 and client.requests[-1].prompt_token_ids == (5, 6, 7)
    assert client.requests[-1].params.max_tokens == 16  # OpenAI's completions default


async def test_sampling_parameters_reach_the_engine(env):
    http, _, _, client = env
    body = {
        **CHAT,
        "max_completion_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["x", "yz"],
        "ignore_eos": True,
        "min_tokens": 2,
        "top_k": 40,
        "user": "u1",
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    p = client.requests[-1].params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.ignore_eos, p.min_tokens, p.top_k, p.seed) == (
        3,
        0.5,
        0.9,
        ("x", "yz"),
        True,
        2,
        40,
        3,
    )


async def test_penalties_bias_and_min_p_reach_the_engine(env):
    http, _, _, client = env
    body = {
        **CHAT,
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "repetition_penalty": 1.3,
        "logit_bias": {"100": 5, "7": -100, "9": 0},
        "min_p": 0.1,
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    p = client.requests[-1].params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1.0, 1.3, 0.1)
    assert p.logit_bias == ((7, -100.0), (100, 5.0)) and p.uses_penalties and p.processes_logits
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "presence_penalty": 1.5})
    assert r.status_code == 200 and client.requests[-1].params.presence_penalty == 1.5
    # What load generators send for "no penalty" stays a plain request.
    r = await http.post("/v1/chat/completions", json={**CHAT, "repetition_penalty": 1.0, "presence_penalty": 0})
    assert r.status_code == 200 and not client.requests[-1].params.processes_logits


async def test_chat_default_max_tokens_fills_the_context(env):
    http, _service, _, client = env
    r = await http.post("/v1/chat/completions", json={k: v for k, v in CHAT.items() if k != "max_tokens"})
    assert r.status_code == 200
    assert client.requests[-1].params.max_tokens == 128 - len(client.requests[-1].prompt_token_ids)


async def test_streaming_matches_non_streaming_and_reports_usage(env):
    http, _, _, _ = env
    full = (await http.post("/v1/chat/completions", json=CHAT)).json()
    r = await http.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    # Without include_usage, no usage chunk.
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True})
    events = sse_events(r.text)
    assert all(e["usage"] is None and len(e["choices"]) == 1 for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) != ""


async def test_first_chunk_arrives_before_generation_ends(env):
    _, service, engine, _ = env
    resp = await service.chat(ChatCompletionRequest(**{**CHAT, "max_tokens": 50, "stream": True}))
    it = resp.body_iterator
    # One body message (one write to the client) carries the role chunk and the first text chunk.
    message = await it.__anext__()
    assert message.endswith(b"\n\n")
    role, first = (json.loads(e[6:]) for e in message.decode().split("\n\n")[:-1])
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["delta"]["content"] and first["choices"][0]["finish_reason"] is None
    assert engine.gen_tokens < 50  # the request is still generating
    # The client disconnects: Starlette closes the body iterator -> the engine request is aborted.
    await it.aclose()
    assert engine.aborted == [role["id"]]
    assert engine.stats().num_free_blocks == engine.num_blocks


async def test_a_stream_writes_one_body_message_per_delta(env):
    """The role chunk rides with the first token's chunk, the usage chunk and [DONE] with the
    last: fewer writes to the client (and relays by the proxy) than one per chunk."""
    _, service, _, _ = env
    body = {**CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    resp = await service.chat(ChatCompletionRequest(**body))
    messages = [m async for m in resp.body_iterator]
    events = [[e for e in m.decode().split("\n\n") if e] for m in messages]
    assert all(m.endswith(b"\n\n") for m in messages)
    role, first = (json.loads(e[6:]) for e in events[0])
    assert role["choices"][0]["delta"]["role"] == "assistant" and first["choices"][0]["delta"]["content"]
    *_, finish, usage, done = events[-1]
    assert json.loads(finish[6:])["choices"][0]["finish_reason"] == "length"
    assert json.loads(usage[6:])["usage"]["completion_tokens"] == 5 and done == "data: [DONE]"
    assert len(messages) <= 5  # one per delta at most, not one per chunk (7 chunks + [DONE])


async def test_models_and_health(env):
    http, _, _, _ = env
    r = await http.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["object"] == "list" and [m["id"] for m in r.json()["data"]] == ["tiny"]
    assert r.json()["data"][0]["max_model_len"] == 128
    r = await http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_a_replica_that_never_answers_model_info_gives_503_not_a_hang(env, monkeypatch):
    http, _service, _, client = env
    monkeypatch.setattr(ingress_mod, "MODEL_INFO_TIMEOUT_S", 0.2)

    async def stuck():
        await asyncio.sleep(60)

    monkeypatch.setattr(client, "model_info", stuck)
    r = await asyncio.wait_for(
        http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}), 10
    )
    assert r.status_code == 503 and "within 0.2s" in r.json()["error"]["message"]


async def test_health_follows_the_replicas_not_the_cached_model_info(env, monkeypatch):
    http, _service, _, client = env
    assert (await http.get("/v1/models")).status_code == 200  # model info now cached
    monkeypatch.setattr(ingress_mod, "HEALTH_TTL_S", 0.0)

    async def gone():
        raise RuntimeError("no replicas")

    monkeypatch.setattr(client, "model_info", gone)
    r = await http.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert (await http.get("/v1/models")).status_code == 200  # still answers from the cache
    monkeypatch.undo()
    assert (await http.get("/health")).status_code == 200


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({**CHAT, "n": 0}, "n", "greater than or equal to 1"),
        ({**CHAT, "n": 129}, "n", "less than or equal to 128"),
        ({**CHAT, "temperature": -1}, "temperature", "greater than or equal"),
        ({**CHAT, "top_p": 0}, "top_p", "greater than"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools.0.function", "Missing required parameter"),
        ({**CHAT, "tools": [TOOL]}, "tools", "chat template does not support tools"),  # FakeTokenizer's
        ({**CHAT, "tools": [TOOL], "tool_choice": "required"}, "tools", "chat template does not support tools"),
        (
            {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
            "not among the tools",
        ),
        ({**CHAT, "tool_choice": "auto"}, "tool_choice", "only allowed when tools are given"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs set to true"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({**CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "greater than or equal to 0"),
        ({**CHAT, "logprobs": 3}, "logprobs", "valid boolean"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({**CHAT, "messages": []}, "messages", "at least 1"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should be"),
        ({"model": MODEL}, "messages", "Missing required parameter"),
        ({**CHAT, "min_tokens": 9}, "min_tokens", "must not exceed max_tokens"),  # SamplingParams check
        ({**CHAT, "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({**CHAT, "frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ({**CHAT, "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({**CHAT, "repetition_penalty": 11}, "repetition_penalty", "less than or equal to 10"),
        ({**CHAT, "min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({**CHAT, "logit_bias": {"5": 101}}, "logit_bias", "biases must be in [-100, 100]"),
        ({**CHAT, "logit_bias": {"x": 1}}, "logit_bias", "keys must be token ids"),
        ({**CHAT, "logit_bias": {"259": 1}}, "logit_bias", "token ids must be in [0, 259)"),  # FakeTokenizer's vocab
    ],
)
async def test_invalid_chat_bodies_answer_400(env, body, param, words):
    http, _, _, client = env
    r = await http.post("/v1/chat/completions", json=body)
    err = assert_openai_error(r, 400, param=param)
    assert words in err["message"] and err["type"] == "invalid_request_error"
    assert client.requests == []  # nothing reached a replica


@pytest.mark.parametrize(
    "prompt, words",
    [
        (["a", "b"], "batches of prompts are not supported"),
        ([], "must not be empty"),
        ([1, 5000], "prompt token ids must be in"),
        ([True, 5], "Input should be"),  # JSON booleans are not token ids
        ([[1.0, 5]], "Input should be"),
        ({"x": 1}, "Input should be"),
    ],
)
async def test_invalid_completion_prompts_answer_400(env, prompt, words):
    http, _, _, _ = env
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert words in assert_openai_error(r, 400)["message"]


async def test_malformed_json_answers_400(env):
    http, _, _, _ = env
    r = await http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_openai_error(r, 400)["message"]
    r = await http.post("/v1/chat/completions", json=[1, 2])
    assert_openai_error(r, 400)


async def test_context_length_exceeded(env):
    http, _, _, client = env
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 200})
    err = assert_openai_error(r, 400, code="context_length_exceeded")
    assert "maximum context length is 128 tokens" in err["message"]
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 20, "max_tokens": 120})
    assert (
        "21 in the prompt, 120 in the completion"
        in assert_openai_error(r, 400, code="context_length_exceeded")["message"]
    )
    assert client.requests == []


async def test_unknown_model_and_route_answer_404(env):
    http, _, _, _ = env
    r = await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert "`gpt-9` does not exist" in assert_openai_error(r, 404, code="model_not_found", param="model")["message"]
    assert_openai_error(await http.get("/v2/nothing"), 404)


async def test_full_queue_answers_429_with_retry_after(env):
    http, service, engine, _ = env
    # Three started streams that nobody reads hold the 2 running + 1 waiting slots.
    busy = [await service.chat(ChatCompletionRequest(**{**CHAT, "stream": True})) for _ in range(3)]
    for stream in (False, True):
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert_openai_error(r, 429, code="queue_full")
        assert r.headers["retry-after"] == "1"
    for b in busy:  # the clients read a chunk, then go away
        await b.body_iterator.__anext__()
        await b.body_iterator.aclose()
    assert not engine.blocks


async def test_draining_replica_answers_503(env):
    http, _service, _, client = env
    await client.server.shutdown()
    for stream in (False, True):
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert_openai_error(r, 503, code="engine_unavailable")


async def test_unreachable_replicas_answer_503_not_500():
    class NoReplicas(LocalClient):
        async def model_info(self):
            raise RuntimeError("deployment has no running replicas")

    server, _ = await make_server()
    service = OpenAIService(
        NoReplicas(server), FakeTokenizer(), IngressSettings(model=MODEL), metrics_backend=FakeMetricsBackend()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t") as http:
        for r in (await http.post("/v1/chat/completions", json=CHAT), await http.get("/v1/models")):
            assert "no running replicas" in assert_openai_error(r, 503, code="engine_unavailable")["message"]


async def test_engine_failure_mid_request(env):
    http, _, engine, _ = env
    engine.fail_after = 2
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert "device lost" in assert_openai_error(r, 500, code="internal_error")["message"]
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200  # headers were sent with the first token
    events = sse_events(r.text)
    assert "device lost" in events[-1]["error"]["message"]


async def test_engine_failure_before_any_output_is_a_500_when_streaming(env):
    http, _, engine, _ = env
    engine.fail_after = 0  # the first delta is the failure: no 200 has gone out yet
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert "device lost" in assert_openai_error(r, 500, code="internal_error")["message"]
    assert not engine.blocks


async def test_replica_exception_mid_stream_ends_with_an_error_event():
    class BreaksMidStream(LocalClient):
        async def generate(self, req):
            yield Delta(req.request_id, "a", (100,))
            raise RuntimeError("replica bug")

    server, _ = await make_server()
    service = OpenAIService(
        BreaksMidStream(server), FakeTokenizer(), IngressSettings(model=MODEL), metrics_backend=FakeMetricsBackend()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t") as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)  # the stream still ends with [DONE]
    assert events[1]["choices"][0]["delta"]["content"] == "a"
    assert events[-1]["error"]["code"] == "internal_error" and "RuntimeError" in events[-1]["error"]["message"]


async def test_chat_template_failure_is_a_client_error(env):
    http, _, _, _ = env
    body = {**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "boom"}]}
    assert "chat template" in assert_openai_error(await http.post("/v1/chat/completions", json=body), 400)["message"]


async def test_message_content_parts_and_developer_role(env):
    http, _, _, client = env
    body = {
        **CHAT,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
        ],
    }
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    expected = FakeTokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert list(client.requests[-1].prompt_token_ids) == expected
    bad = {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_openai_error(await http.post("/v1/chat/completions", json=bad), 400)


# ------------------------------------------------------------- HandleLLMClient over a fake handle


class FakeResponseGen:
    """What ``handle.options(stream=True).generate.remote(req)`` returns: items, then maybe an error."""

    def __init__(self, items, exc: BaseException | None = None) -> None:
        self.items, self.exc, self.cancelled = list(items), exc, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.exc is not None:
            raise self.exc
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, gen: FakeResponseGen) -> None:
        self.generate = SimpleNamespace(remote=lambda req: gen)

    def options(self, **_):
        return self


GREQ = GenerateRequest("r1", (5, 6), SamplingParams(max_tokens=2))
TOKEN = Delta("r1", "a", (100,))
LAST = Delta("r1", "b", (101,), FinishReason.LENGTH, Usage(2, 2))


def test_replica_handle_over_grpc_pickles_and_over_ray_is_the_handle_itself():
    class Handle:
        def __init__(self, **options):
            self.opts = options

        def options(self, **kw):
            return Handle(**{**self.opts, **kw})

    h = Handle()
    assert replica_handle(h, "ray") is h
    grpc = replica_handle(h, "grpc")
    assert grpc.opts == {"_by_reference": False, "request_serialization": "pickle", "response_serialization": "pickle"}


async def test_handle_client_cancels_the_replica_call_when_the_reader_leaves_early():
    gen = FakeResponseGen([TOKEN, TOKEN, LAST])
    agen = HandleLLMClient(FakeHandle(gen)).generate(GREQ)
    assert await agen.__anext__() == TOKEN
    await agen.aclose()
    assert gen.cancelled


async def test_handle_client_does_not_cancel_a_finished_request():
    # The ingress stops reading at the finished delta, before the replica's generator returns.
    gen = FakeResponseGen([TOKEN, LAST])
    agen = HandleLLMClient(FakeHandle(gen)).generate(GREQ)
    assert [await agen.__anext__(), await agen.__anext__()] == [TOKEN, LAST]
    await agen.aclose()
    assert not gen.cancelled


@pytest.mark.parametrize("retry_after, header", [(None, 1), (0.2, 1), (2.5, 3)])
async def test_handle_client_backpressure_is_queue_full_with_a_whole_retry_after(retry_after, header):
    gen = FakeResponseGen([], BackPressureError(4, 4, 429, retry_after))
    items = [x async for x in HandleLLMClient(FakeHandle(gen)).generate(GREQ)]
    assert [(e.code, e.retry_after_s) for e in items] == [("queue_full", header)]


async def test_handle_client_dead_replica_is_engine_unavailable():
    gen = FakeResponseGen([TOKEN], ReplicaUnavailableError("replica-1"))
    items = [x async for x in HandleLLMClient(FakeHandle(gen)).generate(GREQ)]
    assert items[0] == TOKEN and isinstance(items[1], ReplicaError) and items[1].code == "engine_unavailable"
    assert not gen.cancelled


# ------------------------------------------------------------- what other clients send


async def test_a_body_not_sent_as_json_says_so(env):
    http, _, _, _ = env
    r = await http.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": "text/plain"})
    assert "Content-Type: application/json (got text/plain)" in assert_openai_error(r, 400)["message"]
    r = await http.post("/v1/chat/completions", content=json.dumps(CHAT).encode())  # no Content-Type at all
    assert "Content-Type: application/json (got none)" in assert_openai_error(r, 400)["message"]


async def test_a_lone_surrogate_is_refused_without_tokenizer_internals(env):
    http, _, _, client = env
    r = await http.post(
        "/v1/completions",
        content=b'{"model": "tiny", "prompt": "x\\ud800"}',
        headers={"content-type": "application/json"},
    )
    err = assert_openai_error(r, 400, param="prompt")
    assert "lone surrogate" in err["message"] and "codec" not in err["message"]
    chat = json.dumps({**CHAT, "messages": [{"role": "user", "content": "PLACEHOLDER"}]})
    r = await http.post(
        "/v1/chat/completions",
        content=chat.replace("PLACEHOLDER", "a\\ud800").encode(),
        headers={"content-type": "application/json"},
    )
    assert "lone surrogate" in assert_openai_error(r, 400, param="messages.0.content")["message"]
    assert client.requests == []


async def test_models_retrieve_with_the_openai_sdk(env):
    from openai import AsyncOpenAI, NotFoundError

    http, _, _, _ = env
    sdk = AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http)
    for name in ("tiny", MODEL):  # the served name, or the model source as chat accepts it
        card = await sdk.models.retrieve(name)
        assert card.id == "tiny" and card.object == "model"
    with pytest.raises(NotFoundError):
        await sdk.models.retrieve("gpt-9")


async def test_request_id_is_the_response_id_and_echoed_once(env):
    http, _, _, client = env
    r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "bench-7"})
    assert r.headers.get_list("x-request-id") == ["bench-7"] and r.json()["id"] == "bench-7"
    assert client.requests[-1].request_id == "bench-7"
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.headers.get_list("x-request-id") == [r.json()["id"]]
    # An id unfit to be a response id is still echoed, but not used as the id.
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "a"}, headers={"x-request-id": "a b"})
    assert r.headers.get_list("x-request-id") == ["a b"] and r.json()["id"].startswith("cmpl-")


async def test_continuous_usage_stats_puts_usage_in_every_chunk(env):
    http, _, _, client = env
    opts = {"include_usage": True, "continuous_usage_stats": True}
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": opts})
    events = sse_events(r.text)
    n_prompt = len(client.requests[-1].prompt_token_ids)
    assert all(e["usage"] is not None and e["usage"]["prompt_tokens"] == n_prompt for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert counts == [0, 1, 2, 3, 4, 5, 6]  # the role chunk, then one per token
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    # continuous_usage_stats without include_usage: as in vLLM, no usage at all.
    r = await http.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
    )
    assert all(e["usage"] is None for e in sse_events(r.text))


# The bodies these load generators send by default (their source: guidellm 0.8.1
# backends/openai/request_handlers.py, aiperf 0.13.0 endpoints/openai_chat.py,
# vllm benchmarks/lib/endpoint_request_func.py), with their fixed output length.
LOAD_GENERATOR_BODIES = {
    "guidellm chat": (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 5,
            "stop": None,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        },
    ),
    "guidellm completions": (
        "/v1/completions",
        {
            "model": "tiny",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 5,
            "stop": None,
            "ignore_eos": True,
            "prompt": "hello there",
        },
    ),
    "aiperf chat": (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hello there"}],
            "model": "tiny",
            "stream": True,
            "max_completion_tokens": 5,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},  # --per-chunk-usage
        },
    ),
    "vllm bench serve completions": (
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": "hello there",
            "repetition_penalty": 1.0,
            "max_tokens": 5,
            "logprobs": None,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        },
    ),
    "vllm bench serve chat": (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
            "max_completion_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        },
    ),
}


@pytest.mark.parametrize("name", list(LOAD_GENERATOR_BODIES))
async def test_load_generator_bodies_are_served_unchanged(env, name):
    http, _, _, client = env
    path, body = LOAD_GENERATOR_BODIES[name]
    r = await http.post(path, json=body, headers={"x-request-id": f"{name.split()[0]}-1"})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert client.requests[-1].params.ignore_eos == body.get("ignore_eos", False)
