"""The whole application on Ray Serve (CPU, tiny model): ingress + two LLMReplicas placed on
fake GPU resources. One deployment for the module; every check runs against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

APP = "cbserve_test"
MODEL = "tiny:llama"
MAX_NUM_SEQS = 2
MAX_WAITING = 2
ARGS = {
    "model": MODEL,
    "num_replicas": 2,
    "num_gpus": 0,
    "num_cpus": 1,
    "accelerator_resource": "fake_gpu",  # placement as if each replica took a GPU
    "ingress_num_cpus": 0.5,
    "engine": {
        "dtype": "float32",
        "max_model_len": 2048,
        "num_blocks": 256,
        "block_size": 16,
        "max_num_seqs": MAX_NUM_SEQS,
        "max_waiting": MAX_WAITING,
    },
}


@pytest.fixture(scope="module")
def app(serve_url, deploy_app):
    from ray import serve

    deploy_app({APP: (ARGS, "/")})
    yield serve_url
    serve.delete(APP)


def engine_stats() -> dict:
    """EngineStats of every LLMReplica, by replica id, through the handle. The handle's router
    prefers the less loaded replica, so call this only when the replicas are idle (ties are
    broken at random, and every replica answers within a few calls)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMReplica", app_name=APP)
    seen: dict = {}
    for _ in range(200):
        s = handle.stats.remote().result()
        seen[s.replica_id] = s.engine
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only reached replicas {sorted(seen)}")


