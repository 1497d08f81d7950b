"""Baseline: transformers' own continuous batching (``model.init_continuous_batching``).

The same requests as the other methods, each with its own ``max_new_tokens`` and EOS
disabled, greedy. transformers runs its own paged KV cache and scheduler in a
background thread; we only feed requests and collect results.
"""

from __future__ import annotations

import time

import torch

from bench.workload import BenchRequest, RunResult, useful_tokens


@torch.no_grad()
def run_hf_continuous(
    model,
    requests: list[BenchRequest],
    *,
    max_batch_tokens: int | None = None,
    num_blocks: int | None = None,
    max_memory_percent: float | None = None,
    block_size: int = 256,
    warmup: bool = True,
    progress: bool = True,
    timeout_s: float = 3600.0,
) -> RunResult:
    """Greedy, EOS disabled. ``None`` sizes are left to transformers (from free GPU memory);
    on CPU pass ``num_blocks`` (see ``blocks_needed``), or it reserves most of the RAM.
    Warm-up (CUDA graph capture, first kernels) is not timed."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(
        do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(r.max_tokens for r in requests)
    )
    cb = ContinuousBatchingConfig(
        block_size=block_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_memory_percent=max_memory_percent,
        allow_block_sharing=False,
    )
    ids = [f"r{i}" for i in range(len(requests))]
    results: dict[str, list[int]] = {}
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    try:
        if warmup:
            manager.warmup()
        _sync(model.device)
        start = time.perf_counter()
        manager.start()
        for rid, r in zip(ids, requests, strict=True):
            manager.add_request(list(r.prompt_token_ids), request_id=rid, max_new_tokens=r.max_tokens, eos_token_id=-1)
        with tqdm(total=len(requests), desc="hf_cb", unit="req", disable=not progress, dynamic_ncols=True) as bar:
            deadline = time.monotonic() + timeout_s
            while len(results) < len(requests):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"HF continuous batching: {len(results)}/{len(requests)} done in {timeout_s}s")
                res = manager.get_result(timeout=1)
                if res is None:
                    if not manager.is_running():
                        raise RuntimeError("HF continuous batching thread died (see its log above)")
                    continue
                if res.is_finished():
                    results[res.request_id] = list(res.generated_tokens)
                    bar.update(1)
        _sync(model.device)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=60)  # also restores the model's attention implementation
        manager.destroy()
    outputs = []
    for rid, r in zip(ids, requests, strict=True):
        got = results[rid]
        if len(got) < r.max_tokens:
            raise RuntimeError(f"HF continuous batching stopped {rid} early: {len(got)} < {r.max_tokens}")
        outputs.append(tuple(got[: r.max_tokens]))
    computed = sum(len(v) for v in results.values())
    return RunResult("hf_cb", elapsed, useful_tokens(requests), computed, tuple(outputs))


def blocks_needed(requests: list[BenchRequest], block_size: int) -> int:
    """KV blocks for every request at full length at once: enough that nobody is evicted."""
    return sum(-(-(len(r.prompt_token_ids) + r.max_tokens) // block_size) for r in requests)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
