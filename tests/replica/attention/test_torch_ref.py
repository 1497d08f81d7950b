"""The torch reference paged attention against plain dense causal attention, computed per sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from replica.attention.metadata import AttentionMetadata
from replica.attention.torch_ref import TorchAttentionBackend, write_kv


def dense_causal(q, k, v, start, scale, window=None, chunk=None):
    """q [n, H, D] at positions start..start+n-1; k/v [L, KVH, D] at 0..L-1 -> [n, H, D]."""
    h, kvh = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // kvh, dim=1)
    v = v.repeat_interleave(h // kvh, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    kpos = torch.arange(k.shape[0])[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    if chunk is not None:  # chunked local attention (Llama 4): keys of the query's own chunk
        allowed &= kpos >= qpos // chunk * chunk
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


def make_case(rng: np.random.Generator, *, num_seqs, heads, kv_heads, head_dim, block_size, num_blocks):
    """Random sequences with random prefixes already cached, random disjoint block tables."""
    starts = rng.integers(0, 20, num_seqs)
    q_lens = rng.integers(1, 9, num_seqs)
    q_lens[rng.random(num_seqs) < 0.4] = 1  # a mix of decodes and prefills
    seq_lens = starts + q_lens
    need = -(-seq_lens // block_size)
    perm = rng.permutation(num_blocks)
    assert need.sum() <= num_blocks
    offs = np.concatenate([[0], np.cumsum(need)])
    tables = [perm[offs[i] : offs[i + 1]] for i in range(num_seqs)]
    full_k = [torch.randn(int(n), kv_heads, head_dim, dtype=torch.float64) for n in seq_lens]
    full_v = [torch.randn(int(n), kv_heads, head_dim, dtype=torch.float64) for n in seq_lens]
    q = [torch.randn(int(n), heads, head_dim, dtype=torch.float64) for n in q_lens]
    return starts, q_lens, seq_lens, tables, full_k, full_v, q


def metadata(starts, q_lens, seq_lens, tables, block_size) -> AttentionMetadata:
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    width = max(len(t) for t in tables)
    bt = np.zeros((len(tables), width), np.int64)
    slots = []
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
        for p in range(int(starts[i]), int(seq_lens[i])):
            slots.append(int(t[p // block_size]) * block_size + p % block_size)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.from_numpy(qsl).int(),
        seq_lens=torch.from_numpy(seq_lens).int(),
        block_tables=torch.from_numpy(bt).int(),
        query_start_loc_host=qsl,
        seq_lens_host=seq_lens.astype(np.int64),
        max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_size=block_size,
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize(("window", "chunk"), [(None, None), (5, None), (None, 6)])
def test_matches_dense_causal_attention(seed, heads, kv_heads, window, chunk):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    block_size, num_blocks, head_dim = 4, 96, 8
    starts, q_lens, seq_lens, tables, full_k, full_v, qs = make_case(
        rng,
        num_seqs=5,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        num_blocks=num_blocks,
    )
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=torch.float64)
    v_cache = k_cache.clone()
    # The cached prefix, placed by hand (independently of write_kv).
    for i, t in enumerate(tables):
        for p in range(int(starts[i])):
            k_cache[t[p // block_size], p % block_size] = full_k[i][p]
            v_cache[t[p // block_size], p % block_size] = full_v[i][p]
    meta = metadata(starts, q_lens, seq_lens, tables, block_size)
    new_k = torch.cat([full_k[i][int(starts[i]) :] for i in range(5)])
    new_v = torch.cat([full_v[i][int(starts[i]) :] for i in range(5)])
    scale = head_dim**-0.5
    out = TorchAttentionBackend().forward(
        torch.cat(qs),
        new_k,
        new_v,
        k_cache,
        v_cache,
        meta,
        scale=scale,
        sliding_window=window,
        softcap=None,
        chunk_size=chunk,
    )
    expected = torch.cat(
        [dense_causal(qs[i], full_k[i], full_v[i], int(starts[i]), scale, window, chunk) for i in range(5)]
    )
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # Every position of every sequence now sits in its block at its offset.
    for i, t in enumerate(tables):
        for p in range(int(seq_lens[i])):
            assert torch.equal(k_cache[t[p // block_size], p % block_size], full_k[i][p])
            assert torch.equal(v_cache[t[p // block_size], p % block_size], full_v[i][p])


def test_write_kv_skips_negative_slots():
    k_cache = torch.zeros(2, 2, 1, 3)
    v_cache = torch.zeros(2, 2, 1, 3)
    key = torch.arange(9, dtype=torch.float32).reshape(3, 1, 3) + 1
    write_kv(k_cache, v_cache, key, -key, torch.tensor([3, -1, 0]))
    assert torch.equal(k_cache[1, 1, 0], key[0, 0])
    assert torch.equal(k_cache[0, 0, 0], key[2, 0])
    assert int((k_cache != 0).sum()) == 6  # the padding token wrote nothing
    assert torch.equal(v_cache[1, 1, 0], -key[0, 0])


def test_softcap_matches_dense():
    torch.manual_seed(0)
    block_size, kvh, h, d, n = 4, 1, 2, 8, 6
    k = torch.randn(n, kvh, d, dtype=torch.float64) * 4
    v = torch.randn(n, kvh, d, dtype=torch.float64)
    q = torch.randn(n, h, d, dtype=torch.float64) * 4
    k_cache = torch.zeros(2, block_size, kvh, d, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    meta = metadata(np.array([0]), np.array([n]), np.array([n]), [np.array([1, 0])], block_size)
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, scale=0.3, sliding_window=None, softcap=2.0)
    kk = k.repeat_interleave(h, 1)
    s = 2.0 * torch.tanh(torch.einsum("qhd,khd->hqk", q, kk) * 0.3 / 2.0)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    expected = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.repeat_interleave(h, 1))
    torch.testing.assert_close(out, expected)
