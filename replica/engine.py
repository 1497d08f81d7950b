"""The engine: ``LLMEngine`` (synchronous step loop) and ``AsyncEngine`` (the same engine
stepping in a background thread, with one asyncio stream of deltas per request).

One step is three verbs: ``scheduler.schedule()`` -> ``runner.run()`` ->
``scheduler.update()``; the engine then turns new tokens into text deltas with a
per-request incremental detokenizer, which also finds stop strings.

An n > 1 request runs as n child requests in the scheduler (one per choice, see
``replica.scheduler``), each with its own detokenizer; its stream is still one stream of
``Delta``s under its own id, the choices' text in ``Delta.choices``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import operator
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from replica.async_scheduler import AsyncScheduler
from replica.config import EngineConfig
from replica.errors import EngineError, EngineUnavailableError, InvalidRequestError, QueueFullError, RequestTooLongError
from replica.grammar import GrammarCache
from replica.outputs import (
    ChoiceDelta,
    CompletionOutput,
    Delta,
    EngineStats,
    RunnerOutput,
    TokenLogprobs,
    Usage,
    merge_deltas,
)
from replica.pending_step import PendingStep
from replica.request import FinishReason, Request, RequestStatus, SamplingParams
from replica.scheduler import Scheduler
from replica.step import SchedulerOutput

if TYPE_CHECKING:
    from replica.models import LoadedModel
    from replica.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
# Builds a NamedTuple from a full tuple of its fields: a Delta per request per step on the host's
# critical path, and the generated __new__ (a Python-level call filling defaults) costs ~2x more.
_new_tuple = tuple.__new__
_D = TypeVar("_D", Delta, ChoiceDelta)  # what carries a token's logprobs
_RATE_WINDOW_S = 10.0  # output tokens/s is measured over this recent window


class Runner(Protocol):
    def run(self, out: SchedulerOutput) -> RunnerOutput: ...


class PipelinedRunner(Runner, Protocol):
    """A runner that can start a step before the previous one's tokens reached the host."""

    def launch(self, out: SchedulerOutput, prev: PendingStep | None) -> PendingStep: ...


class Detokenizer(Protocol):
    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]: ...
    def flush(self) -> str: ...


def _default_detokenizer(tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> Detokenizer:
    from replica.tokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop, min_tokens=params.min_tokens)


