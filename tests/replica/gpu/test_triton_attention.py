"""Triton paged-attention kernels vs a float64 dense reference, on fresh random inputs.

Shapes cover GQA (Qwen2.5: 14/2 heads, Llama-3.2: 32/8), pages of 16..256 tokens,
split-K decode, empty (padding) decode rows, prefix hits and chunked prefill
(queries starting at start_pos > 0)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")  # CPU-only installs may lack it (these tests need CUDA or its interpreter)
from replica.attention.triton_decode import paged_decode_attention
from replica.attention.triton_kv_write import store_kv
from replica.attention.triton_prefill import paged_prefill_attention
from tests.replica.gpu._reference import attend, gather_kv, random_block_tables, rel_err

TOL = 1e-2


def _cache(num_blocks, page, hkv, dim, dtype, device, gen):
    # Random everywhere (never zeros): wrong indexing shows up as a wrong answer.
    k = torch.randn(num_blocks, page, hkv, dim, generator=gen).to(dtype).to(device)
    v = torch.randn(num_blocks, page, hkv, dim, generator=gen).to(dtype).to(device)
    return k, v


@pytest.mark.parametrize("hkv,dim,page", [(2, 64, 16), (8, 64, 128), (3, 40, 32)])
def test_store_kv_writes_exactly_the_mapped_slots(kernel_device, kernel_dtype, hkv, dim, page):
    gen = torch.Generator().manual_seed(hkv * 1000 + page)
    num_blocks, n = 6, 37
    kc, vc = _cache(num_blocks, page, hkv, dim, kernel_dtype, kernel_device, gen)
    kc0, vc0 = kc.clone(), vc.clone()
    slots = torch.randperm(num_blocks * page, generator=gen)[:n].to(torch.int64)
    slots[5] = -1  # padding token: must not be written
    # Keys as HF hands them over: [1, kv_heads, T, D] viewed as [T, kv_heads, D] (strided).
    key = torch.randn(1, hkv, n, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    value = torch.randn(1, hkv, n, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    k_t, v_t = key[0].transpose(0, 1), value[0].transpose(0, 1)
    store_kv(k_t, v_t, kc, vc, slots.to(kernel_device))

    exp_k, exp_v = kc0.view(-1, hkv, dim).clone(), vc0.view(-1, hkv, dim).clone()
    keep = slots >= 0
    exp_k[slots[keep]] = k_t[keep.to(kernel_device)]
    exp_v[slots[keep]] = v_t[keep.to(kernel_device)]
    assert torch.equal(kc.view(-1, hkv, dim), exp_k)
    assert torch.equal(vc.view(-1, hkv, dim), exp_v)


def test_store_kv_rejects_bad_shapes(kernel_device):
    kc = torch.zeros(2, 16, 2, 8, device=kernel_device)
    with pytest.raises(ValueError):
        store_kv(
            torch.zeros(3, 2, 4, device=kernel_device),
            torch.zeros(3, 2, 4, device=kernel_device),
            kc,
            kc,
            torch.zeros(3, dtype=torch.int64, device=kernel_device),
        )


DECODE_CASES = [
    # hq, hkv, dim, page, context lengths, num_splits
    (14, 2, 64, 16, [1, 17, 40, 5], 1),
    (14, 2, 64, 128, [300, 129, 7], 4),
    (32, 8, 64, 256, [600, 1, 255], 2),
    (4, 4, 32, 32, [0, 70, 33], 3),  # 0: padding row -> zeros; non power-of-two splits
]


@pytest.mark.parametrize("hq,hkv,dim,page,lens,splits", DECODE_CASES)
def test_paged_decode_matches_reference(kernel_device, kernel_dtype, hq, hkv, dim, page, lens, splits):
    gen = torch.Generator().manual_seed(sum(lens) + page)
    nblk = [max(1, math.ceil(n / page)) for n in lens]
    num_blocks = sum(nblk) + 3
    kc, vc = _cache(num_blocks, page, hkv, dim, kernel_dtype, kernel_device, gen)
    bt = random_block_tables(len(lens), nblk, num_blocks, gen).to(kernel_device)
    q = torch.randn(len(lens), hq, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=kernel_device)
    scale = dim**-0.5
    for window, softcap in [(None, None), (37, None), (None, 1.5)]:
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(
            q, kc, vc, bt, ctx, scale, out=out, num_splits=splits, sliding_window=window, softcap=softcap
        )
        refs, outs = [], []
        for b, n in enumerate(lens):
            if n == 0:
                assert torch.all(out[b] == 0), "padding row must be zeros"
                continue
            k, v = gather_kv(kc, bt[b], n), gather_kv(vc, bt[b], n)
            refs.append(attend(q[b : b + 1], k, v, torch.tensor([n - 1]), scale, window, softcap))
            outs.append(out[b : b + 1])
        assert rel_err(torch.cat(outs), torch.cat(refs)) <= TOL, (window, softcap)


def test_paged_decode_default_splits(kernel_device, kernel_dtype):
    gen = torch.Generator().manual_seed(7)
    lens, page, hq, hkv, dim = [513, 64], 64, 8, 2, 64
    nblk = [math.ceil(n / page) for n in lens]
    kc, vc = _cache(sum(nblk), page, hkv, dim, kernel_dtype, kernel_device, gen)
    bt = random_block_tables(2, nblk, sum(nblk), gen).to(kernel_device)
    q = torch.randn(2, hq, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    out = paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=kernel_device), 0.125)
    ref = torch.cat(
        [
            attend(q[b : b + 1], gather_kv(kc, bt[b], n), gather_kv(vc, bt[b], n), torch.tensor([n - 1]), 0.125)
            for b, n in enumerate(lens)
        ]
    )
    assert rel_err(out, ref) <= TOL


PREFILL_CASES = [
    # hq, hkv, dim, page, [(start_pos, q_len)]
    (14, 2, 64, 16, [(0, 5), (0, 70), (0, 1)]),  # plain prompts
    (14, 2, 64, 128, [(128, 40), (0, 130), (77, 1)]),  # prefix hit, fresh, chunk continuing
    (32, 8, 64, 256, [(300, 100), (0, 257)]),
    (6, 3, 40, 32, [(31, 33), (64, 2)]),  # head_dim not a power of two
]


@pytest.mark.parametrize("hq,hkv,dim,page,chunks", PREFILL_CASES)
def test_paged_prefill_matches_reference(kernel_device, kernel_dtype, hq, hkv, dim, page, chunks):
    gen = torch.Generator().manual_seed(sum(s + n for s, n in chunks) + page)
    totals = [s + n for s, n in chunks]
    nblk = [math.ceil(t / page) for t in totals]
    num_blocks = sum(nblk) + 2
    kc, vc = _cache(num_blocks, page, hkv, dim, kernel_dtype, kernel_device, gen)
    bt = random_block_tables(len(chunks), nblk, num_blocks, gen).to(kernel_device)
    q_lens = [n for _, n in chunks]
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=kernel_device)
    seq_lens = torch.tensor(totals, dtype=torch.int32, device=kernel_device)
    q = torch.randn(sum(q_lens), hq, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    scale = dim**-0.5
    for window, softcap in [(None, None), (50, None), (None, 2.0)]:
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(
            q, kc, vc, bt, cu, seq_lens, max(q_lens), scale, out=out, sliding_window=window, softcap=softcap
        )
        refs = []
        for i, (s, n) in enumerate(chunks):
            k, v = gather_kv(kc, bt[i], s + n), gather_kv(vc, bt[i], s + n)
            refs.append(attend(q[cu[i] : cu[i + 1]], k, v, torch.arange(s, s + n), scale, window, softcap))
        assert rel_err(out, torch.cat(refs)) <= TOL, (window, softcap)


def test_write_then_prefill_then_decode_agree(kernel_device, kernel_dtype):
    """End to end on one layer: write a prompt's K/V by slot mapping, prefill it, then
    decode the next token; the decode output equals the prefill output of a prompt one
    token longer (same function, two kernels)."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, dim, page, n = 8, 2, 64, 32, 45
    num_blocks = 4
    kc = torch.randn(num_blocks, page, hkv, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    vc = torch.randn_like(kc)
    bt = torch.tensor([[2, 0]], dtype=torch.int32, device=kernel_device)
    pos = torch.arange(n + 1)
    slots = (bt[0].cpu()[pos // page].long() * page + pos % page).to(kernel_device)
    key = torch.randn(n + 1, hkv, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    val = torch.randn(n + 1, hkv, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    q = torch.randn(n + 1, hq, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    store_kv(key, val, kc, vc, slots)
    i32 = dict(dtype=torch.int32, device=kernel_device)
    pre = paged_prefill_attention(
        q, kc, vc, bt, torch.tensor([0, n + 1], **i32), torch.tensor([n + 1], **i32), n + 1, 0.125
    )
    dec = paged_decode_attention(q[n:], kc, vc, bt, torch.tensor([n + 1], **i32), 0.125, num_splits=2)
    ref = attend(q, key, val, pos, 0.125)
    assert rel_err(pre, ref) <= TOL
    assert rel_err(dec, ref[n:]) <= TOL
