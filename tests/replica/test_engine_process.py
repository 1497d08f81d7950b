"""replica/engine_process.py: the engine in a child process (spawned; tiny model on CPU)."""

from __future__ import annotations

import asyncio

import pytest

from replica.async_engine import AsyncEngine
from replica.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from replica.engine_process import ProcessEngine
from replica.errors import EngineUnavailableError, InvalidRequestError, RequestTooLongError
from replica.models import load_model
from replica.outputs import Delta
from replica.request import FinishReason, SamplingParams

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

CONFIG = EngineConfig(
    model=ModelConfig(model="tiny:llama", dtype="float32", device="cpu", max_model_len=256),
    cache=CacheConfig(num_blocks=64, block_size=16),
    scheduler=SchedulerConfig(max_num_seqs=4, max_waiting=8),
)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]


async def _run(engine, rid: str, prompt: list[int], max_tokens: int) -> list[Delta]:
    out: list[Delta] = []
    async for d in engine.add_request(
        rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    ):
        out.append(d)
    return out


@pytest.fixture(scope="module")
async def engine():
    e = ProcessEngine(CONFIG)
    await e.start()
    yield e
    await e.shutdown(drain_timeout_s=1)


async def test_same_tokens_as_the_in_process_engine(engine):
    local = AsyncEngine(CONFIG, loaded=load_model(CONFIG.model))
    await local.start()
    try:
        want = await asyncio.gather(*(_run(local, f"l{i}", p, 12) for i, p in enumerate(PROMPTS)))
    finally:
        await local.shutdown(drain_timeout_s=1)
    got = await asyncio.gather(*(_run(engine, f"p{i}", p, 12) for i, p in enumerate(PROMPTS)))
    for w, g in zip(want, got, strict=True):
        assert [t for d in g for t in d.token_ids] == [t for d in w for t in d.token_ids]
        assert "".join(d.text for d in g) == "".join(d.text for d in w)
        assert g[-1].finish_reason is FinishReason.LENGTH and g[-1].usage is not None
    await asyncio.sleep(0.5)  # stats arrive every STATS_PERIOD_S
    s = engine.stats()
    assert (
        s.num_running == 0 and s.num_free_blocks == s.num_total_blocks - s.num_cached_blocks
    ) or s.num_free_blocks > 0
    assert engine.max_model_len == 256 and engine.block_size == 16


async def test_refusals_are_typed_and_leave_nothing(engine):
    with pytest.raises(RequestTooLongError):
        await engine.submit_checked("long", list(range(1, 200)), SamplingParams(max_tokens=200), lambda d: None)
    assert "long" not in engine._sinks


async def test_an_abort_frees_the_request_in_the_child(engine):
    seen: list[Delta] = []
    await engine.submit_checked("a", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), seen.append)
    while not seen:
        await asyncio.sleep(0.01)
    engine.abort_nowait("a")
    await asyncio.sleep(1.0)
    s = engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0
    n = len(seen)
    await asyncio.sleep(0.3)
    assert len(seen) == n  # nothing more for an aborted request


async def test_a_dead_engine_process_ends_open_requests_and_refuses_new_ones():
    e = ProcessEngine(CONFIG)
    await e.start()
    seen: list[Delta] = []
    await e.submit_checked("x", [5, 6], SamplingParams(max_tokens=10_000 // 50, ignore_eos=True), seen.append)
    e._proc.kill()
    for _ in range(200):
        if e.is_dead:
            break
        await asyncio.sleep(0.05)
    assert e.is_dead
    assert seen and seen[-1].finish_reason is FinishReason.ERROR
    with pytest.raises(EngineUnavailableError):
        await e.submit_checked("y", [5], SamplingParams(max_tokens=2), seen.append)
    await e.shutdown(drain_timeout_s=0)


async def test_the_stream_form_honours_stream_interval(engine):
    items = [
        d
        async for d in engine.add_request(
            "si", [5, 6, 7], SamplingParams(max_tokens=13, ignore_eos=True, temperature=0.0), stream_interval=4
        )
    ]
    assert sum(len(d.token_ids) for d in items) == 13
    assert all(len(d.token_ids) >= 4 for d in items[1:-1])  # the first never waits; the last ends it


async def test_an_n_request_crosses_the_pipe_as_one_stream_of_choices(engine):
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=21, n=3)
    deltas = [d async for d in engine.add_request("g", [5, 6, 7, 8, 9], params)]
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1
    tokens: list[list[int]] = [[], [], []]
    for d in deltas:
        for c in d.choices:
            tokens[c.index] += c.token_ids
    for i in range(3):  # choice i is the single request with seed 21 + i
        single = [d async for d in engine.add_request(f"s{i}", [5, 6, 7, 8, 9], params.for_choice(i))]
        assert tokens[i] == [t for d in single for t in d.token_ids]
    assert deltas[-1].usage.prompt_tokens == 5 and deltas[-1].usage.completion_tokens == 18
    with pytest.raises(InvalidRequestError) as e:  # refused in the child, typed across the pipe
        await engine.submit_checked("wide", [5, 6, 7], SamplingParams(max_tokens=2, n=5), lambda d: None)
    assert e.value.param == "n" and "max_num_seqs 4" in e.value.message


async def test_logprobs_cross_the_pipe_coalesced(engine):
    """Prompt and output logprobs come through the child process intact, also merged by stream_interval."""
    params = SamplingParams(max_tokens=9, ignore_eos=True, temperature=0.0, logprobs=3, prompt_logprobs=2)
    local = AsyncEngine(CONFIG, loaded=load_model(CONFIG.model))
    await local.start()
    try:
        want = [d async for d in local.add_request("lw", PROMPTS[2], params)]
    finally:
        await local.shutdown(drain_timeout_s=1)
    got = [d async for d in engine.add_request("lp", PROMPTS[2], params, stream_interval=4)]
    assert len(got) < len(want)  # merged items carry several tokens' entries
    for items in (want, got):
        assert [len(d.logprobs) for d in items] == [len(d.token_ids) for d in items]
    flat = [e for d in got for e in d.logprobs]
    assert [e.token_id for e in flat] == [t for d in want for t in d.token_ids]
    assert [e.logprob for e in flat] == pytest.approx([e.logprob for d in want for e in d.logprobs], abs=1e-5)
    assert all(len(e.top_ids) == 3 for e in flat)
    (plp,) = [d.prompt_logprobs for d in got if d.prompt_logprobs is not None]
    assert plp[0] is None and len(plp) == len(PROMPTS[2]) and all(len(e.top_ids) == 2 for e in plp[1:])
