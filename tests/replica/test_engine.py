"""LLMEngine with injected components: a character tokenizer and fake runners (no model), so
every path is fast and deterministic. AsyncEngine's tests are in test_async_engine.py, the
real-model equivalence in test_engine_exact.py."""

from __future__ import annotations

import pytest

from replica.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from replica.engine import LLMEngine
from replica.errors import InvalidRequestError, QueueFullError, RequestTooLongError
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


class FailingRunner(PagedFakeRunner):
    def __init__(self, failures: int) -> None:
        super().__init__(BS, VOCAB)
        self.failures = failures

    def run(self, out):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("device fell over")
        return super().run(out)


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
