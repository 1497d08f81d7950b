"""On Ray (CPU, tiny:llama): the KV-cache-aware router places shared prefixes where they
are cached, better than Serve's default router in the same run, and the queue-depth
policy scales LLMReplica up under a burst and back down when idle.

One module, one pair of apps, because Ray on 2 cores is slow:
  /kv       KVCacheAwareRouter + QueueDepthAutoscalingPolicy (2..3 replicas)
  /default  Serve's default router, 2 fixed replicas
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

BLOCK = 16
PREFIX_BLOCKS = 10  # each conversation's shared prefix: 160 tokens
CONVERSATIONS = 6
FOLLOWUPS = 3

COMMON = {
    "model": "tiny:llama",
    "num_cpus": 0.5,
    "ingress_num_cpus": 0.25,
    "engine": {"block_size": BLOCK, "num_blocks": 512, "max_num_seqs": 16},
}


def kv_app_args() -> dict:
    return {
        **COMMON,
        "router": {
            "request_router_class": "router.kv_router:KVCacheAwareRouter",
            "request_router_kwargs": {"stale_after_s": 30.0, "imbalance_threshold": 4},
            "request_routing_stats_period_s": 0.5,
        },
        "autoscaling": {
            "min_replicas": 2,
            "max_replicas": 3,
            "initial_replicas": 2,
            "metrics_interval_s": 0.5,  # how often replicas push metrics to the controller
            "look_back_period_s": 2.0,
            "upscale_delay_s": 0,  # the policy applies its own delays
            "downscale_delay_s": 0,
            "policy": "deployments.autoscaling:QueueDepthAutoscalingPolicy",
            "policy_kwargs": {
                "target_requests_per_replica": 2,
                "idle_requests_per_replica": 0.5,
                "upscale_delay_s": 1.0,
                "downscale_delay_s": 4.0,
            },
        },
    }


def default_app_args() -> dict:
    return {**COMMON, "num_replicas": 2}


@pytest.fixture(scope="module")
def base_url(serve_url, deploy_app):
    from ray import serve

    deploy_app({"kv": (kv_app_args(), "/kv"), "default": (default_app_args(), "/default")})
    time.sleep(2.0)  # a few routing-stats periods: the kv router starts with fresh stats
    yield serve_url
    for name in ("kv", "default"):
        serve.delete(name)


def _running_replicas(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["LLMReplica"]
    return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _wait(cond, timeout_s: float, what: str, period_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(period_s)


def _complete(client, url: str, prompt: list[int], max_tokens: int = 2) -> dict:
    r = client.post(
        f"{url}/v1/completions",
        json={"model": "tiny:llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _shared_prefix_workload(client, url: str) -> tuple[list[int], list[int]]:
    """Per conversation: one first request, then FOLLOWUPS sharing its 160-token prefix,
    interleaved across conversations. Returns (cached tokens of follow-ups, prompt tokens)."""
    rng = random.Random(7)
    prefixes = [[rng.randrange(100, 40_000) for _ in range(PREFIX_BLOCKS * BLOCK)] for _ in range(CONVERSATIONS)]
    cached, prompt_tokens = [], []
    for turn in range(FOLLOWUPS + 1):
        for _c, prefix in enumerate(prefixes):
            suffix = [rng.randrange(100, 40_000) for _ in range(5)]
            usage = _complete(client, url, prefix + suffix)
            if turn > 0:
                cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                prompt_tokens.append(usage["prompt_tokens"])
    return cached, prompt_tokens


def test_shared_prefixes_land_on_the_replica_holding_them(base_url):
    import httpx

    with httpx.Client(timeout=120) as client:
        kv_cached, kv_prompt = _shared_prefix_workload(client, f"{base_url}/kv")
        def_cached, def_prompt = _shared_prefix_workload(client, f"{base_url}/default")

    prefix_len = PREFIX_BLOCKS * BLOCK
    kv_full_hits = sum(c >= prefix_len for c in kv_cached)
    def_full_hits = sum(c >= prefix_len for c in def_cached)
    kv_rate = sum(kv_cached) / sum(kv_prompt)
    def_rate = sum(def_cached) / sum(def_prompt)
    print(
        f"follow-up prefix hits: kv {kv_full_hits}/{len(kv_cached)} ({kv_rate:.1%} of prompt tokens), "
        f"default {def_full_hits}/{len(def_cached)} ({def_rate:.1%})"
    )
    # Every follow-up finds its whole prefix on the replica it was sent to...
    assert kv_full_hits == len(kv_cached), kv_cached
    # ...while Serve's default router, blind to caches, misses whenever it picks the other
    # replica the first time (expected ~70% of follow-ups hit; all 18 by chance: < 1e-5).
    assert kv_rate > def_rate + 0.05


def test_burst_scales_up_then_idle_scales_down(base_url):
    import httpx

    assert _running_replicas("kv") == 2
    url = f"{base_url}/kv"
    stop = time.monotonic() + 240

    async def burst() -> int:
        """Keep 12 long requests in flight until a third replica runs (bounded in time)."""
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(i: int) -> None:
                prompt = [1000 + i] * 40
                r = await client.post(
                    f"{url}/v1/completions",
                    json={"model": "tiny:llama", "prompt": prompt, "max_tokens": 64, "ignore_eos": True},
                )
                assert r.status_code == 200, r.text

            inflight: set[asyncio.Task] = set()
            i = 0
            while time.monotonic() < stop:
                while len(inflight) < 12:
                    inflight.add(asyncio.create_task(one(i)))
                    i += 1
                done, inflight = await asyncio.wait(inflight, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
                if await asyncio.to_thread(_running_replicas, "kv") >= 3:
                    break
            await asyncio.gather(*inflight)
            return i

    sent = asyncio.run(burst())
    assert _running_replicas("kv") == 3, f"no scale-up after {sent} requests"
    # Idle now: after the downscale delay (4 s) and the look-back window, back to min_replicas.
    _wait(lambda: _running_replicas("kv") == 2, 120, "scale-down to 2 replicas")
