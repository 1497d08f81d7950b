"""``LLMEngine``: requests in, deltas out, one ``step()`` at a time (``AsyncEngine``, in
``async_engine.py``, drives it from a background thread).

One step is three verbs: ``scheduler.schedule()`` -> ``runner.run()`` ->
``scheduler.update()``; the engine then turns new tokens into text deltas with a
per-request incremental detokenizer, which also finds stop strings.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from replica.async_scheduler import AsyncScheduler
from replica.config import EngineConfig
from replica.errors import InvalidRequestError, QueueFullError, RequestTooLongError
from replica.interfaces import Detokenizer, Prompt, Runner
from replica.outputs import CompletionOutput, Delta, EngineStats, RunnerOutput, Usage
from replica.pending_step import PendingStep
from replica.request import FinishReason, Request, RequestStatus, SamplingParams
from replica.scheduler import Scheduler
from replica.step import SchedulerOutput

if TYPE_CHECKING:
    from replica.model_runner import ModelRunner
    from replica.models import LoadedModel
    from replica.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Builds a NamedTuple from a full tuple of its fields: a Delta per request per step on the host's
# critical path, and the generated __new__ (a Python-level call filling defaults) costs ~2x more.
_new_tuple = tuple.__new__
_RATE_WINDOW_S = 10.0  # output tokens/s is measured over this recent window


class InflightStep(NamedTuple):
    """A launched step not applied yet (the pipelined step)."""

    out: SchedulerOutput
    handle: PendingStep
    started: float  # when the engine step that launched it began


def _default_detokenizer(tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> Detokenizer:
    from replica.tokenizer import IncrementalDetokenizer

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
            from replica.models import load_model

            loaded = load_model(config.model)
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
        built_runner = runner is None
        if runner is None:
            assert loaded is not None
            built = self._build_runner(loaded)
            runner, num_blocks = built, built.num_blocks
        else:
            num_blocks = _injected_num_blocks(config, runner)
        self.runner: Runner = runner
        self.num_blocks: int = num_blocks
        self.vocab_size = int(runner.vocab_size or self.tokenizer.vocab_size)
        self._async = config.scheduler.async_scheduling
        scheduler_cls = AsyncScheduler if self._async else Scheduler
        self.scheduler = scheduler_cls(
            config.scheduler, config.cache, num_blocks=num_blocks, max_model_len=self.max_model_len
        )
        self._detokenizer_factory = detokenizer_factory or _default_detokenizer
        if detokenizer_factory is None and callable(getattr(self.tokenizer, "token_bytes", None)):
            # The byte-level detokenizer's table (~0.1-0.3 s once per tokenizer): now, not in the
            # first request's time to first token.
            self.tokenizer.token_bytes(skip_special_tokens=True)
        # Requests whose final delta has not been built yet, with their detokenizers.
        self._live: dict[str, tuple[Request, Detokenizer]] = {}
        self._pending: list[Delta] = []  # deltas of requests finished outside a step (abort)
        self._last_scheduled: tuple[str, ...] = ()
        self._inflight: InflightStep | None = None  # the launched step not applied yet
        # counters
        self._num_steps = 0
        self._num_refused = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._rate: deque[tuple[float, int]] = deque()  # (step start, output tokens)
        if built_runner and config.runner.warmup and runner.device.type == "cuda":
            logger.info("engine warm-up took %.2f s", self.warmup())

    def _build_runner(self, loaded: LoadedModel) -> ModelRunner:
        """The real runner for ``loaded``, after refusing (before any request) what the paged
        path cannot serve exactly (``model_check``); may lower ``max_model_len``."""
        from replica.model_check import dry_run, inspect_model
        from replica.model_runner import ModelRunner, kv_cache_num_blocks

        config = self.config
        verdict = inspect_model(loaded.model)
        self.max_model_len = verdict.cap(self.max_model_len, config.scheduler.max_num_batched_tokens)
        runner = ModelRunner(
            loaded.model,
            config.cache,
            config.runner,
            kv_cache_num_blocks(config, loaded.model, self.max_model_len),
            seed=config.model.seed,
            eos_token_ids=self.tokenizer.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        dry_run(runner)
        return runner

    # ----- requests ---------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """Tokenize and validate, raising InvalidRequestError / RequestTooLongError before
        any work. Touches no engine state besides the refusal counter (thread-safe enough
        for AsyncEngine to call it from the event loop)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                # operator.index, not int(): a float or a numeric string is not a token id.
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise InvalidRequestError(
                    "prompt must be a string or a list of integer token ids", param="prompt"
                ) from None
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self.vocab_size}), got {bad[0]}", param="prompt"
                )
        if not ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            arrival_time=time.monotonic(),
            eos_token_ids=frozenset(self.tokenizer.eos_token_ids),
        )
        try:
            self.scheduler.admission.check_fits(req)
        except RequestTooLongError:
            self._num_refused += 1
            raise
        return req

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request; raises an EngineError subclass (and changes nothing) on refusal."""
        self.add(self.make_request(request_id, prompt, params))

    def add(self, req: Request, *, enforce_queue_limit: bool = True) -> None:
        """Queue a request built by ``make_request``."""
        # Built first: a factory that raises must not leave a queued request without one.
        detok = self._detokenizer_factory(self.tokenizer, req.prompt_token_ids, req.params)
        try:
            self.scheduler.add(req, enforce_queue_limit=enforce_queue_limit)
        except (QueueFullError, RequestTooLongError):
            self._num_refused += 1
            raise
        self._live[req.request_id] = (req, detok)

    def abort(self, request_id: str) -> None:
        """Finish a request now, wherever it is; its final delta comes with the next step."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._pending.append(self._final(req, "", ()))

    def fail_requests(self, request_ids: Sequence[str], error: str) -> list[Delta]:
        """Finish these requests with FinishReason.ERROR (after a failed step); returns their
        deltas. A request the failed step had already finished (its final delta never
        built) gets one too, so no stream waits for it forever."""
        deltas = []
        for rid in request_ids:
            live = self._live.get(rid)
            if live is None:
                continue
            req = live[0]
            if self.scheduler.finish(rid, FinishReason.ERROR) is None:
                req.finish_reason = FinishReason.ERROR
            deltas.append(self._final(req, "", (), error=error))
        return deltas

    def unfinished_request_ids(self) -> list[str]:
        return [r.request_id for r in itertools.chain(self.scheduler.running, self.scheduler.waiting)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    # ----- one step -------------------------------------------------------------------

    def step(self) -> list[Delta]:
        """One engine step; returns the deltas it produced (with those of requests finished
        between steps, e.g. aborted). Synchronous (``_step_sync``) or, with async scheduling,
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
        """Apply the step launched by the previous call after launching its successor, so the
        host work of applying it (update, detokenizing, deltas) overlaps the device computing
        the next one. Tokens thus come out one call after their step was launched.

        1. Nothing in flight: schedule a step, launch it, return (no tokens yet).
        2. Else launch the successor of the step in flight, if the scheduler can build it
           without that step's tokens (``schedule_next``); otherwise the next call starts over
           at 1, after this one applied everything.
        3. Wait for the step in flight and apply it.
        """
        prev, self._inflight = self._inflight, None
        if prev is None:
            out = self.scheduler.schedule()
            if not out.is_empty:
                self._last_scheduled = out.request_ids
                self._inflight = InflightStep(out, self.runner.launch(out, None), started)
            return []
        self._last_scheduled = prev.out.request_ids
        nxt = cast(AsyncScheduler, self.scheduler).schedule_next(prev.out)
        if nxt is not None:
            self._inflight = InflightStep(nxt, self.runner.launch(nxt, prev.handle), started)
            self._last_scheduled += nxt.request_ids
        return self._apply(prev.out, prev.handle.result(), prev.started)

    def _apply(self, out: SchedulerOutput, res: RunnerOutput, started: float) -> list[Delta]:
        got = self.scheduler.update(out, res)
        self._num_steps += 1
        self._generation_tokens_total += len(got)
        self._rate.append((started, len(got)))
        new: list[Delta] = []
        live = self._live
        finished = RequestStatus.FINISHED
        try:
            for req in got:
                try:
                    if req.status is finished:
                        new.append(self._last_delta(req))
                        continue
                    # The common case, once per request per step: one more token of text.
                    rid = req.request_id
                    token = req.output_token_ids[-1]
                    text, hit = live[rid][1].add((token,))
                    if hit:  # a stop string
                        self.scheduler.finish(rid, FinishReason.STOP)
                        new.append(self._final(req, text, (token,)))
                    else:
                        new.append(_new_tuple(Delta, (rid, text, (token,), None, None, None)))
                except Exception as e:  # this request's text failed (a tokenizer bug): only it ends
                    logger.exception("request %s: building its output failed", req.request_id)
                    new.append(self._fail_one(req, f"output decoding failed: {type(e).__name__}: {e}"))
        except BaseException:
            self._pending.extend(new)  # final deltas already built must still go out
            raise
        return new

    def _fail_one(self, req: Request, error: str) -> Delta:
        self.scheduler.finish(req.request_id, FinishReason.ERROR)  # a no-op if this step finished it
        req.finish_reason = FinishReason.ERROR
        return self._final(req, "", (), error=error)

    def drop_inflight(self) -> None:
        """Forget a launched step without applying it (after a failure: its requests are
        failed or aborted by the caller). Waits for it, so no device work is left behind."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            try:
                prev.handle.result()
            except Exception:
                logger.exception("a launched step failed while it was dropped")

    @property
    def last_scheduled(self) -> tuple[str, ...]:
        """Requests of a step that raised (empty after a step that completed)."""
        return self._last_scheduled

    def _last_delta(self, req: Request) -> Delta:
        """The delta of a request this step finished. A stop token (EOS or stop_token_ids)
        ends the output without adding text; a stop string in the last token's text wins
        over LENGTH."""
        token = req.output_token_ids[-1]
        detok = self._live[req.request_id][1]
        text, hit = detok.add(() if req.finish_reason is FinishReason.STOP else (token,))
        if hit:
            req.finish_reason = FinishReason.STOP
        else:
            text += detok.flush()
        return self._final(req, text, (token,))

    def _final(self, req: Request, text: str, token_ids: tuple[int, ...], *, error: str | None = None) -> Delta:
        self._live.pop(req.request_id, None)
        self._prompt_tokens_total += req.num_prompt_tokens
        self._cached_prompt_tokens_total += req.num_cached_tokens
        assert req.finish_reason is not None
        usage = Usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
        return Delta(req.request_id, text, token_ids, req.finish_reason, usage, error)

    # ----- drivers (replica/offline.py) ----------------------------------------------------

    def warmup(self, num_decode: int = 8) -> float:
        """See ``offline.warmup``: throwaway requests through every path, then no trace left."""
        from replica.offline import warmup

        return warmup(self, num_decode)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[CompletionOutput]:
        """See ``offline.generate``: a batch to completion, outputs in the order of ``prompts``."""
        from replica.offline import generate

        return generate(self, prompts, params, use_tqdm=use_tqdm)

    def discard(self, request_ids: Collection[str]) -> None:
        """Abort these requests and drop every delta of theirs not returned yet (a caller giving
        up on them, e.g. ``generate`` after an error). Requests already finished are left be."""
        for rid in request_ids:
            self.abort(rid)
            self._live.pop(rid, None)  # one a failed step finished: no delta will come
        ids = set(request_ids)
        self._pending = [d for d in self._pending if d.request_id not in ids]

    def reset_counters(self) -> None:
        """Forget the counters, the rate window and the prefix cache (after a warm-up)."""
        self.scheduler.kv.reset_prefix_cache()
        self._num_steps = self._prompt_tokens_total = self._generation_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._rate.clear()

    # ----- observability ----------------------------------------------------------------

    def record_refusal(self) -> None:
        """Count a request refused outside ``make_request`` / ``add`` (AsyncEngine's queue bound)."""
        self._num_refused += 1

    @property
    def num_steps(self) -> int:
        """Steps applied so far (a pipelined step counts when its tokens are applied)."""
        return self._num_steps

    def tokens_per_s(self) -> float:
        """Output tokens per second over the recent window (step thread only: it trims it)."""
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - _RATE_WINDOW_S:
            self._rate.popleft()
        if not self._rate:
            return 0.0
        span = max(now - self._rate[0][0], 1e-6)
        return sum(n for _, n in self._rate) / span

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


def _injected_num_blocks(config: EngineConfig, runner: Runner) -> int:
    """The pool size for an injected runner: the scheduler hands out block ids and slots for
    the runner's pool, so the two must agree."""
    num_blocks = int(config.cache.num_blocks or runner.num_blocks or 0)
    if not num_blocks:
        raise ValueError("set CacheConfig.num_blocks (or runner.num_blocks) with an injected runner")
    if runner.num_blocks and num_blocks > runner.num_blocks:
        raise ValueError(f"CacheConfig.num_blocks {num_blocks} exceeds the runner's {runner.num_blocks} blocks")
    if runner.block_size != config.cache.block_size:
        raise ValueError(
            f"CacheConfig.block_size {config.cache.block_size} differs from the runner's {runner.block_size}"
        )
    return num_blocks


def __getattr__(name: str) -> Any:
    # ``from replica.engine import AsyncEngine`` still works: resolved lazily (no import cycle).
    if name == "AsyncEngine":
        from replica.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
