"""Soak (opt-in: ``pytest -m soak tests/reliability/test_soak.py``): minutes of steady mixed load
on the in-process stack (real engine, tiny model, CPU): plain and streamed completions and
chats, clients that leave mid-stream, refused requests. The process RSS must stay flat after
warm-up, no answer may be 5xx, and at the end nothing waits or runs and every KV block is free.

``CBSERVE_SOAK_S`` sets the duration (default 180 s).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import time

import psutil
import pytest

from deployments.limits import RequestLimits
from tests.reliability.stack import MODEL, NullMetricsBackend, asgi_call, build_stack

DURATION_S = float(os.environ.get("CBSERVE_SOAK_S", "180"))
WORKERS = 6
MAX_RSS_GROWTH_MIB = 48.0

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(DURATION_S) + 300)]


def pick(rng: random.Random, n: int) -> tuple[str, dict, int | None]:
    """(path, body, drop_after): a request from the steady mix."""
    r = rng.random()
    prompt = f"request {n}: " + " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 40))
    )
    if r < 0.35:
        return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(1, 24)}, None
    if r < 0.6:
        msgs = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 16, "stream": True}, None
    if r < 0.8:  # leaves mid-stream
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "ignore_eos": True, "stream": True}
        return "/v1/completions", body, rng.randint(1, 10)
    if r < 0.9:  # refused by a limit
        return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 10_000}, None
    return "/v1/chat/completions", {"model": MODEL, "messages": "not a list"}, None


@pytest.fixture
def quiet_logs():
    """pytest keeps every captured log record (with tracebacks, and so frames) for the report:
    at INFO that is memory growing with the request count, which is not the service's."""
    lg = logging.getLogger("ray.serve")
    level = lg.level
    lg.setLevel(logging.WARNING)
    yield
    lg.setLevel(level)


async def test_soak_rss_flat_and_no_leaks(quiet_logs):
    rng = random.Random(7)
    stack = await build_stack(
        limits=RequestLimits(max_tokens=64),
        num_blocks=64,
        max_num_seqs=4,
        max_waiting=16,
        metrics_backend=NullMetricsBackend(),
    )
    proc = psutil.Process()
    statuses: dict[int, int] = {}
    dropped = 0
    n = 0
    samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
    start = time.monotonic()
    stop_at = start + DURATION_S

    async def worker(wid: int) -> None:
        nonlocal n, dropped
        while time.monotonic() < stop_at:
            n += 1
            path, body, drop_after = pick(rng, n)
            mode = rng.choice(["disconnect", "cancel", "oserror"])
            reply = await asyncio.wait_for(
                asgi_call(stack.app, "POST", path, json.dumps(body).encode(), drop_after=drop_after, drop_mode=mode),
                120,
            )
            dropped += reply.dropped
            statuses[reply.status] = statuses.get(reply.status, 0) + 1

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            gc.collect()
            samples.append((time.monotonic() - start, proc.memory_info().rss / 2**20))
            await asyncio.sleep(5)

    await asyncio.gather(sampler(), *(worker(i) for i in range(WORKERS)))
    gc.collect()
    stats = await stack.wait_idle(timeout_s=60)
    samples.append((time.monotonic() - start, proc.memory_info().rss / 2**20))

    warm = [rss for t, rss in samples if t >= DURATION_S * 0.25]
    growth = warm[-1] - warm[0]
    print(
        f"soak: {DURATION_S:.0f}s, {sum(statuses.values())} requests {dict(sorted(statuses.items()))}, "
        f"{dropped} dropped mid-stream, {stats.generation_tokens_total} tokens generated; RSS after warm-up "
        f"{warm[0]:.1f} -> {warm[-1]:.1f} MiB (max {max(warm):.1f}); blocks free "
        f"{stats.num_free_blocks}/{stats.num_total_blocks}; preemptions {stats.num_preemptions}"
    )
    print("RSS samples (s, MiB):", " ".join(f"{t:.0f}:{rss:.1f}" for t, rss in samples))
    assert all(code < 500 for code in statuses), statuses
    assert statuses.get(200, 0) > 0 and dropped > 0
    assert growth < MAX_RSS_GROWTH_MIB, samples
    await stack.server.shutdown()
