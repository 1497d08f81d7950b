"""Per-step paged-attention inputs, built once by the model runner and handed to every layer.

The runner passes ``attn_metadata=AttentionMetadata`` and ``kv_cache=PagedKVCache`` as keyword
arguments to the Hugging Face model's forward; transformers forwards unknown kwargs unchanged down
to the registered attention function (see ``replica.attention.registry``). Nothing per-step lives in
module globals.

Token layout: all scheduled chunks are concatenated into one ragged sequence of ``T`` tokens
(``input_ids`` of shape ``[1, T]``); sequence ``i`` owns tokens
``query_start_loc[i] : query_start_loc[i + 1]`` at positions
``seq_lens[i] - query_len_i .. seq_lens[i] - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """What every attention layer needs for one step (same for all layers).

    Device tensors (on the model's device):
      slot_mapping     [T]    int64  cache slot of each new token: block * block_size + offset
      query_start_loc  [B+1]  int32  cu_seqlens of the new tokens (0, q0, q0+q1, ...)
      seq_lens         [B]    int32  context length after this step (start_pos + query_len)
      block_tables     [B, M] int32  block ids per sequence, right-padded with 0 (padding never read)
    Host mirrors (numpy, int64), so host-looping backends never sync with the device:
      query_start_loc_host [B+1], seq_lens_host [B]
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_host: np.ndarray
    seq_lens_host: np.ndarray
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens_host.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc_host[-1])

    @property
    def query_lens_host(self) -> np.ndarray:
        return np.diff(self.query_start_loc_host)


@dataclass(frozen=True)
class PagedKVCache:
    """The runner's KV pool: one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads,
    head_dim]``; ``layer(i)`` returns that layer's (K, V) views, each
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` and contiguous."""

    data: torch.Tensor

    @property
    def num_layers(self) -> int:
        return int(self.data.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.data.shape[2])

    @property
    def block_size(self) -> int:
        return int(self.data.shape[3])

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        kv = self.data[layer_idx]
        return kv[0], kv[1]
