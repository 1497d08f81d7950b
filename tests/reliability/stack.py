"""The whole HTTP stack in one process, without Ray: FastAPI ingress (with its limits and auth
middleware) -> in-process client -> LLMServer -> real AsyncEngine on a tiny seeded model.

Fast enough to fuzz and to storm on 2 CPU cores; the Ray path has its own test module.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from deployments.auth import AuthSettings
from deployments.ingress import IngressSettings, OpenAIService, build_api
from deployments.limits import RequestLimits
from deployments.llm import LLMServer
from replica.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tests.deployments.fakes import FakeMetricsBackend, LocalClient

MODEL = "tiny:llama"


@dataclass
class Stack:
    app: Any  # the ASGI app
    service: OpenAIService
    server: LLMServer
    client: LocalClient

    @property
    def engine(self) -> Any:  # AsyncEngine
        return self.server._engine

    async def wait_idle(self, timeout_s: float = 30.0) -> Any:
        """Wait until nothing waits or runs and every KV block is free; check the pool's invariants."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.engine.stats()
            if not s.num_waiting and not s.num_running and s.num_free_blocks == s.num_total_blocks:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout_s}s: {s}")
            await asyncio.sleep(0.05)
        self.engine.engine.scheduler.kv.check_invariants()  # the step thread is idle now
        assert self.server.stats().num_inflight == 0
        return s


async def build_stack(
    *,
    limits: RequestLimits | None = None,
    auth: AuthSettings | None = None,
    dtype: str = "float32",
    max_model_len: int = 256,
    num_blocks: int = 64,
    block_size: int = 16,
    max_num_seqs: int = 4,
    max_waiting: int = 16,
    metrics_backend: Any = None,
) -> Stack:
    """Build the stack on the running event loop (the engine binds to it)."""
    config = EngineConfig(
        model=ModelConfig(model=MODEL, dtype=dtype, device="cpu", max_model_len=max_model_len, seed=0),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_waiting=max_waiting),
    )
    server = object.__new__(LLMServer)
    await server.__init__(config, {}, metrics_backend=metrics_backend or FakeMetricsBackend())
    client = LocalClient(server)
    limits = limits or RequestLimits()
    auth = auth or AuthSettings(api_keys_env=None)
    settings = IngressSettings(model=MODEL, limits=limits, auth=auth)
    service = OpenAIService(
        client, server._engine.tokenizer, settings, metrics_backend=metrics_backend or FakeMetricsBackend()
    )
    return Stack(app=build_api(service), service=service, server=server, client=client)


class NullMetricsBackend:
    """Metrics that keep nothing (FakeMetricsBackend records every value: a soak would see it grow)."""

    class _Metric:
        def inc(self, *a: Any, **k: Any) -> None: ...
        def set(self, *a: Any, **k: Any) -> None: ...
        def observe(self, *a: Any, **k: Any) -> None: ...

    def _make(self, name: str, **kwargs: Any) -> Any:
        return self._Metric()

    Counter = Gauge = Histogram = _make


# ------------------------------------------------------------- raw ASGI calls


@dataclass
class Reply:
    status: int | None
    chunks: list[bytes]
    dropped: bool  # the client went away before the end

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_text(self) -> str:
        """Concatenated text of an SSE completion/chat stream (that must have ended with [DONE])."""
        events = [e for e in self.body.decode().split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", events[-3:]
        text = []
        for e in events[:-1]:
            data = json.loads(e.removeprefix("data: "))
            assert "error" not in data, data
            for c in data["choices"]:
                text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
        return "".join(text)


async def asgi_call(
    app: Any,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    drop_after: int | None = None,
    drop_mode: str = "disconnect",
) -> Reply:
    """One HTTP request straight through the ASGI app, as a server would drive it.

    ``drop_after``: the client leaves after that many body chunks. ``drop_mode``:
    ``disconnect`` (receive() answers http.disconnect: ASGI < 2.4 servers), ``oserror``
    (send() raises, ASGI 2.4: uvicorn's way), ``cancel`` (the request task is cancelled:
    Ray Serve's proxy on a client disconnect).
    """
    gone = asyncio.Event()
    body_sent = False
    status: int | None = None
    chunks: list[bytes] = []
    dropped = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, dropped
        if dropped:
            raise OSError("client connection closed")
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if drop_after is not None and len(chunks) >= drop_after and message.get("more_body"):
                dropped = True
                gone.set()
                if drop_mode == "oserror":
                    raise OSError("client connection reset")

    hdrs = [(b"host", b"test"), (b"content-type", b"application/json"), *(headers or [])]
    hdrs.append((b"content-length", str(len(body)).encode()))
    spec = "2.4" if drop_mode == "oserror" else "2.0"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": hdrs,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    if drop_mode == "cancel" and drop_after is not None:
        waiter = asyncio.ensure_future(gone.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            task.cancel()
    try:
        await task
    except (OSError, asyncio.CancelledError):
        if not dropped:
            raise
    except Exception:
        if not dropped:  # after a drop the server may raise (ClientDisconnect): that is its business
            raise
    return Reply(status, chunks, dropped)
