"""The HTTP edge of the ingress: stalled uploads, connection bounds, disconnects, x-request-id.

One pure ASGI middleware, outermost in the ingress app, so every request passes it:

  more than ``max_concurrent_requests`` in this ingress    503 ``server_busy`` (not read)
  more than ``max_uploads_per_client`` bodies in progress  429 ``too_many_uploads`` (not read)
    from one client address
  body not complete within ``body_timeout_s``              408 ``body_timeout``, connection closed
  client gone before the response ends                     outcome ``client_disconnected``: one
                                                           INFO line, no 5xx, the app's task is
                                                           cancelled (which aborts the engine request)

Serve's proxy forwards a body as it arrives and holds one ingress slot per request from its
headers on, so without the body deadline each stalled upload held a slot until its client
went away (about 2,050 of them took the API down). ``/health`` and ``/v1/models`` (no body,
no replica work beyond a cached fact) are not counted, so a saturated ingress still answers
its load balancer.

x-request-id: Serve's proxy appends its own (the client's, or a UUID it makes) to every
response; the ingress uses that same id as the response id, so behind the proxy the app
sends none and the client sees exactly one. Without the proxy (tests, other ASGI servers)
the middleware echoes the client's id, or keeps the app's (the response id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect

from deployments.errors import APIError
from deployments.limits import send_api_error

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = b"x-request-id"
DISCONNECTED = "client_disconnected"  # the metrics' status tag for a client that left
BODY_TIMEOUT_CODE = "body_timeout"
BUSY_CODE = "server_busy"
TOO_MANY_UPLOADS_CODE = "too_many_uploads"
# Paths (suffixes, as Serve may prefix them) that bypass the concurrency bounds.
UNBOUNDED_PATHS = ("/health", "/v1/models")


class BodyTimeout(Exception):
    """Raised from ``receive`` when the body did not arrive in time (caught by the middleware)."""


@dataclass(frozen=True)
class EdgeLimits:
    body_timeout_s: float | None
    max_concurrent_requests: int | None
    max_uploads_per_client: int | None


@dataclass
class _Exchange:
    """One request's state as the middleware sees it."""

    body_deadline: float | None
    client_id: bytes | None
    body_done: bool = False
    status: int | None = None  # set when the response starts
    done: bool = False  # the response's last byte went out
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


def request_id_of(headers: list[tuple[bytes, bytes]] | Any) -> bytes | None:
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            return value
    return None


