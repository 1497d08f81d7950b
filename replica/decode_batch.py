"""A decode-only step in array form: the steady state of async scheduling.

Once nobody is waiting, every step is "each running request computes the token the previous
step sampled for it and samples the next one". Building that step as one ``ScheduledChunk``
per request, then unpacking the chunks again in the runner and in ``update``, costs a few
microseconds per request per step: at batch 256 that alone is about a millisecond of host
time per step. A ``DecodeBatch`` holds the same step as a few numpy arrays with one row per
request; the next step is derived from this one with vectorised operations (drop the rows
that ended, advance positions, append a block where a row crossed a page boundary), the
runner copies the arrays straight into its staging buffers, and ``update`` reads them
without building anything per row. ``chunks`` still gives the per-request view on demand
(eager fallback, test runners).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from replica.outputs import PLACEHOLDER_TOKEN, ScheduledChunk
from replica.request import Request

# Columns of ``DecodeBatch.static``: per-request values that never change while it decodes.
# LOGPROBS: the alternatives a row asks for, -1 for none (most rows: a vectorised check per step).
LIMIT, MIN_TOKENS, GREEDY, CHECK_STOP_IDS, PROMPT_LEN, LOGPROBS = range(6)
_NUM_STATIC = 6


def pack_block_tables(tables: Sequence[Sequence[int]], num_blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Block tables as one zero-padded int32 array ``[B, max len]`` and their lengths. With
    ``num_blocks``, every id must be in ``[0, num_blocks)`` (checked before the int32 cast)."""
    b = len(tables)
    lens = np.fromiter((len(t) for t in tables), np.int64, b)
    width = int(lens.max(initial=1)) or 1
    out = np.zeros((b, width), np.int32)
    flat = np.fromiter((x for t in tables for x in t), np.int64, int(lens.sum()))
    if num_blocks is not None and flat.size and (flat.min() < 0 or flat.max() >= num_blocks):
        raise ValueError(f"block ids must be in [0, {num_blocks}), got min {flat.min()} max {flat.max()}")
    out[np.arange(width)[None, :] < lens[:, None]] = flat
    return out, lens


def static_row(req: Request, max_model_len: int) -> tuple[int, int, int, int, int, int]:
    p = req.params
    prompt_len = len(req.prompt_token_ids)
    # The output count at which LENGTH ends the request (max_tokens, or a full context).
    limit = min(p.max_tokens, max_model_len - prompt_len)
    # GREEDY: the graph's argmax is the token (a greedy row with penalties or a bias is not).
    # CHECK_STOP_IDS: also a grammar row (its matcher may terminate it on any token).
    check = int(bool(p.stop_token_ids) or p.guided is not None)
    logprobs = -1 if p.logprobs is None else p.logprobs
    return limit, p.min_tokens, int(p.greedy and not p.processes_logits), check, prompt_len, logprobs


