"""``LLMEngine``: requests in, deltas out, one ``step()`` at a time (``AsyncEngine``, in
``async_engine.py``, runs it in a background thread for a server).

A step is schedule -> run -> apply, synchronous (``_step_sync``: ``scheduler.schedule()`` ->
``runner.run()`` -> ``_apply``) or, with async scheduling and a runner that can launch,
pipelined (``_step_pipelined``: the successor of the step on the device is launched before that
step is applied). ``_apply`` is ``scheduler.update()`` (tokens appended, stop rule, blocks), then
one call into the ``OutputProcessor`` (``output_processor.py``), which owns every request's output
state (its detokenizer, which also finds stop strings; an n > 1 request's choices; prompt
logprobs) and turns the step's requests into ``Delta``s.

An n > 1 request runs as n child requests in the scheduler (one per choice, see
``replica.scheduler``); its stream is still one stream of ``Delta``s under its own id, the
choices' text in ``Delta.choices``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from replica.async_scheduler import AsyncScheduler
from replica.config import EngineConfig
from replica.errors import QueueFullError, RequestTooLongError
from replica.intake import RequestIntake
from replica.interfaces import PipelinedRunner, Prompt, Runner
from replica.kv_sizing import scheduler_blocks
from replica.output_processor import DetokenizerFactory, OutputProcessor
from replica.outputs import CompletionOutput, Delta, EngineStats, RunnerOutput
from replica.pending_step import PendingStep
from replica.request import Request, SamplingParams
from replica.scheduler import Scheduler
from replica.step import SchedulerOutput

if TYPE_CHECKING:
    from replica.models import LoadedModel
    from replica.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_RATE_WINDOW_S = 10.0  # output tokens/s is measured over this recent window


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
        detokenizer_factory: DetokenizerFactory | None = None,
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
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler.finish, detokenizer_factory)
        self._last_scheduled: tuple[str, ...] = ()
        # The launched step not yet applied: (its SchedulerOutput, its handle, its start time).
        self._inflight: tuple[SchedulerOutput, PendingStep, float] | None = None
        # counters
        self._num_steps = 0
        self._num_refused = 0
        self._generation_tokens_total = 0
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
        # Built first: a factory that raises must not leave a queued request without one.
        detoks = self.output_processor.detokenizers(req)
        try:
            self.scheduler.add(req, enforce_queue_limit=enforce_queue_limit)
        except (QueueFullError, RequestTooLongError):
            self._num_refused += 1
            raise
        self.output_processor.add(req, detoks)

    def abort(self, request_id: str) -> None:
        """Finish a request now, wherever it is; its final delta comes with the next step."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self.output_processor.aborted(req)

    def discard(self, request_ids: Sequence[str]) -> None:
        """Abort these requests and drop their deltas not returned yet: for a caller that stops
        reading them (``offline.generate`` after an error)."""
        for rid in request_ids:
            self.abort(rid)
        self.output_processor.discard(request_ids)

    def fail_requests(self, request_ids: Sequence[str], error: str) -> list[Delta]:
        """Finish these requests with FinishReason.ERROR after a failed step; returns their final
        deltas (``OutputProcessor.fail``)."""
        return self.output_processor.fail(request_ids, error)

    def unfinished_request_ids(self) -> list[str]:
        """Ids of the requests not finished (an n > 1 request's own id, not its choices')."""
        reqs = itertools.chain(self.scheduler.running, self.scheduler.waiting)
        return list(dict.fromkeys(r.request_id if r.parent is None else r.parent.request_id for r in reqs))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.output_processor.has_pending or self._inflight is not None

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
        return self.output_processor.take_pending() + new

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
        """update, then one call into the output processor for the step's deltas."""
        if res.prompt_logprobs:
            self.output_processor.store_prompt_logprobs(res.prompt_logprobs)
        got = self.scheduler.update(out, res)
        self._num_steps += 1
        self._generation_tokens_total += len(got)
        self._rate.append((started, len(got)))
        return self.output_processor.apply(got, res.logprobs)

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
        self._num_steps = self._generation_tokens_total = 0
        self.output_processor.reset_counters()
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
            prompt_tokens_total=self.output_processor.prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            cached_prompt_tokens_total=self.output_processor.cached_prompt_tokens_total,
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
