"""CUDA graphs for one-chunk prefill steps: the forward of a lone prompt replayed from graphs
captured at padded token counts 16, 32, 64, ..., max.

Why: an idle server's time to first token is one prefill step, and an eager prefill of a few
hundred tokens on a small model is bound by the host (about 270 kernel launches from Python
against ~3 ms of GPU work on an H200), so it also varies with whatever else the host runs. A
replay is one launch. Only the forward is captured; sampling stays eager, so every sampling
option works unchanged. Multi-chunk steps, prompt logprobs and tensor parallelism stay eager.

Padding is after the real tokens: padding tokens have slot -1 (no KV write) and position 0, and
the attention kernel ends every query at its own position, so real rows never see them; only
the last real token's logits are computed. Buckets are powers of two so that a prompt and its
bucket take the same kernel paths: the prefill attention tile switches at 32 query tokens
(``triton_prefill``) and the fused kernels hand over to HF's at ``MAX_FUSED_ROWS`` (1024).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from replica.attention.metadata import AttentionMetadata
from replica.cuda_graphs import capture_graph
from replica.host_step import HostStep

MIN_TOKENS = 16
MAX_TOKENS = 1024  # fused_ops.MAX_FUSED_ROWS: above it HF's kernels run, a different path

# forward(input_ids [1, T], position_ids [1, T], meta, logits_index [1]) -> logits [1, V]
PrefillForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor], torch.Tensor]


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """16, 32, 64, ... up to the largest power of two <= ``max_tokens`` (capped at 1024);
    empty below 16 (no prefill graphs)."""
    sizes, s = [], MIN_TOKENS
    while s <= min(max_tokens, MAX_TOKENS):
        sizes.append(s)
        s *= 2
    return sizes


class PrefillGraphs:
    """Captured one-chunk prefill graphs over one model and one KV cache.

    Inputs live in one persistent device buffer of int64 (token ids | positions | slots | query
    length, sequence length, logits row | block table) filled by one host-to-device copy; the
    graph casts what the attention kernel reads as int32 itself.
    """

    def __init__(
        self,
        forward: PrefillForward,
        *,
        device: torch.device,
        block_size: int,
        max_tokens: int,
        max_blocks_per_seq: int,
    ) -> None:
        self.sizes = prefill_graph_sizes(max_tokens)
        if not self.sizes:
            raise ValueError(f"prefill graphs need max_tokens >= {MIN_TOKENS}, got {max_tokens}")
        self.forward = forward
        self.device = device
        self.block_size = block_size
        self.max_tokens = t = self.sizes[-1]
        self.max_blocks_per_seq = w = max_blocks_per_seq
        self._len_col = 3 * t  # query length, sequence length, logits row, then the block table
        n = 3 * t + 3 + w
        # One staging buffer: a replay's inputs are consumed before the next is staged, since the
        # runner reads every prefill step's tokens (a host sync) before it prepares another step.
        self._stage = torch.zeros(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._dev = torch.zeros(n, dtype=torch.int64, device=device)
        i32: dict[str, Any] = dict(dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(2, **i32)
        self.seq_lens = torch.zeros(1, **i32)
        self.block_tables = torch.zeros(1, w, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    def bucket(self, num_tokens: int) -> int | None:
        for s in self.sizes:
            if s >= num_tokens:
                return s
        return None

    def fits(self, host: HostStep) -> bool:
        """A step of one chunk of 2+ tokens that a captured graph holds (one token is a decode
        step: eager, it takes the decode attention kernel, which the graphs do not)."""
        return bool(self.graphs) and self._holds(host)

    def _holds(self, host: HostStep) -> bool:
        return (
            len(host.seq_lens) == 1
            and 1 < len(host.ids) <= self.max_tokens
            and host.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    # -- capture -------------------------------------------------------------------------------

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        t, c = self.max_tokens, self._len_col
        meta = AttentionMetadata(
            slot_mapping=self._dev[2 * t : 2 * t + size],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            query_start_loc_host=np.array([0, size], np.int64),
            seq_lens_host=np.array([size], np.int64),  # unused by graph-safe backends
            max_query_len=size,  # sizes the attention grid: queries past the real length return at once
            max_seq_len=self.max_blocks_per_seq * self.block_size,
            block_size=self.block_size,
        )
        return self._dev[:size][None], self._dev[t : t + size][None], self._dev[c + 2 : c + 3], meta

    def _unpack(self) -> None:
        """Captured: the int32 inputs of the attention kernel from the staged int64 ones."""
        c = self._len_col
        self.query_start_loc[1:].copy_(self._dev[c : c + 1])
        self.seq_lens.copy_(self._dev[c + 1 : c + 2])
        self.block_tables[0].copy_(self._dev[c + 3 :])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (smaller graphs reuse its memory pool). Warm-up and
        capture run on padding only: every slot -1, so nothing is written to the KV cache."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._stage_padding(size)
            self._dev.copy_(self._stage)
            self.graphs[size], self.logits[size] = capture_graph(self.device, pool, partial(self._captured, size))
        torch.cuda.synchronize(self.device)

    def _captured(self, size: int) -> torch.Tensor:
        ids, pos, keep, meta = self._views(size)
        self._unpack()
        return self.forward(ids, pos, meta, keep)

    def _stage_padding(self, size: int) -> None:
        st, t, c = self._stage.numpy(), self.max_tokens, self._len_col
        st[:] = 0
        st[2 * t : 3 * t] = -1
        st[c], st[c + 1], st[c + 2] = size, size, size - 1

    # -- replay --------------------------------------------------------------------------------

    def stage(self, host: HostStep) -> int:
        """Write ``host``'s inputs, padded, into the staging buffer; returns the graph size."""
        n = len(host.ids)
        size = self.bucket(n)
        if size is None or not self._holds(host):
            raise ValueError(f"no prefill graph for a step of {n} tokens in {len(host.seq_lens)} chunks")
        st, t, c = self._stage.numpy(), self.max_tokens, self._len_col
        st[:n] = host.ids
        st[n:size] = 0
        st[t : t + n] = host.positions
        st[t + n : t + size] = 0
        st[2 * t : 2 * t + n] = host.slots
        st[2 * t + n : 2 * t + size] = -1
        st[c], st[c + 1], st[c + 2] = n, host.seq_lens[0], n - 1
        w = host.block_tables.shape[1]
        st[c + 3 : c + 3 + w] = host.block_tables[0]
        st[c + 3 + w :] = 0
        return size

    def replay(self, host: HostStep) -> torch.Tensor:
        """Run the step's forward; returns the last token's logits ``[1, V]``, a device view of
        the graph's output (valid until the next replay)."""
        size = self.stage(host)
        self._dev.copy_(self._stage, non_blocking=True)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[size]
