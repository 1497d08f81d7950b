"""Triton kernel: causal varlen prefill attention that reads K/V through the page table.

Queries of a flat ragged batch ``[total_q, num_heads, head_dim]``; sequence ``i`` owns
rows ``cu_seqlens_q[i] .. cu_seqlens_q[i+1]-1`` and these are its positions
``start_pos[i] ..`` (``start_pos > 0`` for a prefix-cache hit or a later chunk of a
chunked prefill; the kernel derives it as ``seq_len - q_len``). Keys/values of every position up to the chunk's end must already be in
the cache (write this step's K/V with ``store_kv`` first), so one code path covers the
cached prefix and the new tokens alike. Causality is an index comparison inside the
kernel: no dense mask is ever built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.attention.triton_decode import LOG2E, apply_softcap, check_paged_layout, page_tile_offsets


@triton.jit
def _prefill_kernel(  # type: ignore[no-untyped-def]  # Triton DSL
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    o_ptr,
    scale,
    softcap,
    window,
    chunk,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    bt_stride_b,
    c_stride_block,
    c_stride_slot,
    c_stride_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    mt = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if mt * BLOCK_M >= q_len:
        return
    pos0 = tl.load(seq_lens_ptr + seq) - q_len  # position of the chunk's first query

    m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mmask = m < q_len
    dmask = d < HEAD_DIM
    rows = (q_start + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    )
    qpos = pos0 + m
    # Last key this tile can see (causal), exclusive.
    kv_end = pos0 + tl.minimum(q_len, (mt + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * bt_stride_b
    lo = 0
    if USE_WINDOW:
        # Oldest key any query of this tile can see, rounded down to a tile.
        lo = tl.maximum(pos0 + mt * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    if USE_CHUNK:  # chunked local attention: the first key of the tile's first query's chunk
        lo = tl.maximum(lo, (pos0 + mt * BLOCK_M) // chunk * chunk // BLOCK_N * BLOCK_N)
    for n0 in range(lo, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        off = page_tile_offsets(bt_row, n, nmask, kvh, c_stride_block, c_stride_slot, c_stride_h, PAGE)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if USE_SOFTCAP:
            s = apply_softcap(s, softcap)
        # Key n is visible to the query at qpos iff n <= qpos (and qpos - window < n).
        visible = (n[None, :] <= qpos[:, None]) & nmask[None, :]
        if USE_WINDOW:
            visible = visible & (n[None, :] > qpos[:, None] - window)
        if USE_CHUNK:
            visible = visible & (n[None, :] >= qpos[:, None] // chunk * chunk)
        s = tl.where(visible, s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see nothing in a tile (window, or rows past the chunk): keep exp2 finite.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + rows[:, None] * o_stride_t + h * o_stride_h + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Causal attention for a ragged batch of query chunks over their paged contexts.

    query ``[total_q, num_heads, head_dim]``; caches ``[num_blocks, page, num_kv_heads,
    head_dim]`` already holding this step's K/V; block_tables ``[B, max_blocks]`` int32;
    cu_seqlens_q ``[B+1]`` int32; seq_lens ``[B]`` int32 (context length after this step, so
    a chunk's first query sits at ``seq_len - q_len``); max_q_len: the longest chunk (host
    int, sizes the grid). ``sliding_window``/``softcap`` as in ``paged_decode_attention``.
    Returns ``[total_q, num_heads, head_dim]``.
    """
    total, hq, dim, page, hkv = check_paged_layout(query, k_cache, v_cache, "T")
    bsz = cu_seqlens_q.shape[0] - 1
    if seq_lens.shape != (bsz,) or block_tables.shape[0] < bsz:
        raise ValueError("seq_lens must be [B] and block_tables [B, max_blocks]")
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if total == 0 or bsz == 0 or max_q_len <= 0:
        return out
    block_d = triton.next_power_of_2(dim)
    if block_m is None:
        block_m = 64 if max_q_len > 32 else 16
    if block_n is None:
        block_n = 64
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = softcap is not None and softcap > 0
    use_chunk = chunk_size is not None and chunk_size > 0
    grid = (triton.cdiv(max_q_len, block_m), bsz, hq)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        out,
        float(scale),
        float(softcap or 0.0) if use_softcap else 1.0,
        int(sliding_window or 0) if use_window else 0,
        int(chunk_size or 1),  # unused unless USE_CHUNK
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=hq // hkv,
        HEAD_DIM=dim,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        USE_SOFTCAP=use_softcap,
        USE_WINDOW=use_window,
        USE_CHUNK=use_chunk,
        # float32 caches (exactness tests) get full-precision dots, not tf32.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
