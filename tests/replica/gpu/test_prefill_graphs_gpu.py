"""replica/prefill_graphs.py on CUDA: a replayed one-chunk prefill gives the eager forward's logits
(bf16, padded to its bucket, with and without a cached prefix), and the engine's greedy output
with prefill graphs equals transformers' generate and the engine without them."""

from __future__ import annotations

import pytest
import torch

from replica.config import CacheConfig, RunnerConfig
from replica.host_step import host_step
from replica.model_runner import ModelRunner
from replica.models import TINY_CONFIGS, build_random_model
from replica.request import SamplingParams
from replica.step import ScheduledChunk, SchedulerOutput
from tests.replica.gpu.test_engine_gpu import MARGIN, _engine, _reference

P = SamplingParams(temperature=0.0)


def _runner(model, prefill_tokens: int) -> ModelRunner:
    runner = RunnerConfig(attention_backend="triton", max_graph_batch_size=4, max_prefill_graph_tokens=prefill_tokens)
    return ModelRunner(model, CacheConfig(block_size=16, num_blocks=64), runner, 64, eos_token_ids=[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replayed_prefill_gives_the_eager_logits(device, dtype):
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=5, dtype=dtype, device=device)
    runner = _runner(model, 256)
    assert runner.prefill_graphs is not None and runner.prefill_graphs.sizes == [16, 32, 64, 128, 256]
    gen = torch.Generator().manual_seed(6)
    blocks = tuple(range(1, 17))  # 256 positions
    for n, start in [(2, 0), (9, 0), (16, 0), (17, 0), (33, 0), (100, 0), (200, 0), (40, 60), (7, 200)]:
        if start:  # a prefix hit: the context's KV comes from an eager step first
            ctx = ScheduledChunk(
                "ctx", tuple(torch.randint(3, 40000, (start,), generator=gen).tolist()), 0, blocks, True, P, 0
            )
            runner.compute_logits(SchedulerOutput((ctx,), start))
        ids = tuple(torch.randint(3, 40000, (n,), generator=gen).tolist())
        out = SchedulerOutput((ScheduledChunk("r", ids, start, blocks, True, P, 0),), n)
        eager = runner.compute_logits(out)[0].clone()
        replayed = runner.prefill_graphs.replay(host_step(out.chunks, 16, 64, runner.vocab_size).step)[0]
        assert replayed.shape == eager.shape
        assert torch.equal(replayed, eager), f"{n} tokens at {start}: max diff {(replayed - eager).abs().max()}"


def test_engine_with_prefill_graphs_matches_generate_and_the_eager_engine(device):
    torch.manual_seed(0)
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=7, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(8)
    lens = [2, 5, 16, 17, 40, 64, 90]
    prompts = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in lens]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True) for _ in lens]
    refs = [_reference(model, p, 12) for p in prompts]
    model.set_attn_implementation("eager")
    # One request at a time: every prompt is a step of its own chunk (budget 96 holds each).
    engine = _engine(model, block_size=16, graphs=True, max_num_seqs=1)
    graphs = engine.runner.prefill_graphs
    assert graphs is not None
    outs = [list(o.token_ids) for o in engine.generate(prompts, params, use_tqdm=False)]
    assert graphs.num_replays == len(prompts)
    compared = 0
    for got, (ref, margins) in zip(outs, refs):
        for i, (a, b) in enumerate(zip(got, ref)):
            if margins[i] < MARGIN:
                break
            assert a == b, f"token {i}: engine {a} vs transformers {b} (margin {margins[i]:.3g})"
            compared += 1
    assert compared >= sum(p.max_tokens for p in params) // 2
    eager = _engine(model, block_size=16, graphs=True, max_num_seqs=1)
    eager.runner.prefill_graphs = None
    assert [list(o.token_ids) for o in eager.generate(prompts, params, use_tqdm=False)] == outs
