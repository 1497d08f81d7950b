"""The Triton paged-attention backend (CUDA): KV write by slot mapping, then decode or prefill.

A step whose every chunk has one query (``max_query_len == 1``) runs the split-K decode kernel,
whose launch shape depends on the batch size alone, so it can be captured in a CUDA graph. Any
other step (prefill, chunked prefill, prefix hits, mixed prefill + decode) runs the varlen
prefill kernel over the page table in one launch. Semantics equal ``torch_ref.paged_attention``.
"""

from __future__ import annotations

import torch

from replica.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"
    # Decode steps launch a fixed grid per batch size and never sync with the host, so the
    # runner may capture them in CUDA graphs (replica.cuda_graphs).
    cuda_graph_safe = True

    def __init__(self) -> None:
        self._num_sms: dict[int, int] = {}

    def supports(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    def num_sms(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 132  # the Triton interpreter on CPU (tests): any fixed value will do
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._num_sms:
            self._num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return self._num_sms[idx]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        # Imported here so that importing the registry never needs Triton (CPU-only installs).
        from replica.attention.triton_decode import default_num_splits, paged_decode_attention
        from replica.attention.triton_kv_write import store_kv
        from replica.attention.triton_prefill import paged_prefill_attention

        store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        num_seqs = meta.seq_lens.shape[0]
        if meta.max_query_len == 1 and query.shape[0] == num_seqs:
            splits = default_num_splits(num_seqs, k_cache.shape[2], self.num_sms(query.device))
            return paged_decode_attention(
                query,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                num_splits=splits,
                sliding_window=sliding_window,
                softcap=softcap,
                chunk_size=chunk_size,
            )
        return paged_prefill_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            meta.max_query_len,
            scale,
            sliding_window=sliding_window,
            softcap=softcap,
            chunk_size=chunk_size,
        )
