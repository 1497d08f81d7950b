"""Shared test doubles of the engine's parts, and helpers that drive a bare scheduler.

``PagedFakeRunner`` is a stand-in model that really reads its paged cache; ``reference_tokens``
is what it generates for a request alone (the exactness oracle of the scheduler and engine
tests). ``ScriptedRunner`` samples tokens a test chose; ``RecordingRunner`` wraps a real runner
and keeps every step it ran. ``make_scheduler``, ``make_req``, ``step`` and ``step_async`` drive
an ``AsyncScheduler`` the way the engine does.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from replica.async_scheduler import AsyncScheduler
from replica.config import CacheConfig, SchedulerConfig
from replica.outputs import RunnerOutput
from replica.pending_step import DeferredStep, PendingStep
from replica.request import Request, SamplingParams
from replica.step import PLACEHOLDER_TOKEN, SchedulerOutput

_MASK = (1 << 61) - 1


def _mix(state: int, token: int) -> int:
    """The fake model's 'KV' at a position: a function of every token up to it."""
    z = (state * 0x9E3779B97F4A7C15 + token * 0xBF58476D1CE4E5B9 + 1) & _MASK
    return (z ^ (z >> 29)) & _MASK


def has_placeholders(out: SchedulerOutput) -> bool:
    """A step whose input tokens are (some of) the previous step's samples, not on the host yet."""
    return any(c.token_ids[-1] == PLACEHOLDER_TOKEN for c in out.as_chunks())


class PagedFakeRunner:
    """A stand-in model whose outputs depend on its paged cache like a real one does.

    Writing position ``p`` stores ``mix(kv[p-1], token_p)`` in slot ``block_table[p // bs]``,
    reading ``kv[p-1]`` back through the block table; the next token is a function of the
    last position's value (plus ``(seed, index)`` for seeded sampling). A block shared by
    the wrong prefix, freed too early or overwritten changes the tokens that follow, and
    reading a never-written slot raises.
    """

    device = torch.device("cpu")

    def __init__(self, block_size: int, vocab: int = 1000, num_blocks: int | None = None) -> None:
        self.block_size = block_size
        self.vocab_size = vocab
        self.num_blocks = num_blocks  # None: CacheConfig.num_blocks decides
        self.alive = True
        self.kv: dict[tuple[int, int], int] = {}
        self.steps: list[SchedulerOutput] = []
        self.launched_placeholders = 0  # launched steps that had placeholder tokens

    def close(self) -> None:
        pass

    def _slot(self, table, pos: int) -> tuple[int, int]:
        return table[pos // self.block_size], pos % self.block_size

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps.append(out)
        sampled = {}
        for ch in out.as_chunks():
            state = self.kv[self._slot(ch.block_table, ch.start_pos - 1)] if ch.start_pos else 0
            for k, tok in enumerate(ch.token_ids):
                state = _mix(state, tok)
                self.kv[self._slot(ch.block_table, ch.start_pos + k)] = state
            if ch.sample:
                sampled[ch.request_id] = next_token(state, ch.params, ch.num_output_tokens, self.vocab_size)
        return RunnerOutput(sampled)

    def launch(self, out: SchedulerOutput, prev: PendingStep | None) -> DeferredStep:
        """Like ModelRunner.launch: rows without a token take ``prev``'s; computed at result()."""
        d = out.decode
        if d is not None and d.token_ids is None:
            self.launched_placeholders += 1
            assert prev is not None
            got = prev.result().tokens_for(d.request_ids)
            out = replace(out, decode=replace(d, token_ids=np.asarray(got, np.int64), prev_rows=None))
        return DeferredStep(sampling_ids(out), lambda: self.run(out))


def sampling_ids(out: SchedulerOutput) -> tuple[str, ...]:
    """The requests that sample in a step, in row order."""
    return out.decode.request_ids if out.decode is not None else tuple(c.request_id for c in out.chunks if c.sample)


class ScriptedRunner(PagedFakeRunner):
    """Samples ``script[request_id][index]``: lets a test choose exact outputs."""

    def __init__(self, block_size: int = 4, vocab: int = 1000) -> None:
        super().__init__(block_size, vocab)
        self.script: dict[str, list[int]] = {}
        self.blind_steps = 0  # launched steps that had placeholder tokens

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        # Past the end of a script: a blind step's wasted row (its request already stopped).
        return RunnerOutput(
            {
                c.request_id: (self.script[c.request_id] + [0] * (c.num_output_tokens + 1))[c.num_output_tokens]
                for c in out.as_chunks()
                if c.sample
            }
        )

    def launch(self, out: SchedulerOutput, prev: PendingStep | None) -> DeferredStep:
        # The script is indexed by output position, so a placeholder needs no resolving.
        self.blind_steps += has_placeholders(out)
        return DeferredStep(sampling_ids(out), lambda: self.run(out))


class RecordingRunner:
    """Wraps a runner to keep every SchedulerOutput (for the 'it really happened' checks)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.outputs: list[SchedulerOutput] = []

    def run(self, out: SchedulerOutput):
        self.outputs.append(out)
        return self.inner.run(out)

    def launch(self, out: SchedulerOutput, prev):
        self.outputs.append(out)
        return self.inner.launch(out, prev)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def next_token(state: int, params: SamplingParams, index: int, vocab: int) -> int:
    if params.greedy or params.seed is None:
        return state % vocab
    return _mix(_mix(state, params.seed), index) % vocab


def reference_tokens(prompt, params: SamplingParams, vocab: int = 1000, eos=frozenset()) -> list[int]:
    """What the fake model generates for a request alone."""
    state = 0
    for t in prompt:
        state = _mix(state, t)
    out: list[int] = []
    while True:
        tok = next_token(state, params, len(out), vocab)
        out.append(tok)
        state = _mix(state, tok)
        stop = (not params.ignore_eos and tok in eos) or tok in params.stop_token_ids
        if (stop and len(out) >= params.min_tokens) or len(out) >= params.max_tokens:
            return out


def make_scheduler(*, num_blocks=64, block_size=4, budget=64, max_seqs=8, max_model_len=256, **cache):
    sched = AsyncScheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_waiting=1000),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, **cache),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
    )
    return sched, PagedFakeRunner(block_size)


def make_req(rid, prompt, arrival=0.0, **params) -> Request:
    params.setdefault("ignore_eos", True)
    params.setdefault("temperature", 0.0)
    return Request(rid, list(prompt), SamplingParams(**params), arrival_time=arrival)


def step(sched: AsyncScheduler, runner: PagedFakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    got = sched.update(out, runner.run(out)) if not out.is_empty else []
    sched.kv.check_invariants()
    return out, got


def step_async(sched: AsyncScheduler, runner: PagedFakeRunner, inflight):
    """One engine-style step with async scheduling: launch the successor of the step in
    flight (if the scheduler can build it blind), then apply the step in flight."""
    if inflight is None:
        out = sched.schedule()
        return (None if out.is_empty else (out, runner.launch(out, None))), []
    out, handle = inflight
    nxt = sched.schedule_next(out)
    new = (nxt, runner.launch(nxt, handle)) if nxt is not None else None
    got = sched.update(out, handle.result())
    sched.kv.check_invariants()
    return new, got
