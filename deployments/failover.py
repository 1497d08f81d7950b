"""Retry on another replica when one dies before streaming anything.

A replica that is killed, crashes or drains answers ``ReplicaError(engine_unavailable)``
(``HandleLLMClient`` turns Ray's actor errors into it). If that comes before any output
reached the client, nothing is lost by sending the same request again: the router
has dropped or will skip the dead replica. After the first output the error is passed
on (a half-streamed answer cannot be restarted silently), and after ``max_attempts``
the client gets the 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from deployments.errors import ReplicaError

logger = logging.getLogger("ray.serve")

RETRYABLE_CODES = frozenset({"engine_unavailable"})


class FailoverClient:
    """An ``LLMClient`` that retries ``RETRYABLE_CODES`` refusals that arrive before any output."""

    def __init__(self, inner: Any, max_attempts: int = 3, backoff_s: float = 0.2) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._inner = inner
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s

    async def model_info(self) -> Any:
        return await self._inner.model_info()

    async def generate(self, req: Any) -> AsyncIterator[Any]:
        for attempt in range(1, self.max_attempts + 1):
            agen = self._inner.generate(req)
            retry = False
            try:
                first = True
                async for item in agen:
                    if (
                        first
                        and attempt < self.max_attempts
                        and isinstance(item, ReplicaError)
                        and item.code in RETRYABLE_CODES
                    ):
                        logger.warning(
                            "request %s: attempt %d/%d refused (%s); retrying",
                            req.request_id,
                            attempt,
                            self.max_attempts,
                            item.message,
                        )
                        retry = True
                        break
                    first = False
                    yield item
            finally:
                await agen.aclose()
            if not retry:
                return
            await asyncio.sleep(self.backoff_s * attempt)
