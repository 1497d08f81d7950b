"""A tensor-parallel LLMReplica on Ray Serve (CPU, fake GPUs): one replica of tensor_parallel_size 2
reserves two fake_gpu units in one placement group, runs its second rank as an actor in the
group's second bundle, and answers the OpenAI client with the tokens one rank computes."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

APP = "cbserve_tp_test"
MODEL = "tiny:llama"
ARGS = {
    "model": MODEL,
    "num_replicas": 1,
    "num_gpus": 0,
    "num_cpus": 1,
    "accelerator_resource": "fake_gpu",
    "ingress_num_cpus": 0.5,
    "engine": {
        "dtype": "float64",
        "max_model_len": 512,
        "num_blocks": 64,
        "max_num_seqs": 4,
        "tensor_parallel_size": 2,
    },
}


@pytest.fixture(scope="module")
def app(serve_url, deploy_app):
    from ray import serve

    deploy_app({APP: (ARGS, "/")})
    yield serve_url
    serve.delete(APP)


def test_tp2_replica_holds_two_fake_gpus_in_one_placement_group(app):
    import ray

    groups = [
        g
        for g in ray.util.placement_group_table().values()
        if g["state"] == "CREATED" and len(g["bundles"]) == 2 and all(b.get("fake_gpu") for b in g["bundles"].values())
    ]
    assert len(groups) == 1, groups
    assert groups[0]["strategy"] == "STRICT_PACK"
    assert [b["fake_gpu"] for b in groups[0]["bundles"].values()] == [1.0, 1.0]
    workers = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("cbserve_tp_")]
    assert len(workers) == 1 and workers[0]["name"].endswith("_rank1"), workers


def test_tp2_replica_answers_the_openai_client_like_one_rank(app):
    from openai import OpenAI

    from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig
    from replica.engine import LLMEngine
    from replica.request import SamplingParams

    client = OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)
    prompt = [5, 17, 300, 42, 7, 99]
    comp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert chat.usage.completion_tokens == 6

    one_rank = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=MODEL, dtype="float64", device="cpu", max_model_len=512),
            cache=CacheConfig(num_blocks=64),
            runner=RunnerConfig(attention_backend="torch", use_cuda_graphs=False),
        )
    )
    (want,) = one_rank.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    assert comp.choices[0].text == want.text


def test_a_lost_rank_ends_the_open_stream_with_an_error_and_serve_replaces_the_replica(app):
    import time

    import httpx
    import ray

    def worker_names() -> list[str]:
        return [
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("cbserve_tp_")
        ]

    (name,) = worker_names()
    (worker,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=app, timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        ray.kill(ray.get_actor(name, namespace=worker["namespace"]))
        rest = [line for line in lines if line.startswith("data: ")]  # ends: nothing hangs
    assert any('"error"' in line and "rank" in line for line in rest), rest[-3:]
    # The health check fails; Serve starts a new replica with a new placement group and worker rank.
    deadline = time.monotonic() + 240
    while True:
        names = worker_names()
        if names and names != [name]:
            break
        assert time.monotonic() < deadline, f"the replica was not replaced: {names}"
        time.sleep(2)
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=3)
    deadline = time.monotonic() + 120
    while True:
        try:
            comp = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0.0)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(2)
    assert comp.usage.completion_tokens == 4
