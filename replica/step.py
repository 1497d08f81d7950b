"""What one step computes: the scheduler's output, which the runner reads and the scheduler
applies back. A leaf module (it imports only ``request`` and ``stopping``).

A step is one of two kinds (``SchedulerOutput.kind``), never both:
- ``"chunks"``: one ``ScheduledChunk`` per request, any mix of prefill chunks and decodes;
- ``"decode"``: a ``DecodeBatch``, one row per request, each computing one token and sampling the
  next. Every decode-only step is one: those ``Scheduler.schedule`` builds (the tokens known on
  the host) and those ``AsyncScheduler.schedule_next`` derives from a step still on the device
  (each row's token is the one that step samples in a given row: async scheduling's steady state).

Why a decode step has its own array form: built as one ``ScheduledChunk`` per request, then
unpacked again in the runner and in ``update``, it costs a few microseconds per request per
step, about a millisecond of host time per step at batch 256. A ``DecodeBatch`` holds the same
step as a few numpy arrays; the next step is derived from it with array operations (drop the
rows that ended, advance positions, append a block where a row crossed a page boundary), the
runner copies the arrays straight into its staging buffers, and ``update`` reads them without
building anything per row. ``as_chunks()`` gives the per-request view on demand (the eager
path, test runners).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from replica.request import Request, SamplingParams
from replica.stopping import length_limits

if TYPE_CHECKING:
    from replica.grammar import GrammarState

# A token id not known yet when the step was scheduled: the token the previous step samples.
# Only the last token of a chunk can be one; the runner fills it in on the device.
PLACEHOLDER_TOKEN = -1


class ScheduledChunk(NamedTuple):
    """One request's share of a step: compute ``token_ids`` at positions
    ``start_pos .. start_pos + len(token_ids) - 1`` and, if ``sample`` is set,
    sample the next token from the last position's logits.

    ``block_table`` covers every position up to the end of this chunk; the KV of
    positions before ``start_pos`` is already in the cache (earlier steps or
    prefix-cache hits).

    A NamedTuple, not a frozen dataclass, because one is built per request per step on the
    host's critical path: construction is ~2.5x cheaper (tuple.__new__ instead of a
    frozen __init__'s object.__setattr__ per field). Immutable all the same.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool
    params: SamplingParams
    num_output_tokens: int  # outputs so far: the index of the token sampled now (seeded RNG)
    # Prompt + outputs so far (only needed by repetition-aware samplers and tests).
    prompt_len: int = 0
    # The request's own token lists (references, not copies): penalties read the history from them.
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    grammar: GrammarState | None = None  # the request's matcher (structured output), if any

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


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


