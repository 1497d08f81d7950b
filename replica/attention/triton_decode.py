"""Triton kernel: paged decode attention (one query token per sequence), GQA, split-K.

One program handles one (sequence, kv head, split): the whole query group of that kv
head is one small matrix, so each K/V tile read from the cache serves every query head
of the group. The context is cut into ``num_splits`` contiguous ranges (flash-decoding)
so short batches with long contexts still fill the GPU; a second kernel merges the
splits by their log-sum-exp. The grid depends only on the batch size and the split
count, never on context lengths, so a launch is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def page_tile_offsets(bt_row, n, nmask, kvh, c_stride_block, c_stride_slot, c_stride_h, PAGE: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton DSL
    """Cache offsets of key positions ``n`` of one sequence (block table row ``bt_row``),
    for KV head ``kvh``; shared by the decode and prefill kernels (inlined by Triton)."""
    blk = tl.load(bt_row + n // PAGE, mask=nmask, other=0).to(tl.int64)
    return blk * c_stride_block + (n % PAGE) * c_stride_slot + kvh * c_stride_h


@triton.jit
def apply_softcap(s, softcap):  # type: ignore[no-untyped-def]  # Triton DSL
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # softcap * tanh(s / softcap)


@triton.jit
def _decode_split_kernel(  # type: ignore[no-untyped-def]  # Triton DSL
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    ctx_ptr,
    o_ptr,  # [B, Hq, D] when NUM_SPLITS == 1, else partial acc [B, Hq, S, D] fp32
    lse_ptr,  # [B, Hq, S] fp32 (unused when NUM_SPLITS == 1)
    scale,
    softcap,
    window,
    chunk,
    q_stride_b,
    q_stride_h,
    o_stride_b,
    o_stride_h,
    bt_stride_b,
    c_stride_block,
    c_stride_slot,
    c_stride_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )

    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)  # key j is visible iff j > (ctx - 1) - window
    if USE_CHUNK:
        lo = tl.maximum(lo, (ctx - 1) // chunk * chunk)  # chunked local attention: the query's chunk
    num_tiles = tl.cdiv(ctx - lo, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(ctx, start + tiles_per_split * BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * bt_stride_b
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        off = page_tile_offsets(bt_row, n, nmask, kvh, c_stride_block, c_stride_slot, c_stride_h, PAGE)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_G, BLOCK_N]
        if USE_SOFTCAP:
            s = apply_softcap(s, softcap)
        s = tl.where(nmask[None, :], s * LOG2E, float("-inf"))  # log2 domain from here on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # empty context (padding row): zeros, not NaN
    if NUM_SPLITS == 1:
        out = acc / l_safe[:, None]
        tl.store(
            o_ptr + b.to(tl.int64) * o_stride_b + heads[:, None] * o_stride_h + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=gmask[:, None] & dmask[None, :],
        )
    else:
        # Partials: acc normalised by its own l, and lse (log2 domain); empty splits give
        # lse = -inf and weigh nothing in the merge.
        row = (b * tl.num_programs(1) * GROUP + heads).to(tl.int64) * NUM_SPLITS + split
        tl.store(
            o_ptr + row[:, None] * BLOCK_D + d[None, :],
            acc / l_safe[:, None],
            mask=gmask[:, None],
        )
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(  # type: ignore[no-untyped-def]  # Triton DSL
    part_ptr,  # [B, Hq, S, BLOCK_D] fp32
    lse_ptr,  # [B, Hq, S] fp32
    o_ptr,
    o_stride_b,
    o_stride_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    smask = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    row = (b * NUM_HEADS + h).to(tl.int64) * NUM_SPLITS
    lse = tl.load(lse_ptr + row + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    w = tl.exp2(lse - m)
    w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    part = tl.load(part_ptr + (row + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    tl.store(
        o_ptr + b.to(tl.int64) * o_stride_b + h * o_stride_h + d,
        out.to(o_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def default_num_splits(batch_size: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Enough programs to cover the GPU about twice; a power of two, 1..32.

    Depends on the batch only (not on context lengths) so one CUDA graph per padded
    batch size keeps one launch shape."""
    progs = max(1, batch_size * num_kv_heads)
    s = 1
    while s < 32 and progs * s < 2 * num_sms:
        s *= 2
    return s


def check_paged_layout(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: str
) -> tuple[int, int, int, int, int]:
    """Validate what both attention kernels assume of their inputs; returns
    ``(rows, heads, head_dim, page, kv_heads)``. ``rows`` names query's first axis in messages."""
    if query.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"query must be [{rows}, H, D] and caches [blocks, page, kv_heads, D]")
    n, hq, dim = query.shape
    _, page, hkv, cdim = k_cache.shape
    if cdim != dim or hq % hkv != 0:
        raise ValueError(f"head_dim {dim} vs cache {cdim}, or {hq} heads not a multiple of {hkv} kv heads")
    if query.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("query needs a unit last stride and the caches must be contiguous")
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two for the Triton kernels; got {page}")
    return n, hq, dim, page, hkv


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    query ``[B, num_heads, head_dim]``; caches ``[num_blocks, page, num_kv_heads, head_dim]``;
    block_tables ``[B, max_blocks]`` int32; context_lens ``[B]`` int32 (tokens in the cache
    for each sequence, this step's token included; 0 gives a zero row, for padding).
    ``sliding_window``: key j is visible to the query at position p iff ``p - window < j``;
    ``softcap``: scores become ``softcap * tanh(score / softcap)``.
    Returns ``[B, num_heads, head_dim]`` in the query's dtype.
    """
    bsz, hq, dim, page, hkv = check_paged_layout(query, k_cache, v_cache, "B")
    group = hq // hkv
    if out is None:
        out = torch.empty(bsz, hq, dim, dtype=query.dtype, device=query.device)
    if bsz == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_g = max(16, triton.next_power_of_2(group))
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv)
    if block_n is None:
        # Measured on H100 (bench/GPU_NOTES.md): 128-token tiles win with few splits, 64 with many.
        block_n = max(16, min(128 if num_splits <= 4 else 64, page))
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = softcap is not None and softcap > 0
    use_chunk = chunk_size is not None and chunk_size > 0
    scalars = (
        float(scale),
        float(softcap or 0.0) if use_softcap else 1.0,
        int(sliding_window or 0) if use_window else 0,
        int(chunk_size or 1),  # unused unless USE_CHUNK
    )
    common = dict(
        GROUP=group,
        HEAD_DIM=dim,
        PAGE=page,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        USE_SOFTCAP=use_softcap,
        USE_WINDOW=use_window,
        USE_CHUNK=use_chunk,
        # float32 caches (exactness tests) get full-precision dots, not tf32.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    if num_splits == 1:
        _decode_split_kernel[(bsz, hkv, 1)](
            query,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            out,
            out,
            *scalars,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            block_tables.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            NUM_SPLITS=1,
            num_warps=num_warps,
            num_stages=num_stages,
            **common,
        )
        return out
    part = torch.empty(bsz, hq, num_splits, block_d, dtype=torch.float32, device=query.device)
    lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=query.device)
    _decode_split_kernel[(bsz, hkv, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        part,
        lse,
        *scalars,
        query.stride(0),
        query.stride(1),
        0,
        0,
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_SPLITS=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        **common,
    )
    _decode_merge_kernel[(bsz, hq)](
        part,
        lse,
        out,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=hq,
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=1,
    )
    return out