def kv_state() -> dict:
    """Each replica's record_routing_stats() (KV blocks, running, waiting), asked of every
    replica actor directly: unlike a handle call, it reaches busy replicas too."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#LLMReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(names) == 2, names
    actors = {n: ray.get_actor(n, namespace="serve") for n in names}
    return {n: ray.get(a.record_routing_stats.remote(), timeout=30) for n, a in actors.items()}


def wait_idle(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        busy = {
            n: s
            for n, s in kv_state().items()
            if s["num_running"] or s["num_waiting"] or s["num_free_blocks"] != s["num_total_blocks"]
        }
        if not busy:
            return
        assert time.monotonic() < deadline, f"replicas still hold work: {busy}"
        time.sleep(0.2)


def test_openai_client_chat_and_completion_both_replicas_serve(app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    wait_idle()
    before = {rid: s.prompt_tokens_total for rid, s in engine_stats().items()}

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 12
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        seed=7,
        extra_body={"ignore_eos": True},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # same seed, same text, streamed or not

    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=3, temperature=0.8)
    assert comp.usage.completion_tokens <= 8 and comp.choices[0].finish_reason in ("stop", "length")
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, seed=3, temperature=0.8, stream=True
        )
    ]
    assert "".join(pieces) == comp.choices[0].text

    # Concurrent traffic spreads over both replicas.
    async def burst():
        async with httpx.AsyncClient(base_url=app, timeout=120) as http:
            rs = await asyncio.gather(
                *[
                    http.post("/v1/completions", json={"model": MODEL, "prompt": f"prompt {i}", "max_tokens": 4})
                    for i in range(8)
                ]
            )
        return [r.status_code for r in rs]

    codes = asyncio.run(burst())
    assert codes.count(200) >= 4, codes  # the rest may be 429 under this tiny queue
    wait_idle()
    after = engine_stats()
    assert all(after[rid].prompt_tokens_total > before[rid] for rid in after), (before, after)


def test_disconnect_mid_stream_frees_kv_blocks(app):
    wait_idle()
    generated_before = sum(s.generation_tokens_total for s in engine_stats().values())
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=app, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        # The first chunk came while the request still runs and holds KV blocks:
        # time to first token is not the whole request.
        held = [s for s in kv_state().values() if s["num_running"] == 1]
        assert len(held) == 1 and held[0]["num_free_blocks"] < held[0]["num_total_blocks"]
        # Leaving the block closes the connection mid-stream.
    wait_idle(timeout=30)  # no blocks held, nothing running: the engine request was aborted
    generated = sum(s.generation_tokens_total for s in engine_stats().values()) - generated_before
    assert 0 < generated < 1000  # ...long before its 1500 tokens


def test_overfull_queue_answers_429(app):
    """More streams than the replicas can run or queue: the excess is refused at once with
    429 + Retry-After. Accepted requests answer with their first token, so queued ones may
    answer much later: stop once the refusals are in and hang up on the rest (which also
    aborts requests still waiting in an engine queue)."""
    wait_idle()
    body = {"model": MODEL, "prompt": "hold the line", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    n, capacity = 14, 2 * (MAX_NUM_SEQS + MAX_WAITING)

    async def flood():
        async with httpx.AsyncClient(base_url=app, timeout=120) as http:

            async def one():
                return await http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            answered = []
            for fut in asyncio.as_completed(tasks, timeout=120):
                answered.append(await fut)
                if sum(r.status_code == 429 for r in answered) >= n - capacity:
                    break
            refused = [r for r in answered if r.status_code == 429]
            for r in refused:
                await r.aread()
            result = (
                [r.status_code for r in answered],
                [json.loads(r.content)["error"] for r in refused],
                [r.headers.get("retry-after") for r in refused],
            )
            for t in tasks:
                t.cancel()
            for r in answered:
                await r.aclose()
            return result

    codes, errors, retry = asyncio.run(flood())
    assert set(codes) <= {200, 429} and codes.count(429) >= n - capacity, codes
    assert all(e["code"] == "queue_full" and e["type"] == "rate_limit_error" for e in errors)
    assert all(r is not None and int(r) >= 1 for r in retry)
    wait_idle(timeout=30)  # accepted and still-queued streams were dropped: their blocks are back


def test_errors_in_openai_shape(app):
    with httpx.Client(base_url=app, timeout=60) as http:
        cases = [
            (
                http.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}),
                400,
                None,
            ),
            (
                http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3},
                ),
                400,
                None,
            ),
            (http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": "hot"}), 400, None),
            (http.post("/v1/completions", json={"model": MODEL}), 400, None),
            (
                http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5000}),
                400,
                "context_length_exceeded",
            ),
            (http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model_not_found"),
        ]
        for r, status, code in cases:
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if code:
                assert err["code"] == code
        assert http.get("/health").json()["status"] == "ok"


def test_one_request_id_through_serves_proxy_and_models_retrieve(app):
    """Serve's proxy appends its own x-request-id; the app's response id is that same id."""
    import httpx
    from openai import OpenAI

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{app}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-request-id") == [r.json()["id"]]
    r = httpx.post(f"{app}/v1/chat/completions", json=body, headers={"x-request-id": "mine-42"}, timeout=60)
    assert r.headers.get_list("x-request-id") == ["mine-42"] and r.json()["id"] == "mine-42"
    r = httpx.post(f"{app}/v1/chat/completions", json={"model": MODEL}, timeout=60)  # an error from the app
    assert r.status_code == 400 and len(r.headers.get_list("x-request-id")) == 1
    client = OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve(MODEL).id == MODEL


def _haproxy_front() -> bool:
    from deployments.front_proxy import Front

    return Front.of(os.environ).haproxy


@pytest.mark.skipif("not _haproxy_front()", reason="CBSERVE_TEST_FRONT=serve-proxy: Serve's own proxy in front")
def test_haproxy_front_drops_stalled_clients_and_keeps_serving(app):
    """What ./dev serve ships (deployments/front_proxy.py): HAProxy before the ingress replicas.
    Clients that stall their headers or their body are dropped after limits.client_timeout_s
    (HAProxy answers, never the app with a 5xx), while normal requests keep being served."""
    import glob
    import socket
    import threading

    from deployments.limits import RequestLimits

    lim = RequestLimits()
    # This session's HAProxy wrote the newest config (older runs may have left theirs).
    cfg = max(glob.glob("/tmp/haproxy-serve/*/haproxy.cfg"), key=os.path.getmtime)
    text = Path(cfg).read_text()
    assert f"timeout client {lim.client_timeout_s}s" in text and f"maxconn {lim.max_connections}" in text, cfg
    host, port = app.removeprefix("http://").split(":")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

    def normal() -> float:
        t = time.monotonic()
        r = httpx.post(f"{app}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return time.monotonic() - t

    baseline = max(normal() for _ in range(3))
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    stalled = []
    t0 = time.monotonic()
    for i in range(200):
        s = socket.create_connection((host, int(port)))
        s.settimeout(lim.client_timeout_s + 20)
        if i % 2:  # the body stalls
            s.sendall(head + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mod')
        else:  # the headers stall
            s.sendall(head + b"Content-Ty")
        stalled.append(s)
    during = [normal() for _ in range(3)]
    assert max(during) < 5 * baseline + 2, (baseline, during)
    ended: dict[int, tuple[float, bytes]] = {}

    def wait(i: int, s: socket.socket) -> None:
        try:
            data = s.recv(64)
        except OSError as e:
            data = repr(e).encode()
        ended[i] = (time.monotonic() - t0, data)
        s.close()

    threads = [threading.Thread(target=wait, args=(i, s)) for i, s in enumerate(stalled)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = [t for t, _ in ended.values()]
    assert lim.client_timeout_s - 0.5 <= min(times) and max(times) < lim.client_timeout_s + 15, sorted(times)[::20]
    statuses = {data.split(b"\r\n")[0] for _, data in ended.values()}
    assert {ended[i][1].split(b"\r\n")[0] for i in range(0, 200, 2)} == {b"HTTP/1.1 408 Request Time-out"}
    assert not any(b" 5" in s[:13] for s in statuses), statuses
    assert normal() < 5 * baseline + 2
