"""Through Ray Serve (CPU, tiny model, two LLMReplicas on fake GPUs), one deployment for the module:
API keys and limits at the real HTTP proxy, a short fuzz run, and a replica killed under load
(ray.kill on its actor): streams that had output end with a clear error event, requests that
had none are retried on the other replica or get a 503, nothing hangs; Serve replaces the
replica and new requests succeed; no KV block stays held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability.strategies import KEY, http_request

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

APP = "cbserve_reliability"
MODEL = "tiny:llama"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARGS = {
    "model": MODEL,
    "num_replicas": 2,
    "num_gpus": 0,
    "num_cpus": 1,
    "accelerator_resource": "fake_gpu",
    "ingress_num_cpus": 0.5,
    "engine": {
        "dtype": "float32",
        "max_model_len": 512,
        "num_blocks": 128,
        "block_size": 16,
        "max_num_seqs": 8,
        "max_waiting": 16,
    },
    "auth": {"api_keys": [KEY], "api_keys_env": None},
    "limits": {"max_body_bytes": 65536, "max_tokens": 400, "max_prompt_tokens": 256, "request_timeout_s": 120},
}
FUZZ_EXAMPLES = 40
fuzz_counts: dict[int, int] = {}


@pytest.fixture(scope="module")
def app(serve_url, deploy_app):
    from ray import serve

    deploy_app({APP: (ARGS, "/rel")})
    yield f"{serve_url}/rel"
    serve.delete(APP)


def replica_stats(expected: int = 2, tries: int = 200) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("LLMReplica", app_name=APP)
    seen: dict = {}
    for _ in range(tries):
        s = handle.stats.remote().result(timeout_s=30)
        seen[s.replica_id] = s
        if len(seen) == expected:
            return seen
    raise AssertionError(f"only reached replicas {sorted(seen)}")


def wait_idle(timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = replica_stats()
        busy = [
            s
            for s in stats.values()
            if s.engine.num_running or s.engine.num_waiting or s.engine.num_free_blocks != s.engine.num_total_blocks
        ]
        if not busy:
            return stats
        assert time.monotonic() < deadline, f"replicas still hold work: {busy}"
        time.sleep(0.2)


# ------------------------------------------------------------- auth, limits, fuzz at the proxy


def test_keys_and_limits_at_the_http_proxy(app):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    with httpx.Client(base_url=app, timeout=60) as http:
        assert http.get("/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
            r = http.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
        r = http.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        r = http.post("/v1/completions", content=b"x" * 70_000, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.post("/v1/completions", json={**body, "max_tokens": 401}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # 401s never reached a replica: only the one accepted request was counted by an engine.
    from replica.models import load_tokenizer

    total = sum(s.engine.prompt_tokens_total for s in wait_idle().values())
    assert total == len(load_tokenizer(MODEL).encode("hello"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(req=http_request())
def test_fuzz_through_serve(app, req):
    method, path, body, headers = req
    with httpx.Client(base_url=app, timeout=60) as http:
        hdrs = {"content-type": "application/json", **{k.decode(): v.decode() for k, v in headers}}
        r = http.request(method, path, content=body, headers=hdrs)
    fuzz_counts[r.status_code] = fuzz_counts.get(r.status_code, 0) + 1
    assert r.status_code < 500, (method, path, body[:300], r.status_code, r.text[:500])


def test_fuzz_left_replicas_clean(app):
    assert sum(fuzz_counts.values()) == FUZZ_EXAMPLES
    wait_idle()
    print("fuzz through Serve:", dict(sorted(fuzz_counts.items())))


# ------------------------------------------------------------- replica failure


async def _stream(http: httpx.AsyncClient, i: int, first_chunk: asyncio.Event | None) -> dict:
    body = {"model": MODEL, "prompt": f"kill test {i}", "max_tokens": 300, "ignore_eos": True, "stream": True}
    out = {"i": i, "status": None, "events": [], "done": False, "error": None, "exc": None}
    try:
        async with http.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                out["error"] = r.json()["error"]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = data["error"]
                else:
                    out["events"].append(data)
                    if first_chunk is not None:
                        first_chunk.set()
    except httpx.HTTPError as exc:  # the connection itself broke
        out["exc"] = repr(exc)
    return out


def _kill_one(replica_id: str) -> None:
    import ray

    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#LLMReplica#{replica_id}", namespace="serve")
    ray.kill(actor, no_restart=True)


def test_replica_killed_under_load(app):
    from ray import serve

    before = wait_idle()
    victim = sorted(before)[0]

    async def scenario():
        async with httpx.AsyncClient(base_url=app, timeout=httpx.Timeout(180)) as http:
            started = asyncio.Event()
            early = [asyncio.create_task(_stream(http, i, started)) for i in range(10)]
            await asyncio.wait_for(started.wait(), 120)
            await asyncio.sleep(0.5)  # every early stream is running somewhere by now
            _kill_one(victim)
            # Sent right after the kill: nothing streamed yet, the router may still pick the dead replica.
            late = [asyncio.create_task(_stream(http, 100 + i, None)) for i in range(6)]
            return await asyncio.wait_for(asyncio.gather(*early, *late), 240)  # none hangs

    results = asyncio.run(scenario())
    complete = [r for r in results if r["status"] == 200 and r["done"] and r["error"] is None]
    cut = [r for r in results if r["status"] == 200 and r["error"] is not None]
    refused = [r for r in results if r["status"] == 503]
    summary = {
        "complete": len(complete),
        "cut_mid_stream": len(cut),
        "503": len(refused),
        "late_complete": sum(r["i"] >= 100 for r in complete),
        "other": [r for r in results if r not in complete + cut + refused],
    }
    print("replica kill:", summary)
    assert not summary["other"], summary
    for r in complete:
        assert r["events"][-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in r["events"]) > 0
    for r in cut:  # streamed something, then a clear error event, then [DONE]
        assert r["events"] and r["error"]["code"] == "engine_unavailable" and r["done"], r
    for r in refused:
        assert r["error"]["code"] == "engine_unavailable"
    assert cut, "the killed replica was running some streams"
    assert len(complete) >= 1  # the other replica kept serving

    # Serve replaces the replica; new requests then succeed on both.
    deadline = time.monotonic() + 240
    while True:
        dep = serve.status().applications[APP].deployments["LLMReplica"]
        ids = set()
        if dep.status == "HEALTHY":
            with contextlib.suppress(AssertionError):
                ids = set(replica_stats(tries=50))
        if len(ids) == 2 and victim not in ids:
            break
        assert time.monotonic() < deadline, f"replica not replaced: {dep}"
        time.sleep(1)

    async def after():
        async with httpx.AsyncClient(base_url=app, timeout=120) as http:
            rs = await asyncio.gather(
                *[
                    http.post(
                        "/v1/completions", json={"model": MODEL, "prompt": f"after {i}", "max_tokens": 4}, headers=AUTH
                    )
                    for i in range(6)
                ]
            )
        return [r.status_code for r in rs]

    assert asyncio.run(after()) == [200] * 6
    wait_idle()  # both replicas, the new one included, hold no blocks
