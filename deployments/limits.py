"""Request limits of the OpenAI ingress: body size, prompt tokens, max_tokens, stop strings,
and a per-request deadline. All configurable (``RequestLimits``, the ``limits`` argument
of the app); exceeding one is answered in the OpenAI error shape before a replica is used:

  body larger than ``max_body_bytes``           413  code ``request_too_large``
  prompt longer than ``max_prompt_tokens``      400  code ``prompt_too_long``
  max_tokens above ``max_tokens``               400  code ``max_tokens_too_large``
  too many / too long stop strings              400  code ``invalid_request``
  no finish within ``request_timeout_s``        400  code ``request_timeout`` (the engine
                                                     request is aborted; mid-stream: an error event)
  body, connections and uploads per client      408 / 503 / 429, enforced by deployments/edge.py

The body limit is a pure ASGI middleware (it reads at most ``max_body_bytes + 1`` bytes and
never trusts Content-Length alone); the deadline wraps the ingress's ``LLMClient`` so the
replica request is closed, and thereby aborted, the moment it expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import APIError, ReplicaError
from replica.request import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS

logger = logging.getLogger("ray.serve")

TIMEOUT_CODE = "request_timeout"
TOO_LARGE_CODE = "request_too_large"


class RequestLimits(BaseModel):
    """Per-request limits enforced by the ingress (``limits`` in the app's args)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        default=4 * 2**20, gt=0, description="Largest HTTP request body in bytes; beyond it: 413."
    )
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="Most prompt tokens (after the chat template); None: only the context length."
    )
    max_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Largest max_tokens a client may ask for (400 beyond it); also caps the default when "
        "a client sends none. None: the rest of the context.",
    )
    max_stop_strings: int = Field(
        default=MAX_STOP_STRINGS, ge=0, le=MAX_STOP_STRINGS, description="Most stop strings per request."
    )
    max_stop_string_len: int = Field(
        default=MAX_STOP_STRING_LEN, ge=1, le=MAX_STOP_STRING_LEN, description="Longest stop string, in characters."
    )
    request_timeout_s: float | None = Field(
        default=600.0,
        gt=0,
        description="Deadline of one request from its arrival at the ingress; on expiry the engine request "
        "is aborted and the client gets 400 (or an error event mid-stream). None: no deadline.",
    )
    # The HTTP edge (deployments/edge.py): stalled or abusive clients must not hold ingress slots.
    body_timeout_s: float | None = Field(
        default=10.0,
        gt=0,
        description="Time from a request's arrival at the ingress to the last byte of its body; beyond it: 408 "
        "and the connection is closed. None: no bound.",
    )
    max_concurrent_requests: int | None = Field(
        default=2000,
        gt=0,
        description="Requests one ingress replica serves at once (/health and /v1/models not counted); beyond "
        "it: 503 server_busy at once, without reading the body. None: only Serve's max_ongoing_requests.",
    )
    max_uploads_per_client: int | None = Field(
        default=256,
        gt=0,
        description="Request bodies still arriving from one client address at once; beyond it: 429 "
        "too_many_uploads. None: no bound (e.g. when every client comes through one load balancer). Not "
        "applied behind HAProxy, where every client has HAProxy's address (client_timeout_s bounds uploads there).",
    )
    # The cluster's HTTP front (deployments/front_proxy.py): HAProxy enforces these; Ray reads them
    # when it starts, so they reach it as environment (./dev serve, k8s/generate.py), not from here.
    client_timeout_s: int = Field(
        default=10,
        gt=0,
        description="HAProxy front: longest silence of a client while it sends its request (headers or body) or "
        "while it does not read its response; beyond it the connection is closed (408 for unfinished headers). "
        "Waiting for a slow answer is not silence.",
    )
    max_connections: int = Field(
        default=4096,
        gt=0,
        description="HAProxy front: client connections open at once per node; more wait in the kernel's queue.",
    )

    # ------------------------------------------------------------- checks before a replica is used

    def check(self, *, n_prompt: int, max_tokens: int | None, stop: str | list[str] | None, what: str) -> None:
        """Raise APIError (400) if the request exceeds a limit; ``what`` names the prompt's parameter."""
        if self.max_prompt_tokens is not None and n_prompt > self.max_prompt_tokens:
            raise APIError(
                400,
                f"The prompt has {n_prompt} tokens; this server accepts at most {self.max_prompt_tokens}.",
                code="prompt_too_long",
                param=what,
            )
        if self.max_tokens is not None and max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens}.",
                code="max_tokens_too_large",
                param="max_tokens",
            )
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > self.max_stop_strings:
            raise APIError.invalid(
                f"at most {self.max_stop_strings} stop strings are allowed, got {len(stops)}", param="stop"
            )
        for s in stops:
            if len(s) > self.max_stop_string_len:
                raise APIError.invalid(
                    f"stop strings must be at most {self.max_stop_string_len} characters, got one of {len(s)}",
                    param="stop",
                )

    def default_max_tokens(self, rest_of_context: int) -> int:
        """max_tokens for a request that sent none: the rest of the context, capped by ``max_tokens``."""
        return rest_of_context if self.max_tokens is None else min(rest_of_context, self.max_tokens)


