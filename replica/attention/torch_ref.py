"""Paged attention in plain torch: the reference every faster backend is tested against.

Runs anywhere (CPU in tests and CPU serving; CUDA as a fallback). Per step and layer it
1. writes the new tokens' K/V into the paged cache by slot mapping, then
2. per sequence, gathers K/V of positions ``0 .. seq_len-1`` from the sequence's blocks and attends
   causally: the new query at position ``p`` sees keys ``0 .. p`` (and only ``p - window < j`` with a
   sliding window). Decode sequences (one new token) are batched into one gather; sequences with
   several new tokens (prefill, chunked prefill, prefix hits) are looped on the host. No mask ever
   spans two sequences.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from replica.attention.metadata import AttentionMetadata


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[T, KVH, D]`` into caches ``[num_blocks, block_size, KVH, D]``
    at flat slots ``slot_mapping [T]``; a negative slot marks a padding token that is not written."""
    _, _, kvh, d = k_cache.shape
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):  # a host sync: reference path only
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are upcast like HF's eager softmax; float64 stays float64 for exact tests.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None or softcap <= 0:
        return scores
    return softcap * torch.tanh(scores / softcap)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Attention of the new queries ``[T, H, D]`` over the cached context (which must already hold
    the new tokens' K/V). Returns ``[T, H, D]`` in ``query.dtype``."""
    _t, h, d = query.shape
    _, block_size, kvh, _ = k_cache.shape
    if h % kvh:
        raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    g = h // kvh
    cdt = _compute_dtype(query.dtype)
    out = torch.empty_like(query)
    qsl = meta.query_start_loc_host
    seq_lens = meta.seq_lens_host
    q_lens = meta.query_lens_host
    device = query.device

    decode = np.flatnonzero(q_lens == 1)
    if decode.size:
        max_len = int(seq_lens[decode].max())
        nb = -(-max_len // block_size)
        dec_t = torch.from_numpy(decode).to(device)
        tok_t = torch.from_numpy(qsl[decode]).to(device)
        lens_t = torch.from_numpy(seq_lens[decode]).to(device)
        bt = meta.block_tables.index_select(0, dec_t)[:, :nb].long()  # [Bd, nb]
        k = k_cache[bt].reshape(len(decode), nb * block_size, kvh, d).to(cdt)
        v = v_cache[bt].reshape(len(decode), nb * block_size, kvh, d).to(cdt)
        q = query.index_select(0, tok_t).reshape(len(decode), kvh, g, d).to(cdt)
        scores = torch.einsum("bkgd,bskd->bkgs", q, k) * scale
        scores = _softcap(scores, softcap)
        kpos = torch.arange(nb * block_size, device=device)
        valid = kpos[None, :] < lens_t[:, None]
        if sliding_window is not None:
            valid &= kpos[None, :] > (lens_t[:, None] - 1 - sliding_window)
        if chunk_size is not None:  # chunked local attention: only keys of the query's own chunk
            valid &= kpos[None, :] >= (lens_t[:, None] - 1) // chunk_size * chunk_size
        scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
        probs = torch.softmax(scores, dim=-1)
        # Slots past the context may hold anything (even NaN); 0 * NaN would leak into the output.
        v = v.masked_fill(~valid[:, :, None, None], 0)
        o = torch.einsum("bkgs,bskd->bkgd", probs, v).reshape(len(decode), h, d)
        out.index_copy_(0, tok_t, o.to(query.dtype))

    for i in np.flatnonzero(q_lens > 1):
        a, b = int(qsl[i]), int(qsl[i + 1])
        n_ctx = int(seq_lens[i])
        start = n_ctx - (b - a)
        nb = -(-n_ctx // block_size)
        blocks = meta.block_tables[i, :nb].long()
        k = k_cache[blocks].reshape(-1, kvh, d)[:n_ctx].to(cdt).transpose(0, 1)  # [KVH, L, D]
        v = v_cache[blocks].reshape(-1, kvh, d)[:n_ctx].to(cdt).transpose(0, 1)
        q = query[a:b].to(cdt).reshape(b - a, kvh, g, d).permute(1, 2, 0, 3)  # [KVH, G, q, D]
        scores = torch.matmul(q, k[:, None].transpose(-1, -2)) * scale  # [KVH, G, q, L]
        scores = _softcap(scores, softcap)
        qpos = torch.arange(start, n_ctx, device=device)
        kpos = torch.arange(n_ctx, device=device)
        allowed = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            allowed &= kpos[None, :] > (qpos[:, None] - sliding_window)
        if chunk_size is not None:
            allowed &= kpos[None, :] >= qpos[:, None] // chunk_size * chunk_size
        scores = scores.masked_fill(~allowed, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, v[:, None])  # [KVH, G, q, D]
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, h, d).to(query.dtype)
    return out


class TorchAttentionBackend:
    """The reference backend: any device, any float dtype."""

    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

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
        write_kv(k_cache, v_cache, key, value, meta.slot_mapping)
        return paged_attention(
            query,
            k_cache,
            v_cache,
            meta,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            chunk_size=chunk_size,
        )
