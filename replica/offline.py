"""Drivers of an ``LLMEngine`` through its public methods: ``generate`` (an offline batch run
to completion) and ``warmup`` (throwaway requests through every step path before serving)."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from replica.errors import InvalidRequestError
from replica.interfaces import Prompt
from replica.outputs import CompletionOutput, Usage
from replica.request import FinishReason, SamplingParams

if TYPE_CHECKING:
    from replica.engine import LLMEngine

_ids = itertools.count()  # request ids of generate(): unique in the process


def warmup(engine: LLMEngine, num_decode: int = 8) -> float:
    """Run throwaway requests through every path a real step takes (a prefill chunk of the
    full token budget, a mixed step, decode steps) so that kernel compilation, cuBLAS
    heuristics and allocator growth happen now, not in a user's first request. Leaves no
    trace: counters, rate window and prefix cache are reset. Returns the seconds it took."""
    if engine.has_unfinished():
        raise RuntimeError("warmup needs an idle engine")
    t0 = time.monotonic()
    sched = engine.config.scheduler
    long_len = max(1, min(sched.max_num_batched_tokens, engine.max_model_len - 2))
    vocab = max(2, min(engine.vocab_size, 30_000))
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add(
        engine.make_request("warmup-long", [(7 * i) % vocab + 1 for i in range(long_len)], greedy),
        enforce_queue_limit=False,
    )
    n = max(1, min(num_decode, sched.max_num_seqs - 1))
    for i in range(n):
        prompt = [(13 * i + j) % vocab + 1 for j in range(min(16 + 8 * i, engine.max_model_len - 9))]
        engine.add(engine.make_request(f"warmup-{i}", prompt, replace(greedy, max_tokens=8)), enforce_queue_limit=False)
    while engine.has_unfinished():
        engine.step()
    engine.reset_counters()
    return time.monotonic() - t0


def generate(
    engine: LLMEngine,
    prompts: Prompt | Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    use_tqdm: bool = True,
) -> list[CompletionOutput]:
    """Run a batch to completion; outputs in the order of ``prompts``. Every prompt is
    validated before any work (a refusal raises and runs nothing); the bounded waiting
    queue is fed as it drains. On an error every unfinished request of the batch is dropped."""
    plist_prompts: list[Prompt]
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        plist_prompts = [cast(Prompt, prompts)]
    else:
        plist_prompts = list(cast(Sequence[Prompt], prompts))
    prompts = plist_prompts
    if params is None or isinstance(params, SamplingParams):
        plist = [params or SamplingParams()] * len(prompts)
    else:
        plist = list(params)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
    todo = deque(engine.make_request(f"generate-{next(_ids)}", p, sp) for p, sp in zip(prompts, plist, strict=True))
    order = [r.request_id for r in todo]
    reqs = {r.request_id: r for r in todo}
    # Per request, per choice (one for n = 1): text parts, token ids, finish reason.
    texts: dict[str, list[list[str]]] = {rid: [[] for _ in range(r.params.n)] for rid, r in reqs.items()}
    tokens: dict[str, list[list[int]]] = {rid: [[] for _ in range(r.params.n)] for rid, r in reqs.items()}
    reasons: dict[str, list[FinishReason | None]] = {rid: [None] * r.params.n for rid, r in reqs.items()}
    results: dict[str, CompletionOutput] = {}
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="generate", unit="req", dynamic_ncols=True)
    max_waiting = max(1, engine.config.scheduler.max_waiting)  # at least one waiting, even with 0
    try:
        while todo or engine.has_unfinished():
            while todo and engine.num_waiting < max_waiting:  # feed the bounded queue as it drains
                engine.add(todo.popleft(), enforce_queue_limit=False)
            for d in engine.step():
                rid = d.request_id
                if rid not in texts:
                    continue  # someone else's request sharing this engine
                if not d.choices:
                    texts[rid][0].append(d.text)
                    tokens[rid][0].extend(d.token_ids)
                for c in d.choices:
                    texts[rid][c.index].append(c.text)
                    tokens[rid][c.index].extend(c.token_ids)
                    reasons[rid][c.index] = c.finish_reason or reasons[rid][c.index]
                if d.finished:
                    assert d.finish_reason is not None and d.usage is not None
                    prompt = tuple(reqs[rid].prompt_token_ids)
                    outs = [
                        CompletionOutput(
                            request_id=rid,
                            prompt_token_ids=prompt,
                            token_ids=tuple(tokens[rid][i]),
                            text="".join(texts[rid][i]),
                            finish_reason=reasons[rid][i] or d.finish_reason,
                            usage=Usage(len(prompt), len(tokens[rid][i]), d.usage.cached_tokens),
                        )
                        for i in range(len(texts[rid]))
                    ]
                    results[rid] = replace(outs[0], usage=d.usage, choices=tuple(outs) if len(outs) > 1 else ())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{engine.tokens_per_s():.0f}", refresh=False)
    except BaseException:
        engine.drop_inflight()
        engine.discard([rid for rid in order if rid not in results])
        raise
    finally:
        if bar is not None:
            bar.close()
    return [results[rid] for rid in order]
