"""CUDA graphs for decode-only steps: the whole HF forward (and greedy sampling) replayed
from graphs captured at padded batch sizes 1, 2, 4, ..., max.

Small models are launch-bound: an eager HF forward issues about a thousand kernels from
Python (tens of ms of host time), a replay issues one graph. Every input lives in a
persistent device buffer that the graph reads; a step copies its inputs into pinned host
staging buffers and from there into the device buffers (asynchronous copies), replays the
graph of the smallest captured size >= batch, and reads the sampled ids back with one
host copy. Padding rows have slot -1 (no KV write) and context length 0 (no attention
work, a zero row), so they cost almost nothing and never touch real cache blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from replica.attention.metadata import AttentionMetadata
from replica.outputs import RunnerOutput


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

    def __init__(self, request_ids: tuple[str, ...], host: torch.Tensor, event: torch.cuda.Event) -> None:
        self._ids = request_ids
        self._host = host
        self._event = event
        self._tokens: list[int] | None = None

    @property
    def request_ids(self) -> tuple[str, ...]:
        return self._ids

    def result(self) -> RunnerOutput:
        if self._tokens is None:
            self._event.synchronize()  # releases the GIL while the device works
            self._tokens = self._host.tolist()
        return RunnerOutput(request_ids=self._ids, token_ids=self._tokens)


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
    ) -> None:
        self.forward = forward
        self.device = device
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.sizes = graph_batch_sizes(max_batch_size)
        n, m = max_batch_size, max_blocks_per_seq
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        # Persistent device inputs (graphs read these addresses).
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.seq_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, m, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        # Pinned host staging: packed int64 rows [ids | positions | slots | seq_lens | src rows]
        # and the block table. Two sets, used by alternate replays: with async scheduling the
        # host fills one while the previous replay's copies from the other may still be queued.
        # Reuse is safe because the engine reads replay N's tokens (an event after its copies)
        # before it prepares replay N+2.
        self._stage = [torch.zeros(5, n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._stage_bt = [torch.zeros(n, m, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._stage_dev = torch.zeros(5, n, **i64)
        # Sampled ids of the last replay (device; next step's placeholders read them) and
        # their pinned host copies (two: one being read while the next is written).
        self.last_tokens = torch.zeros(n, **i64)
        self._out_host = [torch.zeros(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self.pool = None

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
        """Device side of the input copies, captured in the graph: the staged rows into the
        inputs the model reads, and each continuing row's token from the previous replay's
        sampled ids (``src`` row >= 0). One replay instead of a handful of small launches."""
        dev = self._stage_dev
        src = dev[4, :bs]
        self.input_ids[:bs].copy_(torch.where(src >= 0, self.last_tokens[src.clamp(min=0)], dev[0, :bs]))
        self.positions[:bs].copy_(dev[1, :bs])
        self.slot_mapping[:bs].copy_(dev[2, :bs])
        self.seq_lens[:bs].copy_(dev[3, :bs])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first (smaller graphs reuse its memory pool)."""
        # Staged padding rows: no KV write (slot -1), no attention work (length 0), no source row.
        self._stage_dev.zero_()
        self._stage_dev[2].fill_(-1)
        self._stage_dev[4].fill_(-1)
        self.pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            ids, pos = self.input_ids[:bs][None], self.positions[:bs][None]
            # Warm up on a side stream (Triton compiles, cuBLAS picks kernels) before capture.
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                self._unpack(bs)
                self.forward(ids, pos, meta)
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._unpack(bs)
                logits = self.forward(ids, pos, meta)
                tokens = torch.argmax(logits, dim=-1)
            self.graphs[bs], self.logits[bs], self.tokens[bs] = g, logits, tokens
        torch.cuda.synchronize(self.device)

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
        stage, stage_bt = self._stage[self._turn], self._stage_bt[self._turn]
        st, bt = stage.numpy(), stage_bt.numpy()
        page = self.block_size
        pos = inp.positions
        st[0, :b] = inp.token_ids
        st[1, :b] = pos
        bt[:b, :w] = inp.block_tables
        bt[:b, w:] = 0
        st[2, :b] = inp.block_tables[np.arange(b), pos // page].astype(np.int64) * page + pos % page
        st[3, :b] = pos + 1
        st[4, :b] = -1 if inp.src_rows is None else inp.src_rows
        # Padding rows: no KV write, no attention work.
        st[0, b:bs] = 0
        st[1, b:bs] = 0
        st[2, b:bs] = -1
        st[3, b:bs] = 0
        st[4, b:bs] = -1
        # Two host-to-device copies; the graph unpacks them (see _unpack).
        self._stage_dev[:, :bs].copy_(stage[:, :bs], non_blocking=True)
        self.block_tables[:bs].copy_(stage_bt[:bs], non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:b], self.tokens[bs][:b]

    def emit(self, request_ids: tuple[str, ...], tokens: torch.Tensor) -> GraphStep:
        """Record the last replay's sampled ids (device ``[B]``): kept on the device for the
        next replay's placeholders and copied to pinned host memory without waiting."""
        b = len(request_ids)
        self.last_tokens[:b].copy_(tokens)
        host = self._out_host[self._turn][:b]
        host.copy_(self.last_tokens[:b], non_blocking=True)
        # Blocking: the waiting host thread sleeps instead of spinning a core (cudaEventBlockingSync);
        # a spinning waiter per replica steals CPU from the proxy, ingress and other replicas.
        event = torch.cuda.Event(blocking=True)
        event.record()
        return GraphStep(request_ids, host, event)
