"""Triton kernel: write new keys/values into the paged KV cache by slot mapping.

Cache layout (one tensor per layer for K and one for V):
``[num_blocks, block_size, num_kv_heads, head_dim]``. A slot is
``block_id * block_size + offset``; a negative slot marks a padding token whose
K/V must not be written (padded CUDA-graph batches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(  # type: ignore[no-untyped-def]  # Triton DSL
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    c_stride_slot,
    c_stride_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # Padding tokens (slot < 0) are masked out rather than branched on: one code path.
    mask = (h < NUM_HEADS) & (d < HEAD_DIM) & (slot >= 0)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * k_stride_t + h * k_stride_h + d, mask=mask)
    v = tl.load(v_ptr + t64 * v_stride_t + h * v_stride_h + d, mask=mask)
    dst = slot * c_stride_slot + h * c_stride_h + d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` (any strides with a
    unit last stride) into the caches at ``slot_mapping`` ``[num_tokens]`` (int32/int64)."""
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key/value must be [tokens, kv_heads, head_dim]; got {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache/v_cache must be [num_blocks, block_size, kv_heads, head_dim] and equal")
    n, h, d = key.shape
    if tuple(k_cache.shape[2:]) != (h, d):
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != key heads/dim {(h, d)}")
    if slot_mapping.shape != (n,):
        raise ValueError(f"slot_mapping must be [{n}]; got {tuple(slot_mapping.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key/value need a unit stride on head_dim")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    if n == 0:
        return
    _store_kv_kernel[(n,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=h,
        HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(h),
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=1 if h * d <= 512 else 4,
    )
