"""FailoverClient: a replica that refuses as unavailable before any output is retried; after
output, or with other errors, the error goes to the client."""

from __future__ import annotations

import pytest

from deployments.errors import ReplicaError
from deployments.failover import FailoverClient
from replica.outputs import Delta
from replica.request import FinishReason

pytestmark = pytest.mark.timeout(30)

DOWN = ReplicaError("engine_unavailable", "model replica unavailable: actor died")


class ScriptedClient:
    """Each generate() call plays the next script; records calls and closed streams."""

    def __init__(self, *scripts: list) -> None:
        self.scripts = list(scripts)
        self.calls = 0
        self.closed = 0

    async def model_info(self):
        return "info"

    async def generate(self, req):
        script = self.scripts[self.calls]
        self.calls += 1
        try:
            for item in script:
                yield item
        finally:
            self.closed += 1


class _Req:
    request_id = "r1"


def ok(text: str = "hi") -> list:
    return [Delta("r1", text[0], (1,)), Delta("r1", text[1:], (2,), FinishReason.STOP)]


async def collect(client) -> list:
    return [x async for x in client.generate(_Req())]


async def test_unavailable_before_output_is_retried_on_another_call():
    inner = ScriptedClient([DOWN], [DOWN], ok())
    out = await collect(FailoverClient(inner, max_attempts=3, backoff_s=0))
    assert [d.text for d in out] == ["h", "i"] and inner.calls == 3 and inner.closed == 3


async def test_gives_up_after_max_attempts_with_the_503_error():
    inner = ScriptedClient([DOWN], [DOWN])
    out = await collect(FailoverClient(inner, max_attempts=2, backoff_s=0))
    assert out == [DOWN] and inner.calls == 2


async def test_error_after_output_is_not_retried():
    inner = ScriptedClient([Delta("r1", "h", (1,)), DOWN], ok())
    out = await collect(FailoverClient(inner, max_attempts=3, backoff_s=0))
    assert [getattr(x, "text", None) for x in out] == ["h", None] and out[-1] is DOWN and inner.calls == 1


async def test_other_refusals_are_not_retried():
    full = ReplicaError("queue_full", "busy", retry_after_s=1)
    inner = ScriptedClient([full], ok())
    out = await collect(FailoverClient(inner, max_attempts=3, backoff_s=0))
    assert out == [full] and inner.calls == 1


async def test_closing_early_closes_the_inner_stream():
    inner = ScriptedClient(ok("hello"))
    agen = FailoverClient(inner).generate(_Req())
    assert (await agen.__anext__()).text == "h"
    await agen.aclose()
    assert inner.closed == 1 and await FailoverClient(inner).model_info() == "info"


def test_max_attempts_is_validated():
    with pytest.raises(ValueError):
        FailoverClient(ScriptedClient(), max_attempts=0)
