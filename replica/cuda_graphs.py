"""CUDA graphs for decode-only steps: the whole HF forward (and greedy sampling) replayed
from graphs captured at padded batch sizes 1, 2, 4, ..., max.

Small models are launch-bound: an eager HF forward issues about a thousand kernels from
Python (tens of ms of host time), a replay issues one graph. Every input lives in a
persistent device buffer that the graph reads; a step copies its inputs into pinned host
staging buffers and from there into the device buffers (asynchronous copies), replays the
graph of the smallest captured size >= batch, and reads the sampled ids back with one
host copy. Padding rows have slot -1 (no KV write) and context length 0 (no attention
work, a zero row), so they cost almost nothing and never touch real cache blocks.

Tensor parallelism: every rank captures the same graphs, whose first device work broadcasts rank
0's staged rows and then its input ids (the previous replay's sampled tokens live on rank 0 only)
over the device group; the row-parallel layers' all-reduces are captured with the forward. Rank 0
tells the others the batch size of each replay (``TPGroup.send_graph``), and they replay it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from replica.attention.metadata import AttentionMetadata
from replica.logprobs import DeviceLogprobs
from replica.outputs import RunnerOutput
from replica.request import MAX_LOGPROBS

if TYPE_CHECKING:
    from replica.tp_executor import TPGroup

_T = TypeVar("_T")

# Columns of a staged row (then the block table).
_TOKEN, _POS, _SLOT, _LEN, _SRC = range(5)
_COLS = 5


def capture_graph(device: torch.device, pool: Any, body: Callable[[], _T]) -> tuple[torch.cuda.CUDAGraph, _T]:
    """Run ``body`` once on a side stream (Triton compiles, cuBLAS picks its kernels), then capture
    it into a graph in ``pool``; returns the graph and what the captured ``body`` returned (its
    output tensors, which every replay rewrites)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = body()
    return g, out


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, ... up to and including ``max_batch_size`` (itself if not a power)."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    sizes, s = [], 1
    while s < max_batch_size:
        sizes.append(s)
        s *= 2
    sizes.append(max_batch_size)
    return sizes


@dataclass
class DecodeInputs:
    """Host-side inputs of one decode step (numpy, unpadded, length B)."""

    token_ids: np.ndarray  # [B] int64 (a row with src_rows >= 0 may hold anything)
    positions: np.ndarray  # [B] int64: position of the new token (= tokens already cached)
    block_tables: np.ndarray  # [B, W] int32, each row zero-padded after its blocks
    # [B] int64 or None: row of the previous replay whose sampled token is this row's input
    # (async scheduling: that token never went through the host), -1 where token_ids holds it.
    src_rows: np.ndarray | None = None


class GraphStep:
    """The tokens of one replay on their way to pinned host memory (see ``DecodeGraphs.emit``)."""

    def __init__(
        self,
        graphs: DecodeGraphs,
        request_ids: tuple[str, ...],
        host: torch.Tensor,
        event: torch.cuda.Event,
        logprobs: DeviceLogprobs | None = None,
    ) -> None:
        self._graphs = graphs
        self._logprobs = logprobs  # pinned copies, complete with the event
        self._index = graphs.num_emitted  # its host buffer and event serve again two emits later
        self._ids = request_ids
        self._host = host
        self._event = event
        self._tokens: list[int] | None = None
        self._output: RunnerOutput | None = None

    @property
    def request_ids(self) -> tuple[str, ...]:
        return self._ids

    def result(self) -> RunnerOutput:
        if self._output is None:
            if self._graphs.num_emitted - self._index > 2:
                raise RuntimeError("a replay's tokens must be read before the replay after next")
            self._event.synchronize()  # releases the GIL while the device works
            self._tokens = tokens = self._host.tolist()
            logprobs = None
            if self._logprobs is not None:
                rows, ids = self._logprobs.rows, self._ids
                logprobs = dict(zip((ids[r] for r in rows), self._logprobs.to_host([tokens[r] for r in rows])))
            self._output = RunnerOutput(request_ids=self._ids, token_ids=tokens, logprobs=logprobs)
        return self._output


