"""AsyncScheduler: decode steps built blind while the previous step is on the device (schedule_next),
and the scheduler's update of a decode batch."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from replica.outputs import RunnerOutput
from replica.request import FinishReason, Request, SamplingParams
from tests.replica.fakes import make_req, make_scheduler, reference_tokens, step_async


def _drive(sched, runner, max_steps=5000):
    """Async steps to the end; returns (tokens per request, steps that were DecodeBatches)."""
    inflight, emitted, batches = None, defaultdict(list), 0
    for _ in range(max_steps):
        if not (sched.has_unfinished() or inflight is not None):
            return emitted, batches
        inflight, got = step_async(sched, runner, inflight)
        batches += inflight is not None and inflight[0].decode is not None
        for r in got:
            emitted[r.request_id].append(r.output_token_ids[-1])
    raise AssertionError("did not finish")


def test_steady_decode_runs_on_batches_and_stays_exact():
    """Blocks of 4 tokens: rows cross into new blocks every 4 steps (allocated by
    schedule_next), rows leave at different lengths, outputs match each request alone."""
    sched, runner = make_scheduler(num_blocks=96, block_size=4, budget=64, max_seqs=8)
    lens = [3, 9, 17, 30, 5, 12]
    for i, n in enumerate(lens):
        sched.add(make_req(f"r{i}", [i + 2, 5, 1, 8, 9][: 2 + i % 3], arrival=float(i), max_tokens=n))
    emitted, batches = _drive(sched, runner)
    assert batches > 20
    for i, n in enumerate(lens):
        prompt = [i + 2, 5, 1, 8, 9][: 2 + i % 3]
        assert emitted[f"r{i}"] == reference_tokens(
            prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        )
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_batch_update_stops_on_eos_stop_ids_min_tokens_and_a_full_context():
    sched, runner = make_scheduler(num_blocks=96, block_size=4, budget=64, max_seqs=8, max_model_len=45)
    eos = frozenset(range(0, 1000, 7))  # about one token in seven is an EOS
    sched.add(Request("eos", [1, 2], SamplingParams(max_tokens=40, temperature=0.0), eos_token_ids=eos))
    sched.add(
        Request(
            "min",
            [1, 2],
            SamplingParams(max_tokens=40, min_tokens=12, temperature=0.0),
            arrival_time=1.0,
            eos_token_ids=eos,
        )
    )
    sched.add(
        Request(
            "ids",
            [3, 4],
            SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=tuple(range(0, 1000, 5))),
            arrival_time=2.0,
        )
    )
    sched.add(
        Request("ctx", [5, 6, 7], SamplingParams(max_tokens=42, temperature=0.0, ignore_eos=True), arrival_time=3.0)
    )
    emitted, batches = _drive(sched, runner)
    assert batches > 0
    ref = {
        "eos": reference_tokens([1, 2], SamplingParams(max_tokens=40, temperature=0.0), eos=eos),
        "min": reference_tokens([1, 2], SamplingParams(max_tokens=40, min_tokens=12, temperature=0.0), eos=eos),
        "ids": reference_tokens(
            [3, 4],
            SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=tuple(range(0, 1000, 5))),
        ),
        "ctx": reference_tokens([5, 6, 7], SamplingParams(max_tokens=42, temperature=0.0, ignore_eos=True)),
    }
    assert dict(emitted) == ref
    assert len(emitted["ctx"]) == 42  # 3 prompt + 42 outputs fill max_model_len 45
    assert len(emitted["eos"]) < 40 and len(emitted["ids"]) < 40  # they did stop early
    assert len(emitted["min"]) >= 12


def _applied_prefill_and_its_blind_successor():
    """Request "a" prefilled and applied; returns the scheduler and the decode step launched
    blind after the prefill (not applied yet)."""
    sched, runner = make_scheduler()
    sched.add(make_req("a", [1, 2, 3], max_tokens=8))
    first = sched.schedule()
    nxt = sched.schedule_next(first)
    sched.update(first, runner.run(first))
    return sched, nxt


def test_batch_update_refuses_a_step_applied_twice_and_a_missing_token():
    sched, nxt = _applied_prefill_and_its_blind_successor()
    assert nxt is not None and nxt.decode is not None
    with pytest.raises(RuntimeError, match="no token for a"):
        sched.update(nxt, RunnerOutput({}))
    res = RunnerOutput(request_ids=("a",), token_ids=[5])
    sched.update(nxt, res)
    with pytest.raises(RuntimeError, match="chunk starts at 3"):
        sched.update(nxt, res)


def test_an_abort_between_steps_leaves_the_batch():
    sched, runner = make_scheduler()
    for i in range(3):
        sched.add(make_req(f"r{i}", [i + 1, 2], arrival=float(i), max_tokens=30))
    inflight, _ = step_async(sched, runner, None)
    inflight, _ = step_async(sched, runner, inflight)
    inflight, _ = step_async(sched, runner, inflight)
    assert inflight[0].decode is not None and len(inflight[0].decode) == 3
    sched.abort("r1")
    inflight, got = step_async(sched, runner, inflight)  # r1's row in flight is dropped by update
    assert "r1" not in {r.request_id for r in got}
    assert inflight[0].decode.request_ids == ("r0", "r2")
    _drive_from(sched, runner, inflight)
    assert sched.get("r1") is None and sched.kv.num_free_blocks == sched.kv.num_total_blocks


def _drive_from(sched, runner, inflight):
    while sched.has_unfinished() or inflight is not None:
        inflight, _ = step_async(sched, runner, inflight)


def test_a_waiting_request_ends_the_batch_and_a_full_pool_falls_back():
    sched, runner = make_scheduler(num_blocks=6, block_size=4, budget=64, max_seqs=8)
    reqs = {
        "a": make_req("a", [1, 2, 3], max_tokens=20),
        "b": make_req("b", [4, 5, 6], arrival=1.0, max_tokens=20),
        "c": make_req("c", [7], arrival=2.0, max_tokens=2),
    }
    sched.add(reqs["a"])
    sched.add(reqs["b"])
    inflight, _ = step_async(sched, runner, None)
    inflight, _ = step_async(sched, runner, inflight)
    assert inflight[0].decode is not None
    sched.add(reqs["c"])
    assert sched.schedule_next(inflight[0]) is None  # admission is the synchronous path's
    _drive_from(sched, runner, inflight)
    # 6 blocks of 4 cannot hold a and b at 23 tokens each: someone was preempted on the way.
    assert sched.num_preemptions > 0
    for rid, prompt, n in (("a", [1, 2, 3], 20), ("b", [4, 5, 6], 20), ("c", [7], 2)):
        assert reqs[rid].output_token_ids == reference_tokens(
            prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        )
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_finish_reason_is_length_for_rows_leaving_at_their_limit():
    sched, runner = make_scheduler()
    reqs = [make_req(f"r{i}", [i + 1], arrival=float(i), max_tokens=4 + i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    _drive(sched, runner)
    assert [r.finish_reason for r in reqs] == [FinishReason.LENGTH] * 3
    assert [len(r.output_token_ids) for r in reqs] == [4, 5, 6]


def test_batch_update_stores_plain_ints_whatever_the_runner_returns():
    sched, nxt = _applied_prefill_and_its_blind_successor()
    sched.update(nxt, RunnerOutput(request_ids=("a",), token_ids=np.array([5])))
    assert sched.get("a").output_token_ids[-1] == 5
    assert type(sched.get("a").output_token_ids[-1]) is int
