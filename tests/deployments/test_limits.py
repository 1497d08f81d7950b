"""Request limits: the checks, the body-size middleware (over real ASGI calls), the deadline client."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError

from deployments.errors import APIError, ReplicaError
from deployments.limits import BodySizeLimitMiddleware, DeadlineClient, RequestLimits
from replica.outputs import Delta
from replica.request import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS, FinishReason

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------- RequestLimits


def test_defaults_allow_what_the_engine_allows():
    lim = RequestLimits()
    lim.check(n_prompt=100_000, max_tokens=100_000, stop=["x"] * MAX_STOP_STRINGS, what="prompt")
    lim.check(n_prompt=1, max_tokens=None, stop="y" * MAX_STOP_STRING_LEN, what="prompt")
    assert lim.default_max_tokens(1234) == 1234
    assert lim.request_timeout_s == 600 and lim.max_body_bytes == 4 * 2**20


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param"),
    [
        (dict(n_prompt=11, max_tokens=1, stop=None, what="messages"), 400, "prompt_too_long", "messages"),
        (dict(n_prompt=5, max_tokens=9, stop=None, what="prompt"), 400, "max_tokens_too_large", "max_tokens"),
        (dict(n_prompt=5, max_tokens=1, stop=["a", "b", "c"], what="prompt"), 400, "invalid_request", "stop"),
        (dict(n_prompt=5, max_tokens=1, stop="abcde", what="prompt"), 400, "invalid_request", "stop"),
    ],
)
def test_exceeding_a_limit_is_a_400_in_openai_shape(kwargs, status, code, param):
    lim = RequestLimits(max_prompt_tokens=10, max_tokens=8, max_stop_strings=2, max_stop_string_len=4)
    with pytest.raises(APIError) as ei:
        lim.check(**kwargs)
    err = ei.value
    assert err.status == status
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == code and body["param"] == param and body["type"] == "invalid_request_error"


def test_limits_at_the_bound_pass_and_default_is_capped():
    lim = RequestLimits(max_prompt_tokens=10, max_tokens=8, max_stop_strings=2, max_stop_string_len=4)
    lim.check(n_prompt=10, max_tokens=8, stop=["abcd", "efgh"], what="prompt")
    assert lim.default_max_tokens(100) == 8 and lim.default_max_tokens(3) == 3


def test_settings_are_validated():
    with pytest.raises(ValidationError):
        RequestLimits(max_stop_strings=MAX_STOP_STRINGS + 1)  # the engine would refuse them anyway
    with pytest.raises(ValidationError):
        RequestLimits(max_body_bytes=0)
    with pytest.raises(ValidationError):
        RequestLimits(request_timeout_s=-1)
    with pytest.raises(ValidationError):
        RequestLimits(max_body=10)  # unknown key
    assert RequestLimits(request_timeout_s=None).request_timeout_s is None


# ------------------------------------------------------------- body size middleware


def _app(max_bytes: int, rejected: list) -> tuple[FastAPI, list]:
    seen: list[bytes] = []
    api = FastAPI()

    @api.post("/v1/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        seen.append(body)
        return {"n": len(body)}

    api.add_middleware(BodySizeLimitMiddleware, max_bytes=max_bytes, on_reject=lambda p, s: rejected.append((p, s)))
    return api, seen


async def test_body_over_limit_is_413_and_never_reaches_the_app():
    rejected: list = []
    api, seen = _app(100, rejected)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as http:
        ok = await http.post("/v1/echo", content=b"x" * 100)
        assert ok.status_code == 200 and ok.json() == {"n": 100}
        big = await http.post("/v1/echo", content=b"x" * 101)
        assert big.status_code == 413
        err = big.json()["error"]
        assert err["code"] == "request_too_large" and "100 bytes" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}

        async def chunked():  # no Content-Length: counted while reading
            for _ in range(5):
                yield b"y" * 30

        r = await http.post("/v1/echo", content=chunked())
        assert r.status_code == 413
    assert seen == [b"x" * 100]
    assert rejected == [("/v1/echo", 413), ("/v1/echo", 413)]


async def _asgi_call(app, messages: list[dict], headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], int]:
    """Drive the ASGI app directly; returns what it sent and how many receive() calls it made."""
    sent: list[dict] = []
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v1/echo", "headers": headers, "query_string": b""}
    await app(scope, receive, send)
    return sent, calls


async def test_declared_oversize_is_refused_without_reading_the_body():
    api, seen = _app(100, [])
    sent, calls = await _asgi_call(
        api, [{"type": "http.request", "body": b"z" * 10, "more_body": True}], [(b"content-length", b"5000")]
    )
    assert sent[0]["status"] == 413 and calls == 0 and not seen
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


async def test_body_is_replayed_then_receive_reaches_the_server():
    """After the replay the app's receive() is the server's: a streaming response still sees
    the disconnect."""
    got: list = []

    async def app(scope, receive, send):
        got.append(await receive())
        got.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = BodySizeLimitMiddleware(app, max_bytes=10)
    msgs = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent, _ = await _asgi_call(mw, msgs, [])
    assert got == [{"type": "http.request", "body": b"abcd", "more_body": False}, {"type": "http.disconnect"}]
    assert sent[0]["status"] == 204


async def test_client_gone_before_body_answers_nothing():
    api, seen = _app(100, [])
    sent, _ = await _asgi_call(api, [{"type": "http.disconnect"}], [])
    assert sent == [] and seen == []


# ------------------------------------------------------------- deadline


class _SlowClient:
    """Yields ``n_fast`` deltas, then hangs; records whether its stream was closed."""

    def __init__(self, n_fast: int) -> None:
        self.n_fast = n_fast
        self.closed = asyncio.Event()

    async def model_info(self):
        return "info"

    async def generate(self, req):
        try:
            for i in range(self.n_fast):
                yield Delta(req.request_id, str(i), (i,))
            await asyncio.sleep(3600)
            yield Delta(req.request_id, "", (), FinishReason.LENGTH)
        finally:
            self.closed.set()


class _Req:
    request_id = "r1"


@pytest.mark.parametrize("n_fast", [0, 2])
async def test_deadline_closes_the_stream_and_reports_a_timeout(n_fast):
    inner = _SlowClient(n_fast)
    client = DeadlineClient(inner, timeout_s=0.2)
    items = [x async for x in client.generate(_Req())]
    assert [x.text for x in items[:-1]] == [str(i) for i in range(n_fast)]
    last = items[-1]
    assert isinstance(last, ReplicaError) and last.code == "request_timeout"
    assert inner.closed.is_set()  # the replica's stream was closed: its engine request is aborted
    assert await client.model_info() == "info"


async def test_no_deadline_passes_everything_through():
    class Quick:
        async def generate(self, req):
            yield Delta(req.request_id, "a", (1,))
            yield Delta(req.request_id, "b", (2,), FinishReason.STOP)

    items = [x async for x in DeadlineClient(Quick(), None).generate(_Req())]
    assert [x.text for x in items] == ["a", "b"]
    items = [x async for x in DeadlineClient(Quick(), 30).generate(_Req())]
    assert [x.text for x in items] == ["a", "b"]


async def test_timeout_error_maps_to_400():
    err = APIError.from_replica(ReplicaError("request_timeout", "late"))
    assert err.status == 400 and err.code == "request_timeout"


# ------------------------------------------------------------- wired into the ingress


@pytest.fixture
async def limited():
    from deployments.ingress import IngressSettings, OpenAIService, build_api
    from tests.deployments.fakes import FakeEngine, FakeMetricsBackend, FakeTokenizer, LocalClient, make_server

    server, engine = await make_server(FakeEngine(max_model_len=128))
    client = LocalClient(server)
    limits = RequestLimits(
        max_body_bytes=2000,
        max_prompt_tokens=20,
        max_tokens=8,
        max_stop_strings=2,
        max_stop_string_len=5,
        request_timeout_s=0.5,
    )
    service = OpenAIService(
        client, FakeTokenizer(), IngressSettings(model="m", limits=limits), metrics_backend=FakeMetricsBackend()
    )
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t")
    yield http, service, engine, client
    await http.aclose()


async def test_ingress_refuses_over_limit_requests_before_any_replica(limited):
    http, _, _, client = limited
    ok = {"model": "m", "prompt": "hi"}
    cases = [
        ({**ok, "prompt": "x" * 2100}, 413, "request_too_large", None),
        ({**ok, "prompt": "y" * 25}, 400, "prompt_too_long", "prompt"),  # 26 tokens with BOS
        ({**ok, "max_tokens": 9}, 400, "max_tokens_too_large", "max_tokens"),
        ({**ok, "stop": ["a", "b", "c"]}, 400, "invalid_request", "stop"),
        ({**ok, "stop": "abcdef"}, 400, "invalid_request", "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "z" * 30}]}, 400, "prompt_too_long", "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "z"}], "max_completion_tokens": 50},
            400,
            "max_tokens_too_large",
            "max_tokens",
        ),
    ]
    for body, status, code, param in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = await http.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["param"] == param and set(err) == {"message", "type", "param", "code"}
    assert client.requests == []


async def test_defaults_are_capped_by_the_max_tokens_limit(limited):
    http, _, _, client = limited
    r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})  # OpenAI's default 16
    assert r.status_code == 200 and client.requests[-1].params.max_tokens == 8
    r = await http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and client.requests[-1].params.max_tokens == 8  # not the rest of the context
    r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 8, "stop": ["ab", "cd"]})
    assert r.status_code == 200 and client.requests[-1].params.max_tokens == 8


async def test_request_timeout_aborts_the_engine_request(limited):
    http, _, engine, client = limited
    engine.pause.clear()  # the engine stalls: no token comes
    r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "request_timeout" and r.json()["error"]["type"] == "invalid_request_error"
    rid = client.requests[-1].request_id
    assert engine.aborted == [rid] and engine.blocks == {}  # aborted, blocks freed


async def test_request_timeout_mid_stream_ends_with_an_error_event(limited):
    from deployments.protocol import CompletionRequest

    _, service, engine, client = limited
    resp = await service.completions(CompletionRequest(model="m", prompt="hi", max_tokens=8, stream=True))
    it = resp.body_iterator
    first = await it.__anext__()
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    engine.pause.clear()
    # SSE events as a client reads them (a body message may carry several: the error and [DONE]).
    rest = b"".join([chunk async for chunk in it]).split(b"\n\n")
    assert rest[-2:] == [b"data: [DONE]", b""]
    events = [json.loads(e[6:]) for e in rest[:-2]]
    assert events[-1]["error"]["code"] == "request_timeout"
    assert engine.aborted == [client.requests[-1].request_id] and engine.blocks == {}


def test_app_args_reach_the_ingress_settings():
    from deployments.app import build_app
    from deployments.ingress import IngressSettings

    app = build_app({"limits": {"max_tokens": 64, "request_timeout_s": 30}, "auth": {"api_keys": ["k-123456"]}})
    _, settings = app._bound_deployment.init_args
    s = IngressSettings.model_validate(settings)
    assert s.limits == RequestLimits(max_tokens=64, request_timeout_s=30)
    assert s.auth.load(environ={}).matches("k-123456") and "k-123456" not in repr(settings)
    with pytest.raises(ValidationError):
        build_app({"limits": {"max_tokens": 0}})
