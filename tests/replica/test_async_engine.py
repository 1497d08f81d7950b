"""AsyncEngine over an LLMEngine with injected components (test_engine.py's character tokenizer
and fake runners): streams, refusals, aborts, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from replica.async_engine import AsyncEngine
from replica.engine import LLMEngine
from replica.errors import EngineUnavailableError, InvalidRequestError, QueueFullError, RequestTooLongError
from replica.request import FinishReason, SamplingParams
from tests.replica.fakes import PagedFakeRunner, reference_tokens
from tests.replica.test_engine import (
    BS,
    GREEDY,
    VOCAB,
    CharTokenizer,
    DetokenizerFailingAt,
    FailingRunner,
    config,
    engine,
)


async def collect(stream):
    deltas = [d async for d in stream]
    return deltas


async def test_async_streams_concurrent_requests():
    eng = AsyncEngine(config(num_blocks=16, budget=8), engine=engine(num_blocks=16, budget=8))
    await eng.start()
    params = [SamplingParams(max_tokens=3 + i, **GREEDY) for i in range(6)]
    prompts = [f"request {i} asks something" for i in range(6)]
    streams = [eng.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 30)
    tok = CharTokenizer()
    for prompt, sp, deltas in zip(prompts, params, results, strict=True):
        assert sum(1 for d in deltas if d.finished) == 1 and deltas[-1].finished
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == reference_tokens(tok.encode(prompt), sp)
        assert deltas[-1].usage.completion_tokens == sp.max_tokens
    s = eng.stats()
    assert s.generation_tokens_total == sum(p.max_tokens for p in params)
    await eng.shutdown()


class GatedRunner(PagedFakeRunner):
    """Blocks in ``run`` until released: lets a test hold the step thread mid-step."""

    def __init__(self) -> None:
        super().__init__(BS, VOCAB)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, out):
        self.entered.set()
        assert self.gate.wait(30)
        return super().run(out)


class HoldingRunner(PagedFakeRunner):
    """Runs ``free_steps`` steps, then blocks in ``run`` until released: a request stays
    unfinished while the test acts on its stream (streams coalesce queued deltas, so a fast
    engine could otherwise deliver a whole request in one or two items)."""

    def __init__(self, free_steps: int = 3) -> None:
        super().__init__(BS, VOCAB)
        self.free_steps = free_steps
        self.gate = threading.Event()

    def run(self, out):
        if self.free_steps <= 0:
            assert self.gate.wait(30)
        self.free_steps -= 1
        return super().run(out)


async def test_async_refusals_are_synchronous_and_distinct():
    runner = GatedRunner()
    eng = AsyncEngine(config(max_waiting=1, max_seqs=1), engine=engine(runner, max_waiting=1, max_seqs=1))
    a = eng.add_request("a", "aaaa", SamplingParams(max_tokens=2))
    await asyncio.to_thread(runner.entered.wait, 10)  # the step thread is inside run() with "a"
    b = eng.add_request("b", "bbbb", SamplingParams(max_tokens=2))  # fills the queue of 1
    with pytest.raises(QueueFullError):
        eng.add_request("c", "cccc", SamplingParams(max_tokens=2))
    with pytest.raises(RequestTooLongError):
        eng.add_request("d", "d" * 200, SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("a", "aaaa", SamplingParams(max_tokens=2))
    assert eng.stats().num_waiting == 1 and eng.stats().num_refused == 2
    runner.gate.set()
    da, db = await asyncio.wait_for(asyncio.gather(collect(a), collect(b)), 30)
    assert da[-1].finish_reason is FinishReason.LENGTH and db[-1].finish_reason is FinishReason.LENGTH
    await eng.shutdown()


async def test_submit_from_another_thread_streams_on_the_loop_and_refuses_as_submit_does():
    """The engine process's pipe reader submits from its own thread: same checks, same stream,
    deltas still delivered on the event loop."""
    eng = AsyncEngine(config(num_blocks=16, budget=8), engine=engine(num_blocks=16, budget=8))
    with pytest.raises(RuntimeError, match="started"):
        eng.submit_from_thread("early", "abc", SamplingParams(max_tokens=2), lambda d: None)
    await eng.start()
    loop_thread = threading.get_ident()
    deltas, threads = [], set()
    done = asyncio.Event()

    def on_delta(d):
        deltas.append(d)
        threads.add(threading.get_ident())
        if d.finished:
            done.set()

    sp = SamplingParams(max_tokens=4, **GREEDY)
    await asyncio.to_thread(eng.submit_from_thread, "t", "from a thread", sp, on_delta)
    with pytest.raises(RequestTooLongError):
        await asyncio.to_thread(eng.submit_from_thread, "long", "x" * 200, sp, on_delta)
    await asyncio.wait_for(done.wait(), 30)
    assert threads == {loop_thread}
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == reference_tokens(CharTokenizer().encode("from a thread"), sp)
    await eng.shutdown()


async def test_cancelled_consumer_aborts_and_frees_blocks():
    runner = HoldingRunner()
    eng = AsyncEngine(config(), engine=engine(runner))
    stream = eng.add_request("long", "x" * 20, SamplingParams(max_tokens=100, **GREEDY))
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert first.token_ids and not first.finished
    await stream.aclose()  # e.g. the HTTP client went away
    runner.gate.set()
    for _ in range(500):
        s = eng.stats()
        if s.num_running == 0 and s.num_free_blocks == s.num_total_blocks:
            break
        await asyncio.sleep(0.01)
    assert s.num_running == 0 and s.num_free_blocks == s.num_total_blocks
    assert s.generation_tokens_total < 100
    await eng.shutdown()


async def test_cancelled_task_aborts_the_request():
    runner = HoldingRunner()
    eng = AsyncEngine(config(), engine=engine(runner))
    stream = eng.add_request("long", "y" * 20, SamplingParams(max_tokens=100, **GREEDY))
    got = []

    async def consume():
        async for d in stream:
            got.append(d)

    task = asyncio.create_task(consume())
    while not got:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    runner.gate.set()
    for _ in range(500):
        if not eng.engine.has_unfinished() and eng.stats().num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    await eng.shutdown()


async def test_async_abort_ends_the_stream_with_abort():
    runner = GatedRunner()
    eng = AsyncEngine(config(), engine=engine(runner))
    stream = eng.add_request("a", "abc", SamplingParams(max_tokens=100, **GREEDY))
    await asyncio.to_thread(runner.entered.wait, 10)
    await eng.abort("a")
    runner.gate.set()
    deltas = await asyncio.wait_for(collect(stream), 10)
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert sum(len(d.token_ids) for d in deltas) < 100
    await eng.shutdown()


async def test_failed_step_errors_its_requests_and_engine_stays_usable():
    eng = AsyncEngine(config(), engine=engine(FailingRunner(failures=1)))
    deltas = await asyncio.wait_for(collect(eng.add_request("a", "abc", SamplingParams(max_tokens=4))), 10)
    assert deltas[-1].finish_reason is FinishReason.ERROR and "device fell over" in deltas[-1].error
    ok = await asyncio.wait_for(collect(eng.add_request("b", "abc", SamplingParams(max_tokens=4))), 10)
    assert ok[-1].finish_reason is FinishReason.LENGTH
    s = eng.stats()
    assert s.num_free_blocks == s.num_total_blocks
    await eng.shutdown()


async def test_a_request_finished_by_a_step_that_then_fails_still_ends_its_stream():
    # max_tokens=2: the second token finishes the request (its blocks are freed) and then
    # turning that token into text raises; the stream must end with ERROR, not wait forever.
    inner = LLMEngine(
        config(),
        runner=PagedFakeRunner(BS, VOCAB),
        tokenizer=CharTokenizer(),
        detokenizer_factory=lambda tok, prompt, stop: DetokenizerFailingAt(2),
    )
    eng = AsyncEngine(config(), engine=inner)
    deltas = await asyncio.wait_for(collect(eng.add_request("a", "abc", SamplingParams(max_tokens=2))), 10)
    assert deltas[-1].finish_reason is FinishReason.ERROR and "cannot decode" in deltas[-1].error
    assert not inner.output_processor.num_live and not inner.has_unfinished()
    s = eng.stats()
    assert s.num_free_blocks == s.num_total_blocks
    await eng.shutdown()


async def test_engine_that_keeps_failing_is_marked_dead():
    eng = AsyncEngine(config(), engine=engine(FailingRunner(failures=100)))
    for i in range(AsyncEngine._MAX_CONSECUTIVE_FAILURES):
        deltas = await asyncio.wait_for(collect(eng.add_request(f"r{i}", "abc", SamplingParams(max_tokens=4))), 10)
        assert deltas[-1].finish_reason is FinishReason.ERROR
    for _ in range(200):
        if eng.is_dead:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(EngineUnavailableError, match="failed"):
        eng.add_request("late", "abc", SamplingParams(max_tokens=4))
    await eng.shutdown(drain_timeout_s=1)


async def test_a_crashed_step_loop_ends_open_streams_and_refuses_new_requests(monkeypatch):
    runner = GatedRunner()
    eng = AsyncEngine(config(), engine=engine(runner))
    stream = eng.add_request("a", "abc", SamplingParams(max_tokens=100, **GREEDY))
    await asyncio.to_thread(runner.entered.wait, 10)

    def broken_abort(request_id):
        raise AssertionError("double free of block 0")

    monkeypatch.setattr(eng.engine, "abort", broken_abort)
    await eng.abort("a")  # the loop itself raises (not a step): nothing is left to deliver "a"'s end
    runner.gate.set()
    deltas = await asyncio.wait_for(collect(stream), 10)
    assert deltas[-1].finish_reason is FinishReason.ERROR and "step loop crashed" in deltas[-1].error
    with pytest.raises(EngineUnavailableError, match="failed"):
        eng.add_request("b", "abc", SamplingParams(max_tokens=4))
    await eng.shutdown(drain_timeout_s=1)


async def test_shutdown_drains_running_requests_and_refuses_new_ones():
    runner = GatedRunner()
    eng = AsyncEngine(config(), engine=engine(runner))
    stream = eng.add_request("a", "abc", SamplingParams(max_tokens=5, **GREEDY))
    consumer = asyncio.create_task(collect(stream))
    await asyncio.to_thread(runner.entered.wait, 10)
    shutdown = asyncio.create_task(eng.shutdown(drain_timeout_s=30))
    await asyncio.sleep(0.05)
    with pytest.raises(EngineUnavailableError, match="shutting down"):
        eng.add_request("b", "abc", SamplingParams(max_tokens=5))
    runner.gate.set()
    deltas = await asyncio.wait_for(consumer, 10)
    await asyncio.wait_for(shutdown, 10)
    assert deltas[-1].finish_reason is FinishReason.LENGTH and sum(len(d.token_ids) for d in deltas) == 5


async def test_shutdown_timeout_aborts_what_is_left():
    runner = HoldingRunner(free_steps=2)  # the request cannot finish before shutdown stops the loop
    eng = AsyncEngine(config(), engine=engine(runner))
    stream = eng.add_request("a", "abc", SamplingParams(max_tokens=120, **GREEDY))
    consumer = asyncio.create_task(collect(stream))
    shutdown = asyncio.create_task(eng.shutdown(drain_timeout_s=0.0))
    await asyncio.sleep(0.05)
    runner.gate.set()
    await asyncio.wait_for(shutdown, 10)
    deltas = await asyncio.wait_for(consumer, 10)
    assert deltas[-1].finish_reason is FinishReason.ABORT and sum(len(d.token_ids) for d in deltas) < 120
    assert eng.engine.stats().num_free_blocks == eng.engine.stats().num_total_blocks


async def test_async_stream_coalesces_deltas_a_slow_consumer_left_queued():
    runner = HoldingRunner(free_steps=1)
    eng = AsyncEngine(config(), engine=engine(runner))
    sp = SamplingParams(max_tokens=12, **GREEDY)
    stream = eng.add_request("slow", "coalesce me", sp)
    first = await asyncio.wait_for(stream.__anext__(), 10)  # the prefill step's token
    assert len(first.token_ids) == 1 and not first.finished
    runner.gate.set()
    for _ in range(1000):  # the consumer stalls until the engine has finished the request
        if eng.stats().num_running == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the last deliveries run on this loop
    rest = await asyncio.wait_for(collect(stream), 10)
    assert len(rest) == 1 and rest[0].finished  # everything queued came as one delta
    tokens = list(first.token_ids) + list(rest[0].token_ids)
    assert tokens == reference_tokens(CharTokenizer().encode("coalesce me"), sp)
    assert first.text + rest[0].text == CharTokenizer().decode(tokens)
    assert rest[0].usage.completion_tokens == 12
    await eng.shutdown()


class SlowRunner(PagedFakeRunner):
    """10 ms per step: the consumer keeps up, so only stream_interval batches tokens."""

    def run(self, out):
        threading.Event().wait(0.01)
        return super().run(out)


async def test_stream_interval_batches_tokens_but_not_the_first():
    eng = AsyncEngine(config(), engine=engine(SlowRunner(BS, VOCAB)))
    sp = SamplingParams(max_tokens=11, **GREEDY)
    plain = await asyncio.wait_for(collect(eng.add_request("a", "abc", sp)), 10)
    chunked = await asyncio.wait_for(collect(eng.add_request("b", "abc", sp, stream_interval=4)), 10)
    assert [t for d in chunked for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    assert "".join(d.text for d in chunked) == "".join(d.text for d in plain)
    sizes = [len(d.token_ids) for d in chunked]
    # First token alone, then items of at least 4 tokens; the last item holds the remainder.
    assert sizes[0] == 1 and all(s >= 4 for s in sizes[1:-1]) and sum(sizes) == 11 and len(sizes) <= 4
    assert chunked[-1].finished and chunked[-1].usage.completion_tokens == 11
    with pytest.raises(InvalidRequestError):
        eng.add_request("c", "abc", sp, stream_interval=0)
    await eng.shutdown()


async def test_async_stream_of_an_n_request():
    eng = AsyncEngine(config(), engine=engine())
    await eng.start()
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=9, n=2)
    deltas = await asyncio.wait_for(collect(eng.add_request("g", "hello there", params)), 30)
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1
    tokens = [[], []]
    for d in deltas:
        for c in d.choices:
            tokens[c.index] += c.token_ids
    tok = CharTokenizer()
    for i in range(2):
        assert tokens[i] == reference_tokens(tok.encode("hello there"), params.for_choice(i))
    assert deltas[-1].usage.completion_tokens == 10
    await eng.shutdown()