def usable_request_id(value: str | None) -> str | None:
    """A client's x-request-id reused as the response id only if it is short printable ASCII."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value:
        return value
    return None


class EdgeMiddleware:
    def __init__(
        self,
        app: Any,
        limits: EdgeLimits,
        on_outcome: Callable[[str, int | str], None] | None = None,
        *,
        proxy_adds_request_id: bool = False,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_outcome = on_outcome or (lambda path, status: None)
        self.proxy_adds_request_id = proxy_adds_request_id
        self.active = 0  # requests counted against max_concurrent_requests
        self.uploads: dict[str, int] = {}  # client host -> bodies still arriving

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        bounded = not path.endswith(UNBOUNDED_PATHS)
        host = (scope.get("client") or ("?",))[0]
        lim = self.limits
        if bounded and lim.max_concurrent_requests is not None and self.active >= lim.max_concurrent_requests:
            await self._refuse(
                scope, send, APIError.from_code(BUSY_CODE, "The server is at its connection limit; retry shortly.")
            )
            return
        if (
            bounded
            and lim.max_uploads_per_client is not None
            and self.uploads.get(host, 0) >= lim.max_uploads_per_client
        ):
            msg = f"More than {lim.max_uploads_per_client} request bodies in progress from this client; retry shortly."
            await self._refuse(scope, send, APIError.from_code(TOO_MANY_UPLOADS_CODE, msg))
            return
        loop = asyncio.get_running_loop()
        deadline = None if lim.body_timeout_s is None else loop.time() + lim.body_timeout_s
        ex = _Exchange(deadline, request_id_of(scope.get("headers", ())))
        self.active += bounded
        self.uploads[host] = self.uploads.get(host, 0) + 1
        try:
            await self._serve(scope, receive, send, ex, lambda: self._upload_done(host))
        finally:
            self.active -= bounded
            if not ex.body_done:
                self._upload_done(host)

    def _upload_done(self, host: str) -> None:
        n = self.uploads.get(host, 0) - 1
        if n > 0:
            self.uploads[host] = n
        else:
            self.uploads.pop(host, None)

    async def _refuse(self, scope: dict, send: Callable[..., Any], err: APIError) -> None:
        self.on_outcome(scope.get("path", ""), err.status)
        # Close: the unread body must not be parsed as a next request.
        await send_api_error(send, err, {"connection": "close"})

    async def _serve(
        self,
        scope: dict,
        receive: Callable[..., Any],
        send: Callable[..., Any],
        ex: _Exchange,
        on_body_done: Callable[[], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            # The server's receive after the body: the only message left is the disconnect.
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    ex.disconnected.set()
                    return

        async def edge_receive() -> dict:
            nonlocal watcher
            if ex.body_done:
                await ex.disconnected.wait()
                return {"type": "http.disconnect"}
            try:
                if ex.body_deadline is None:
                    msg = await receive()
                else:
                    # wait_for's helper task is harmless here: receive() is no generator.
                    msg = await asyncio.wait_for(receive(), max(ex.body_deadline - loop.time(), 0))
            except (TimeoutError, asyncio.TimeoutError):
                raise BodyTimeout from None
            if msg["type"] == "http.disconnect":
                ex.disconnected.set()
            elif not msg.get("more_body", False):
                ex.body_done = True
                on_body_done()
                watcher = asyncio.ensure_future(watch())
            return msg

        async def edge_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                message = {**message, "headers": self._response_headers(list(message.get("headers", ())), ex)}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ex.done = True
            try:
                await send(message)
            except (OSError, ClientDisconnect):
                ex.disconnected.set()
                raise

        app_task = asyncio.ensure_future(self.app(scope, edge_receive, edge_send))
        gone = asyncio.ensure_future(ex.disconnected.wait())
        path = scope.get("path", "")
        try:
            await asyncio.wait({app_task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not app_task.done():  # the client left while the app was still working
                app_task.cancel()
                await asyncio.wait({app_task})
            exc = None if app_task.cancelled() else app_task.exception()
            if isinstance(exc, BodyTimeout):
                logger.info("%s: body not received within %gs; closing", path, self.limits.body_timeout_s)
                if ex.status is None:
                    err = APIError(
                        408,
                        f"The request body did not arrive within {self.limits.body_timeout_s:g}s.",
                        code=BODY_TIMEOUT_CODE,
                    )
                    self.on_outcome(path, 408)
                    await send_api_error(send, err, {"connection": "close"})
                return
            if ex.disconnected.is_set() and not ex.done:
                self._left(path, ex)
                return
            if exc is not None:
                if isinstance(exc, (OSError, ClientDisconnect)):
                    self._left(path, ex)
                    return
                raise exc
        except asyncio.CancelledError:
            # Serve cancels the request when its client disconnects at the proxy.
            app_task.cancel()
            await asyncio.wait({app_task})
            if not ex.done:
                self._left(path, ex)
            raise
        finally:
            gone.cancel()
            if watcher is not None:
                watcher.cancel()

    def _left(self, path: str, ex: _Exchange) -> None:
        stage = "before the response" if ex.status is None else "mid-response"
        logger.info("%s: client disconnected %s; request cancelled", path, stage)
        if ex.status is None:  # a started response was already counted by its status
            self.on_outcome(path, DISCONNECTED)

    def _response_headers(self, headers: list[tuple[bytes, bytes]], ex: _Exchange) -> list[tuple[bytes, bytes]]:
        """Exactly one x-request-id: the client's if it sent one, else the app's (the response id)."""
        if ex.client_id is None:
            return headers
        headers = [(k, v) for k, v in headers if k.lower() != REQUEST_ID_HEADER]
        if not self.proxy_adds_request_id:
            headers.append((REQUEST_ID_HEADER, ex.client_id))
        return headers
