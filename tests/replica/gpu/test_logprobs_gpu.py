"""Logprobs on CUDA (Triton attention, CUDA-graph decode, async scheduling): the graph path scores
the tokens it samples like a float64 log_softmax of Hugging Face's logits (float32 model), the
prompt's too (eager prefill), and a batch where nobody asks takes the graph's argmax path untouched."""

from __future__ import annotations

import pytest
import torch

from replica.models import TINY_CONFIGS, build_random_model
from replica.request import SamplingParams
from tests.replica.gpu.test_engine_gpu import _engine

TOL = 2e-4  # float32 logits of a tiny model, other kernels than HF's


def _hf_log_softmax(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1).cpu()


def _run(engine, prompts, params):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    deltas: dict[str, list] = {}
    while engine.has_unfinished():
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
    return deltas


def test_graph_decode_logprobs_match_hf(device):
    torch.manual_seed(0)
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=5, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (7, 20, 12, 31)]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=3),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),  # asks nothing
        SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0),
    ]
    reference = build_random_model(TINY_CONFIGS["qwen2"], seed=5, dtype=torch.float32, device=device)
    engine = _engine(model, block_size=16, graphs=True)  # installs its attention on `model`
    graphs = engine.runner.graphs
    emitted = []
    real_emit = graphs.emit

    def recording_emit(rids, tokens=None, logprobs=None, real=real_emit):
        emitted.append((len(rids), logprobs is not None))
        return real(rids, tokens, logprobs)

    graphs.emit = recording_emit
    got = _run(engine, prompts, params)
    assert len(emitted) > 10 and any(lp for _, lp in emitted)  # the graph path ran, with logprobs
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        deltas = got[f"r{i}"]
        tokens = [t for d in deltas for t in d.token_ids]
        if sp.logprobs is None:
            assert all(d.logprobs is None for d in deltas)
            continue
        ref = _hf_log_softmax(reference, prompt + tokens, sp.temperature or 1.0)
        entries = [e for d in deltas for e in d.logprobs]
        assert len(entries) == len(tokens)
        for j, (e, t) in enumerate(zip(entries, tokens)):
            row = ref[len(prompt) - 1 + j]
            assert e.token_id == t and abs(e.logprob - float(row[t])) < TOL
            top = row.topk(sp.logprobs)
            assert list(e.top_logprobs) == pytest.approx(top.values.tolist(), abs=TOL)
        if sp.prompt_logprobs is not None:
            (plp,) = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
            raw = _hf_log_softmax(reference, prompt)
            assert plp[0] is None and len(plp) == len(prompt)
            for j in range(1, len(prompt)):
                assert abs(plp[j].logprob - float(raw[j - 1][prompt[j]])) < TOL


def test_a_batch_that_asks_nothing_keeps_the_argmax_path(device):
    torch.manual_seed(0)
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=5, dtype=torch.float32, device=device)
    engine = _engine(model, block_size=16, graphs=True)
    graphs = engine.runner.graphs
    calls = []
    real_emit = graphs.emit

    def recording_emit(rids, tokens=None, logprobs=None, real=real_emit):
        calls.append((tokens is None, logprobs is None))
        return real(rids, tokens, logprobs)

    graphs.emit = recording_emit
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]
    _run(engine, prompts, [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * 4)
    assert len(calls) > 10 and all(c == (True, True) for c in calls)  # no sampler, no logprobs
