"""Fuzz the HTTP API in-process: hypothesis generates request bodies (near-valid ones with
hostile values, random JSON, raw bytes), paths and methods; every answer must be < 500, in the
OpenAI error shape when it is an error, and come within a deadline; afterwards the engine is
clean (nothing waiting or running, every KV block free, pool invariants hold).

The real AsyncEngine (tiny:llama) runs behind the real ingress, limits and auth included;
the limits keep generations short so hundreds of examples take seconds.
``CBSERVE_FUZZ_EXAMPLES`` scales the run (the figure in RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.auth import AuthSettings
from deployments.limits import RequestLimits
from tests.reliability.stack import MODEL, asgi_call, build_stack
from tests.reliability.strategies import AUTH, KEY, dumps, http_request

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("CBSERVE_FUZZ_EXAMPLES", "200"))
LIMITS = RequestLimits(
    max_body_bytes=64 * 1024,
    max_prompt_tokens=128,
    max_tokens=8,
    max_stop_strings=4,
    max_stop_string_len=32,
    request_timeout_s=30,
)
PER_REQUEST_S = 60  # a hang fails the test instead of the suite

counts: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_env():
    """One engine for the module, on its own event loop (AsyncEngine binds to one loop)."""
    loop = asyncio.new_event_loop()
    stack = loop.run_until_complete(
        build_stack(limits=LIMITS, auth=AuthSettings(api_keys=[KEY], api_keys_env=None), num_blocks=48, max_waiting=8)
    )
    yield loop, stack
    loop.run_until_complete(stack.server.shutdown())
    loop.close()
    print("fuzz status counts:", dict(sorted(counts.items())))


# ------------------------------------------------------------- checks


def check_reply(method: str, path: str, reply) -> None:
    assert reply.status is not None and reply.status < 500, (method, path, reply.status, reply.body[:500])
    if reply.status >= 400 and path.startswith("/v1/"):
        err = reply.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if reply.status == 200 and reply.body.startswith(b"data: "):
        events = [e for e in reply.body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-2:]
        for e in events[:-1]:
            assert "error" not in json.loads(e[6:]), e


def send(loop, stack, req) -> None:
    method, path, body, headers = req
    reply = loop.run_until_complete(
        asyncio.wait_for(asgi_call(stack.app, method, path, body, headers=headers), PER_REQUEST_S)
    )
    counts[str(reply.status)] = counts.get(str(reply.status), 0) + 1
    check_reply(method, path, reply)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(req=http_request())
def test_fuzz_requests_never_5xx_nor_hang(fuzz_env, req):
    loop, stack = fuzz_env
    send(loop, stack, req)


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(http_request(), min_size=2, max_size=12))
def test_fuzz_concurrent_batches(fuzz_env, batch):
    """Bursts over the small queue: 429s are fine, 5xx and hangs are not."""
    loop, stack = fuzz_env

    async def burst():
        return await asyncio.wait_for(
            asyncio.gather(*(asgi_call(stack.app, m, p, b, headers=h) for m, p, b, h in batch)), PER_REQUEST_S
        )

    for (m, p, _, _), reply in zip(batch, loop.run_until_complete(burst()), strict=True):
        counts[str(reply.status)] = counts.get(str(reply.status), 0) + 1
        check_reply(m, p, reply)


def test_engine_is_clean_after_fuzzing(fuzz_env):
    loop, stack = fuzz_env
    total = sum(counts.values())
    assert total >= EXAMPLES, counts  # the fuzz tests above ran in this module
    assert counts.get("200", 0) > 0 and counts.get("400", 0) > 0 and counts.get("401", 0) > 0, counts
    stats = loop.run_until_complete(stack.wait_idle(timeout_s=30))
    assert stats.generation_tokens_total > 0
    print(f"fuzzed {total} requests: {dict(sorted(counts.items()))}; engine idle, {stats.num_free_blocks} blocks free")


def test_nan_and_huge_numbers_are_400_not_500(fuzz_env):
    """Explicit cases hypothesis found worth pinning."""
    loop, stack = fuzz_env
    for extra in (
        {"temperature": math.nan},
        {"top_p": math.inf},
        {"temperature": -math.inf},
        {"max_tokens": 10**30},
        {"max_tokens": 9},
        {"stop": ["x"] * 5},
        {"stop": "y" * 33},
        {"top_k": 2**63, "temperature": 1.0},
    ):
        body = dumps({"model": MODEL, "prompt": "hi", **extra})
        reply = loop.run_until_complete(asgi_call(stack.app, "POST", "/v1/completions", body, headers=AUTH))
        assert reply.status == 400, (extra, reply.status, reply.body)
