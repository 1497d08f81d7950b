"""LLMEngine and AsyncEngine with injected components: a character tokenizer and fake
runners (no model), so every path is fast and deterministic. The real-model equivalence
lives in test_engine_exact.py."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from replica.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from replica.engine import AsyncEngine, LLMEngine, kv_cache_num_blocks
from replica.errors import EngineUnavailableError, InvalidRequestError, QueueFullError, RequestTooLongError
from replica.request import FinishReason, SamplingParams
from tests.replica.fakes import PagedFakeRunner, ScriptedRunner, reference_tokens

EOS = 3
VOCAB = 1000
BS = 4


class CharTokenizer:
    """One token per character (code points below VOCAB); id 3 is EOS."""

    eos_token_ids = frozenset({EOS})
    vocab_size = VOCAB

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids, *, skip_special_tokens: bool = False) -> str:
        return "".join(chr(t) for t in token_ids if not (skip_special_tokens and t == EOS))


def config(num_blocks=32, budget=32, max_seqs=4, max_waiting=64, max_model_len=128, async_=True) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="fake", max_model_len=max_model_len),
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks, watermark=0.0),
        scheduler=SchedulerConfig(
            max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_waiting=max_waiting, async_scheduling=async_
        ),
    )


def engine(runner=None, **kw) -> LLMEngine:
    return LLMEngine(config(**kw), runner=runner or PagedFakeRunner(BS, VOCAB), tokenizer=CharTokenizer())


GREEDY = dict(temperature=0.0, ignore_eos=True)


# ----- LLMEngine --------------------------------------------------------------------------


def test_an_injected_runner_must_match_the_cache_config():
    with pytest.raises(ValueError, match="block_size 4 differs from the runner's 8"):
        LLMEngine(config(), runner=PagedFakeRunner(8, VOCAB), tokenizer=CharTokenizer())
    small = PagedFakeRunner(BS, VOCAB)
    small.num_blocks = 16
    with pytest.raises(ValueError, match="num_blocks 32 exceeds the runner's 16 blocks"):
        LLMEngine(config(num_blocks=32), runner=small, tokenizer=CharTokenizer())
    assert LLMEngine(config(num_blocks=8), runner=small, tokenizer=CharTokenizer()).num_blocks == 8


def test_generate_returns_exact_outputs_in_order_under_pressure():
    eng = engine(num_blocks=12, budget=8, max_seqs=4, max_waiting=3)  # small cache, small queue
    prompts = [f"prompt {i} " * (1 + i % 3) for i in range(10)]
    params = [SamplingParams(max_tokens=2 + i, **GREEDY) for i in range(10)]
    outs = eng.generate(prompts, params, use_tqdm=True)
    tok = CharTokenizer()
    assert [o.prompt_token_ids for o in outs] == [tuple(tok.encode(p)) for p in prompts]
    for o, p in zip(outs, params, strict=True):
        assert list(o.token_ids) == reference_tokens(o.prompt_token_ids, p)
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
        assert o.finish_reason is FinishReason.LENGTH
        assert o.usage.prompt_tokens == len(o.prompt_token_ids) and o.usage.completion_tokens == p.max_tokens
    s = eng.stats()
    assert s.num_preemptions > 0  # the small cache forced some
    assert s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0
    assert s.generation_tokens_total == sum(p.max_tokens for p in params)
    assert s.prompt_tokens_total == sum(len(o.prompt_token_ids) for o in outs)
    assert s.tokens_per_s > 0 and s.num_steps > 0 and s.num_refused == 0


def test_generate_accepts_a_single_prompt_and_token_ids():
    eng = engine()
    (a,) = eng.generate("hello", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    (b,) = eng.generate([104, 101, 108, 108, 111], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert a.token_ids == b.token_ids and a.prompt_token_ids == b.prompt_token_ids


def test_generate_feeds_a_queue_that_refuses_direct_adds():
    eng = engine(max_waiting=0)
    with pytest.raises(QueueFullError):
        eng.add_request("x", "abc", SamplingParams(max_tokens=2))
    outs = eng.generate(["abc", "def", "ghi"], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [2, 2, 2]


def test_generate_refuses_before_any_work():
    eng = engine(max_model_len=32)
    with pytest.raises(RequestTooLongError):
        eng.generate(["ok", "x" * 40], SamplingParams(max_tokens=2), use_tqdm=False)
    assert eng.stats().num_steps == 0 and not eng.has_unfinished()


def test_stop_string_truncates_text_and_frees_blocks():
    runner = ScriptedRunner()
    eng = engine(runner)
    runner.script["r"] = [ord(c) for c in "hello world, and more"]
    eng.add_request("r", "say:", SamplingParams(max_tokens=20, stop=("wor",), **GREEDY))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    text = "".join(d.text for d in deltas)
    assert text == "hello "
    last = deltas[-1]
    assert last.finish_reason is FinishReason.STOP and last.usage.completion_tokens == len("hello wor")
    assert sum(len(d.token_ids) for d in deltas) == len("hello wor")  # nothing generated after the hit
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_stop_strings_wait_for_min_tokens_like_eos():
    runner = ScriptedRunner()
    eng = engine(runner)
    runner.script["early"] = [ord(c) for c in "abcbd"]
    runner.script["late"] = [ord(c) for c in "abcbd"]
    eng.add_request("early", "p", SamplingParams(max_tokens=5, stop=("b",), **GREEDY))
    eng.add_request("late", "p", SamplingParams(max_tokens=5, stop=("b",), min_tokens=2, **GREEDY))
    text, final = {}, {}
    while eng.has_unfinished():
        for d in eng.step():
            text[d.request_id] = text.get(d.request_id, "") + d.text
            if d.finished:
                final[d.request_id] = d
    assert text["early"] == "a" and final["early"].usage.completion_tokens == 2
    # The "b" of token 2 comes before min_tokens is passed; the "b" of token 4 stops it.
    assert text["late"] == "abc" and final["late"].usage.completion_tokens == 4
    assert final["late"].finish_reason is FinishReason.STOP


def test_eos_and_stop_token_end_without_adding_text():
    runner = ScriptedRunner()
    eng = engine(runner)
    runner.script["eos"] = [ord("a"), ord("b"), EOS, ord("c")]
    runner.script["tok"] = [ord("x"), ord("y"), ord("z")]
    runner.script["min"] = [EOS, ord("q"), EOS, ord("r")]
    eng.add_request("eos", "p", SamplingParams(max_tokens=10, temperature=0))
    eng.add_request("tok", "p", SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(ord("y"),)))
    eng.add_request("min", "p", SamplingParams(max_tokens=10, min_tokens=2, temperature=0))
    text, tokens, final = {}, {}, {}
    while eng.has_unfinished():
        for d in eng.step():
            text[d.request_id] = text.get(d.request_id, "") + d.text
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finished:
                final[d.request_id] = d
    assert text["eos"] == "ab" and tokens["eos"] == [97, 98, EOS] and final["eos"].finish_reason is FinishReason.STOP
    assert text["tok"] == "x" and tokens["tok"] == [120, 121] and final["tok"].finish_reason is FinishReason.STOP
    # min_tokens=2: the first EOS does not stop (and adds no text), the second one does.
    assert tokens["min"] == [EOS, 113, EOS] and text["min"] == "q"


def test_async_scheduling_gives_the_deltas_of_synchronous_steps():
    """Blind steps (launched before the previous step's tokens are known) must not change what
    anyone sees: EOS, stop tokens, stop strings, min_tokens, length and an abort mid-way."""
    scripts = {
        "eos": [ord(c) for c in "abcdef"] + [EOS] + [ord("z")] * 20,
        "stopstr": [ord(c) for c in "hello world, and more"],
        "stoptok": [ord(c) for c in "xyzxyz"],
        "min": [EOS, ord("q"), EOS, ord("r"), ord("s")],
        "length": [ord(c) for c in "lengthy-output-here"],
        "aborted": [ord("k")] * 30,
        "late": [ord(c) for c in "late arrival!"] + [EOS],
    }
    params = {
        "eos": SamplingParams(max_tokens=20, temperature=0),
        "stopstr": SamplingParams(max_tokens=20, stop=("wor",), **GREEDY),
        "stoptok": SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(ord("z"),)),
        "min": SamplingParams(max_tokens=10, min_tokens=2, temperature=0),
        "length": SamplingParams(max_tokens=9, **GREEDY),
        "aborted": SamplingParams(max_tokens=30, **GREEDY),
        "late": SamplingParams(max_tokens=30, temperature=0),
    }

    def run(async_: bool):
        runner = ScriptedRunner()
        runner.script.update(scripts)
        eng = LLMEngine(config(max_seqs=8, async_=async_), runner=runner, tokenizer=CharTokenizer())
        for rid in scripts:
            if rid != "late":
                eng.add_request(rid, "p" * (3 + len(rid)), params[rid])
        seen: dict[str, tuple] = {}
        steps = 0
        while eng.has_unfinished() or "late" not in seen:
            steps += 1
            if steps == 6:
                eng.abort("aborted")
            if steps == 9:
                eng.add_request("late", "later", params["late"])
                seen["late"] = ("", (), None, None)
            for d in eng.step():
                text, toks, _, _ = seen.get(d.request_id, ("", (), None, None))
                seen[d.request_id] = (text + d.text, toks + d.token_ids, d.finish_reason, d.usage)
        assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
        return seen, runner.blind_steps

    sync, blind_sync = run(False)
    asynchronous, blind = run(True)
    assert blind_sync == 0 and blind > 5
    # The abort comes after a number of calls, and async tokens arrive one call later: it
    # cuts "aborted" at another point. Everything else must be identical.
    for run_ in (sync, asynchronous):
        text, toks, reason, usage = run_.pop("aborted")
        assert reason is FinishReason.ABORT and 0 < len(toks) == usage.completion_tokens < 30
        assert text == "k" * len(toks)
    assert asynchronous == sync
    assert sync["stopstr"][0] == "hello " and sync["eos"][2] is FinishReason.STOP
    assert sync["late"][0] == "late arrival!"


def test_refusals_are_counted_and_disturb_nothing():
    eng = engine(max_waiting=1, max_model_len=32, max_seqs=1)
    eng.add_request("a", "aaaa", SamplingParams(max_tokens=4))
    eng.step()  # a runs
    eng.add_request("b", "bbbb", SamplingParams(max_tokens=4))  # b waits: max_num_seqs
    before = eng.stats()
    with pytest.raises(QueueFullError):
        eng.add_request("c", "cccc", SamplingParams(max_tokens=4))
    with pytest.raises(RequestTooLongError, match="maximum context length is 32"):
        eng.add_request("d", "d" * 40, SamplingParams(max_tokens=4))
    with pytest.raises(RequestTooLongError):
        eng.add_request("e", "e" * 10, SamplingParams(max_tokens=30))
    with pytest.raises(InvalidRequestError, match="token ids"):
        eng.add_request("f", [5, VOCAB + 1], SamplingParams(max_tokens=4))
    for not_ids in ([5, 6.7], ["5"], 5):
        with pytest.raises(InvalidRequestError, match="integer token ids"):
            eng.add_request("f", not_ids, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="at least one token"):
        eng.add_request("g", "", SamplingParams(max_tokens=4))
    after = eng.stats()
    assert after.num_refused == before.num_refused + 3
    assert (after.num_waiting, after.num_running, after.num_free_blocks) == (
        before.num_waiting,
        before.num_running,
        before.num_free_blocks,
    )


def test_abort_frees_at_once_and_reports_a_final_delta():
    eng = engine()
    eng.add_request("a", "abcdefghij", SamplingParams(max_tokens=50, **GREEDY))
    produced = 0
    while produced < 2:
        produced += sum(len(d.token_ids) for d in eng.step())
    assert eng.stats().num_free_blocks < eng.stats().num_total_blocks
    eng.abort("a")
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    eng.abort("a")  # twice: harmless
    (d,) = eng.step()
    assert d.finish_reason is FinishReason.ABORT and d.usage.completion_tokens == 2 and d.token_ids == ()
    assert not eng.has_unfinished()


def test_a_failed_step_keeps_an_aborts_final_delta():
    runner = FailingRunner(failures=0)
    eng = engine(runner)
    eng.add_request("a", "abc", SamplingParams(max_tokens=50, **GREEDY))
    eng.add_request("b", "abc", SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    eng.abort("a")
    runner.failures = 1
    with pytest.raises(RuntimeError, match="device fell over"):
        eng.step()
    finished = [d for d in eng.step() if d.finished]
    assert [(d.request_id, d.finish_reason) for d in finished] == [("a", FinishReason.ABORT)]


def test_last_scheduled_names_only_the_step_that_raised(monkeypatch):
    eng = engine(FailingRunner(failures=1))
    eng.add_request("a", "abc", SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError):
        for _ in range(2):  # with async scheduling the step runs when the next call collects it
            eng.step()
    assert eng.last_scheduled == ("a",)

    def broken_schedule():
        raise AssertionError("scheduler bug")

    monkeypatch.setattr(eng.scheduler, "schedule", broken_schedule)
    with pytest.raises(AssertionError):
        eng.step()
    assert eng.last_scheduled == ()  # not "a" again: nothing was scheduled by this step


def test_prefix_cache_counts_cached_tokens_and_exposes_hashes():
    eng = engine()
    shared = "the same long system prompt; "
    (a,) = eng.generate(shared + "q1", SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    (b,) = eng.generate(shared + "q2", SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert a.usage.cached_tokens == 0 and b.usage.cached_tokens == (len(shared) // BS) * BS
    assert list(b.token_ids) == reference_tokens(b.prompt_token_ids, SamplingParams(max_tokens=2, **GREEDY))
    from replica.prefix_hash import block_hashes

    assert set(block_hashes(b.prompt_token_ids, BS)) <= set(eng.cached_block_hashes())
    assert eng.stats().num_cached_blocks > 0 and eng.stats().cached_prompt_tokens_total == b.usage.cached_tokens


def test_kv_pool_size_from_memory_budget():
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    model = torch.nn.Linear(2, 2).to(torch.float32)
    model.config = hf
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block, kv heads, head dim, float32
    base = EngineConfig(cache=CacheConfig(block_size=16, cpu_cache_gib=per_block * 10 / 2**30))
    assert kv_cache_num_blocks(base, model, max_model_len=4096) == 10
    capped = EngineConfig(
        cache=CacheConfig(block_size=16, cpu_cache_gib=1.0), scheduler=SchedulerConfig(max_num_seqs=2)
    )
    assert kv_cache_num_blocks(capped, model, max_model_len=64) == 2 * 4
    fixed = EngineConfig(cache=CacheConfig(num_blocks=7))
    assert kv_cache_num_blocks(fixed, model, max_model_len=64) == 7
    tiny = EngineConfig(cache=CacheConfig(block_size=16, cpu_cache_gib=1e-9))
    with pytest.raises(ValueError, match="no room"):
        kv_cache_num_blocks(tiny, model, max_model_len=64)


# ----- AsyncEngine -----------------------------------------------------------------------


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


class FailingRunner(PagedFakeRunner):
    def __init__(self, failures: int) -> None:
        super().__init__(BS, VOCAB)
        self.failures = failures

    def run(self, out):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("device fell over")
        return super().run(out)


async def test_failed_step_errors_its_requests_and_engine_stays_usable():
    eng = AsyncEngine(config(), engine=engine(FailingRunner(failures=1)))
    deltas = await asyncio.wait_for(collect(eng.add_request("a", "abc", SamplingParams(max_tokens=4))), 10)
    assert deltas[-1].finish_reason is FinishReason.ERROR and "device fell over" in deltas[-1].error
    ok = await asyncio.wait_for(collect(eng.add_request("b", "abc", SamplingParams(max_tokens=4))), 10)
    assert ok[-1].finish_reason is FinishReason.LENGTH
    s = eng.stats()
    assert s.num_free_blocks == s.num_total_blocks
    await eng.shutdown()


class DetokenizerFailingAt:
    """Raises on its ``fail_at``-th ``add`` (e.g. a tokenizer bug on an odd token)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def add(self, token_ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("cannot decode")
        return "x", False

    def flush(self) -> str:
        return ""


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
    assert not inner._live and not inner.has_unfinished()
    s = eng.stats()
    assert s.num_free_blocks == s.num_total_blocks
    await eng.shutdown()


def test_a_detokenizer_failure_ends_only_its_own_request():
    eng = LLMEngine(
        config(),
        runner=PagedFakeRunner(BS, VOCAB),
        tokenizer=CharTokenizer(),
        detokenizer_factory=lambda tok, prompt, params: DetokenizerFailingAt(3 if prompt[0] == ord("b") else 0),
    )
    eng.add_request("a", "abc", SamplingParams(max_tokens=6, **GREEDY))
    eng.add_request("b", "bcd", SamplingParams(max_tokens=6, **GREEDY))
    final = {}
    while eng.has_unfinished():
        for d in eng.step():  # never raises: the failure is b's alone
            if d.finished:
                final[d.request_id] = d
    assert final["a"].finish_reason is FinishReason.LENGTH and final["a"].usage.completion_tokens == 6
    assert final["b"].finish_reason is FinishReason.ERROR and "cannot decode" in final["b"].error
    assert final["b"].usage.completion_tokens == 3
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


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


def test_warmup_leaves_no_trace_and_later_outputs_are_exact():
    eng = engine(num_blocks=64, budget=16, max_seqs=4, max_model_len=64)
    took = eng.warmup(num_decode=3)
    s = eng.stats()
    assert took >= 0 and not eng.has_unfinished()
    assert s.num_free_blocks == s.num_total_blocks and s.num_cached_blocks == 0
    assert s.num_steps == 0 and s.generation_tokens_total == 0 and s.prompt_tokens_total == 0
    (out,) = eng.generate(["hello"], SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert list(out.token_ids) == reference_tokens(out.prompt_token_ids, SamplingParams(max_tokens=5, **GREEDY))
    assert out.usage.cached_tokens == 0


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


# ----- n > 1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("async_", [True, False])
def test_n_choices_equal_single_requests_with_seed_plus_index(async_):
    eng = engine(async_=async_)
    prompt = "a prompt of some length"
    (group,) = eng.generate(prompt, SamplingParams(max_tokens=6, temperature=0.9, seed=3, n=3), use_tqdm=False)
    singles = eng.generate(
        [prompt] * 3, [SamplingParams(max_tokens=6, temperature=0.9, seed=3 + i) for i in range(3)], use_tqdm=False
    )
    assert [c.token_ids for c in group.choices] == [s.token_ids for s in singles]
    assert [c.text for c in group.choices] == [s.text for s in singles]
    assert [c.finish_reason for c in group.choices] == [s.finish_reason for s in singles]
    assert len({c.token_ids for c in group.choices}) == 3
    assert group.token_ids == group.choices[0].token_ids  # the top level is choice 0
    n_prompt = len(prompt)
    assert group.usage.prompt_tokens == n_prompt  # once, not 3 times
    assert group.usage.completion_tokens == sum(len(c.token_ids) for c in group.choices)
    s = eng.stats()
    assert s.prompt_tokens_total == 4 * n_prompt and s.num_free_blocks == s.num_total_blocks
    assert not eng.has_unfinished()


def test_n_choices_end_on_their_own_and_the_request_with_the_last():
    runner = ScriptedRunner()
    eng = engine(runner)
    a, b, x = ord("a"), ord("b"), ord("X")
    runner.script = {"g #0": [a, x, a, a, a], "g #1": [b] * 5, "g #2": [b, EOS]}
    eng.add_request("g", "prompt", SamplingParams(max_tokens=5, temperature=0.0, stop=("X",), n=3))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    assert {d.request_id for d in deltas} == {"g"} and [d.finished for d in deltas][-1]
    assert sum(d.finished for d in deltas) == 1
    assert all(d.text == "" and d.token_ids == () for d in deltas)
    texts, reasons = ["", "", ""], [None, None, None]
    for d in deltas:
        for c in d.choices:
            assert reasons[c.index] is None  # nothing after a choice's finish
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason
    assert texts == ["a", "bbbbb", "b"]
    assert reasons == [FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP]
    assert deltas[-1].usage.completion_tokens == 2 + 5 + 2 and deltas[-1].usage.prompt_tokens == 6
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_abort_of_an_n_request_ends_all_choices_and_frees_every_block():
    eng = engine()
    eng.add_request("g", "abcdefghij", SamplingParams(max_tokens=20, n=3, **GREEDY))
    produced = 0
    while produced < 6:
        produced += sum(d.num_tokens for d in eng.step())
    assert eng.stats().num_running == 3
    eng.abort("g")
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    (d,) = eng.step()
    assert d.finish_reason is FinishReason.ABORT and d.usage.completion_tokens == produced
    assert [(c.index, c.finish_reason) for c in d.choices] == [(i, FinishReason.ABORT) for i in range(3)]
    assert not eng.has_unfinished() and eng.unfinished_request_ids() == []


def test_a_choice_whose_output_fails_fails_its_whole_request():
    class Boom:
        def __init__(self, tokenizer, prompt, params):
            self.n = 0

        def add(self, token_ids):
            self.n += 1
            if self.n == 2:
                raise RuntimeError("broken tokenizer")
            return "t", False

        def flush(self):
            return ""

    eng = LLMEngine(config(), runner=PagedFakeRunner(BS, VOCAB), tokenizer=CharTokenizer(), detokenizer_factory=Boom)
    eng.add_request("g", "abcdefgh", SamplingParams(max_tokens=10, n=2, **GREEDY))
    eng.add_request("solo", "xyz", SamplingParams(max_tokens=3, **GREEDY))
    finals = {}
    while eng.has_unfinished():
        for d in eng.step():
            if d.finished:
                finals[d.request_id] = d
    assert finals["g"].finish_reason is FinishReason.ERROR and "broken tokenizer" in finals["g"].error
    assert finals["solo"].finish_reason is FinishReason.ERROR  # its own detokenizer fails too
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


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
