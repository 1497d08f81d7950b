"""The HTTP edge (deployments/edge.py): stalled uploads, connection bounds, disconnects, x-request-id.

The stall and disconnect tests run the real ingress app (fake engine) under a real uvicorn
server in this process, with raw sockets as the misbehaving clients: httpx's ASGI transport
always delivers a whole body at once and never disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
import psutil
import pytest
import uvicorn

from deployments.edge import EdgeLimits, EdgeMiddleware
from deployments.ingress import IngressSettings, OpenAIService, build_api
from deployments.limits import RequestLimits
from tests.deployments.fakes import FakeEngine, FakeMetricsBackend, FakeTokenizer, LocalClient, make_server

pytestmark = pytest.mark.timeout(60)

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}
RESPONSES = "cbserve_http_responses_total"


def statuses(backend: FakeMetricsBackend) -> list[str]:
    return [tags["status"] for _, tags in backend.metrics[RESPONSES].values]


# ------------------------------------------------------------- the middleware alone (raw ASGI)


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, int | str]] = []

    def __call__(self, path: str, status: int | str) -> None:
        self.outcomes.append((path, status))


def scope(path: str = "/v1/chat/completions", client: str = "10.0.0.1", headers=()) -> dict:
    return {"type": "http", "method": "POST", "path": path, "client": (client, 1234), "headers": list(headers)}


async def echo_app(scope, receive, send):
    """Reads the whole body, answers it back with an x-request-id of its own."""
    body = b""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"chatcmpl-app")]})
    await send({"type": "http.response.body", "body": body})


def edge(app=echo_app, rec=None, *, body_timeout_s=0.2, max_concurrent=None, per_client=None, proxy=False):
    return EdgeMiddleware(app, EdgeLimits(body_timeout_s, max_concurrent, per_client), rec, proxy_adds_request_id=proxy)


async def call(mw, sc, messages):
    """Run one request; ``messages`` are what the client sends (then it waits forever)."""
    queue: asyncio.Queue = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    sent: list[dict] = []

    async def send(m):
        sent.append(m)

    await asyncio.wait_for(mw(sc, queue.get, send), 10)
    return sent, queue


def headers_of(sent) -> list[tuple[bytes, bytes]]:
    return list(sent[0]["headers"])


async def test_a_stalled_body_gets_408_and_a_closed_connection():
    rec = Recorder()
    mw = edge(rec=rec)
    sent, _ = await call(mw, scope(), [{"type": "http.request", "body": b"{", "more_body": True}])
    assert sent[0]["status"] == 408 and (b"connection", b"close") in headers_of(sent)
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_timeout"
    assert rec.outcomes == [("/v1/chat/completions", 408)]
    assert mw.active == 0 and mw.uploads == {}


async def test_a_complete_body_is_not_timed_out():
    mw = edge(body_timeout_s=0.2)
    sent, _ = await call(mw, scope(), [{"type": "http.request", "body": b"abc", "more_body": False}])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"abc"


async def test_a_client_gone_before_its_body_ends_is_recorded_as_a_disconnect(caplog):
    rec = Recorder()
    caplog.set_level(logging.INFO, logger="ray.serve")
    sent, _ = await call(
        edge(rec=rec), scope(), [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    )
    assert sent == [] and rec.outcomes == [("/v1/chat/completions", "client_disconnected")]
    assert [r.levelno for r in caplog.records if "disconnected" in r.getMessage()] == [logging.INFO]


async def test_a_client_gone_while_the_app_works_cancels_the_app():
    cancelled = asyncio.Event()

    async def slow_app(scope, receive, send):
        await receive()
        try:
            await asyncio.sleep(60)  # e.g. queued behind other requests in the engine
        except asyncio.CancelledError:
            cancelled.set()
            raise

    rec = Recorder()
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait({"type": "http.request", "body": b"{}"})
    sent: list = []

    async def send(m):
        sent.append(m)

    task = asyncio.ensure_future(edge(slow_app, rec)(scope(), queue.get, send))
    await asyncio.sleep(0.05)
    assert not task.done()
    queue.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(task, 10)
    assert cancelled.is_set() and sent == []
    assert rec.outcomes == [("/v1/chat/completions", "client_disconnected")]


async def test_concurrency_bound_answers_503_and_spares_health():
    release = asyncio.Event()

    async def holding_app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    rec = Recorder()
    mw = edge(holding_app, rec, max_concurrent=2)
    full = [{"type": "http.request", "body": b"{}"}]
    held = [asyncio.ensure_future(call(mw, scope(), full)) for _ in range(2)]
    await asyncio.sleep(0.05)
    sent, _ = await call(mw, scope(), full)
    assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["error"]["code"] == "server_busy"
    assert (b"retry-after", b"1") in headers_of(sent)
    health = asyncio.ensure_future(call(mw, scope("/health"), full))  # not counted: reaches the app
    await asyncio.sleep(0.05)
    assert mw.active == 2 and not health.done()
    release.set()
    for t in [*held, health]:
        assert (await t)[0][0]["status"] == 200
    assert mw.active == 0 and rec.outcomes == [("/v1/chat/completions", 503)]


async def test_uploads_per_client_are_bounded_but_other_clients_pass():
    mw = edge(body_timeout_s=5, per_client=2)
    stalled = [{"type": "http.request", "body": b"{", "more_body": True}]
    tasks = [asyncio.ensure_future(call(mw, scope(client="10.0.0.9"), stalled)) for _ in range(2)]
    await asyncio.sleep(0.05)
    sent, _ = await call(mw, scope(client="10.0.0.9"), stalled)
    assert sent[0]["status"] == 429 and json.loads(sent[1]["body"])["error"]["code"] == "too_many_uploads"
    sent, _ = await call(mw, scope(client="10.0.0.10"), [{"type": "http.request", "body": b"ok"}])
    assert sent[0]["status"] == 200
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert mw.uploads == {} and mw.active == 0


@pytest.mark.parametrize(
    "client_id, proxy, expected",
    [
        (None, False, [b"chatcmpl-app"]),  # the app's id (the response id)
        (b"mine-1", False, [b"mine-1"]),  # the client's, echoed
        (b"mine-1", True, []),  # Serve's proxy appends the client's (or its own) itself
    ],
)
async def test_exactly_one_request_id(client_id, proxy, expected):
    hdrs = [] if client_id is None else [(b"x-request-id", client_id)]
    sent, _ = await call(edge(proxy=proxy), scope(headers=hdrs), [{"type": "http.request", "body": b""}])
    assert [v for k, v in headers_of(sent) if k == b"x-request-id"] == expected


# ------------------------------------------------------------- the ingress under a real uvicorn


@contextlib.asynccontextmanager
async def serving(limits: RequestLimits, engine: FakeEngine | None = None):
    server, engine = await make_server(engine or FakeEngine(max_model_len=128, max_running=8, max_waiting=8))
    backend = FakeMetricsBackend()
    service = OpenAIService(
        LocalClient(server), FakeTokenizer(), IngressSettings(model=MODEL, limits=limits), metrics_backend=backend
    )
    config = uvicorn.Config(build_api(service), host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    uv = uvicorn.Server(config)
    task = asyncio.ensure_future(uv.serve())
    while not uv.started:
        await asyncio.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, engine, backend
    finally:
        uv.should_exit = True
        await task


def server_sockets(port: int) -> int:
    """Established connections on the server's side of ``port`` (this process holds both ends)."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def stalled_upload(port: int) -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b'content-length: 1000\r\n\r\n{"model":'
    )
    await writer.drain()
    return reader, writer


