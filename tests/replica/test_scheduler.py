"""Scheduler: continuous batching, chunked prefill, token budget, preemption by recompute,
abort; and a randomized stress test against a fake model that really reads its paged cache.

``PagedFakeRunner`` and ``reference_tokens`` are reused by tests/replica/test_engine.py.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace

import pytest

from replica import kv_cache as kv_mod
from replica.config import CacheConfig, SchedulerConfig
from replica.outputs import PLACEHOLDER_TOKEN, RunnerOutput, SchedulerOutput
from replica.pending_step import DeferredStep
from replica.request import FinishReason, Request, RequestStatus, SamplingParams
from replica.scheduler import Scheduler

_MASK = (1 << 61) - 1


def _mix(state: int, token: int) -> int:
    """The fake model's 'KV' at a position: a function of every token up to it."""
    z = (state * 0x9E3779B97F4A7C15 + token * 0xBF58476D1CE4E5B9 + 1) & _MASK
    return (z ^ (z >> 29)) & _MASK


class PagedFakeRunner:
    """A stand-in model whose outputs depend on its paged cache like a real one does.

    Writing position ``p`` stores ``mix(kv[p-1], token_p)`` in slot ``block_table[p // bs]``,
    reading ``kv[p-1]`` back through the block table; the next token is a function of the
    last position's value (plus ``(seed, index)`` for seeded sampling). A block shared by
    the wrong prefix, freed too early or overwritten changes the tokens that follow, and
    reading a never-written slot raises.
    """

    def __init__(self, block_size: int, vocab: int = 1000) -> None:
        self.block_size = block_size
        self.vocab_size = vocab
        self.kv: dict[tuple[int, int], int] = {}
        self.steps: list[SchedulerOutput] = []
        self.launched_placeholders = 0  # launched steps that had placeholder tokens

    def _slot(self, table, pos: int) -> tuple[int, int]:
        return table[pos // self.block_size], pos % self.block_size

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps.append(out)
        sampled = {}
        for ch in out.chunks:
            state = self.kv[self._slot(ch.block_table, ch.start_pos - 1)] if ch.start_pos else 0
            for k, tok in enumerate(ch.token_ids):
                state = _mix(state, tok)
                self.kv[self._slot(ch.block_table, ch.start_pos + k)] = state
            if ch.sample:
                sampled[ch.request_id] = next_token(state, ch.params, ch.num_output_tokens, self.vocab_size)
        return RunnerOutput(sampled)

    def launch(self, out: SchedulerOutput, prev) -> DeferredStep:
        """Like ModelRunner.launch: placeholders take ``prev``'s tokens; computed at result()."""
        if any(c.token_ids[-1] == PLACEHOLDER_TOKEN for c in out.chunks):
            self.launched_placeholders += 1
            got = prev.result().sampled
            out = replace(
                out,
                chunks=tuple(
                    c._replace(token_ids=c.token_ids[:-1] + (got[c.request_id],))
                    if c.token_ids[-1] == PLACEHOLDER_TOKEN
                    else c
                    for c in out.chunks
                ),
            )
        return DeferredStep(tuple(c.request_id for c in out.chunks if c.sample), lambda: self.run(out))


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
    sched = Scheduler(
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


def step(sched: Scheduler, runner: PagedFakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    got = sched.update(out, runner.run(out)) if not out.is_empty else []
    sched.kv.check_invariants()
    return out, got


def step_async(sched: Scheduler, runner: PagedFakeRunner, inflight):
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


def run_to_end(sched, runner, max_steps=10_000):
    emitted = defaultdict(list)
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return emitted
        _, got = step(sched, runner)
        for r in got:
            emitted[r.request_id].append(r.output_token_ids[-1])
    raise AssertionError("did not finish")


# ----- continuous batching ---------------------------------------------------------------


def test_finished_slot_is_refilled_on_the_very_next_step():
    sched, runner = make_scheduler(max_seqs=2)
    reqs = [
        make_req("a", [1, 2, 3], max_tokens=1),
        make_req("b", [4, 5], max_tokens=5),
        make_req("c", [6], max_tokens=2),
    ]
    for r in reqs:
        sched.add(r)
    out, _ = step(sched, runner)
    assert [c.request_id for c in out.chunks] == ["a", "b"]  # c waits: max_num_seqs
    assert reqs[0].is_finished and reqs[0].block_table == []
    out, _ = step(sched, runner)
    assert {c.request_id for c in out.chunks} == {"b", "c"}  # a's slot went to c at once
    c_chunk = next(ch for ch in out.chunks if ch.request_id == "c")
    b_chunk = next(ch for ch in out.chunks if ch.request_id == "b")
    assert c_chunk.start_pos == 0 and b_chunk.token_ids == (reqs[1].output_token_ids[0],)  # prefill + decode


def test_chunked_prefill_respects_the_budget_and_samples_only_at_the_end():
    sched, runner = make_scheduler(budget=16)
    sched.add(make_req("dec", [9, 9], max_tokens=20))
    step(sched, runner)  # "dec" is now decoding
    long_prompt = list(range(100, 150))  # 50 tokens
    long_req = make_req("long", long_prompt, max_tokens=3)
    sched.add(long_req)
    sizes = []
    while True:
        out, _ = step(sched, runner)
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= 16
        assert "dec" in {c.request_id for c in out.chunks}  # decodes continue alongside prefill
        ch = next((c for c in out.chunks if c.request_id == "long"), None)
        if ch is None or ch.start_pos + ch.num_tokens > 50:
            break
        sizes.append(ch.num_tokens)
        assert ch.sample == (ch.start_pos + ch.num_tokens == 50)
        assert len(ch.block_table) * 4 >= ch.start_pos + ch.num_tokens
        if ch.sample:
            break
    assert sum(sizes) == 50 and len(sizes) == 4 and max(sizes) == 15  # 15 + decode == 16
    run_to_end(sched, runner)
    assert long_req.output_token_ids == reference_tokens(long_prompt, long_req.params)


def test_running_requests_are_served_before_waiting_ones():
    sched, runner = make_scheduler(budget=8)
    sched.add(make_req("a", list(range(1, 6)), max_tokens=10))
    step(sched, runner)
    sched.add(make_req("b", list(range(20, 40)), max_tokens=2))
    out, _ = step(sched, runner)
    assert [c.request_id for c in out.chunks] == ["a", "b"]
    assert [c.num_tokens for c in out.chunks] == [1, 7]


def test_preemption_by_recompute_is_lossless():
    # 6 blocks of 4: two requests of 8 prompt tokens each growing by 12 cannot both fit.
    sched, runner = make_scheduler(num_blocks=6, budget=64, watermark=0.0)
    a = make_req("a", list(range(1, 9)), arrival=1.0, max_tokens=12)
    b = make_req("b", list(range(50, 58)), arrival=2.0, max_tokens=12)
    sched.add(a)
    sched.add(b)
    emitted = defaultdict(list)
    statuses = []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out, got = step(sched, runner)
        for r in got:
            emitted[r.request_id].append(r.output_token_ids[-1])
        if out.preempted_ids:
            assert out.preempted_ids == ("b",)  # the newest
            assert b.status is RequestStatus.PREEMPTED and b.block_table == [] and b.num_computed_tokens == 0
            assert sched.waiting[0] is b
            statuses.append(len(b.output_token_ids))
    assert sched.num_preemptions >= 1 and b.num_preemptions >= 1 and statuses[0] > 0
    for r in (a, b):
        expect = reference_tokens(r.prompt_token_ids, r.params)
        assert r.output_token_ids == expect
        assert emitted[r.request_id] == expect  # each token reported once, none re-emitted
        assert r.finish_reason is FinishReason.LENGTH
    assert sched.kv.num_free_blocks == 6


def test_abort_frees_blocks_at_once_wherever_the_request_is():
    sched, runner = make_scheduler(num_blocks=8, max_seqs=1)
    sched.add(make_req("run", list(range(10)), max_tokens=5))
    sched.add(make_req("wait", list(range(5)), max_tokens=5))
    step(sched, runner)
    assert sched.kv.num_free_blocks == 5
    r = sched.abort("run")
    assert r is not None and r.finish_reason is FinishReason.ABORT and r.is_finished
    assert sched.kv.num_free_blocks == 8 and sched.num_running == 0
    w = sched.abort("wait")
    assert w is not None and sched.num_waiting == 0 and not sched.has_unfinished()
    assert sched.abort("nope") is None
    sched.kv.check_invariants()
    assert step(sched, runner)[0].is_empty


def test_stop_conditions():
    sched, runner = make_scheduler()
    base = [3, 1, 4, 1, 5]
    ref = reference_tokens(base, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    eos = frozenset({ref[2]})
    r_eos = Request("eos", base, SamplingParams(max_tokens=10, temperature=0), eos_token_ids=eos)
    r_ign = Request("ign", base, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), eos_token_ids=eos)
    r_min = Request("min", base, SamplingParams(max_tokens=10, min_tokens=5, temperature=0), eos_token_ids=eos)
    r_stop = make_req("stop", base, max_tokens=10, stop_token_ids=(ref[1],))
    for r in (r_eos, r_ign, r_min, r_stop):
        sched.add(r)
    run_to_end(sched, runner)
    assert r_eos.output_token_ids == ref[:3] and r_eos.finish_reason is FinishReason.STOP
    assert r_ign.output_token_ids == ref and r_ign.finish_reason is FinishReason.LENGTH
    # min_tokens: the EOS at index 2 does not count; the next EOS after 5 outputs would.
    assert len(r_min.output_token_ids) >= 5 and r_min.output_token_ids[:3] == ref[:3]
    assert r_min.finish_reason is (FinishReason.STOP if r_min.output_token_ids[-1] in eos else FinishReason.LENGTH)
    assert r_stop.output_token_ids == ref[:2] and r_stop.finish_reason is FinishReason.STOP
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_finish_by_caller_frees_and_reports_reason():
    sched, runner = make_scheduler()
    sched.add(make_req("a", [1, 2, 3], max_tokens=10))
    step(sched, runner)
    r = sched.finish("a", FinishReason.STOP)
    assert r is not None and r.finish_reason is FinishReason.STOP
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_prefix_hit_skips_computation_and_counts_cached_tokens():
    sched, runner = make_scheduler(budget=256)
    shared = list(range(1, 21))  # 5 full blocks
    a = make_req("a", shared + [30], max_tokens=2)
    sched.add(a)
    run_to_end(sched, runner)
    b = make_req("b", shared + [31, 32], max_tokens=2)
    sched.add(b)
    out, _ = step(sched, runner)
    assert out.chunks[0].start_pos == 20 and b.num_cached_tokens == 20
    run_to_end(sched, runner)
    assert b.output_token_ids == reference_tokens(b.prompt_token_ids, b.params)


# ----- randomized stress ---------------------------------------------------------------------


EOS = frozenset(range(0, 1000, 23))  # ~4% of the fake vocabulary


def _stress(seed: int, *, prefix_caching=True, num_steps_cap=5000, overlap=False, runners=None):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    num_blocks = rng.randint(12, 40)
    sched, runner = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        budget=rng.choice([8, 16, 48]),
        max_seqs=rng.randint(2, 8),
        max_model_len=num_blocks * block_size,
        watermark=rng.choice([0.0, 0.05, 0.2]),
        enable_prefix_caching=prefix_caching,
    )
    if runners is not None:
        runners.append(runner)
    capacity = num_blocks * block_size
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(1, 24))] for _ in range(4)]
    pending = []
    for i in range(40):
        prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [
            rng.randrange(1000) for _ in range(rng.randint(0 if i % 2 else 1, 20))
        ]
        prompt = prompt[: max(1, capacity // 2)] or [1]
        max_tokens = rng.randint(1, max(1, min(20, capacity - len(prompt))))
        seeded = rng.random() < 0.3
        params = dict(
            max_tokens=max_tokens, temperature=0.8 if seeded else 0.0, seed=rng.randrange(100) if seeded else None
        )
        req = make_req(f"r{i}", prompt, arrival=float(i), **params)
        if overlap and rng.random() < 0.5:  # EOS stops: async steps compute a wasted row for them
            req = Request(
                req.request_id,
                req.prompt_token_ids,
                replace(req.params, ignore_eos=False),
                arrival_time=req.arrival_time,
                eos_token_ids=EOS,
            )
        pending.append((rng.randint(0, 60), req))
    pending.sort(key=lambda x: x[0])
    aborted, emitted = set(), defaultdict(list)
    all_reqs = {r.request_id: r for _, r in pending}
    inflight = None
    for t in range(num_steps_cap):
        while pending and pending[0][0] <= t:
            sched.add(pending.pop(0)[1])
        if rng.random() < 0.03 and sched.has_unfinished():
            victim = rng.choice([r.request_id for r in list(sched.running) + list(sched.waiting)])
            sched.abort(victim)
            aborted.add(victim)
            sched.kv.check_invariants()
        if overlap:
            inflight, got = step_async(sched, runner, inflight)
            out = inflight[0] if inflight is not None else SchedulerOutput((), 0)
        else:
            out, got = step(sched, runner)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(out.chunks) <= sched.config.max_num_seqs
        assert len({c.request_id for c in out.chunks}) == len(out.chunks)
        for r in got:
            emitted[r.request_id].append(r.output_token_ids[-1])
        if not pending and not sched.has_unfinished() and inflight is None:
            break
    else:
        raise AssertionError("stress run did not finish")
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks  # nothing leaked when idle
    for rid, r in all_reqs.items():
        if rid in aborted:
            continue
        expect = reference_tokens(r.prompt_token_ids, r.params, eos=r.eos_token_ids)
        assert r.output_token_ids == expect, rid
        assert emitted[rid] == expect, rid
    return sched


def test_randomized_stress_keeps_invariants_and_outputs():
    total_preempt = total_cached = 0
    for seed in range(12):
        sched = _stress(seed)
        total_preempt += sched.num_preemptions
        total_cached += sum(1 for _ in sched.kv.cached_block_hashes(10**6))
    assert total_preempt > 0 and total_cached > 0


def test_randomized_stress_with_async_scheduling():
    """Pipelined schedule_next/update with EOS stops, preemption, aborts and prefix hits:
    exact outputs, no leaked block, and the blind steps really ran (with wasted rows)."""
    runners: list[PagedFakeRunner] = []
    preempted = 0
    for seed in range(12):
        preempted += _stress(300 + seed, overlap=True, runners=runners).num_preemptions
    assert sum(r.launched_placeholders for r in runners) > 100 and preempted > 0
    # A small run where every request stops on EOS or length while blind steps run.
    blind = stops = 0
    sched, runner = make_scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=8)
    for i in range(6):
        sched.add(
            Request(
                f"e{i}",
                [i + 1, 7, 9],
                SamplingParams(max_tokens=40, temperature=0.0),
                arrival_time=float(i),
                eos_token_ids=EOS,
            )
        )
    inflight, emitted = None, defaultdict(list)
    while sched.has_unfinished() or inflight is not None:
        inflight, got = step_async(sched, runner, inflight)
        for r in got:
            emitted[r.request_id].append(r.output_token_ids[-1])
        if inflight is not None and any(c.token_ids[-1] == PLACEHOLDER_TOKEN for c in inflight[0].chunks):
            blind += 1
    assert blind > 10
    for i in range(6):
        ref = reference_tokens([i + 1, 7, 9], SamplingParams(max_tokens=40, temperature=0.0), eos=EOS)
        assert emitted[f"e{i}"] == ref
        stops += ref[-1] in EOS
    assert stops > 0  # some stopped on EOS, i.e. a blind step computed a row that was dropped
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_randomized_stress_without_prefix_caching():
    for seed in range(3):
        _stress(100 + seed, prefix_caching=False)


def test_randomized_stress_with_colliding_hashes(monkeypatch):
    # A 4-value hash: nearly every lookup collides; outputs must still be exact.
    monkeypatch.setattr(kv_mod, "hash_block", lambda parent, toks: (parent + sum(toks)) % 4)
    for seed in range(4):
        _stress(200 + seed)


def test_schedule_update_mismatch_is_an_error():
    sched, runner = make_scheduler()
    sched.add(make_req("a", [1, 2, 3], max_tokens=4))
    out = sched.schedule()
    sched.update(out, runner.run(out))
    with pytest.raises(RuntimeError, match="chunk starts at 0"):
        sched.update(out, runner.run(out))
