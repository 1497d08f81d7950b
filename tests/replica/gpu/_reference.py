"""Float64 dense references for the paged attention kernels (per sequence, gathered caches)."""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Positions 0..length-1 of one sequence: ``[length, kv_heads, head_dim]``."""
    page = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table[pos // page].long()
    return cache[blocks, pos % page]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q ``[Tq, Hq, D]`` at absolute positions q_pos; k/v ``[Tk, Hkv, D]``; causal by position
    (key j visible to query p iff j <= p, and p - window < j with a window)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(k.shape[0], device=q.device)[None, :]
    qpos = q_pos[:, None].to(q.device)
    visible = kpos <= qpos
    if window:
        visible &= kpos > qpos - window
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm()).item()


def random_block_tables(
    num_seqs: int, blocks_per_seq: list[int], num_blocks: int, gen: torch.Generator
) -> torch.Tensor:
    """Distinct, shuffled block ids per sequence; unused entries are 0 (never read)."""
    need = sum(blocks_per_seq)
    assert need <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)[:need]
    width = max(blocks_per_seq)
    bt = torch.zeros(num_seqs, width, dtype=torch.int32)
    i = 0
    for s, nb in enumerate(blocks_per_seq):
        bt[s, :nb] = perm[i : i + nb].int()
        i += nb
    return bt
