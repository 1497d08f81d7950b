"""AdmissionController and the scheduler's refusals: each a distinct, clear error raised
before any work, leaving everything else as it was."""

from __future__ import annotations

import pytest

from replica.admission import AdmissionController
from replica.config import CacheConfig, SchedulerConfig
from replica.errors import InvalidRequestError, QueueFullError, RequestTooLongError
from replica.kv_cache import KVCacheManager
from replica.outputs import RunnerOutput
from replica.request import Request, SamplingParams
from replica.scheduler import Scheduler


def make_req(rid: str, n_prompt: int, max_tokens: int = 4, arrival: float = 0.0) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival)


def controller(num_blocks=10, block_size=4, max_model_len=32, watermark=0.2) -> AdmissionController:
    return AdmissionController(KVCacheManager(num_blocks, block_size), max_model_len=max_model_len, watermark=watermark)


def test_fits_exactly_at_the_limits():
    ac = controller(num_blocks=10, block_size=4, max_model_len=32)
    ac.check_fits(make_req("a", 28, max_tokens=4))  # 32 == max_model_len
    ac = controller(num_blocks=5, block_size=4, max_model_len=100)
    ac.check_fits(make_req("a", 16, max_tokens=4))  # 20 == whole cache


def test_prompt_longer_than_context_is_refused_with_numbers():
    ac = controller(max_model_len=32)
    with pytest.raises(RequestTooLongError) as e:
        ac.check_fits(make_req("a", 40, max_tokens=1))
    msg = str(e.value)
    assert "32" in msg and "41" in msg and "40 in the prompt" in msg
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"


def test_max_tokens_beyond_context_is_refused():
    ac = controller(max_model_len=32)
    with pytest.raises(RequestTooLongError) as e:
        ac.check_fits(make_req("a", 20, max_tokens=13))
    assert "33" in str(e.value) and "13 for max_tokens" in str(e.value)
    assert e.value.param == "max_tokens"


def test_request_larger_than_the_whole_cache_is_refused():
    ac = controller(num_blocks=5, block_size=4, max_model_len=1000)
    with pytest.raises(RequestTooLongError, match=r"whole KV cache holds 20 tokens \(5 blocks of 4\)"):
        ac.check_fits(make_req("a", 17, max_tokens=4))


def test_can_start_keeps_a_watermark_unless_idle():
    ac = controller(num_blocks=10, watermark=0.2)  # 2 blocks of headroom
    assert ac.watermark_blocks == 2
    assert ac.can_start(8) and not ac.can_start(9)
    assert ac.can_start(10, idle=True) and not ac.can_start(11, idle=True)


def test_victim_is_the_newest_running_request():
    running = [make_req("a", 3, arrival=1.0), make_req("c", 3, arrival=3.0), make_req("b", 3, arrival=2.0)]
    assert AdmissionController.pick_victim(running).request_id == "c"
    tied = [make_req("x", 3, arrival=5.0), make_req("y", 3, arrival=5.0)]
    assert AdmissionController.pick_victim(tied).request_id == "y"
    with pytest.raises(ValueError):
        AdmissionController.pick_victim([])


def scheduler(max_waiting=2, num_blocks=8, max_model_len=64) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_waiting=max_waiting),
        CacheConfig(block_size=4, num_blocks=num_blocks),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
    )


def snapshot(s: Scheduler):
    return (
        [r.request_id for r in s.waiting],
        [r.request_id for r in s.running],
        s.kv.num_free_blocks,
        [(r.request_id, r.num_computed_tokens, tuple(r.block_table)) for r in s.running],
    )


def test_refusals_are_distinct_errors_and_disturb_nothing():
    s = scheduler(max_waiting=2, num_blocks=8, max_model_len=24)
    s.add(make_req("run", 6))
    out = s.schedule()
    s.update(out, _tokens(out))  # "run" is running and holds blocks
    s.add(make_req("w1", 5))
    s.add(make_req("w2", 5))
    before = snapshot(s)

    with pytest.raises(QueueFullError, match="2 of 2") as full:
        s.add(make_req("w3", 5))
    assert not isinstance(full.value, RequestTooLongError) and full.value.code == "queue_full"
    assert snapshot(s) == before

    with pytest.raises(RequestTooLongError, match="maximum context length is 24") as long_prompt:
        s.add(make_req("long", 30, max_tokens=1))
    assert not isinstance(long_prompt.value, QueueFullError)
    assert snapshot(s) == before

    with pytest.raises(RequestTooLongError, match="20 for max_tokens"):
        s.add(make_req("many", 5, max_tokens=20))
    assert snapshot(s) == before

    with pytest.raises(InvalidRequestError, match="already in use"):
        s.add(make_req("w1", 5))
    with pytest.raises(InvalidRequestError, match="at least one token"):
        s.add(make_req("empty", 0))
    assert snapshot(s) == before
    assert s.get("w3") is None and s.get("long") is None
    s.kv.check_invariants()


def test_a_waiting_request_starts_only_with_its_blocks_plus_watermark_free():
    s = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
        CacheConfig(block_size=4, num_blocks=10, watermark=0.2),
        num_blocks=10,
        max_model_len=64,
    )
    s.add(make_req("a", 20, max_tokens=8))  # 5 blocks
    s.add(make_req("b", 13, max_tokens=4))  # 4 blocks: 5 free - 4 < watermark 2
    out = s.schedule()
    assert [c.request_id for c in out.as_chunks()] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b"]
    s.update(out, _tokens(out))
    s.abort("a")
    out = s.schedule()
    assert [c.request_id for c in out.as_chunks()] == ["b"]


def test_watermark_is_waived_when_nothing_runs():
    s = Scheduler(
        SchedulerConfig(),
        CacheConfig(block_size=4, num_blocks=10, watermark=0.5),
        num_blocks=10,
        max_model_len=64,
    )
    s.add(make_req("big", 36, max_tokens=4))  # needs all 10 blocks eventually
    out = s.schedule()
    assert [c.request_id for c in out.as_chunks()] == ["big"]


def _tokens(out):
    return RunnerOutput({c.request_id: 7 for c in out.as_chunks() if c.sample})
