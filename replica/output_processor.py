"""``OutputProcessor``: the engine's output side. It owns what a request needs until its last
``Delta`` is built (its incremental detokenizer, one per choice of an n > 1 request; the n > 1
request itself; the prompt logprobs a prefill scored) and turns the requests a step advanced
(``Scheduler.update``'s list, one new token each) into ``Delta``s, in one call per step.

* Text: each new token goes through the request's detokenizer, which also finds stop strings;
  a hit finishes the request in the scheduler (through ``finish``, which frees its blocks) and
  its delta is its last. A stop token (EOS, a stop id, a grammar's end) adds no text.
* n > 1: a choice's token becomes a ``ChoiceDelta``; the step's choices of one request go out
  as one ``Delta`` under the request's id, the last one (with the usage of every choice, the
  prompt counted once) once every choice has finished.
* Logprobs: a sampled token's only for a request that asked; the prompt's once, with the first
  output token (every choice carries them).
* Failure: a request whose text cannot be built (a tokenizer bug) ends alone with
  ``FinishReason.ERROR``; a choice's failure ends its whole request, once.

It counts the prompt and cached prompt tokens of the requests it ends (``EngineStats``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from replica.interfaces import Detokenizer
from replica.outputs import ChoiceDelta, Delta, TokenLogprobs, Usage
from replica.request import FinishReason, Request, RequestStatus, SamplingParams

logger = logging.getLogger(__name__)

# Builds a NamedTuple from a full tuple of its fields: a Delta per request per step on the host's
# critical path, and the generated __new__ (a Python-level call filling defaults) costs ~2x more.
_new_tuple = tuple.__new__
_D = TypeVar("_D", Delta, ChoiceDelta)  # what carries a token's logprobs

DetokenizerFactory = Callable[[Any, Sequence[int], SamplingParams], Detokenizer]
# Scheduler.finish: finish a request now and free its blocks; None if it had already finished.
Finish = Callable[[str, FinishReason], Request | None]


def _default_detokenizer(tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> Detokenizer:
    from replica.detokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop, min_tokens=params.min_tokens)


class OutputProcessor:
    """Requests' output state and deltas (see the module docstring). ``finish`` is the
    scheduler's; ``detokenizer_factory`` defaults to ``IncrementalDetokenizer``."""

    def __init__(self, tokenizer: Any, finish: Finish, detokenizer_factory: DetokenizerFactory | None = None) -> None:
        self.tokenizer = tokenizer
        self._finish = finish
        self._detokenizer_factory = detokenizer_factory or _default_detokenizer
        if detokenizer_factory is None and callable(getattr(tokenizer, "token_bytes", None)):
            # The byte-level detokenizer's table (~0.1-0.3 s once per tokenizer): now, not in the
            # first request's time to first token.
            tokenizer.token_bytes(skip_special_tokens=True)
        # Requests whose final delta has not been built yet, with their detokenizers (for an
        # n > 1 request: its choices', and the request itself in _groups).
        self._live: dict[str, tuple[Request, Detokenizer]] = {}
        self._groups: dict[str, Request] = {}
        self._pending: list[Delta] = []  # deltas built outside a step's return (abort, a raising step)
        self.prompt_tokens_total = 0  # of the requests ended so far
        self.cached_prompt_tokens_total = 0

    # ----- requests -----------------------------------------------------------------------

    def detokenizers(self, req: Request) -> list[Detokenizer]:
        """New detokenizers for ``req`` (one per choice), registered by ``add``: built before the
        request is queued, so a factory that raises leaves nothing behind."""
        req.make_children()
        return [self._detokenizer_factory(self.tokenizer, s.prompt_token_ids, s.params) for s in req.children or (req,)]

    def add(self, req: Request, detokenizers: Sequence[Detokenizer]) -> None:
        """Track a request the scheduler accepted, with ``detokenizers(req)``."""
        for seq, detok in zip(req.children or (req,), detokenizers):
            self._live[seq.request_id] = (seq, detok)
        if req.children:
            self._groups[req.request_id] = req

    def aborted(self, req: Request) -> None:
        """Queue the final delta of a request the scheduler finished between steps (abort)."""
        self._pending.append(self._final(req, "", ()))

    def fail(self, request_ids: Sequence[str], error: str) -> list[Delta]:
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
            if self._finish(req.request_id, FinishReason.ERROR) is None:
                req.finish_reason = FinishReason.ERROR
            deltas.append(self._final(req, "", (), error=error))
        return deltas

    def discard(self, request_ids: Sequence[str]) -> None:
        """Drop these requests' output state and their deltas not taken yet (the caller stopped
        reading them; it finished them in the scheduler first)."""
        for rid in request_ids:
            self._forget(rid)  # one a failed step finished: no final delta will come
        gone = set(request_ids)
        self._pending = [d for d in self._pending if d.request_id not in gone]

    def take_pending(self) -> list[Delta]:
        """The deltas built outside a step's return, oldest first; forgets them."""
        deltas, self._pending = self._pending, []
        return deltas

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @property
    def num_live(self) -> int:
        """Requests (choices of an n > 1 request each) whose final delta is not built yet."""
        return len(self._live)

    def reset_counters(self) -> None:
        self.prompt_tokens_total = self.cached_prompt_tokens_total = 0

    # ----- one step -----------------------------------------------------------------------

    def store_prompt_logprobs(self, found: dict[str, tuple[int, list[TokenLogprobs]]]) -> None:
        """Extend each request's prompt logprobs with a chunk's (``RunnerOutput.prompt_logprobs``);
        positions it already has (a recompute after preemption) are skipped."""
        for rid, (first, entries) in found.items():
            live = self._live.get(rid)
            req = live[0] if live is not None else self._groups.get(rid)  # an n > 1 request before its fork
            have = req.prompt_logprobs if req is not None else None
            if have is not None and first <= len(have) < first + len(entries):
                have.extend(entries[len(have) - first :])

    def apply(self, got: list[Request], logprobs: dict[str, TokenLogprobs] | None) -> list[Delta]:
        """The deltas of a step's requests that got a token (``Scheduler.update``'s list), in
        its order, an n > 1 request's after them; ``logprobs``: the step's, None unless a request
        of the step asked. Deltas built before an exception (not one request's own failure) stay
        pending, so final deltas still go out."""
        new: list[Delta] = []
        live = self._live
        finished = RequestStatus.FINISHED
        groups: dict[Request, list[ChoiceDelta]] | None = None  # n > 1 requests' choices this step
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
                            self._finish(rid, FinishReason.STOP)
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
            self._finish(req.request_id, FinishReason.STOP)  # a stop string
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
        self.prompt_tokens_total += parent.num_prompt_tokens
        self.cached_prompt_tokens_total += parent.num_cached_tokens
        outputs = sum(c.num_output_tokens for c in parent.children)
        usage = Usage(parent.num_prompt_tokens, outputs, parent.num_cached_tokens)
        return Delta(parent.request_id, "", (), reason, usage, error, tuple(sorted(choices)))

    @staticmethod
    def _with_logprobs(req: Request, d: _D, sampled: TokenLogprobs | None) -> _D:
        """``d`` with its token's logprobs (``sampled``; None for a stop token) and, with the
        first output token, the prompt's (a ``Delta``, or one choice's ``ChoiceDelta``)."""
        prompt = tuple(req.prompt_logprobs) if req.prompt_logprobs is not None and req.num_output_tokens == 1 else None
        return d._replace(logprobs=() if sampled is None else (sampled,), prompt_logprobs=prompt)

    def _fail_one(self, req: Request, error: str) -> Delta:
        if req.parent is not None:  # a choice failing fails its whole request
            req = req.parent
        self._finish(req.request_id, FinishReason.ERROR)  # a no-op if this step finished it
        req.finish_reason = FinishReason.ERROR
        return self._final(req, "", (), error=error)

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
        self.prompt_tokens_total += req.num_prompt_tokens
        self.cached_prompt_tokens_total += req.num_cached_tokens
        assert req.finish_reason is not None
        usage = Usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
        return Delta(req.request_id, text, token_ids, req.finish_reason, usage, error)

    def _forget(self, request_id: str) -> None:
        """Drop the output state of a request whose final delta will never be built."""
        parent = self._groups.pop(request_id, None)
        for seq in parent.children if parent is not None else ():
            self._live.pop(seq.request_id, None)
        self._live.pop(request_id, None)
