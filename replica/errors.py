"""Engine errors. Each carries a stable ``code`` that the HTTP edge maps to a status.

The engine knows nothing of HTTP; ``deployments/`` maps:
  InvalidRequestError -> 400, RequestTooLongError -> 400 (context_length_exceeded),
  QueueFullError -> 429 (+ Retry-After), EngineUnavailableError -> 503.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises for a request."""

    code: str = "engine_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EngineError, ValueError):
    """A parameter is out of range or malformed."""

    code = "invalid_request"


class RequestTooLongError(InvalidRequestError):
    """Prompt plus max_tokens can never fit: longer than the context or the whole KV cache."""

    code = "context_length_exceeded"


class QueueFullError(EngineError):
    """The bounded waiting queue is full; try again later."""

    code = "queue_full"


class EngineUnavailableError(EngineError):
    """The engine is draining, stopped, or its step loop died."""

    code = "engine_unavailable"


def check_accepting(dead: str | None, closing: bool) -> None:
    """Refuse a new request to an engine whose step loop died (``dead``: why) or that is shutting down."""
    if dead is not None:
        raise EngineUnavailableError(f"the engine failed and no longer accepts requests: {dead}")
    if closing:
        raise EngineUnavailableError("the engine is shutting down and no longer accepts requests")


class ModelLoadError(RuntimeError):
    """The model named in the config cannot be found or loaded (at start, not for a request)."""
