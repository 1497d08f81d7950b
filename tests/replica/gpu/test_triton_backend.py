"""TritonAttentionBackend vs the torch reference backend on the same AttentionMetadata:
same cache contents after the write, same attention output (bf16 rel err <= 1e-2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replica.attention.metadata import AttentionMetadata
from replica.attention.torch_ref import TorchAttentionBackend
from replica.attention.triton_backend import TritonAttentionBackend
from tests.replica.gpu._reference import rel_err


def _metadata(chunks, page, num_blocks, device, gen) -> AttentionMetadata:
    """chunks: [(start_pos, q_len)] -> metadata with shuffled distinct blocks per sequence."""
    seq_lens = np.array([s + n for s, n in chunks], np.int64)
    q_lens = np.array([n for _, n in chunks], np.int64)
    nblk = -(-seq_lens // page)
    perm = torch.randperm(num_blocks, generator=gen).numpy()[: nblk.sum()]
    bt = np.zeros((len(chunks), nblk.max()), np.int64)
    i = 0
    for r, nb in enumerate(nblk):
        bt[r, :nb] = perm[i : i + nb]
        i += nb
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    pos = np.concatenate([np.arange(s, s + n) for s, n in chunks])
    seq = np.repeat(np.arange(len(chunks)), q_lens)
    slots = bt[seq, pos // page] * page + pos % page
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        block_tables=torch.tensor(bt, **i32),
        query_start_loc_host=qsl,
        seq_lens_host=seq_lens,
        max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_size=page,
    )


@pytest.mark.parametrize(
    "chunks",
    [
        [(10, 1), (200, 1), (0, 1), (63, 1)],  # decode-only step
        [(0, 40), (100, 1), (64, 17), (5, 1)],  # mixed: prefill, decode, chunked prefill
    ],
)
@pytest.mark.parametrize(("window", "chunk_size"), [(None, None), (24, None), (None, 48)])
def test_triton_backend_matches_torch_reference(kernel_device, kernel_dtype, chunks, window, chunk_size):
    gen = torch.Generator().manual_seed(len(chunks) * 31 + (window or 0))
    hq, hkv, dim, page, num_blocks = 14, 2, 64, 32, 24
    meta = _metadata(chunks, page, num_blocks, kernel_device, gen)
    t = meta.num_tokens
    kc = torch.randn(num_blocks, page, hkv, dim, generator=gen).to(kernel_dtype).to(kernel_device)
    vc = torch.randn_like(kc)
    q = torch.randn(1, hq, t, dim, generator=gen).to(kernel_dtype).to(kernel_device)[0].transpose(0, 1)
    k = torch.randn(1, hkv, t, dim, generator=gen).to(kernel_dtype).to(kernel_device)[0].transpose(0, 1)
    v = torch.randn(1, hkv, t, dim, generator=gen).to(kernel_dtype).to(kernel_device)[0].transpose(0, 1)
    kw = dict(scale=dim**-0.5, sliding_window=window, softcap=None, chunk_size=chunk_size)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = TorchAttentionBackend().forward(q, k, v, kc_ref, vc_ref, meta, **kw)
    out = TritonAttentionBackend().forward(q, k, v, kc, vc, meta, **kw)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert out.shape == ref.shape
    assert rel_err(out, ref.double()) <= 1e-2


def test_triton_backend_supports_only_cuda():
    b = TritonAttentionBackend()
    assert not b.supports(torch.device("cpu"))
    try:
        import triton  # noqa: F401
    except ImportError:
        has_triton = False
    else:
        has_triton = True
    # CUDA is supported exactly when Triton can be imported (CPU-only installs may lack it).
    assert b.supports(torch.device("cuda")) is has_triton
