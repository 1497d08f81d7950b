"""bench/throughput.py's StepProbe on CPU: it wraps the runner without changing outputs and
accounts every launched step and every engine.step call (the GPU-only parts need CUDA)."""

from __future__ import annotations

import torch

from bench.throughput import StepProbe, roofline, workload
from replica import models
from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from replica.engine import LLMEngine
from replica.request import SamplingParams


def _engine():
    loaded = models.tiny_model("llama", seed=3, dtype=torch.float32)
    cfg = EngineConfig(
        model=ModelConfig(model="tiny:llama", device="cpu", max_model_len=256),
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        runner=RunnerConfig(attention_backend="torch", use_cuda_graphs=False),
    )
    return LLMEngine(cfg, loaded=loaded)


def test_probe_records_steps_and_leaves_outputs_unchanged():
    vocab = 200
    prompts = [[(i * 7 + j) % vocab + 3 for j in range(10 + 9 * i)] for i in range(6)]
    params = [SamplingParams(max_tokens=4 + i, temperature=0.0, ignore_eos=True) for i in range(6)]
    expected = [list(o.token_ids) for o in _engine().generate(prompts, params, use_tqdm=False)]

    engine = _engine()
    probe = StepProbe(engine)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(6)}
    while engine.has_unfinished():
        for d in probe.step():
            got[d.request_id].extend(d.token_ids)
    probe.finish()
    assert [got[f"r{i}"] for i in range(6)] == expected
    recs, calls = probe.records, probe.calls
    assert sum(r["sampled"] for r in recs) >= sum(sp.max_tokens for sp in params)  # + wasted rows
    assert any(r["decode"] for r in recs) and any(not r["decode"] for r in recs)
    assert len(calls) == engine.stats().num_steps  # one call per applied step
    assert all(c["wall"] >= c["host"] >= 0 and c["blocked"] >= 0 for c in calls)
    assert all(c["loop_host"] >= c["host"] for c in calls)  # plus the caller's time between steps
    assert any(r["decode"] and r["batch"] > 1 for r in recs)  # decode batches (arrays) were recorded
    assert not any(r["graph"] for r in recs)  # no CUDA here


def test_workload_is_seeded_and_in_range():
    a, oa = workload(16, seed=5)
    b, ob = workload(16, seed=5)
    assert a == b and oa == ob
    assert all(100 <= len(p) <= 1024 for p in a) and all(100 <= o <= 1024 for o in oa)


def test_roofline_grows_with_context():
    recs = [
        dict(ctx=1000, tokens=8, sampled=8, attn_pairs=8000.0),
        dict(ctx=2000, tokens=8, sampled=8, attn_pairs=16000.0),
    ]
    small = roofline("qwen2.5-0.5b", recs[:1], bw=3e12, peak=7e14)
    both = roofline("qwen2.5-0.5b", recs, bw=3e12, peak=7e14)
    assert both["floor_s"] > 2 * small["floor_s"] * 0.99 and small["weight_bytes"] > 9e8
