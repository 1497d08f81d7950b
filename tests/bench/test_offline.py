"""The offline baselines run and agree with each other on a tiny model (CPU)."""

from __future__ import annotations

import json

import torch

from bench.hf_continuous import blocks_needed, run_hf_continuous
from bench.offline import main
from bench.static_batching import run_static
from bench.workload import WorkloadSpec, make_workload
from replica.models import tiny_model


def _greedy_alone(model, prompt, n):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return tuple(out[0, len(prompt) :].tolist())


def test_static_batching_pads_left_and_counts_only_useful_tokens():
    model = tiny_model("qwen2", seed=1).model
    reqs = make_workload(WorkloadSpec(num_requests=5, prompt_len=(3, 10), output_len=(2, 7), seed=2))
    res = run_static(model, reqs, batch_size=3, pad_token_id=2, progress=False)
    assert res.useful_tokens == sum(r.max_tokens for r in reqs)
    # Each batch decodes as long as its longest member: the difference is waste.
    assert res.computed_tokens == 3 * max(r.max_tokens for r in reqs[:3]) + 2 * max(r.max_tokens for r in reqs[3:])
    for r, out in zip(reqs, res.outputs, strict=True):  # padding + mask change nothing
        assert out == _greedy_alone(model, list(r.prompt_token_ids), r.max_tokens)


def test_hf_continuous_batching_matches_static():
    model = tiny_model("llama", seed=3).model
    reqs = make_workload(WorkloadSpec(num_requests=4, prompt_len=(3, 10), output_len=(2, 6), seed=3))
    hf = run_hf_continuous(
        model, reqs, block_size=16, num_blocks=blocks_needed(reqs, 16), max_batch_tokens=64, progress=False
    )
    static = run_static(model, reqs, batch_size=4, pad_token_id=2, progress=False)
    assert hf.outputs == static.outputs
    assert hf.computed_tokens == hf.useful_tokens
    assert model.config._attn_implementation == "sdpa"  # restored for whoever uses the model next


def test_offline_runs_all_three_and_writes_json(tmp_path, capsys):
    out = tmp_path / "offline.json"
    report = main(
        [
            "--model",
            "tiny:llama",
            "--num-requests",
            "6",
            "--prompt-len",
            "4",
            "12",
            "--output-len",
            "3",
            "8",
            "--batch-size",
            "4",
            "--no-progress",
            "--no-warmup",
            "--max-num-batched-tokens",
            "64",
            "--num-blocks",
            "64",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == {"static", "hf_cb", "engine"}
    useful = {r["useful_tokens"] for r in saved["results"].values()}
    assert len(useful) == 1  # the same requests for all
    assert saved["results"]["static"]["computed_tokens"] > saved["results"]["engine"]["computed_tokens"]
    assert set(saved["ratios"]) == {"hf_cb/static", "engine/static", "engine/hf_cb"}
    # float32 greedy on the same weights: every method computed the same tokens.
    assert all(v == 1.0 for v in saved["agreement_first8"].values()), saved["agreement_first8"]
    assert report["workload"]["num_requests"] == 6
    assert "engine/static" in capsys.readouterr().out