@dataclass(frozen=True, eq=False)
class DecodeBatch:
    """One decode step, one row per request. Row ``i`` computes the token at ``positions[i]``
    and samples output number ``num_output_tokens[i] + 1``. That token is ``token_ids[i]`` when
    the host knows it, else the one the previous step samples in its row ``prev_rows[i]`` (not
    known on the host when this step is built)."""

    requests: tuple[Request, ...]
    request_ids: tuple[str, ...]
    positions: np.ndarray  # int64 [B]
    num_output_tokens: np.ndarray  # int64 [B]: outputs before this step's sample
    token_ids: np.ndarray | None  # int64 [B], or None: every row takes the previous step's token
    prev_rows: np.ndarray | None  # int64 [B] when token_ids is None
    block_tables: np.ndarray  # int32 [B, W], rows padded with 0 after num_blocks
    num_blocks: np.ndarray  # int64 [B]
    # Per-request values that never change while it decodes (shared by successors while no row leaves):
    limit: np.ndarray  # int64 [B]: stopping.length_limit, the output count that ends it by LENGTH
    min_tokens: np.ndarray  # int64 [B]
    greedy: np.ndarray  # bool [B]: the graph's argmax is the token (greedy without penalties or a bias)
    check_stop_ids: np.ndarray  # bool [B]: stop_token_ids or a grammar (its matcher may end it on any token)
    needs_host: np.ndarray  # bool [B]: penalties or a grammar (the eager path: it needs the last token)
    num_logprobs: np.ndarray  # int64 [B]: alternatives the row asks for, -1 for no logprobs
    prompt_len: np.ndarray  # int64 [B]
    # Every EOS id some row checks (a superset once rows leave): candidates for an exact check.
    eos_ids: np.ndarray  # int64 [E]

    def __len__(self) -> int:
        return len(self.request_ids)

    @cached_property
    def plain_greedy(self) -> bool:
        """Every row greedy with its min_tokens already met: the argmax is the whole sampler."""
        return bool(self.greedy.all() and (self.num_output_tokens >= self.min_tokens).all())

    def as_chunks(self) -> tuple[ScheduledChunk, ...]:
        """The same step as one ScheduledChunk per request (built on demand, not per step)."""
        tables = self.block_tables.tolist()
        toks = [PLACEHOLDER_TOKEN] * len(self) if self.token_ids is None else self.token_ids.tolist()
        return tuple(
            ScheduledChunk(
                request_id=req.request_id,
                token_ids=(tok,),
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
            for i, (req, tok, pos, n_out, nb, plen) in enumerate(
                zip(
                    self.requests,
                    toks,
                    self.positions.tolist(),
                    self.num_output_tokens.tolist(),
                    self.num_blocks.tolist(),
                    self.prompt_len.tolist(),
                )
            )
        )

    @staticmethod
    def build(
        requests: Sequence[Request],
        positions: Sequence[int],
        num_output_tokens: Sequence[int],
        max_model_len: int,
        *,
        token_ids: Sequence[int] | None = None,
        prev_rows: Sequence[int] | None = None,
    ) -> DecodeBatch:
        """From per-request values: either every row's ``token_ids`` or every row's ``prev_rows``."""
        if (token_ids is None) == (prev_rows is None):
            raise ValueError("a decode batch takes its tokens from token_ids or from prev_rows")
        b = len(requests)
        tables, nblocks = pack_block_tables([r.block_table for r in requests])
        # One pass over the requests, then a column per value (one per row and value costs more).
        cols = np.array(
            [
                (
                    len(r.prompt_token_ids),
                    p.max_tokens,
                    p.min_tokens,
                    p.greedy and not p.processes_logits,
                    bool(p.stop_token_ids) or p.guided is not None,
                    p.uses_penalties or p.guided is not None,
                    -1 if p.logprobs is None else p.logprobs,
                )
                for r in requests
                for p in (r.params,)
            ],
            np.int64,
        ).reshape(b, 7)
        prompt_len = np.ascontiguousarray(cols[:, 0])
        return DecodeBatch(
            requests=tuple(requests),
            request_ids=tuple([r.request_id for r in requests]),
            positions=np.asarray(positions, np.int64),
            num_output_tokens=np.asarray(num_output_tokens, np.int64),
            token_ids=None if token_ids is None else np.asarray(token_ids, np.int64),
            prev_rows=None if prev_rows is None else np.asarray(prev_rows, np.int64),
            block_tables=tables,
            num_blocks=nblocks,
            limit=length_limits(cols[:, 1], prompt_len, max_model_len),
            min_tokens=np.ascontiguousarray(cols[:, 2]),
            greedy=cols[:, 3] != 0,
            check_stop_ids=cols[:, 4] != 0,
            needs_host=cols[:, 5] != 0,
            num_logprobs=np.ascontiguousarray(cols[:, 6]),
            prompt_len=prompt_len,
            eos_ids=np.array(
                sorted(set().union(*(r.eos_token_ids for r in requests if not r.params.ignore_eos))), np.int64
            ),
        )

    def successor(self, rows: np.ndarray) -> DecodeBatch:
        """The next step for the requests in ``rows`` of this one (each computes the token this
        step samples for it). Block tables are copied as they are: the caller extends the rows
        that crossed into a new block (``set_blocks``) before handing the step out."""
        if len(rows) == len(self.request_ids):  # nobody left: the constant rows carry over as they are
            return DecodeBatch(
                self.requests,
                self.request_ids,
                self.positions + 1,
                self.num_output_tokens + 1,
                None,
                rows,
                self.block_tables.copy(),
                self.num_blocks.copy(),
                self.limit,
                self.min_tokens,
                self.greedy,
                self.check_stop_ids,
                self.needs_host,
                self.num_logprobs,
                self.prompt_len,
                self.eos_ids,
            )
        sel = rows.tolist()
        requests, ids = self.requests, self.request_ids
        return DecodeBatch(
            tuple([requests[i] for i in sel]),
            tuple([ids[i] for i in sel]),
            self.positions[rows] + 1,
            self.num_output_tokens[rows] + 1,
            None,
            rows,
            self.block_tables[rows],
            self.num_blocks[rows],
            self.limit[rows],
            self.min_tokens[rows],
            self.greedy[rows],
            self.check_stop_ids[rows],
            self.needs_host[rows],
            self.num_logprobs[rows],
            self.prompt_len[rows],
            self.eos_ids,
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


@dataclass(frozen=True)
class SchedulerOutput:
    """One step: ``chunks`` or ``decode``, never both (``kind`` says which). Consumers branch
    on the kind once, at the top."""

    # kind "chunks": one per scheduled request, running ones first, then newly admitted ones.
    chunks: tuple[ScheduledChunk, ...] = ()
    num_batched_tokens: int = 0  # tokens computed in this step (at most the token budget)
    # Requests preempted (blocks freed, back to waiting) while this step was built.
    preempted_ids: tuple[str, ...] = ()
    # kind "decode": the array form of a decode-only step.
    decode: DecodeBatch | None = None

    def __post_init__(self) -> None:
        if self.decode is not None and self.chunks:
            raise ValueError("a SchedulerOutput holds chunks or a decode batch, not both")

    @property
    def kind(self) -> Literal["chunks", "decode"]:
        return "chunks" if self.decode is None else "decode"

    @property
    def is_empty(self) -> bool:
        return self.decode is None and not self.chunks

    @property
    def request_ids(self) -> tuple[str, ...]:
        if self.decode is not None:
            return self.decode.request_ids
        return tuple(c.request_id for c in self.chunks)

    def as_chunks(self) -> tuple[ScheduledChunk, ...]:
        """The step as one chunk per request, whatever its kind (for per-request readers)."""
        return self.chunks if self.decode is None else self.decode.as_chunks()