# ------------------------------------------------------------- body size (ASGI)


def _error_json(err: APIError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    return body, headers


async def send_api_error(send: Callable[..., Any], err: APIError, extra_headers: dict[str, str] | None = None) -> None:
    """Answer an ASGI HTTP request with ``err`` in the OpenAI error shape."""
    body, headers = _error_json(err)
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodySizeLimitMiddleware:
    """Refuse HTTP bodies over ``max_bytes`` with 413 before the app parses them.

    A declared Content-Length over the limit is refused without reading; otherwise the body
    is read up to the limit (chunked uploads included) and replayed to the app. After the
    replay, ``receive`` goes back to the server's own, so a streaming response still sees
    the client's disconnect.
    """

    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[str, int], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(scope, send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict, send: Callable[..., Any], declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else f"more than {self.max_bytes} bytes"
        err = APIError(
            413,
            f"The request body is {size}; this server accepts at most {self.max_bytes} bytes.",
            code=TOO_LARGE_CODE,
        )
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""), 413)
        # Close the connection: the unread rest of the body must not be parsed as a next request.
        await send_api_error(send, err, {"connection": "close"})


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# ------------------------------------------------------------- deadline (LLMClient wrapper)


class DeadlineClient:
    """An ``LLMClient`` whose requests end at a deadline: on expiry the inner stream is closed
    (which aborts the replica's engine request and frees its KV blocks) and one
    ``ReplicaError(request_timeout)`` is yielded, so the ingress answers 400 before the first
    token and an error event after it."""

    def __init__(self, inner: Any, timeout_s: float | None) -> None:
        self._inner = inner
        self.timeout_s = timeout_s

    async def model_info(self) -> Any:
        return await self._inner.model_info()

    async def generate(self, req: Any) -> AsyncIterator[Any]:
        agen = self._inner.generate(req)
        if self.timeout_s is None:
            try:
                async for item in agen:
                    yield item
            finally:
                await agen.aclose()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    item = await _next_before(agen, deadline, remaining)
                except StopAsyncIteration:
                    return
                except (TimeoutError, asyncio.TimeoutError):  # distinct types before Python 3.11
                    logger.warning("request %s: timed out after %.1fs; aborted", req.request_id, self.timeout_s)
                    yield ReplicaError(
                        TIMEOUT_CODE,
                        f"The request did not finish within {self.timeout_s:g}s and was aborted.",
                    )
                    return
                yield item
        finally:
            await agen.aclose()


async def _next_before(agen: Any, deadline: float, remaining: float) -> Any:
    """``agen.__anext__()`` bounded by ``deadline`` (loop time), in the caller's own task: a
    helper task (``wait_for`` before 3.12) could still be running the generator when an
    outer cancel scope (Starlette's, on a client disconnect) closes it."""
    timeout_at = getattr(asyncio, "timeout_at", None)
    if timeout_at is None:  # Python 3.10
        return await asyncio.wait_for(agen.__anext__(), remaining)
    async with timeout_at(deadline):
        return await agen.__anext__()
