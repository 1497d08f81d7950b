"""The seed article's baseline: static batching with Hugging Face ``generate``.

Requests are cut, in arrival order, into batches of ``batch_size``; each batch is left
padded to its longest prompt (with an attention mask) and decoded until its longest
output is done, so every member waits for the longest one. Only each request's own
``max_tokens`` count as useful; the rest is the waste continuous batching removes.
"""

from __future__ import annotations

import time

import torch

from bench.workload import BenchRequest, RunResult, useful_tokens


@torch.no_grad()
def run_static(
    model, requests: list[BenchRequest], *, batch_size: int, pad_token_id: int, progress: bool = True
) -> RunResult:
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = model.device
    outputs: list[tuple[int, ...]] = []
    computed = 0
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    _sync(device)
    start = time.perf_counter()
    for batch in tqdm(batches, desc="static", unit="batch", disable=not progress, dynamic_ncols=True):
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding: every prompt ends at the same column
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids) :] = 1
        max_new = max(r.max_tokens for r in batch)
        gen = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_token_id,
            bos_token_id=None,
        )
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        new = out[:, width:].tolist()
        for row, r in enumerate(batch):
            if len(new[row]) < r.max_tokens:
                raise RuntimeError(f"static batching stopped early: {len(new[row])} < {r.max_tokens} tokens")
            outputs.append(tuple(new[row][: r.max_tokens]))
        computed += len(batch) * max_new
    _sync(device)
    elapsed = time.perf_counter() - start
    return RunResult("static", elapsed, useful_tokens(requests), computed, tuple(outputs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