@dataclass(frozen=True, eq=False)
class DecodeBatch(Sequence[ScheduledChunk]):
    """One decode step, one row per request. Row ``i`` computes the token at
    ``positions[i]``, which is the token the previous step sampled in its row
    ``prev_rows[i]`` (not known on the host when this step is built), and samples
    output number ``num_output_tokens[i]``."""

    requests: tuple[Request, ...]
    request_ids: tuple[str, ...]
    positions: np.ndarray  # int64 [B]
    num_output_tokens: np.ndarray  # int64 [B]: outputs before this step's sample
    prev_rows: np.ndarray  # int64 [B]
    block_tables: np.ndarray  # int32 [B, W], rows padded with 0 after num_blocks
    num_blocks: np.ndarray  # int64 [B]
    static: np.ndarray  # int64 [B, 6]: LIMIT, MIN_TOKENS, GREEDY, CHECK_STOP_IDS, PROMPT_LEN, LOGPROBS
    # Every EOS id some row checks (a superset once rows leave): candidates for an exact check.
    eos_ids: np.ndarray  # int64 [E]

    # A Sequence of its chunks, so that it can stand as a SchedulerOutput's ``chunks``.
    def __len__(self) -> int:
        return len(self.request_ids)

    def __getitem__(self, i: int) -> ScheduledChunk:  # type: ignore[override]  # no slices
        return self.chunks[i]

    def __iter__(self) -> Iterator[ScheduledChunk]:
        return iter(self.chunks)

    @cached_property
    def plain_greedy(self) -> bool:
        """Every row greedy with its min_tokens already met: the argmax is the whole sampler."""
        s = self.static
        return bool(s[:, GREEDY].all() and (self.num_output_tokens >= s[:, MIN_TOKENS]).all())

    @cached_property
    def chunks(self) -> tuple[ScheduledChunk, ...]:
        """The same step as one ScheduledChunk per request (built on demand, not per step)."""
        tables = self.block_tables.tolist()
        return tuple(
            ScheduledChunk(
                request_id=req.request_id,
                token_ids=(PLACEHOLDER_TOKEN,),
                start_pos=pos,
                block_table=tuple(tables[i][:nb]),
                sample=True,
                params=req.params,
                num_output_tokens=n_out,
                prompt_len=plen,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                grammar=req.grammar,
            )
            for i, (req, pos, n_out, nb, plen) in enumerate(
                zip(
                    self.requests,
                    self.positions.tolist(),
                    self.num_output_tokens.tolist(),
                    self.num_blocks.tolist(),
                    self.static[:, PROMPT_LEN].tolist(),
                )
            )
        )

    @staticmethod
    def build(
        requests: Sequence[Request],
        prev_rows: Sequence[int],
        positions: Sequence[int],
        num_output_tokens: Sequence[int],
        max_model_len: int,
    ) -> DecodeBatch:
        """From per-request values (the first decode step after a synchronous one)."""
        b = len(requests)
        tables, nblocks = pack_block_tables([r.block_table for r in requests])
        return DecodeBatch(
            requests=tuple(requests),
            request_ids=tuple(r.request_id for r in requests),
            positions=np.asarray(positions, np.int64),
            num_output_tokens=np.asarray(num_output_tokens, np.int64),
            prev_rows=np.asarray(prev_rows, np.int64),
            block_tables=tables,
            num_blocks=nblocks,
            static=np.array([static_row(r, max_model_len) for r in requests], np.int64).reshape(b, _NUM_STATIC),
            eos_ids=np.array(
                sorted(set().union(*(r.eos_token_ids for r in requests if not r.params.ignore_eos))), np.int64
            ),
        )

    def successor(self, rows: np.ndarray) -> DecodeBatch:
        """The next step for the requests in ``rows`` of this one (each computes the token this
        step samples for it). Block tables are copied as they are: the caller extends the rows
        that crossed into a new block (``set_blocks``) before handing the step out."""
        requests = self.requests
        ids = self.request_ids
        if len(rows) == len(requests):
            reqs, rids = requests, ids
        else:
            sel = rows.tolist()
            reqs = tuple([requests[i] for i in sel])
            rids = tuple([ids[i] for i in sel])
        return DecodeBatch(
            requests=reqs,
            request_ids=rids,
            positions=self.positions[rows] + 1,
            num_output_tokens=self.num_output_tokens[rows] + 1,
            prev_rows=rows,
            block_tables=self.block_tables[rows],
            num_blocks=self.num_blocks[rows],
            static=self.static[rows],
            eos_ids=self.eos_ids,
        )

    def set_blocks(self, row: int, block_table: Sequence[int]) -> None:
        """Replace ``row``'s block table (it got a new block), widening the table array when
        the row outgrows it. Only while the step is being built: its arrays are its own."""
        n = len(block_table)
        if n > self.block_tables.shape[1]:
            wide = np.zeros((len(self), n), np.int32)
            wide[:, : self.block_tables.shape[1]] = self.block_tables
            object.__setattr__(self, "block_tables", wide)
        self.block_tables[row, :n] = block_table
        self.num_blocks[row] = n
