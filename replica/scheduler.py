"""One step of continuous batching under a token budget (vLLM-v1 style).

There are no prefill and decode phases: every request has ``num_computed_tokens``
catching up to ``num_tokens`` (prompt + outputs). Each step hands out one token budget,
running requests first (usually one decode token each, or the next prefill chunk),
then waiting ones in arrival order. A long prompt is cut into chunks that fit the
budget (chunked prefill), so prefill chunks and decodes share a step, and a finished
request's slot is refilled on the very next step.

A step where every request computes its last known token and samples (no prefill anywhere) is a
decode step, built as a ``DecodeBatch`` (``replica.step``: arrays, one row per request) and
applied by ``_update_decode`` with vectorised stop and block checks; any other step is one
``ScheduledChunk`` per request. The stop rule is ``replica.stopping``'s.

When a running request cannot get its next block, the newest running request is
preempted by recompute: its blocks are freed, its outputs kept, and it goes back to
the front of the waiting queue; on resume it recomputes prompt + outputs (often
from its own blocks, still in the prefix cache) and continues where it stopped.

A request with n > 1 (``params.n``) is one request until its prompt is computed, then n.
It computes its prompt's full blocks before the last token (``num_shared_blocks``) and, once
they are computed, forks: each of its ``children`` (one per choice) takes a reference to
every one of those blocks (``KVCacheManager.fork``) and becomes an ordinary running request
that computes the rest of the prompt (1 to block_size tokens, into a block of its own) and
samples with its own seed. Shared blocks are never written again, so nothing is copied: the
partial last block is recomputed per choice instead of copied. The children are scheduled,
preempted (freeing only their own references) and finished independently; finishing or
aborting the request by its own id finishes them all. Admission keeps room for the n
sequences: n seats of ``max_num_seqs`` and, to start, the shared blocks plus a tail block each.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from collections.abc import Sequence

import numpy as np

from replica.admission import AdmissionController
from replica.config import CacheConfig, SchedulerConfig
from replica.errors import InvalidRequestError, QueueFullError
from replica.kv_cache import KVCacheManager
from replica.outputs import RunnerOutput
from replica.request import FinishReason, Request, RequestStatus
from replica.step import DecodeBatch, ScheduledChunk, SchedulerOutput
from replica.stopping import may_stop, stop_reason

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the waiting queue, the running list and the KV block pool."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, *, num_blocks: int, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.admission = AdmissionController(
            self.kv, max_model_len=max_model_len, watermark=cache.watermark, max_num_seqs=config.max_num_seqs
        )
        self.waiting: deque[Request] = deque()
        # Kept sorted by (arrival_time, admission order): the newest, the preemption
        # victim, is always last, so preempting never undoes a chunk already scheduled.
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}  # waiting + running
        self._groups: dict[str, Request] = {}  # forked n > 1 requests with a choice not finished
        # Seats of max_num_seqs promised to the choices of running n > 1 requests not forked yet.
        self._reserved_seats = 0
        self._seq: dict[str, int] = {}
        self._seq_counter = itertools.count()
        self.num_preemptions = 0

    # ----- queue --------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add(self, request: Request, *, enforce_queue_limit: bool = True) -> None:
        """Queue a new request. Refuses (raising, changing nothing) one that can never fit
        (RequestTooLongError) or arrives at a full queue (QueueFullError)."""
        if request.request_id in self._requests or request.request_id in self._groups:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", param="request_id")
        if not request.prompt_token_ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        if request.output_token_ids or request.num_computed_tokens or request.block_table:
            raise InvalidRequestError(f"request {request.request_id!r} is not fresh", param="request_id")
        self.admission.check_fits(request)
        request.make_children()
        for child in request.children:
            if child.request_id in self._requests or child.request_id in self._groups:
                raise InvalidRequestError(f"request id {child.request_id!r} is already in use", param="request_id")
        if enforce_queue_limit and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)} of {self.config.max_waiting} requests); retry later"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._requests[request.request_id] = request
        self._seq[request.request_id] = next(self._seq_counter)

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks at once."""
        return self.finish(request_id, FinishReason.ABORT)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a request now (abort, a stop string seen by the detokenizer, ...). The id of
        an n > 1 request finishes all its choices (and returns it); a choice's id, that choice."""
        req = self._requests.pop(request_id, None)
        if req is None:
            parent = self._groups.pop(request_id, None)
            if parent is None:
                return None
            for child in parent.children:
                if self._requests.pop(child.request_id, None) is not None:
                    self._finish(child, reason)
            parent.status = RequestStatus.FINISHED
            parent.finish_reason = reason
            return parent
        self._finish(req, reason)
        for child in req.children:  # not forked yet: its choices never started
            child.status = RequestStatus.FINISHED
            child.finish_reason = reason
        parent = req.parent
        if parent is not None and all(c.status is RequestStatus.FINISHED for c in parent.children):
            self._groups.pop(parent.request_id, None)
            parent.status = RequestStatus.FINISHED
            parent.finish_reason = reason  # the last choice's
        return req

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self._remove_running(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        self._seq.pop(req.request_id, None)
        if req.grammar is not None:
            req.grammar.closed = True  # its rows still in flight are not masked
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    # ----- one step --------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Hand out one token budget. A step where every request computes one token and samples
        is a decode step (a ``DecodeBatch``); any other is one chunk per request."""
        budget = self.config.max_num_batched_tokens
        reqs: list[Request] = []  # scheduled, with their token counts
        counts: list[int] = []
        decodes = True  # every scheduled request computes its last token (and samples)
        preempted: list[str] = []

        # Running requests first: their next decode token or prefill chunk.
        bs = self.kv.block_size
        i = 0
        running = self.running
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed_tokens
            if req.children:  # n > 1 not forked yet: computes its shared blocks, samples nothing
                target, decodes = self._fork_point(req), False
            else:
                target = len(req.prompt_token_ids) + len(req.output_token_ids)
            left = target - computed
            num_new = min(left, budget)
            assert num_new > 0, f"running request {req.request_id} has nothing to compute"
            if computed + num_new <= len(req.block_table) * bs:
                # The common decode case: the tokens fit the blocks it holds; no allocation.
                reqs.append(req)
                counts.append(num_new)
                decodes = decodes and left == 1
                budget -= num_new
                i += 1
                continue
            while self.kv.allocate_slots(req, num_new) is None:
                victim = self.admission.pick_victim(self.running[i:])
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                reqs.append(req)
                counts.append(num_new)
                decodes = decodes and left == 1
                budget -= num_new
                i += 1

        # Then waiting ones, in order, while they fit. Not right after a preemption:
        # the freed blocks are for the running requests that needed them.
        max_seqs = self.config.max_num_seqs
        while not preempted and self.waiting and budget > 0 and len(self.running) + self._reserved_seats < max_seqs:
            req = self.waiting[0]
            n = len(req.children)
            if n and len(self.running) + self._reserved_seats + n > max_seqs:
                break  # its n choices need n seats
            # Prompt logprobs (echo) need every prompt position's logits: no prefix reuse for them.
            hits, num_hit = self.kv.get_computed_prefix(req) if req.params.prompt_logprobs is None else ([], 0)
            target = self._fork_point(req) if n else req.num_tokens
            needed = self.kv.blocks_for(target) - len(hits) + self.kv.num_unreferenced(hits)
            if n:  # and a block of its own for each choice's rest of the prompt
                needed += n * (self.kv.blocks_for(req.num_tokens) - target // bs)
            if not self.admission.can_start(needed, idle=not self.running):
                break
            num_new = min(target - num_hit, budget)
            if self.kv.allocate_slots(req, num_new, hits) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.status is RequestStatus.WAITING:  # first admission, not a resume
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if num_new == 0:  # n > 1, its shared blocks all prefix hits (or none): fork now
                for child in self._fork(req):
                    num_new = min(child.num_tokens - child.num_computed_tokens, budget)
                    if num_new <= 0 or self.kv.allocate_slots(child, num_new) is None:
                        break  # the rest are scheduled as running requests next step
                    reqs.append(child)
                    counts.append(num_new)
                    decodes = decodes and child.num_computed_tokens + 1 == child.num_tokens
                    budget -= num_new
                continue
            self._insert_running(req)
            reqs.append(req)
            counts.append(num_new)
            decodes = decodes and not n and num_hit + 1 == target
            budget -= num_new

        num_batched = self.config.max_num_batched_tokens - budget
        if decodes and reqs:
            return SchedulerOutput(
                num_batched_tokens=num_batched, preempted_ids=tuple(preempted), decode=self._decode(reqs)
            )
        return SchedulerOutput(
            chunks=tuple([self._chunk(r, n) for r, n in zip(reqs, counts)]),
            num_batched_tokens=num_batched,
            preempted_ids=tuple(preempted),
        )

    def update(self, out: SchedulerOutput, res: RunnerOutput) -> list[Request]:
        """Apply a step's results: advance counters, append sampled tokens, finish and free
        requests that stopped, register newly full blocks. Returns requests that got a token."""
        if out.decode is not None:
            return self._update_decode(out.decode, res)
        got: list[Request] = []
        requests = self._requests
        bs = self.kv.block_size
        caching = self.kv.enable_prefix_caching
        for ch in out.chunks:
            req = requests.get(ch.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished or aborted since it was scheduled
            if req.num_computed_tokens != ch.start_pos:
                raise RuntimeError(
                    f"request {ch.request_id}: chunk starts at {ch.start_pos} "
                    f"but {req.num_computed_tokens} tokens are computed"
                )
            computed = req.num_computed_tokens = ch.start_pos + len(ch.token_ids)
            reason = None
            if ch.sample:
                try:
                    token = int(res.sampled[ch.request_id])
                except KeyError:
                    raise RuntimeError(f"the model runner returned no token for {ch.request_id}") from None
                req.output_token_ids.append(token)
                got.append(req)
                if req.grammar is not None:
                    self._accept(req, token)
                reason = stop_reason(req, token, self.max_model_len)
            if caching and ch.start_pos // bs != computed // bs:  # only a chunk that filled a block
                self.kv.cache_full_blocks(req)
            if reason is not None:
                self.finish(req.request_id, reason)
            elif req.children and computed == self._fork_point(req):
                self._remove_running(req)
                self._fork(req)
        return got

    def _update_decode(self, d: DecodeBatch, res: RunnerOutput) -> list[Request]:
        """``update`` of a decode step: one short loop over rows; the stop and block checks
        are vectorised and only the rows they flag are looked at again."""
        try:
            tokens = res.tokens_for(d.request_ids)
        except KeyError as e:
            raise RuntimeError(f"the model runner returned no token for {e.args[0]}") from None
        toks = np.fromiter(tokens, np.int64, len(d))
        tokens = toks.tolist()  # plain ints, whatever the runner returned (numpy ints would leak out)
        running = RequestStatus.RUNNING
        got: list[Request] = []
        for req, token, pos in zip(d.requests, tokens, d.positions.tolist()):
            if req.status is not running:
                continue  # finished or aborted since it was scheduled
            if req.num_computed_tokens != pos:
                raise RuntimeError(
                    f"request {req.request_id}: chunk starts at {pos} but {req.num_computed_tokens} tokens are computed"
                )
            req.num_computed_tokens = pos + 1
            req.output_token_ids.append(token)
            got.append(req)
            if req.grammar is not None:
                self._accept(req, token)
        # Rows that may stop now (checked exactly, per row, by stop_reason). Rows that also
        # filled a block cache it first.
        maybe = may_stop(d.num_output_tokens + 1, d.limit, d.check_stop_ids, toks, d.eos_ids)
        if self.kv.enable_prefix_caching:
            for i in np.flatnonzero((d.positions + 1) % self.kv.block_size == 0).tolist():
                req = d.requests[i]
                if req.status is running:
                    self.kv.cache_full_blocks(req)
        for i in np.flatnonzero(maybe).tolist():
            req = d.requests[i]
            if req.status is not running:
                continue
            reason = stop_reason(req, int(toks[i]), self.max_model_len)
            if reason is not None:
                self.finish(req.request_id, reason)
        return got

    # ----- helpers ---------------------------------------------------------------------

    @staticmethod
    def _accept(req: Request, token: int) -> None:
        """Advance the request's grammar by its new token (a rejected one stops it, logged)."""
        g = req.grammar
        assert g is not None
        if not g.accept(token) and g.rejected:
            logger.warning(
                "request %s: sampled token %d is not allowed by its grammar; stopping", req.request_id, token
            )

    def _fork_point(self, req: Request) -> int:
        """Tokens an n > 1 request computes before it forks: its prompt's shared full blocks."""
        return self.admission.num_shared_blocks(len(req.prompt_token_ids)) * self.kv.block_size

    def _fork(self, parent: Request) -> tuple[Request, ...]:
        """Turn ``parent`` (out of the running list, its shared blocks computed) into its
        running children, which share its blocks; the parent keeps no reference of its own."""
        children = parent.children
        del self._requests[parent.request_id]
        self._seq.pop(parent.request_id, None)
        for child in children:
            self.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            self._requests[child.request_id] = child
            self._seq[child.request_id] = next(self._seq_counter)
        self._insert_running(*children)
        self.kv.free(parent)
        parent.status = RequestStatus.FORKED
        self._groups[parent.request_id] = parent
        return children

    def _preempt(self, req: Request) -> None:
        self._remove_running(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _insert_running(self, *reqs: Request) -> None:
        """Insert ``reqs`` (one request, or the children of one fork: the same arrival time,
        consecutive sequence numbers) at their place in the running list."""
        first = reqs[0]
        key = (first.arrival_time, self._seq[first.request_id])
        keys = [(r.arrival_time, self._seq[r.request_id]) for r in self.running]
        at = bisect.bisect(keys, key)
        self.running[at:at] = reqs
        for req in reqs:
            if req.children:
                self._reserved_seats += len(req.children) - 1

    def _remove_running(self, req: Request) -> None:
        self.running.remove(req)
        if req.children:
            self._reserved_seats -= len(req.children) - 1

    def _decode(self, reqs: list[Request]) -> DecodeBatch:
        """A decode step of ``reqs``, each computing its last token (known on the host)."""
        return DecodeBatch.build(
            reqs,
            positions=[r.num_computed_tokens for r in reqs],
            num_output_tokens=[len(r.output_token_ids) for r in reqs],
            max_model_len=self.max_model_len,
            token_ids=[(r.output_token_ids or r.prompt_token_ids)[-1] for r in reqs],
        )

    @staticmethod
    def _chunk(req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        prompt, outs = req.prompt_token_ids, req.output_token_ids
        p = len(prompt)
        toks: Sequence[int]
        if n == 1 and start >= p:  # a decode step
            toks = (outs[start - p],)
        elif start >= p:
            toks = outs[start - p : start - p + n]
        elif start + n <= p:
            toks = prompt[start : start + n]
        else:
            toks = prompt[start:] + outs[: start + n - p]
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=tuple(toks),
            start_pos=start,
            block_table=tuple(req.block_table),
            sample=start + n == p + len(outs),
            params=req.params,
            num_output_tokens=len(outs),
            prompt_len=p,
            prompt_token_ids=prompt,
            output_token_ids=outs,
            grammar=req.grammar,
        )
