"""OutputProcessor on its own: a real scheduler and a scripted fake model produce the requests
of each step (``Scheduler.update``), the processor turns them into deltas; no LLMEngine. The
engine-level behaviour (the same paths through ``LLMEngine.step``) is in test_engine.py."""

from __future__ import annotations

import pytest

from replica.output_processor import OutputProcessor
from replica.outputs import Delta, TokenLogprobs
from replica.request import FinishReason, Request, RequestStatus
from tests.replica.fakes import ScriptedRunner, make_req, make_scheduler, step
from tests.replica.test_engine import CharTokenizer


class RecordingFinish:
    """The scheduler's ``finish``, recording each call and whether it finished anything."""

    def __init__(self, sched) -> None:
        self.sched = sched
        self.calls: list[tuple[str, FinishReason, bool]] = []

    def __call__(self, request_id: str, reason: FinishReason) -> Request | None:
        req = self.sched.finish(request_id, reason)
        self.calls.append((request_id, reason, req is not None))
        return req


class FailingDetokenizer:
    """Its ``fail_at``-th ``add`` raises ``error`` (a tokenizer bug); else one "x" per token."""

    def __init__(self, fail_at: int, error: BaseException | None = None) -> None:
        self.fail_at, self.error, self.calls = fail_at, error or ValueError("cannot decode"), 0

    def add(self, token_ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return "x" * len(token_ids), False

    def flush(self) -> str:
        return ""


def setup(detokenizer_factory=None):
    sched, _ = make_scheduler()
    runner = ScriptedRunner(block_size=4)
    finish = RecordingFinish(sched)
    return sched, runner, finish, OutputProcessor(CharTokenizer(), finish, detokenizer_factory)


def add(sched, proc: OutputProcessor, req: Request) -> None:
    detoks = proc.detokenizers(req)
    sched.add(req)
    proc.add(req, detoks)


def run(sched, runner, proc: OutputProcessor) -> list[Delta]:
    deltas: list[Delta] = []
    while sched.has_unfinished():
        _, got = step(sched, runner)
        deltas += proc.apply(got, None)
    return deltas


def all_free(sched) -> bool:
    sched.kv.check_invariants()
    return sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_a_stop_string_across_tokens_is_held_back_cut_and_finishes_the_request_once():
    sched, runner, finish, proc = setup()
    runner.script["r"] = [ord(c) for c in "abcdef"]
    runner.script["s"] = [ord(c) for c in "uvwxyz"]
    add(sched, proc, make_req("r", [5, 6, 7], max_tokens=6, stop=("bcd",)))
    add(sched, proc, make_req("s", [8, 9], max_tokens=3))
    deltas = run(sched, runner, proc)
    r = [d for d in deltas if d.request_id == "r"]
    assert [d.text for d in r] == ["a", "", "", ""]  # "b", "bc" held back: a stop string may start there
    assert [d.token_ids for d in r] == [(97,), (98,), (99,), (100,)]
    assert [d.finished for d in r] == [False, False, False, True]
    assert r[-1].finish_reason is FinishReason.STOP and r[-1].usage.completion_tokens == 4
    assert finish.calls == [("r", FinishReason.STOP, True)]  # nothing computed after the hit
    s = [d for d in deltas if d.request_id == "s"]
    assert "".join(d.text for d in s) == "uvw" and s[-1].finish_reason is FinishReason.LENGTH
    assert proc.num_live == 0 and all_free(sched)
    assert proc.prompt_tokens_total == 3 + 2


def test_n_choices_come_as_group_deltas_and_one_final_with_the_usage_of_all():
    sched, runner, finish, proc = setup()
    runner.script["g #0"] = [ord(c) for c in "aXa"]
    runner.script["g #1"] = [ord(c) for c in "bbbb"]
    prompt = list(range(10, 19))  # 9 tokens: two full shared blocks, then each choice its own
    add(sched, proc, make_req("g", prompt, max_tokens=4, stop=("X",), n=2))
    deltas = run(sched, runner, proc)
    assert {d.request_id for d in deltas} == {"g"}
    assert all(d.text == "" and d.token_ids == () for d in deltas)  # the text is in the choices
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    final = deltas[-1]
    texts, tokens, reasons = ["", ""], [0, 0], [None, None]
    for d in deltas:
        for c in d.choices:
            assert reasons[c.index] is None, "a choice gained something after its finish"
            texts[c.index] += c.text
            tokens[c.index] += len(c.token_ids)
            reasons[c.index] = c.finish_reason
    assert texts == ["a", "bbbb"] and tokens == [2, 4]
    assert reasons == [FinishReason.STOP, FinishReason.LENGTH]
    assert final.finish_reason is FinishReason.LENGTH  # the last choice's
    assert final.usage.prompt_tokens == 9 and final.usage.completion_tokens == 2 + 4
    assert proc.prompt_tokens_total == 9  # the prompt counted once, not per choice
    assert finish.calls == [("g #0", FinishReason.STOP, True)]
    assert proc.num_live == 0 and all_free(sched)


def test_a_failure_ends_only_its_request_and_frees_its_blocks_once():
    # "bad" fails on its 3rd token, the one that also reaches max_tokens: the scheduler has
    # already finished it (blocks freed), so failing it must not finish it again.
    sched, runner, finish, proc = setup(lambda tok, prompt, p: FailingDetokenizer(3 if prompt[0] == 1 else 0))
    runner.script["bad"] = [40, 41, 42]
    runner.script["ok"] = [50, 51, 52, 53, 54]
    add(sched, proc, make_req("bad", [1, 2], max_tokens=3))
    add(sched, proc, make_req("ok", [2, 2], max_tokens=5))
    deltas = run(sched, runner, proc)
    bad = [d for d in deltas if d.request_id == "bad"]
    assert [d.finished for d in bad] == [False, False, True]
    assert bad[-1].finish_reason is FinishReason.ERROR and "cannot decode" in bad[-1].error
    assert bad[-1].usage.completion_tokens == 3
    assert finish.calls == [("bad", FinishReason.ERROR, False)]  # finished by update already: freed once
    ok = [d for d in deltas if d.request_id == "ok"]
    assert "".join(d.text for d in ok) == "xxxxx" and ok[-1].finish_reason is FinishReason.LENGTH
    assert proc.fail(["bad"], "later") == []  # its final delta was built: never a second one
    assert proc.num_live == 0 and all_free(sched)


def test_choices_failing_in_one_step_fail_their_request_once():
    sched, runner, finish, proc = setup(lambda tok, prompt, p: FailingDetokenizer(2))
    runner.script["g #0"] = [60, 61, 62, 63]
    runner.script["g #1"] = [70, 71, 72, 73]
    add(sched, proc, make_req("g", list(range(10, 19)), max_tokens=4, n=2))
    deltas = run(sched, runner, proc)
    finals = [d for d in deltas if d.finished]
    assert len(finals) == 1 and finals[0] is deltas[-1]
    assert finals[0].finish_reason is FinishReason.ERROR and "cannot decode" in finals[0].error
    assert sorted(c.finish_reason for c in finals[0].choices) == [FinishReason.ERROR] * 2
    assert finish.calls == [("g", FinishReason.ERROR, True)]  # the request as a whole, once
    assert proc.num_live == 0 and all_free(sched)


def test_prompt_logprobs_fill_chunk_by_chunk_and_go_out_once_with_the_first_token():
    proc = OutputProcessor(CharTokenizer(), lambda rid, reason: pytest.fail("nothing may finish here"))
    req = make_req("r", [5, 6, 7, 8], max_tokens=3, logprobs=1, prompt_logprobs=1)
    req.prompt_logprobs = [None]  # as RequestIntake sets it: nothing predicts the first token
    proc.add(req, proc.detokenizers(req))
    lp = [TokenLogprobs(t, -0.5 * t, (t,), (-0.5 * t,)) for t in range(10)]
    proc.store_prompt_logprobs({"r": (1, [lp[6], lp[7]])})
    proc.store_prompt_logprobs({"r": (1, [lp[6], lp[7]])})  # a recompute after preemption: kept once
    proc.store_prompt_logprobs({"other": (1, [lp[1]])})  # a request it does not know: ignored
    proc.store_prompt_logprobs({"r": (4, [lp[9]])})  # past what it has (a gap): not taken
    proc.store_prompt_logprobs({"r": (3, [lp[8]])})
    req.status = RequestStatus.RUNNING

    def token(t: int) -> Delta:
        req.output_token_ids.append(t)
        (d,) = proc.apply([req], {"r": lp[t]})
        return d

    first, second = token(1), token(2)
    assert first.prompt_logprobs == (None, lp[6], lp[7], lp[8]) and first.logprobs == (lp[1],)
    assert second.prompt_logprobs is None and second.logprobs == (lp[2],)
    req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.STOP  # a stop token: no text
    last = token(3)
    assert last.finish_reason is FinishReason.STOP and last.logprobs == () and last.text == ""
    assert (first.text, second.text) == ("\x01", "\x02")
    assert proc.num_live == 0


def test_an_abort_between_steps_queues_one_final_delta_and_discard_drops_it():
    sched, runner, finish, proc = setup()
    runner.script["a"] = [65] * 8
    runner.script["b"] = [66] * 8
    add(sched, proc, make_req("a", [1, 2, 3], max_tokens=8))
    add(sched, proc, make_req("b", [1, 2, 4], max_tokens=8))
    _, got = step(sched, runner)
    assert [d.text for d in proc.apply(got, None)] == ["A", "B"]
    for rid in ("a", "b"):
        proc.aborted(sched.abort(rid))
    assert proc.has_pending and proc.num_live == 0 and all_free(sched)
    assert finish.calls == []  # the scheduler finished them; the processor only built their deltas
    proc.discard(["b"])
    (a,) = proc.take_pending()
    assert a.request_id == "a" and a.finish_reason is FinishReason.ABORT and a.usage.completion_tokens == 1
    assert not proc.has_pending and proc.take_pending() == []


def test_deltas_built_before_an_interrupt_stay_pending():
    # An exception that is not one request's own failure (KeyboardInterrupt) propagates; the
    # final delta "a" got earlier in the step must still go out.
    sched, runner, _, proc = setup(
        lambda tok, prompt, p: FailingDetokenizer(2 if prompt[0] == 2 else 0, KeyboardInterrupt())
    )
    runner.script["a"] = [65, 65]
    runner.script["b"] = [66, 66, 66]
    add(sched, proc, make_req("a", [1, 1], max_tokens=2))
    add(sched, proc, make_req("b", [2, 2], max_tokens=3))
    _, got = step(sched, runner)
    assert len(proc.apply(got, None)) == 2 and not proc.has_pending
    _, got = step(sched, runner)
    assert [r.request_id for r in got] == ["a", "b"]
    with pytest.raises(KeyboardInterrupt):
        proc.apply(got, None)
    (a,) = proc.take_pending()
    assert a.request_id == "a" and a.finish_reason is FinishReason.LENGTH and a.usage.completion_tokens == 2