def kv_cache_num_blocks(config: EngineConfig, model: Any, max_model_len: int) -> int:
    """KV pool size: ``cache.num_blocks`` if set, else free CUDA memory times
    ``gpu_memory_utilization`` (CUDA) or ``cpu_cache_gib`` (CPU), divided by the size of a
    block; capped at what ``max_num_seqs`` full-length sequences could ever use (a tiny
    model would otherwise get millions of blocks it can never fill)."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    import torch

    from replica.model_runner import ModelRunner

    param = next(model.parameters())
    per_block = ModelRunner.block_bytes(model.config, cache.block_size, param.dtype)
    if param.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(param.device)
        budget = free * cache.gpu_memory_utilization
        where = f"{free / 2**30:.2f} GiB free on {param.device} x gpu_memory_utilization {cache.gpu_memory_utilization}"
    else:
        budget = cache.cpu_cache_gib * 2**30
        where = f"cpu_cache_gib {cache.cpu_cache_gib}"
    n = int(budget // per_block)
    if n < 1:
        raise ValueError(f"no room for a single KV block of {per_block} bytes ({where})")
    blocks_per_seq = -(-max_model_len // cache.block_size)
    return min(n, config.scheduler.max_num_seqs * blocks_per_seq)


class LLMEngine:
    """Synchronous engine: ``add_request`` then call ``step`` until ``has_unfinished`` is False.

    Components can be injected for tests: ``runner`` (anything with ``run``),
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
        built_runner = runner is None
        if runner is None:
            from replica.model_check import dry_run, inspect_model
            from replica.model_runner import ModelRunner

            # Refuse, before any request, what the paged path cannot serve exactly (model_check).
            verdict = inspect_model(loaded.model)  # type: ignore[union-attr]
            self.max_model_len = verdict.cap(self.max_model_len, config.scheduler.max_num_batched_tokens)
            if config.parallel.tensor_parallel_size > 1:
                from replica.tp_executor import tp_runner

                runner, reference = tp_runner(config, loaded, self.max_model_len)  # type: ignore[arg-type]
                num_blocks = runner.num_blocks
                try:
                    dry_run(runner, reference)
                except BaseException:
                    runner.close()
                    raise
            else:
                num_blocks = kv_cache_num_blocks(config, loaded.model, self.max_model_len)  # type: ignore[union-attr]
                runner = ModelRunner(
                    loaded.model,  # type: ignore[union-attr]
                    config.cache,
                    config.runner,
                    num_blocks,
                    seed=config.model.seed,
                    eos_token_ids=self.tokenizer.eos_token_ids,
                    max_model_len=self.max_model_len,
                )
                dry_run(runner)
        else:
            runner_blocks = getattr(runner, "num_blocks", None)
            num_blocks = int(config.cache.num_blocks or runner_blocks or 0)
            if not num_blocks:
                raise ValueError("set CacheConfig.num_blocks (or runner.num_blocks) with an injected runner")
            # The scheduler hands out block ids and slots for the runner's pool: they must agree.
            if runner_blocks and num_blocks > runner_blocks:
                raise ValueError(f"CacheConfig.num_blocks {num_blocks} exceeds the runner's {runner_blocks} blocks")
            runner_bs = getattr(runner, "block_size", None)
            if runner_bs is not None and runner_bs != config.cache.block_size:
                raise ValueError(
                    f"CacheConfig.block_size {config.cache.block_size} differs from the runner's {runner_bs}"
                )
        self.runner = runner
        self.num_blocks = num_blocks
        self._vocab_size = int(getattr(runner, "vocab_size", 0) or self.tokenizer.vocab_size)
        self._grammars: GrammarCache | None = None  # built at the first structured-output request
        self.scheduler = (AsyncScheduler if config.scheduler.async_scheduling else Scheduler)(
            config.scheduler, config.cache, num_blocks=num_blocks, max_model_len=self.max_model_len
        )
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
        self._async = config.scheduler.async_scheduling and hasattr(runner, "launch")
        # The launched step not yet applied: (its SchedulerOutput, its handle, its start time).
        self._inflight: tuple[SchedulerOutput, PendingStep, float] | None = None
        self._ids = itertools.count()
        # counters
        self._num_steps = 0
        self._num_refused = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._rate: deque[tuple[float, int]] = deque()  # (step start, output tokens)
        if built_runner and config.runner.warmup and getattr(getattr(runner, "device", None), "type", None) == "cuda":
            logger.info("engine warm-up took %.2f s", self.warmup())

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
            bad = [t for t in ids if not 0 <= t < self._vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self._vocab_size}), got {bad[0]}", param="prompt"
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
        req.make_children()
        if params.guided is not None:
            # Compiled here, when the request is made (cached per spec), never in the step loop.
            for seq in req.children or (req,):  # each choice its own matcher
                seq.grammar = self.grammars.state(params.guided)
        if params.prompt_logprobs is not None:
            # Nothing predicts the first prompt token. One list for the request and its choices:
            # they score the same prompt, whichever computes a position first fills it in.
            shared: list[TokenLogprobs | None] = [None]
            for seq in (req, *req.children):
                seq.prompt_logprobs = shared
        return req

    @property
    def grammars(self) -> GrammarCache:
        """The structured-output compiler of this engine's tokenizer and model vocabulary."""
        if self._grammars is None:
            hf = getattr(self.tokenizer, "hf", None)
            if hf is None:
                raise InvalidRequestError("structured output needs a Hugging Face tokenizer", param="response_format")
            self._grammars = GrammarCache(hf, self._vocab_size, self.tokenizer.eos_token_ids)
        return self._grammars

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

    # ----- warm-up ------------------------------------------------------------------------

    def warmup(self, num_decode: int = 8) -> float:
        """Run throwaway requests through every path a real step takes (a prefill chunk of the
        full token budget, a mixed step, decode steps) so that kernel compilation, cuBLAS
        heuristics and allocator growth happen now, not in a user's first request. Leaves no
        trace: counters, rate window and prefix cache are reset. Returns the seconds it took."""
        if self.has_unfinished():
            raise RuntimeError("warmup needs an idle engine")
        t0 = time.monotonic()
        budget = self.config.scheduler.max_num_batched_tokens
        long_len = max(1, min(budget, self.max_model_len - 2))
        vocab = max(2, min(self._vocab_size, 30_000))
        greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.add(
            self.make_request("warmup-long", [(7 * i) % vocab + 1 for i in range(long_len)], greedy),
            enforce_queue_limit=False,
        )
        n = max(1, min(num_decode, self.config.scheduler.max_num_seqs - 1))
        for i in range(n):
            prompt = [(13 * i + j) % vocab + 1 for j in range(min(16 + 8 * i, self.max_model_len - 9))]
            self.add(self.make_request(f"warmup-{i}", prompt, replace(greedy, max_tokens=8)), enforce_queue_limit=False)
        while self.has_unfinished():
            self.step()
        self.scheduler.kv.reset_prefix_cache()
        self._num_steps = self._prompt_tokens_total = self._generation_tokens_total = 0
        self._cached_prompt_tokens_total = 0
        self._rate.clear()
        return time.monotonic() - t0

    # ----- offline batches ----------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[CompletionOutput]:
        """Run a batch to completion; outputs in the order of ``prompts``. Every prompt is
        validated before any work (a refusal raises and runs nothing); the bounded waiting
        queue is fed as it drains."""
        plist_prompts: list[Prompt]
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            plist_prompts = [cast(Prompt, prompts)]
        else:
            plist_prompts = list(cast(Sequence[Prompt], prompts))
        prompts = plist_prompts
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise InvalidRequestError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        todo = deque(
            self.make_request(f"generate-{next(self._ids)}", p, sp) for p, sp in zip(prompts, plist, strict=True)
        )
        order = [r.request_id for r in todo]
        reqs = {r.request_id: r for r in todo}
        # Per request, per choice (one for n = 1): text parts, token ids, finish reason.
        texts: dict[str, list[list[str]]] = {rid: [[] for _ in range(r.params.n)] for rid, r in reqs.items()}
        tokens: dict[str, list[list[int]]] = {rid: [[] for _ in range(r.params.n)] for rid, r in reqs.items()}
        reasons: dict[str, list[FinishReason | None]] = {rid: [None] * r.params.n for rid, r in reqs.items()}
        results: dict[str, CompletionOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="generate", unit="req", dynamic_ncols=True)
        try:
            while todo or self.has_unfinished():
                # Feed the bounded queue as it drains (at least one waiting, even with max_waiting 0).
                while todo and self.scheduler.num_waiting < max(1, self.config.scheduler.max_waiting):
                    self.add(todo.popleft(), enforce_queue_limit=False)
                for d in self.step():
                    rid = d.request_id
                    if rid not in texts:
                        continue  # someone else's request sharing this engine
                    if not d.choices:
                        texts[rid][0].append(d.text)
                        tokens[rid][0].extend(d.token_ids)
                    for c in d.choices:
                        texts[rid][c.index].append(c.text)
                        tokens[rid][c.index].extend(c.token_ids)
                        reasons[rid][c.index] = c.finish_reason or reasons[rid][c.index]
                    if d.finished:
                        assert d.finish_reason is not None and d.usage is not None
                        prompt = tuple(reqs[rid].prompt_token_ids)
                        outs = [
                            CompletionOutput(
                                request_id=rid,
                                prompt_token_ids=prompt,
                                token_ids=tuple(tokens[rid][i]),
                                text="".join(texts[rid][i]),
                                finish_reason=reasons[rid][i] or d.finish_reason,
                                usage=Usage(len(prompt), len(tokens[rid][i]), d.usage.cached_tokens),
                            )
                            for i in range(len(texts[rid]))
                        ]
                        results[rid] = replace(outs[0], usage=d.usage, choices=tuple(outs) if len(outs) > 1 else ())
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(tok_s=f"{self._tokens_per_s():.0f}", refresh=False)
        except BaseException:
            self.drop_inflight()
            for rid in order:
                if rid not in results:
                    self.abort(rid)
                    self._forget(rid)  # one a failed step finished: no delta will come
            self._pending = [d for d in self._pending if d.request_id not in texts]
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in order]

    # ----- observability ----------------------------------------------------------------

    def _tokens_per_s(self) -> float:
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - _RATE_WINDOW_S:
            self._rate.popleft()
        if not self._rate:
            return 0.0
        span = max(now - self._rate[0][0], 1e-6)
        return sum(n for _, n in self._rate) / span

    def stats(self) -> EngineStats:
        return self.build_stats(self._tokens_per_s())

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

    @property
    def alive(self) -> bool:
        """False once the runner lost a tensor-parallel rank: no step can run any more."""
        return bool(getattr(self.runner, "alive", True))

    def close(self) -> None:
        """Release what the runner holds beyond this process (tensor-parallel ranks)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


async def coalesced(
    queue: asyncio.Queue[Delta], interval: int = 1, on_abandon: Callable[[], None] | None = None
) -> AsyncGenerator[Delta, None]:
    """One request's deltas from ``queue`` until its last: what queued up while the consumer
    was busy goes out as one item (one per wake-up instead of one per token when it falls
    behind), and after the first token (which never waits) at least ``interval`` tokens per item.
    ``on_abandon`` runs if the consumer closes or cancels the stream before its last delta
    (the engine then aborts the request and frees its blocks)."""
    first_sent = finished = False
    try:
        while True:
            delta = await queue.get()
            n = delta.num_tokens
            if not delta.finished and (not queue.empty() or (first_sent and n < interval)):
                batch = [delta]
                while not batch[-1].finished:
                    if not queue.empty():
                        batch.append(queue.get_nowait())
                    elif first_sent and n < interval:
                        batch.append(await queue.get())
                    else:
                        break
                    n += batch[-1].num_tokens
                delta = merge_deltas(batch)
            first_sent = first_sent or n > 0
            finished = delta.finished
            yield delta
            if finished:
                return
    finally:
        if not finished and on_abandon is not None:
            on_abandon()


class AsyncEngine:
    """``LLMEngine`` stepping in a background thread, so the asyncio loop stays free.

    ``add_request`` validates and refuses synchronously, then hands the request to the
    step thread through a locked inbox; deltas come back through a per-request
    ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``. Only the step thread touches
    the engine's queues and cache, so no lock is held during a step.
    """

    _MAX_CONSECUTIVE_FAILURES = 3
    _HASHES_REFRESH_S = 0.5

    def __init__(
        self, config: EngineConfig, *, loaded: LoadedModel | None = None, engine: LLMEngine | None = None, **kwargs: Any
    ) -> None:
        self.engine = engine if engine is not None else LLMEngine(config, loaded=loaded, **kwargs)
        self.config = config
        self._lock = threading.Lock()  # guards _inbox, _closed, _dead
        self._inbox: list[tuple[str, Any]] = []  # ("add", Request) | ("abort", request_id)
        self._num_inbox_adds = 0
        self._wake = threading.Event()
        self._streams: dict[str, Callable[[Delta], None]] = {}  # request -> its sink; event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False  # draining or stopped: refuse new requests
        self._stop = False
        self._dead: str | None = None
        self._failures = 0
        self._tokens_per_s = 0.0  # refreshed by the step thread (the rate window is its own)
        self._hashes: list[int] = []
        self._hashes_limit = 4096
        self._hashes_at = 0.0

    # ----- facade -----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or not self.engine.alive

    async def start(self) -> None:
        self._ensure_started(asyncio.get_running_loop())

    def _ensure_started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            if loop is not self._loop:
                raise RuntimeError("AsyncEngine is bound to another event loop")
            return
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Delta]:
        """Queue a request and return its stream of deltas (the last has finish_reason).
        Refusals raise here, synchronously. Closing or cancelling the stream aborts the
        request and frees its blocks. ``stream_interval`` > 1 holds deltas after the first
        token until that many tokens (or the end) are there: fewer stream items per token
        for every hop behind this one (Ray streaming, SSE), at the cost of coarser chunks."""
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise InvalidRequestError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.submit(request_id, prompt, params, queue.put_nowait)
        return coalesced(queue, stream_interval, lambda: self.abort_nowait(request_id))

    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        """Queue a request whose deltas go to ``on_delta``, called on the event loop in order
        (the last has finish_reason). Refusals raise here, synchronously. The caller owns
        the request's life: ``abort`` it when its consumer goes away."""
        if self._dead is not None:
            raise EngineUnavailableError(f"the engine failed and no longer accepts requests: {self._dead}")
        if self._closed:
            raise EngineUnavailableError("the engine is shutting down and no longer accepts requests")
        self._ensure_started(asyncio.get_running_loop())
        req = self.engine.make_request(request_id, prompt, params)
        with self._lock:
            if self._dead is not None or self._closed:
                raise EngineUnavailableError("the engine is shutting down and no longer accepts requests")
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            max_waiting = self.engine.config.scheduler.max_waiting
            queued = self.engine.scheduler.num_waiting + self._num_inbox_adds
            if queued >= max_waiting:
                self.engine._num_refused += 1
                raise QueueFullError(f"the waiting queue is full ({queued} of {max_waiting} requests); retry later")
            self._streams[request_id] = on_delta
            self._inbox.append(("add", req))
            self._num_inbox_adds += 1
        self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if still read) ends with an ABORT delta."""
        self._post_abort(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` for callers outside a coroutine; no ABORT delta is delivered."""
        self._streams.pop(request_id, None)
        self._post_abort(request_id)

    def _post_abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        if self._thread is None:
            return self.engine.stats()
        s = self.engine.build_stats(self._tokens_per_s)
        if self._num_inbox_adds:
            s = replace(s, num_waiting=s.num_waiting + self._num_inbox_adds)
        return s

    def cached_block_hashes(self, limit: int = 4096) -> list[int]:
        if self._thread is None:
            return self.engine.cached_block_hashes(limit)
        self._hashes_limit = max(self._hashes_limit, limit)
        return self._hashes[:limit]

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to ``drain_timeout_s``), abort
        the rest, stop the step loop."""
        self._closed = True
        if self._thread is None:
            await asyncio.to_thread(self.engine.close)
            return
        deadline = time.monotonic() + drain_timeout_s
        while self._thread.is_alive() and (self._streams or self._inbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with self._lock:
            self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.engine.close)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe deliveries run
        self._end_streams(FinishReason.ABORT, None)

    # ----- event-loop side --------------------------------------------------------------

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            sink = self._streams.get(d.request_id)
            if sink is None:
                continue  # its consumer went away
            if d.finished:
                del self._streams[d.request_id]
            sink(d)

    def _end_streams(self, reason: FinishReason, error: str | None) -> None:
        """Give every open stream a final delta: nobody waits forever."""
        streams, self._streams = self._streams, {}
        for rid, sink in streams.items():
            sink(Delta(rid, "", (), reason, Usage(0, 0), error))

    # ----- step thread ------------------------------------------------------------------

    def _send(self, deltas: list[Delta]) -> None:
        if deltas and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _run(self) -> None:
        try:
            self._loop_body()
        except BaseException as e:  # a bug in the loop itself: fail loudly, never hang a consumer
            logger.exception("engine step loop crashed")
            with self._lock:
                self._dead = f"step loop crashed: {e!r}"
        if self._dead is not None and self._loop is not None and not self._loop.is_closed():
            # After the last deliveries (call_soon_threadsafe is FIFO): any stream still open
            # would otherwise wait forever for a loop that has stopped.
            self._loop.call_soon_threadsafe(self._end_streams, FinishReason.ERROR, self._dead)

    def _loop_body(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                items, self._inbox = self._inbox, []
                stop = self._stop
            deltas: list[Delta] = []
            for kind, x in items:
                if kind == "add":
                    try:
                        eng.add(x, enforce_queue_limit=False)  # the bound was checked on arrival
                    except EngineError as e:
                        deltas.append(Delta(x.request_id, "", (), FinishReason.ERROR, Usage(0, 0), e.message))
                    finally:
                        with self._lock:
                            self._num_inbox_adds -= 1
                else:
                    eng.abort(x)
            if stop:
                for rid in eng.unfinished_request_ids():
                    eng.abort(rid)
                deltas.extend(eng.step())  # only the pending ABORT deltas: nothing is left to run
                self._send(deltas)
                self._refresh(force=True)
                return
            if not eng.has_unfinished():
                self._send(deltas)
                self._refresh(force=True)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                applied = eng._num_steps
                deltas.extend(eng.step())
                if eng._num_steps > applied:  # a step that only launched proves nothing yet
                    self._failures = 0
            except Exception as e:
                deltas.extend(self._on_step_error(e))
            self._send(deltas)
            self._refresh()
            if self._dead is not None:
                return

    def _on_step_error(self, e: Exception) -> list[Delta]:
        """Fail the requests of the step that raised; if the engine's state is broken or
        steps keep failing, fail everything and refuse new requests."""
        logger.exception("engine step failed")
        eng = self.engine
        msg = f"engine step failed: {type(e).__name__}: {e}"
        self._failures += 1
        blamed = eng.last_scheduled
        eng.drop_inflight()  # a step launched after the failed one is not applied either
        deltas = eng.fail_requests(blamed or eng.unfinished_request_ids(), msg)
        try:
            eng.scheduler.kv.check_invariants()
            broken = self._failures >= self._MAX_CONSECUTIVE_FAILURES or not eng.alive
        except AssertionError:
            broken = True
        if broken:
            with self._lock:
                self._dead = msg
                items, self._inbox = self._inbox, []
                self._num_inbox_adds -= sum(1 for k, _ in items if k == "add")
            deltas.extend(eng.fail_requests(eng.unfinished_request_ids(), msg))
            deltas.extend(
                Delta(x.request_id, "", (), FinishReason.ERROR, Usage(0, 0), msg) for k, x in items if k == "add"
            )
        return deltas

    def _refresh(self, *, force: bool = False) -> None:
        self._tokens_per_s = self.engine._tokens_per_s()
        now = time.monotonic()
        if force or now - self._hashes_at >= self._HASHES_REFRESH_S:
            self._hashes = self.engine.cached_block_hashes(self._hashes_limit)
            self._hashes_at = now
