"""``LLMEngine``: the synchronous step loop (``AsyncEngine``, in ``async_engine.py``, runs it in
a background thread for a server).

A step is synchronous (``_step_sync``: ``scheduler.schedule()`` -> ``runner.run()`` ->
``scheduler.update()``) or, with async scheduling and a runner that can launch, pipelined
(``_step_pipelined``: the successor of the step on the device is launched before that step is
applied). The engine then turns new tokens into text deltas with a per-request incremental
detokenizer, which also finds stop strings.

An n > 1 request runs as n child requests in the scheduler (one per choice, see
``replica.scheduler``), each with its own detokenizer; its stream is still one stream of
``Delta``s under its own id, the choices' text in ``Delta.choices``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from replica.async_scheduler import AsyncScheduler
from replica.config import EngineConfig
from replica.errors import QueueFullError, RequestTooLongError
from replica.intake import RequestIntake
from replica.interfaces import Detokenizer, PipelinedRunner, Prompt, Runner
from replica.kv_sizing import scheduler_blocks
from replica.outputs import (
    ChoiceDelta,
    CompletionOutput,
    Delta,
    EngineStats,
    RunnerOutput,
    TokenLogprobs,
    Usage,
)
from replica.pending_step import PendingStep
from replica.request import FinishReason, Request, RequestStatus, SamplingParams
from replica.scheduler import Scheduler
from replica.step import SchedulerOutput

if TYPE_CHECKING:
    from replica.models import LoadedModel
    from replica.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Builds a NamedTuple from a full tuple of its fields: a Delta per request per step on the host's
# critical path, and the generated __new__ (a Python-level call filling defaults) costs ~2x more.
_new_tuple = tuple.__new__
_D = TypeVar("_D", Delta, ChoiceDelta)  # what carries a token's logprobs
_RATE_WINDOW_S = 10.0  # output tokens/s is measured over this recent window


def _default_detokenizer(tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> Detokenizer:
    from replica.detokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop, min_tokens=params.min_tokens)


class LLMEngine:
    """Synchronous engine: ``add_request`` then call ``step`` until ``has_unfinished`` is False.

    Components can be injected for tests: ``runner`` (an ``interfaces.Runner``),
    ``tokenizer`` and ``detokenizer_factory``; without them they come from ``loaded``
    (or ``replica.models.load_model(config.model)``).
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        loaded: LoadedModel | None = None,
        runner: Runner | None = None,
        tokenizer: Tokenizer | None = None,
        detokenizer_factory: Callable[[Any, Sequence[int], SamplingParams], Detokenizer] | None = None,
    ) -> None:
        self.config = config
        if loaded is None and (runner is None or tokenizer is None):
            from replica.tensor_parallel import load_engine_model

            loaded = load_engine_model(config)
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer  # type: ignore[union-attr]
        lens = [n for n in (config.model.max_model_len, getattr(loaded, "max_model_len", None)) if n]
        if not lens:
            raise ValueError("max_model_len is unknown: set ModelConfig.max_model_len")
        self.max_model_len = min(lens)
        if config.model.max_model_len and config.model.max_model_len > self.max_model_len:
            logger.warning(
                "max_model_len %d is above the model's %d: using %d",
                config.model.max_model_len,
                self.max_model_len,
                self.max_model_len,
            )
        self.model_name = config.model.served_name or (loaded.name if loaded is not None else config.model.model)
        self.block_size = config.cache.block_size
        warm_up = False
        if runner is None:
            from replica.runner_factory import build_runner

            assert loaded is not None
            built, self.max_model_len = build_runner(config, loaded, self.max_model_len, self.tokenizer.eos_token_ids)
            runner, warm_up = built, config.runner.warmup and built.device.type == "cuda"
        self.runner: Runner = runner
        self.num_blocks = scheduler_blocks(config.cache, runner)
        # Pipelined steps need a runner that can launch; only they use AsyncScheduler's successor.
        self._async = config.scheduler.async_scheduling and isinstance(runner, PipelinedRunner)
        self.scheduler = (AsyncScheduler if self._async else Scheduler)(
            config.scheduler, config.cache, num_blocks=self.num_blocks, max_model_len=self.max_model_len
        )
        self.intake = RequestIntake(self.tokenizer, runner.vocab_size, self.scheduler.admission)
        self._detokenizer_factory = detokenizer_factory or _default_detokenizer
        if detokenizer_factory is None and callable(getattr(self.tokenizer, "token_bytes", None)):
            # The byte-level detokenizer's table (~0.1-0.3 s once per tokenizer): now, not in the
            # first request's time to first token.
            self.tokenizer.token_bytes(skip_special_tokens=True)
        # Requests whose final delta has not been built yet, with their detokenizers (for an
        # n > 1 request: its choices', and the request itself in _groups).
        self._live: dict[str, tuple[Request, Detokenizer]] = {}
        self._groups: dict[str, Request] = {}
        self._pending: list[Delta] = []  # deltas of requests finished outside a step (abort)
        self._last_scheduled: tuple[str, ...] = ()
        # The launched step not yet applied: (its SchedulerOutput, its handle, its start time).
        self._inflight: tuple[SchedulerOutput, PendingStep, float] | None = None
        # counters
        self._num_steps = 0
        self._num_refused = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._rate: deque[tuple[float, int]] = deque()  # (step start, output tokens)
        if warm_up:
            logger.info("engine warm-up took %.2f s", self.warmup())

    # ----- requests ---------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """``intake.make``: tokenize and validate, raising InvalidRequestError / RequestTooLongError
        before any work. Touches no engine state besides the refusal counter (AsyncEngine calls
        it from the event loop)."""
        try:
            return self.intake.make(request_id, prompt, params)
        except RequestTooLongError:
            self._num_refused += 1
            raise

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request; raises an EngineError subclass (and changes nothing) on refusal."""
        self.add(self.make_request(request_id, prompt, params))

    def add(self, req: Request, *, enforce_queue_limit: bool = True) -> None:
        """Queue a request built by ``make_request``."""
        req.make_children()
        # Built first: a factory that raises must not leave a queued request without one.
        seqs = req.children or (req,)
        detoks = [self._detokenizer_factory(self.tokenizer, s.prompt_token_ids, s.params) for s in seqs]
        try:
            self.scheduler.add(req, enforce_queue_limit=enforce_queue_limit)
        except (QueueFullError, RequestTooLongError):
            self._num_refused += 1
            raise
        for seq, detok in zip(seqs, detoks):
            self._live[seq.request_id] = (seq, detok)
        if req.children:
            self._groups[req.request_id] = req

    def abort(self, request_id: str) -> None:
        """Finish a request now, wherever it is; its final delta comes with the next step."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._pending.append(self._final(req, "", ()))

    def discard(self, request_ids: Sequence[str]) -> None:
        """Abort these requests and drop their deltas not returned yet: for a caller that stops
        reading them (``offline.generate`` after an error)."""
        for rid in request_ids:
            self.abort(rid)
            self._forget(rid)  # one a failed step finished: no final delta will come
        gone = set(request_ids)
        self._pending = [d for d in self._pending if d.request_id not in gone]

    def fail_requests(self, request_ids: Sequence[str], error: str) -> list[Delta]:
        """Finish these requests with FinishReason.ERROR (after a failed step); returns their
        deltas. A request the failed step had already finished (its final delta never
        built) gets one too, so no stream waits for it forever."""
        deltas = []
        for rid in request_ids:
            live = self._live.get(rid)
            req = live[0] if live is not None else self._groups.get(rid)
            if req is None:
                continue
            if req.parent is not None:  # a choice failing fails its whole request, once
                req = req.parent
                if req.request_id not in self._groups:
                    continue
            if self.scheduler.finish(req.request_id, FinishReason.ERROR) is None:
                req.finish_reason = FinishReason.ERROR
            deltas.append(self._final(req, "", (), error=error))
        return deltas

    def unfinished_request_ids(self) -> list[str]:
        """Ids of the requests not finished (an n > 1 request's own id, not its choices')."""
        reqs = itertools.chain(self.scheduler.running, self.scheduler.waiting)
        return list(dict.fromkeys(r.request_id if r.parent is None else r.parent.request_id for r in reqs))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    # ----- one step -------------------------------------------------------------------

    def step(self) -> list[Delta]:
        """One engine step; returns the deltas it produced (with those of requests finished
        between steps, e.g. aborted): synchronous (``_step_sync``) or, with async scheduling,
        pipelined (``_step_pipelined``)."""
        started = time.monotonic()
        self._last_scheduled = ()  # a failing schedule() must not blame an earlier step's requests
        new = self._step_pipelined(started) if self._async else self._step_sync(started)
        self._last_scheduled = ()
        # Taken only now: a step that raises keeps them (e.g. an abort's final delta) for the next.
        deltas, self._pending = self._pending, []
        return deltas + new

    def _step_sync(self, started: float) -> list[Delta]:
        """schedule -> run -> apply: the step's tokens come out of this call."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self._last_scheduled = out.request_ids
        return self._apply(out, self.runner.run(out), started)

    def _step_pipelined(self, started: float) -> list[Delta]:
        """Apply the step launched by the previous call after launching its successor, so that
        the host work of applying it (update, detokenizing, deltas) overlaps the device computing
        the next one. Tokens thus come out one call after their step was launched.

        1. Nothing in flight: schedule a step and launch it; no tokens yet.
        2. Else launch the successor of the step in flight if the scheduler can build it without
           that step's tokens (``AsyncScheduler.schedule_next``); otherwise the next call
           starts over at 1.
        3. Wait for the step in flight and apply it.
        """
        runner = cast(PipelinedRunner, self.runner)
        prev, self._inflight = self._inflight, None
        if prev is None:
            out = self.scheduler.schedule()
            if not out.is_empty:
                self._last_scheduled = out.request_ids
                self._inflight = (out, runner.launch(out, None), started)
            return []
        out, handle, t0 = prev
        self._last_scheduled = out.request_ids
        nxt = cast(AsyncScheduler, self.scheduler).schedule_next(out)
        if nxt is not None:
            self._inflight = (nxt, runner.launch(nxt, handle), started)
            self._last_scheduled += nxt.request_ids
        return self._apply(out, handle.result(), t0)

    def _apply(self, out: SchedulerOutput, res: RunnerOutput, started: float) -> list[Delta]:
        if res.prompt_logprobs:
            self._store_prompt_logprobs(res.prompt_logprobs)
        got = self.scheduler.update(out, res)
        self._num_steps += 1
        self._generation_tokens_total += len(got)
        self._rate.append((started, len(got)))
        new: list[Delta] = []
        live = self._live
        finished = RequestStatus.FINISHED
        groups: dict[Request, list[ChoiceDelta]] | None = None  # n > 1 requests' choices this step
        logprobs = res.logprobs  # None unless a request of this step asked
        try:
            for req in got:
                try:
                    # A stop token (EOS, a stop id, a grammar's end) adds no text: nor logprobs.
                    silent = req.status is finished and req.finish_reason is FinishReason.STOP
                    asked = logprobs if req.params.logprobs is not None else None
                    parent = req.parent
                    if parent is not None:  # a choice of an n > 1 request
                        if parent.request_id in self._groups:  # else the request failed meanwhile
                            if groups is None:
                                groups = {}
                            c = self._choice_delta(req)
                            if asked is not None:
                                c = self._with_logprobs(req, c, None if silent else asked.get(req.request_id))
                            groups.setdefault(parent, []).append(c)
                        continue
                    if req.status is finished:
                        d = self._last_delta(req)
                    else:
                        # The common case, once per request per step: one more token of text.
                        rid = req.request_id
                        token = req.output_token_ids[-1]
                        text, hit = live[rid][1].add((token,))
                        if hit:  # a stop string
                            self.scheduler.finish(rid, FinishReason.STOP)
                            d = self._final(req, text, (token,))
                        else:
                            d = _new_tuple(Delta, (rid, text, (token,), None, None, None, (), None, None))
                    if asked is not None:
                        d = self._with_logprobs(req, d, None if silent else asked.get(req.request_id))
                    new.append(d)
                except Exception as e:  # this request's text failed (a tokenizer bug): only it ends
                    logger.exception("request %s: building its output failed", req.request_id)
                    new.append(self._fail_one(req, f"output decoding failed: {type(e).__name__}: {e}"))
            if groups is not None:
                new.extend(self._group_delta(p, cs) for p, cs in groups.items() if p.request_id in self._groups)
        except BaseException:
            self._pending.extend(new)  # final deltas already built must still go out
            raise
        return new

    def _choice_delta(self, req: Request) -> ChoiceDelta:
        """``req``'s (a choice's) token of this step as text; its last also ends its detokenizer."""
        token = req.output_token_ids[-1]
        if req.status is RequestStatus.FINISHED:
            text = self._last_text(req)
        else:
            text, hit = self._live[req.request_id][1].add((token,))
            if not hit:
                return _new_tuple(ChoiceDelta, (req.index, text, (token,), None, None, None))
            self.scheduler.finish(req.request_id, FinishReason.STOP)  # a stop string
        self._live.pop(req.request_id, None)
        return ChoiceDelta(req.index, text, (token,), req.finish_reason)

    def _group_delta(self, parent: Request, choices: list[ChoiceDelta]) -> Delta:
        """One delta of an n > 1 request: its choices' progress; the last once all finished."""
        if parent.status is RequestStatus.FINISHED:
            return self._group_final(parent, choices, None)
        return Delta(parent.request_id, "", (), None, None, None, tuple(choices))

    def _group_final(self, parent: Request, choices: list[ChoiceDelta], error: str | None) -> Delta:
        """The last delta of an n > 1 request: the choices not ended yet end with it (abort,
        error); the usage counts the prompt once and every choice's outputs."""
        self._groups.pop(parent.request_id, None)
        reason = parent.finish_reason
        assert reason is not None
        ended = {c.index for c in choices}
        for c in parent.children:
            if self._live.pop(c.request_id, None) is not None and c.index not in ended:
                choices.append(ChoiceDelta(c.index, "", (), c.finish_reason or reason))
        self._prompt_tokens_total += parent.num_prompt_tokens
        self._cached_prompt_tokens_total += parent.num_cached_tokens
        outputs = sum(c.num_output_tokens for c in parent.children)
        usage = Usage(parent.num_prompt_tokens, outputs, parent.num_cached_tokens)
        return Delta(parent.request_id, "", (), reason, usage, error, tuple(sorted(choices)))

    def _store_prompt_logprobs(self, found: dict[str, tuple[int, list[TokenLogprobs]]]) -> None:
        """Extend each request's prompt logprobs with a chunk's; positions it already has (a
        recompute after preemption) are skipped."""
        for rid, (first, entries) in found.items():
            live = self._live.get(rid)
            req = live[0] if live is not None else self._groups.get(rid)  # an n > 1 request before its fork
            have = req.prompt_logprobs if req is not None else None
            if have is not None and first <= len(have) < first + len(entries):
                have.extend(entries[len(have) - first :])

    @staticmethod
    def _with_logprobs(req: Request, d: _D, sampled: TokenLogprobs | None) -> _D:
        """``d`` with its token's logprobs (``sampled``; None for a stop token) and, with the
        first output token, the prompt's (a ``Delta``, or one choice's ``ChoiceDelta``)."""
        prompt = tuple(req.prompt_logprobs) if req.prompt_logprobs is not None and req.num_output_tokens == 1 else None
        return d._replace(logprobs=() if sampled is None else (sampled,), prompt_logprobs=prompt)

    def _fail_one(self, req: Request, error: str) -> Delta:
        if req.parent is not None:  # a choice failing fails its whole request
            req = req.parent
        self.scheduler.finish(req.request_id, FinishReason.ERROR)  # a no-op if this step finished it
        req.finish_reason = FinishReason.ERROR
        return self._final(req, "", (), error=error)

    def drop_inflight(self) -> None:
        """Forget a launched step without applying it (after a failure: its requests are
        failed or aborted by the caller). Waits for it, so no device work is left behind."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            try:
                prev[1].result()
            except Exception:
                logger.exception("a launched step failed while it was dropped")

    @property
    def last_scheduled(self) -> tuple[str, ...]:
        """Requests of a step that raised (empty after a step that completed)."""
        return self._last_scheduled

    def _last_delta(self, req: Request) -> Delta:
        """The delta of a request this step finished."""
        return self._final(req, self._last_text(req), (req.output_token_ids[-1],))

    def _last_text(self, req: Request) -> str:
        """The text of the last token of a request this step finished. A stop token (EOS or
        stop_token_ids) ends the output without adding text; a stop string in the last
        token's text wins over LENGTH."""
        token = req.output_token_ids[-1]
        detok = self._live[req.request_id][1]
        text, hit = detok.add(() if req.finish_reason is FinishReason.STOP else (token,))
        if hit:
            req.finish_reason = FinishReason.STOP
        else:
            text += detok.flush()
        return text

    def _final(self, req: Request, text: str, token_ids: tuple[int, ...], *, error: str | None = None) -> Delta:
        if req.children:  # an n > 1 request ended as a whole (abort, error)
            return self._group_final(req, [], error)
        if req.parent is not None:  # one choice ended outside a step
            self._live.pop(req.request_id, None)
            choice = ChoiceDelta(req.index, text, token_ids, req.finish_reason)
            if req.parent.status is RequestStatus.FINISHED:
                return self._group_final(req.parent, [choice], error)
            return Delta(req.parent.request_id, "", (), None, None, None, (choice,))
        self._live.pop(req.request_id, None)
        self._prompt_tokens_total += req.num_prompt_tokens
        self._cached_prompt_tokens_total += req.num_cached_tokens
        assert req.finish_reason is not None
        usage = Usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
        return Delta(req.request_id, text, token_ids, req.finish_reason, usage, error)

    def _forget(self, request_id: str) -> None:
        """Drop the output state of a request whose final delta will never be built."""
        parent = self._groups.pop(request_id, None)
        for seq in parent.children if parent is not None else ():
            self._live.pop(seq.request_id, None)
        self._live.pop(request_id, None)

    # ----- drivers (replica.offline) -----------------------------------------------------

    def warmup(self, num_decode: int = 8) -> float:
        """``offline.warmup``: throwaway requests through every step path; returns its seconds."""
        from replica.offline import warmup

        return warmup(self, num_decode)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[CompletionOutput]:
        """``offline.generate``: run a batch to completion; outputs in the order of ``prompts``."""
        from replica.offline import generate

        return generate(self, prompts, params, use_tqdm=use_tqdm)

    # ----- observability ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.intake.vocab_size

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_steps(self) -> int:
        """Steps applied so far (a launched step counts once its tokens were applied)."""
        return self._num_steps

    def record_refusal(self) -> None:
        """Count a request refused outside this engine (``AsyncEngine``'s queue bound)."""
        self._num_refused += 1

    def tokens_per_s(self) -> float:
        """Output tokens per second over the recent window (the step thread's: it trims it)."""
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - _RATE_WINDOW_S:
            self._rate.popleft()
        if not self._rate:
            return 0.0
        span = max(now - self._rate[0][0], 1e-6)
        return sum(n for _, n in self._rate) / span

    def reset_counters(self) -> None:
        """Forget what ran so far (after a warm-up): counters, rate window, prefix cache."""
        self.scheduler.kv.reset_prefix_cache()
        self._num_steps = self._prompt_tokens_total = self._generation_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._rate.clear()

    def stats(self) -> EngineStats:
        return self.build_stats(self.tokens_per_s())

    def build_stats(self, tokens_per_s: float) -> EngineStats:
        """Counters only (plain reads), so another thread may call it during a step."""
        kv = self.scheduler.kv
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_total_blocks,
            num_cached_blocks=kv.num_cached_blocks,
            block_size=self.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            num_refused=self._num_refused,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            cached_prompt_tokens_total=self._cached_prompt_tokens_total,
            tokens_per_s=tokens_per_s,
            num_steps=self._num_steps,
            max_model_len=self.max_model_len,
        )

    def cached_block_hashes(self, limit: int = 4096) -> list[int]:
        return self.scheduler.kv.cached_block_hashes(limit)

    def check_invariants(self) -> None:
        """Raise AssertionError if the KV cache's books are broken (after a failed step)."""
        self.scheduler.kv.check_invariants()

    @property
    def alive(self) -> bool:
        """False once the runner lost a tensor-parallel rank: no step can run any more."""
        return self.runner.alive

    def close(self) -> None:
        """Release what the runner holds beyond this process (tensor-parallel ranks)."""
        self.runner.close()