async def test_hundreds_of_stalled_uploads_do_not_starve_normal_traffic():
    limits = RequestLimits(body_timeout_s=1.0, max_uploads_per_client=None)
    async with serving(limits) as (port, _engine, backend):
        base = server_sockets(port)
        stalled = [await stalled_upload(port) for _ in range(300)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(5):  # normal traffic, answered while every stalled upload is still open
                r = await http.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 200, r.text
                assert (await http.get("/health")).status_code == 200
        assert not any(reader.at_eof() for reader, _ in stalled)  # answered before any body timeout fired
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), 10) for reader, _ in stalled))
        # Each stalled upload got its 408 and then the server closed the connection (read() hit EOF).
        assert all(a.startswith(b"HTTP/1.1 408") and b"body_timeout" in a for a in answers)
        for _, writer in stalled:
            writer.close()
        s = statuses(backend)
        assert s.count("408") == 300 and s.count("200") == 5 and not [x for x in s if x.startswith("5")]
        for _ in range(100):
            if server_sockets(port) <= base:
                break
            await asyncio.sleep(0.05)
        assert server_sockets(port) <= base


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        assert chunk, data
        data += chunk
    return data


def post(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def wait_for(cond, what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


@pytest.mark.parametrize(
    "stage", ["before the body ends", "while queued", "mid-stream", "mid-stream, no tokens coming"]
)
async def test_disconnect_at_each_stage_aborts_and_is_no_server_error(stage, caplog):
    """ "mid-stream, no tokens coming": no write can fail, so only a watch on the connection
    finds the client gone (the edge middleware's; the streamed response has none of its own)."""
    caplog.set_level(logging.INFO)
    async with serving(RequestLimits(body_timeout_s=5)) as (port, engine, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        streamed = stage.startswith("mid-stream")
        body = json.dumps({**CHAT, "max_tokens": 50, "stream": streamed}).encode()
        if stage == "before the body ends":
            writer.write(post(body)[:-5])
        else:
            if stage == "while queued":
                engine.pause.clear()  # the engine takes the request but produces nothing yet
            writer.write(post(body))
            if streamed:
                await read_until(reader, b"data: ")
                if stage == "mid-stream, no tokens coming":
                    engine.pause.clear()
            else:
                await wait_for(lambda: engine.blocks, "the request reached the engine")
        await writer.drain()
        writer.close()
        if stage == "before the body ends":
            await wait_for(lambda: backend.metrics[RESPONSES].values, "the disconnect was recorded")
            assert statuses(backend) == ["client_disconnected"]
        else:
            await wait_for(lambda: engine.aborted, "the engine request was aborted")
            assert not engine.blocks
            expected = ["200"] if streamed else ["client_disconnected"]
            await wait_for(lambda: statuses(backend) == expected, f"recorded as {expected}: {statuses(backend)}")
        engine.pause.set()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
