"""Scheduler: continuous batching, chunked prefill, token budget, preemption by recompute,
abort; and a randomized stress test against a fake model that really reads its paged cache
(``PagedFakeRunner``, tests/replica/fakes.py).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace

import pytest

from replica import kv_cache as kv_mod
from replica.errors import InvalidRequestError, RequestTooLongError
from replica.request import FinishReason, Request, RequestStatus, SamplingParams
from replica.scheduler import Scheduler
from replica.step import SchedulerOutput
from tests.replica.fakes import (
    PagedFakeRunner,
    has_placeholders,
    make_req,
    make_scheduler,
    reference_tokens,
    step,
    step_async,
)


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
    assert [c.request_id for c in out.as_chunks()] == ["a", "b"]  # c waits: max_num_seqs
    assert reqs[0].is_finished and reqs[0].block_table == []
    out, _ = step(sched, runner)
    assert {c.request_id for c in out.as_chunks()} == {"b", "c"}  # a's slot went to c at once
    c_chunk = next(ch for ch in out.as_chunks() if ch.request_id == "c")
    b_chunk = next(ch for ch in out.as_chunks() if ch.request_id == "b")
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
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.as_chunks()) <= 16
        assert "dec" in {c.request_id for c in out.as_chunks()}  # decodes continue alongside prefill
        ch = next((c for c in out.as_chunks() if c.request_id == "long"), None)
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
    assert [c.request_id for c in out.as_chunks()] == ["a", "b"]
    assert [c.num_tokens for c in out.as_chunks()] == [1, 7]


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
    assert out.as_chunks()[0].start_pos == 20 and b.num_cached_tokens == 20
    run_to_end(sched, runner)
    assert b.output_token_ids == reference_tokens(b.prompt_token_ids, b.params)


# ----- randomized stress ---------------------------------------------------------------------


EOS = frozenset(range(0, 1000, 23))  # ~4% of the fake vocabulary


def _stress(seed: int, *, prefix_caching=True, num_steps_cap=5000, overlap=False, runners=None, groups=False):
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
        if groups and rng.random() < 0.3:  # n > 1, when the n sequences fit this cache
            n = rng.randint(2, 3)
            try:
                sched.admission.check_fits(make_req("probe", prompt, n=n, **params))
                params["n"] = n
            except (RequestTooLongError, InvalidRequestError):
                pass
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
    num_groups = sum(r.params.n > 1 for r in all_reqs.values())
    inflight = None
    for t in range(num_steps_cap):
        while pending and pending[0][0] <= t:
            sched.add(pending.pop(0)[1])
        if rng.random() < 0.03 and sched.has_unfinished():
            victim = rng.choice([r.request_id for r in list(sched.running) + list(sched.waiting)])
            if groups and " #" in victim and rng.random() < 0.5:  # one choice, or its whole request
                victim = victim.split(" #")[0]
            sched.abort(victim)
            aborted.add(victim)
            sched.kv.check_invariants()
        if overlap:
            inflight, got = step_async(sched, runner, inflight)
            out = inflight[0] if inflight is not None else SchedulerOutput((), 0)
        else:
            out, got = step(sched, runner)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(out.as_chunks()) <= sched.config.max_num_seqs
        assert len({c.request_id for c in out.as_chunks()}) == len(out.as_chunks())
        for r in got:
            emitted[r.request_id].append(r.output_token_ids[-1])
        if not pending and not sched.has_unfinished() and inflight is None:
            break
    else:
        raise AssertionError("stress run did not finish")
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks  # nothing leaked when idle
    assert not sched._groups and sched._reserved_seats == 0
    for rid, r in all_reqs.items():
        if rid in aborted:
            continue
        for seq in r.children or (r,):  # each choice as the single request with its params
            if seq.request_id in aborted:
                continue
            expect = reference_tokens(seq.prompt_token_ids, seq.params, eos=seq.eos_token_ids)
            assert seq.output_token_ids == expect, seq.request_id
            assert emitted[seq.request_id] == expect, seq.request_id
    sched.num_groups = num_groups  # type: ignore[attr-defined]
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
        if inflight is not None and has_placeholders(inflight[0]):
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


def test_randomized_stress_with_n_sequence_requests():
    """n > 1 requests among the others, with and without async scheduling and the prefix cache:
    every choice equals the single request with its seed, aborts of one choice or of the whole
    request, preemption of choices, and no leaked block or seat."""
    groups = preempted = 0
    for seed in range(10):
        sched = _stress(500 + seed, groups=True, overlap=seed % 2 == 1, prefix_caching=seed % 3 != 2)
        groups += sched.num_groups  # type: ignore[attr-defined]
        preempted += sched.num_preemptions
    assert groups > 20 and preempted > 0


# ----- n > 1: the choices share the prompt's blocks ------------------------------------------


def _used(sched: Scheduler) -> int:
    return sched.kv.num_total_blocks - sched.kv.num_free_blocks


def test_n_choices_share_the_prompt_blocks_and_each_equals_its_single_request():
    sched, runner = make_scheduler(num_blocks=64, block_size=4, enable_prefix_caching=False)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks shared, the last 2 tokens per choice
    parent = make_req("g", prompt, max_tokens=6, n=3, temperature=0.8, seed=41)
    sched.add(parent)
    out, got = step(sched, runner)
    # One request computes the shared part (8 tokens) and samples nothing.
    assert [(c.request_id, len(c.token_ids), c.sample) for c in out.as_chunks()] == [("g", 8, False)]
    assert got == [] and _used(sched) == 2
    assert [c.request_id for c in sched.running] == ["g #0", "g #1", "g #2"]
    assert parent.block_table == [] and parent.status is RequestStatus.FORKED
    shared = list(sched.running[0].block_table)
    assert len(shared) == 2 and all(c.block_table == shared for c in sched.running)
    out, got = step(sched, runner)
    # Each choice computes the rest of the prompt into a block of its own and samples.
    assert [(c.request_id, c.start_pos, len(c.token_ids), c.sample) for c in out.as_chunks()] == [
        (f"g #{i}", 8, 2, True) for i in range(3)
    ]
    assert _used(sched) == 2 + 3  # not 3 x 3
    assert all(c.block_table[:2] == shared and len(c.block_table) == 3 for c in sched.running)
    first = {r.request_id: r.output_token_ids[-1] for r in got}
    emitted = run_to_end(sched, runner)
    for i, child in enumerate(parent.children):
        single = reference_tokens(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=41 + i, ignore_eos=True))
        assert child.output_token_ids == single
        assert [first[child.request_id], *emitted[child.request_id]] == single
    assert len({tuple(c.output_token_ids) for c in parent.children}) == 3  # different seeds, different outputs
    assert _used(sched) == 0 and parent.status is RequestStatus.FINISHED


def test_n_choices_reproduce_single_requests_run_by_the_scheduler():
    prompt = [5, 9, 2, 7, 7, 1, 3, 8, 6]
    sched, runner = make_scheduler(block_size=4)
    sched.add(make_req("g", prompt, max_tokens=5, n=2, temperature=1.0, seed=7))
    for i in range(2):
        sched.add(make_req(f"s{i}", prompt, max_tokens=5, temperature=1.0, seed=7 + i))
    emitted = run_to_end(sched, runner)
    assert emitted["g #0"] == emitted["s0"] and emitted["g #1"] == emitted["s1"]
    assert emitted["g #0"] != emitted["g #1"]


def test_greedy_choices_are_identical_and_unseeded_ones_differ():
    prompt = list(range(20, 33))
    sched, runner = make_scheduler(block_size=4)
    greedy = make_req("g", prompt, max_tokens=6, n=3)
    sched.add(greedy)
    run_to_end(sched, runner)
    assert len({tuple(c.output_token_ids) for c in greedy.children}) == 1
    assert greedy.children[0].output_token_ids == reference_tokens(prompt, greedy.params.for_choice(0))


def test_a_short_prompt_forks_at_once_and_a_cached_prefix_forks_at_admission():
    sched, runner = make_scheduler(block_size=4)
    sched.add(make_req("short", [1, 2, 3], max_tokens=3, n=2, temperature=1.0, seed=3))
    out, _ = step(sched, runner)  # nothing to share: each choice computes the whole prompt now
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in out.as_chunks()] == [
        ("short #0", 0, 3),
        ("short #1", 0, 3),
    ]
    run_to_end(sched, runner)
    prompt = list(range(40, 53))  # 3 full blocks shared
    sched.add(make_req("first", prompt, max_tokens=2, n=2))
    run_to_end(sched, runner)
    sched.add(make_req("again", prompt, max_tokens=2, n=2))
    out, _ = step(sched, runner)  # the shared blocks are prefix hits: the choices start this very step
    assert [(c.request_id, c.start_pos) for c in out.as_chunks()] == [("again #0", 12), ("again #1", 12)]
    assert sched.get("again #0").num_cached_tokens == 12
    run_to_end(sched, runner)
    assert _used(sched) == 0


def test_preempting_a_choice_frees_only_its_own_blocks():
    # 14 blocks of 4: an older request grows while the choices (newest) grow too.
    sched, runner = make_scheduler(num_blocks=14, block_size=4, max_seqs=4, enable_prefix_caching=False)
    old = make_req("old", [9] * 4, arrival=0.0, max_tokens=30)
    group = make_req("g", list(range(1, 10)), arrival=1.0, max_tokens=12, n=3, temperature=0.5, seed=11)
    sched.add(old)
    sched.add(group)
    seen = False
    while sched.has_unfinished():
        before = {c.request_id: list(c.block_table) for c in group.children}
        out, _ = step(sched, runner)
        for rid in out.preempted_ids:
            assert rid.startswith("g #")
            victim = sched.get(rid)
            assert victim.block_table == [] and victim.status is RequestStatus.PREEMPTED
            shared = before[rid][:2]
            holders = [c for c in group.children if c.block_table[:2] == shared]
            if holders:  # the siblings still hold the shared blocks (check_invariants: refs = holders)
                seen = True
                assert all(b not in sched.kv._free_plain for b in shared)
    assert seen and sched.num_preemptions > 0
    for child in group.children:
        assert child.output_token_ids == reference_tokens(child.prompt_token_ids, child.params)
    assert old.output_token_ids == reference_tokens(old.prompt_token_ids, old.params)
    assert _used(sched) == 0


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "forked", "one_choice_done"])
def test_abort_of_an_n_request_ends_every_choice_and_frees_every_block(when):
    sched, runner = make_scheduler(block_size=4, budget=8, enable_prefix_caching=False)
    group = make_req("g", list(range(1, 19)), max_tokens=6, n=3)
    sched.add(group)
    group.children[2].params = replace(group.children[2].params, max_tokens=1)
    steps = {"waiting": 0, "mid_prefill": 1, "forked": 3, "one_choice_done": 4}[when]
    for _ in range(steps):
        step(sched, runner)
    if when == "one_choice_done":
        assert group.children[2].is_finished and not group.children[0].is_finished
    assert _used(sched) > 0 or when == "waiting"
    assert sched.abort("g") is group
    assert group.status is RequestStatus.FINISHED and group.finish_reason is FinishReason.ABORT
    assert all(c.is_finished for c in group.children)
    assert _used(sched) == 0 and not sched.has_unfinished() and sched._reserved_seats == 0
    sched.kv.check_invariants()
    assert sched.abort("g") is None


def test_an_n_request_that_can_never_fit_is_refused_with_the_reason():
    sched, _ = make_scheduler(num_blocks=16, block_size=4, max_seqs=4)
    # One sequence fits (9 + 20 tokens: 8 blocks); three need 2 shared + 3 x 6 = 20 blocks.
    sched.add(make_req("one", list(range(1, 10)), max_tokens=20))
    with pytest.raises(RequestTooLongError, match=r"n=3 sequences of up to 29 tokens need 20 KV blocks") as e:
        sched.add(make_req("three", list(range(1, 10)), max_tokens=20, n=3))
    assert e.value.param == "n"
    with pytest.raises(InvalidRequestError, match="max_num_seqs 4") as e2:
        sched.add(make_req("wide", [1, 2], max_tokens=1, n=5))
    assert e2.value.param == "n"
    assert [r.request_id for r in sched.waiting] == ["one"]


def test_an_n_request_waits_for_seats_for_all_its_choices():
    sched, runner = make_scheduler(block_size=4, max_seqs=3)
    sched.add(make_req("a", [1, 2, 3], arrival=0.0, max_tokens=3))
    sched.add(make_req("g", list(range(5, 15)), arrival=1.0, max_tokens=2, n=3))
    sched.add(make_req("b", [4], arrival=2.0, max_tokens=2))
    out, _ = step(sched, runner)
    assert [c.request_id for c in out.as_chunks()] == ["a"]  # g needs 3 seats, b waits behind it
    emitted = run_to_end(sched, runner)
    assert set(emitted) == {"a", "b", "g #0", "g #1", "g #2"}
    for step_out in runner.steps:
        assert len(step_out.as_chunks()) <= 3


def test_the_id_of_a_forked_n_request_stays_in_use_until_it_ends():
    sched, runner = make_scheduler(block_size=4)
    sched.add(make_req("g", list(range(1, 11)), max_tokens=3, n=2))
    step(sched, runner)  # forked: "g" itself is no longer a running request
    assert sched.get("g") is None and sched.get("g #1") is not None
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add(make_req("g", [1, 2], max_tokens=1))
    with pytest.raises(InvalidRequestError, match="'g #1' is already in use"):
        sched.add(make_req("g #1", [1, 2], max_tokens=1))
    run_to_end(sched, runner)
    sched.add(make_req("g", [1, 2], max_tokens=1))


def test_every_decode_only_step_is_a_decode_batch_with_its_tokens():
    """schedule() (the synchronous path) builds a DecodeBatch whenever every request computes its
    last token: the tokens are known on the host, one row per request."""
    sched, runner = make_scheduler(budget=16)
    sched.add(make_req("a", [1, 2, 3], max_tokens=6))
    sched.add(make_req("b", [4, 5], arrival=1.0, max_tokens=6))
    out, _ = step(sched, runner)
    assert out.kind == "chunks"  # the prompts
    out = sched.schedule()
    assert out.kind == "decode" and out.num_batched_tokens == 2
    d = out.decode
    a, b = sched.get("a"), sched.get("b")
    assert d.request_ids == ("a", "b") and d.prev_rows is None
    assert d.token_ids.tolist() == [a.output_token_ids[-1], b.output_token_ids[-1]]
    assert d.positions.tolist() == [3, 2] and d.num_output_tokens.tolist() == [1, 1]
    sched.update(out, runner.run(out))
    sched.add(make_req("c", [6, 7, 8, 9], arrival=2.0, max_tokens=2))
    out = sched.schedule()  # an admission: chunks again
    assert out.kind == "chunks" and [c.num_tokens for c in out.chunks] == [1, 1, 4]
    sched.update(out, runner.run(out))
    c = sched.get("c")
    run_to_end(sched, runner)
    for req, prompt in ((a, [1, 2, 3]), (b, [4, 5]), (c, [6, 7, 8, 9])):
        assert req.output_token_ids == reference_tokens(prompt, req.params)
