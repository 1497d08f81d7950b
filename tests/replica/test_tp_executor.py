"""Tensor parallelism on CPU: two gloo ranks (rank 0 here, rank 1 a spawned process) serve the
exactness workload of test_engine_exact (preemption, chunked prefill, prefix hits, async
scheduling, seeded sampling) token for token like one rank and like HF ``generate``; a killed
rank ends the replica's streams with an error and leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

import pytest
import torch

from replica.async_engine import AsyncEngine
from replica.config import ParallelConfig
from replica.engine import LLMEngine
from replica.errors import EngineUnavailableError
from replica.model_check import UnsupportedModelError
from replica.request import FinishReason, SamplingParams
from tests.replica.fakes import RecordingRunner, has_placeholders
from tests.replica.test_engine_exact import engine_config, hf_greedy, make_specs, run_engine

models = pytest.importorskip("replica.models")

SEED = 1234  # test_engine_exact's tiny models
NUM_BLOCKS = 18  # fewer than test_engine_exact's: half its requests must still preempt


def _index(rid: str) -> int:
    kind, _, i = rid.partition("-")
    return int(i) if kind == "req" else -1


def tp_config(arch: str, n: int = 2, **kw):
    cfg = engine_config(arch, **kw)
    return replace(
        cfg, model=replace(cfg.model, seed=SEED), parallel=ParallelConfig(tensor_parallel_size=n, timeout_s=60)
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tp_run(request):
    arch = request.param
    engine = LLMEngine(tp_config(arch, num_blocks=NUM_BLOCKS))
    try:
        engine.runner = RecordingRunner(engine.runner)
        # Half of test_engine_exact's requests (still enough to preempt) and its seeded ones.
        specs = [s for s in make_specs(seed=7, vocab=engine.runner.vocab_size) if _index(s.rid) < 22]
        result = run_engine(engine, specs)
        stats = engine.stats()
        outputs = engine.runner.outputs
    finally:
        engine.close()
    workers = engine.runner.tp.workers
    loaded = models.tiny_model(arch, seed=SEED, dtype=torch.float64)
    single = LLMEngine(engine_config(arch, num_blocks=NUM_BLOCKS), loaded=loaded)
    single_result = run_engine(single, specs)
    reference = models.tiny_model(arch, seed=SEED, dtype=torch.float64).model
    refs = {s.rid: hf_greedy(reference, s.prompt, s.params) for s in specs if s.params.greedy}
    return dict(
        arch=arch,
        specs=specs,
        result=result,
        single=single_result,
        refs=refs,
        stats=stats,
        outputs=outputs,
        workers=workers,
        kv_heads=engine.runner.kv_cache.data.shape[4],
    )


def test_tp2_greedy_tokens_equal_hf_generate(tp_run):
    result, refs = tp_run["result"], tp_run["refs"]
    assert len(refs) >= 20
    bad = [rid for rid, ref in refs.items() if result.tokens[rid] != ref]
    assert not bad, f"{tp_run['arch']}: {len(bad)} differ from HF, e.g. " + "; ".join(
        f"{rid}: tp2 {result.tokens[rid]} vs hf {refs[rid]}" for rid in bad[:3]
    )


def test_tp2_equals_tp1_for_every_request(tp_run):
    # Greedy and seeded sampling alike: the sharded replica samples what one rank samples.
    assert tp_run["result"].tokens == tp_run["single"].tokens
    assert tp_run["result"].reasons == tp_run["single"].reasons


def test_tp2_workload_preempted_chunked_and_pipelined(tp_run):
    outs = tp_run["outputs"]
    assert tp_run["stats"].num_preemptions > 0
    assert any(not c.sample and c.num_tokens > 1 for o in outs for c in o.as_chunks())
    assert sum(has_placeholders(o) for o in outs) >= 5
    assert tp_run["stats"].num_total_blocks == NUM_BLOCKS


def test_tp2_rank0_cache_holds_half_the_kv_heads_and_workers_exit(tp_run):
    assert tp_run["kv_heads"] == 1  # tiny models: 2 KV heads over 2 ranks
    assert tp_run["workers"] and not any(p.is_alive() for p in tp_run["workers"])


def test_indivisible_heads_refused_before_any_worker_starts():
    with pytest.raises(UnsupportedModelError, match="num_attention_heads 4 is not divisible by tensor_parallel_size 3"):
        LLMEngine(tp_config("llama", n=3))


def test_killed_worker_ends_streams_with_an_error_and_the_replica_is_unhealthy():
    async def scenario(engine: AsyncEngine) -> None:
        await engine.start()
        params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        stream = engine.add_request("long", list(range(3, 40)), params)
        first = await asyncio.wait_for(stream.__anext__(), 60)
        assert first.token_ids and not first.finished
        assert not engine.is_dead
        os.kill(engine.engine.runner.tp.workers[0].pid, signal.SIGKILL)
        last = first
        async with asyncio.timeout(60):
            async for d in stream:
                last = d
        assert last.finish_reason is FinishReason.ERROR and "rank lost" in (last.error or "")
        assert engine.is_dead
        with pytest.raises(EngineUnavailableError):
            engine.add_request("after", [3, 4, 5], params)
        await engine.shutdown(drain_timeout_s=1)

    engine = AsyncEngine(tp_config("llama"))
    worker = engine.engine.runner.tp.workers[0]
    try:
        asyncio.run(scenario(engine))
    finally:
        engine.engine.close()
    worker.join(5)
    assert not worker.is_alive()


def test_tp2_sampled_and_prompt_logprobs_equal_hf_also_for_n_choices():
    """Rank 0 alone computes logits, so logprobs (sampled and echo's prompt, chunked, an n = 2
    request's forked choices) come out of its sampler as with one rank."""
    from tests.replica.test_logprobs import check, hf_log_softmax, run

    engine = LLMEngine(tp_config("llama", num_blocks=64, budget=16))
    try:
        prompt = list(range(10, 50))  # 40 tokens: over the token budget (chunked), several shared blocks
        params = [
            SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2),
            SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True, n=2, logprobs=2, prompt_logprobs=1),
        ]
        got = run(engine, [prompt, prompt], params)
    finally:
        engine.close()
    reference = models.tiny_model("llama", seed=SEED, dtype=torch.float64).model
    raw = hf_log_softmax(reference, prompt)
    parts = {0: got["r0"]}
    for d in got["r1"]:
        for c in d.choices:
            parts.setdefault(c.index + 1, []).append(c)
    assert sorted(parts) == [0, 1, 2]
    for key, items in parts.items():
        sp = params[min(key, 1)]
        tokens = [t for x in items for t in x.token_ids]
        ref = hf_log_softmax(reference, prompt + tokens, sp.temperature or 1.0)
        entries = [e for x in items for e in x.logprobs]
        for j, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
            check(entry, ref[len(prompt) - 1 + j], token, sp.logprobs)
        (plp,) = [x.prompt_logprobs for x in items if x.prompt_logprobs is not None]
        assert len(plp) == len(prompt) and plp[0] is None
        for j in range(1, len(prompt)):
            check(plp[j], raw[j - 1], prompt[j], sp.prompt_logprobs)
