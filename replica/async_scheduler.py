"""Async scheduling: the step after one still on the device, built without its tokens.

The engine's pipelined step (``LLMEngine._step_pipelined``) launches step N+1 before step N's
sampled tokens reach the host, so the host's bookkeeping for N overlaps the device computing
N+1. ``AsyncScheduler.schedule_next`` builds that N+1 as a ``DecodeBatch``: each running
request computes the token N samples for it (``PLACEHOLDER_TOKEN``: the runner takes it from
N's row on the device) and samples the next one. From a decode step it is derived with array
operations (``DecodeBatch.successor``); after a step of chunks it is built row by row.

Only a plain continuation qualifies: nobody waiting (admission is the synchronous path's),
every running request sampled in N, its next block available without a preemption. Otherwise
``schedule_next`` returns None and the engine calls ``schedule()`` once N is applied.
Invariant: ``update(N)`` runs before ``update(N+1)``; a request that N finishes by EOS, a stop
id or a stop string computes one wasted row in N+1, which ``update`` drops.
"""

from __future__ import annotations

import numpy as np

from replica.request import RequestStatus
from replica.scheduler import Scheduler
from replica.step import DecodeBatch, SchedulerOutput
from replica.stopping import length_limit


class AsyncScheduler(Scheduler):
    """A ``Scheduler`` that can also build the successor of a step in flight."""

    def schedule_next(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``prev`` while ``prev``'s tokens are still on the device: a
        ``DecodeBatch`` of every running request, or None when it does not qualify (see the
        module). Blocks allocated on the way stay with their requests (the next step needs
        them anyway). Requests whose token in ``prev`` is their last by length are left out.
        Call ``update(prev, ...)`` before ``update`` of the returned step."""
        if self.waiting:
            return None
        batch = self._next_of_batch(prev.decode) if prev.decode is not None else self._next_of_chunks(prev)
        if batch is None or not len(batch) or len(batch) > self.config.max_num_batched_tokens:
            return None
        bs = self.kv.block_size
        # Rows whose next token starts a new block: allocate it now (rare: once per block_size steps).
        for i in np.flatnonzero(batch.positions + 1 > batch.num_blocks * bs).tolist():
            req = batch.requests[i]
            if self.kv.allocate_slots(req, int(batch.positions[i]) + 1 - req.num_computed_tokens) is None:
                return None  # would need a preemption: the synchronous path decides
            batch.set_blocks(i, req.block_table)
        return SchedulerOutput(num_batched_tokens=len(batch), decode=batch)

    def _next_of_batch(self, d: DecodeBatch) -> DecodeBatch | None:
        """Vectorised successor of a decode step: drop rows whose request ended (or whose
        token in ``d`` is its last by length), advance the rest by one."""
        running = RequestStatus.RUNNING
        alive = np.array([r.status is running for r in d.requests], bool)
        if int(alive.sum()) != len(self.running):
            return None  # someone running was not in d
        return d.successor(np.flatnonzero(alive & (d.num_output_tokens + 1 < d.limit)))

    def _next_of_chunks(self, prev: SchedulerOutput) -> DecodeBatch | None:
        """The first decode step after a step of chunks (row by row)."""
        requests = self._requests
        reqs, prev_rows, positions, n_outs = [], [], [], []
        seen = row = 0
        for ch in prev.chunks:
            if ch.sample:
                row += 1  # rows of prev's sampled tokens, in chunk order
            req = requests.get(ch.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished or aborted since prev was scheduled
            seen += 1
            if not ch.sample or req.num_computed_tokens != ch.start_pos:
                return None  # mid-prefill, or prev was already applied: not a continuation
            n_out = len(req.output_token_ids) + 1  # after prev's token
            if n_out >= length_limit(req.params, len(req.prompt_token_ids), self.max_model_len):
                continue  # prev's token is its last
            reqs.append(req)
            prev_rows.append(row - 1)
            positions.append(ch.start_pos + len(ch.token_ids))
            n_outs.append(n_out)
        if seen != len(self.running) or not reqs:
            return None  # someone running was not in prev (budget), or nothing to do
        return DecodeBatch.build(reqs, positions, n_outs, self.max_model_len, prev_rows=prev_rows)
