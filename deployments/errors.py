"""Errors at the Serve boundary and their HTTP mapping.

The replica never raises for a user error across the Serve boundary: an exception
there arrives at the ingress as an opaque ``RayTaskError`` and would become a 500.
Instead it yields a ``ReplicaError`` value (picklable, no exception state) that the
ingress turns into an ``APIError`` with the right status and the OpenAI error body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from replica.errors import EngineError

# code -> (HTTP status, OpenAI error "type")
_STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "queue_full": (429, "rate_limit_error"),
    "engine_unavailable": (503, "service_unavailable"),
    # limits and auth (deployments/limits.py, deployments/auth.py)
    "invalid_api_key": (401, "invalid_request_error"),
    "request_timeout": (400, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    # the HTTP edge (deployments/edge.py)
    "body_timeout": (408, "invalid_request_error"),
    "too_many_uploads": (429, "rate_limit_error"),
    "server_busy": (503, "service_unavailable"),
    "internal_error": (500, "internal_error"),
}

DEFAULT_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ReplicaError:
    """A refusal or failure, as a value the replica yields instead of raising."""

    code: str  # one of the engine error codes (replica/errors.py) or "internal_error"
    message: str
    param: str | None = None
    retry_after_s: int | None = None  # for queue_full

    @classmethod
    def from_exception(cls, exc: EngineError, *, retry_after_s: int | None = None) -> ReplicaError:
        retry = retry_after_s if exc.code == "queue_full" else None
        if exc.code == "queue_full" and retry is None:
            retry = DEFAULT_RETRY_AFTER_S
        return cls(code=exc.code, message=exc.message, param=exc.param, retry_after_s=retry)


def backpressure_error(exc: Any) -> ReplicaError:
    """Serve's own ``BackPressureError`` (max_queued_requests on the handle) as a 429 value."""
    retry = max(1, math.ceil(exc.retry_after_s or 1))  # a header of 0 would invite a hammering retry
    return ReplicaError("queue_full", str(exc), retry_after_s=retry)


class APIError(Exception):
    """An error answered to the HTTP client in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    @classmethod
    def from_code(
        cls, code: str, message: str, *, param: str | None = None, retry_after_s: int | None = None
    ) -> APIError:
        status, type_ = _STATUS.get(code, (500, "internal_error"))
        if (status == 429 or code == "server_busy") and retry_after_s is None:
            retry_after_s = DEFAULT_RETRY_AFTER_S
        return cls(status, message, type=type_, code=code, param=param, retry_after_s=retry_after_s)

    @classmethod
    def from_replica(cls, err: ReplicaError) -> APIError:
        return cls.from_code(err.code, err.message, param=err.param, retry_after_s=err.retry_after_s)

    @classmethod
    def invalid(cls, message: str, *, param: str | None = None) -> APIError:
        return cls.from_code("invalid_request", message, param=param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