class DecodeGraphs:
    """Captured decode graphs over one model and one KV cache.

    ``forward(input_ids [1,B], position_ids [1,B], meta) -> logits [B, V]`` is the model call
    to capture (it must run only graph-safe device work). ``greedy`` also captures an argmax,
    so a greedy step returns token ids straight from the graph.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        *,
        device: torch.device,
        block_size: int,
        max_batch_size: int,
        max_blocks_per_seq: int,
        tp: TPGroup | None = None,
    ) -> None:
        self.forward = forward
        self.tp = tp
        self.device = device
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.sizes = graph_batch_sizes(max_batch_size)
        n, m = max_batch_size, max_blocks_per_seq
        i64: dict[str, Any] = dict(dtype=torch.int64, device=device)
        i32: dict[str, Any] = dict(dtype=torch.int32, device=device)
        # Persistent device inputs (graphs read these addresses).
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.seq_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, m, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        # Pinned host staging, one int32 row per request: [token id | position | slot | seq len |
        # source row | block table ...], so a replay needs one host-to-device copy. Two buffers,
        # used by alternate replays: with async scheduling the host fills one while the previous
        # replay's copy from the other may still be queued. Reuse is safe because the engine
        # reads replay N's tokens (an event after its copies) before it prepares replay N+2.
        self._stage = [torch.zeros(n, _COLS + m, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._stage_dev = torch.zeros(n, _COLS + m, **i32)
        # A padding row: no KV write (slot -1), no attention work (length 0), no source row.
        self._pad_row = np.zeros(_COLS + m, np.int32)
        self._pad_row[_SLOT] = self._pad_row[_SRC] = -1
        # Sampled ids of the last replay (device; next step's placeholders read them; a greedy
        # graph writes its argmax there itself) and their pinned host copies, with an event each.
        self.last_tokens = torch.zeros(n, **i64)
        self._out_host = [torch.zeros(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        # Blocking: the waiting host thread sleeps instead of spinning a core (cudaEventBlockingSync);
        # a spinning waiter per replica steals CPU from the proxy, ingress and other replicas.
        self._events = [torch.cuda.Event(blocking=True) for _ in range(2)]
        # Logprobs of the rows that ask (replica/logprobs.py): their row indices in, values and ids
        # out, through pinned buffers alternating like the staging ones (a pinned allocation per
        # step cost ~0.2 ms of host time each).
        self._lp_rows = [torch.zeros(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._lp_values = [torch.zeros(n, 1 + MAX_LOGPROBS, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self._lp_ids = [torch.zeros(n, MAX_LOGPROBS, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.num_emitted = 0
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self.pool: Any = None

    # -- capture ---------------------------------------------------------------------------

    def _meta(self, bs: int) -> AttentionMetadata:
        qsl = np.arange(bs + 1, dtype=np.int64)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_start_loc_host=qsl,
            seq_lens_host=np.ones(bs, dtype=np.int64),  # unused by graph-safe backends
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
            block_size=self.block_size,
        )

    def _unpack(self, bs: int) -> None:
        """Device side of the input copy, captured in the graph: the staged rows into the
        inputs the model reads, and each continuing row's token from the previous replay's
        sampled ids (source row >= 0). One replay instead of a handful of small launches."""
        dev = self._stage_dev[:bs]
        if self.tp is not None:
            self.tp.device_group.broadcast(dev, 0).wait()
        src = dev[:, _SRC]
        self.input_ids[:bs].copy_(torch.where(src >= 0, self.last_tokens[src.clamp(min=0)], dev[:, _TOKEN]))
        if self.tp is not None:  # rank 0's last_tokens are the real ones
            self.tp.device_group.broadcast(self.input_ids[:bs], 0).wait()
        self.positions[:bs].copy_(dev[:, _POS])
        self.slot_mapping[:bs].copy_(dev[:, _SLOT])
        self.seq_lens[:bs].copy_(dev[:, _LEN])
        self.block_tables[:bs].copy_(dev[:, _COLS:])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first (smaller graphs reuse its memory pool)."""
        self._stage_dev.copy_(torch.from_numpy(self._pad_row).expand_as(self._stage_dev))
        self.pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            g, (logits, tokens) = capture_graph(self.device, self.pool, partial(self._captured, bs))
            self.graphs[bs], self.logits[bs], self.tokens[bs] = g, logits, tokens
        torch.cuda.synchronize(self.device)

    def _captured(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._unpack(bs)
        logits = self.forward(self.input_ids[:bs][None], self.positions[:bs][None], self._meta(bs))
        tokens = torch.argmax(logits, dim=-1)
        self.last_tokens[:bs].copy_(tokens)  # a greedy step's tokens, where the next reads them
        return logits, tokens

    # -- replay ----------------------------------------------------------------------------

    def padded_size(self, batch: int) -> int | None:
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    def fits(self, batch: int, max_blocks: int) -> bool:
        return bool(self.graphs) and batch <= self.max_batch_size and max_blocks <= self.max_blocks_per_seq

    def replay(self, inp: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decode step; returns (logits [B, V], greedy token ids [B]) as device views
        of the graph's outputs (valid until the next replay). Call ``emit`` with the step's
        chosen tokens before the next replay."""
        b = len(inp.token_ids)
        bs = self.padded_size(b)
        if bs is None or bs not in self.graphs:
            raise ValueError(f"no graph for batch {b}")
        w = inp.block_tables.shape[1]
        if w > self.max_blocks_per_seq:
            raise ValueError("a block table is wider than the captured graphs allow")
        self._turn ^= 1
        stage = self._stage[self._turn]
        st = stage.numpy()
        page = self.block_size
        pos = inp.positions
        st[:b, _TOKEN] = inp.token_ids
        st[:b, _POS] = pos
        st[:b, _SLOT] = inp.block_tables[np.arange(b), pos // page] * page + pos % page
        st[:b, _LEN] = pos + 1
        st[:b, _SRC] = -1 if inp.src_rows is None else inp.src_rows
        st[:b, _COLS : _COLS + w] = inp.block_tables
        st[:b, _COLS + w :] = 0
        st[b:bs] = self._pad_row
        self._stage_dev[:bs].copy_(stage[:bs], non_blocking=True)  # the graph unpacks it (_unpack)
        if self.tp is not None:
            self.tp.send_graph(bs)
        self.graphs[bs].replay()
        return self.logits[bs][:b], self.tokens[bs][:b]

    def replay_as_worker(self, batch_size: int) -> None:
        """Tensor-parallel ranks 1..N-1: replay rank 0's graph of ``batch_size`` (its inputs
        arrive by the captured broadcasts; the logits are not read)."""
        self.graphs[batch_size].replay()

    def rows_on_device(self, rows: np.ndarray) -> torch.Tensor:
        """``rows`` of the last replay (those asking for logprobs) as a device index, copied
        without a stream sync or an allocation."""
        host = self._lp_rows[self._turn][: len(rows)]
        host.numpy()[:] = rows
        return host.to(self.device, non_blocking=True)

    def _logprobs_to_host(self, lp: DeviceLogprobs) -> DeviceLogprobs:
        r, k = lp.top_ids.shape
        if lp.values.dtype != torch.float32 or k > MAX_LOGPROBS:
            return lp.to_pinned()
        values = self._lp_values[self._turn][:r, : 1 + k]
        ids = self._lp_ids[self._turn][:r, :k]
        values.copy_(lp.values, non_blocking=True)
        ids.copy_(lp.top_ids, non_blocking=True)
        return DeviceLogprobs(lp.rows, lp.num_top, values, ids)

    def emit(
        self, request_ids: tuple[str, ...], tokens: torch.Tensor | None = None, logprobs: DeviceLogprobs | None = None
    ) -> GraphStep:
        """Record the last replay's sampled ids: ``tokens`` (device ``[B]``, from the sampler)
        or, with None, the graph's own argmax (already in ``last_tokens``). They stay on the
        device for the next replay's placeholders and are copied to pinned host memory
        without waiting; so are ``logprobs`` (rows that asked), behind the same event."""
        b = len(request_ids)
        if tokens is not None:
            self.last_tokens[:b].copy_(tokens)
        host = self._out_host[self._turn][:b]
        host.copy_(self.last_tokens[:b], non_blocking=True)
        pinned = self._logprobs_to_host(logprobs) if logprobs is not None else None
        event = self._events[self._turn]
        event.record()
        step = GraphStep(self, request_ids, host, event, pinned)
        self.num_emitted += 1
        return step
