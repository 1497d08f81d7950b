"""Logit processing before sampling, batched on the logits' device: presence / frequency
penalties (OpenAI), repetition penalty (Hugging Face), logit bias, min-p.

Only rows whose ``SamplingParams.processes_logits`` is set reach here; each feature costs one
scatter over the rows that use it, whatever the batch, in this order:

* repetition (over **prompt and output** tokens, as ``RepetitionPenaltyLogitsProcessor``): a seen
  token's logit is divided by the penalty when positive, multiplied by it otherwise;
* frequency / presence (over the **output** tokens): ``logit -= frequency * count + presence * (count > 0)``;
* logit bias: ``logit += bias`` for the listed ids (ids outside the vocabulary are ignored).

min-p filters after the temperature (``min_p_mask``), on the sampler's scaled logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from replica.request import SamplingParams


class HistoryRow(Protocol):
    @property
    def params(self) -> SamplingParams: ...

    @property
    def prompt_token_ids(self) -> Sequence[int]: ...

    @property
    def output_token_ids(self) -> Sequence[int]: ...


def _index(
    ids_per_row: Sequence[Sequence[int]], rows: Sequence[int], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of every id in range, as two device tensors (one copy each)."""
    lens = np.fromiter((len(ids) for ids in ids_per_row), np.int64, len(ids_per_row))
    flat = np.fromiter((t for ids in ids_per_row for t in ids), np.int64, int(lens.sum()))
    r = np.repeat(np.asarray(rows, np.int64), lens)
    ok = (flat >= 0) & (flat < vocab)
    return torch.from_numpy(r[ok]).to(device), torch.from_numpy(flat[ok]).to(device)


def apply_penalties(logits: torch.Tensor, rows: Sequence[HistoryRow], which: Sequence[int]) -> torch.Tensor:
    """Penalties and biases of rows ``which`` applied to ``logits [N, V]`` in place (the caller
    passes a copy in a float dtype); returns it."""
    vocab = logits.shape[1]
    dev, dt = logits.device, logits.dtype

    def column(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dt, device=dev)[:, None]

    rep = [i for i in which if rows[i].params.repetition_penalty != 1]
    if rep:
        r, t = _index(
            [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in rep], range(len(rep)), vocab, dev
        )
        seen = torch.zeros(len(rep), vocab, dtype=torch.bool, device=dev)
        seen[r, t] = True
        p = column([rows[i].params.repetition_penalty for i in rep])
        idx = torch.tensor(rep, device=dev)
        sub = logits.index_select(0, idx)
        logits[idx] = torch.where(seen, torch.where(sub > 0, sub / p, sub * p), sub)
    pf = [i for i in which if rows[i].params.presence_penalty != 0 or rows[i].params.frequency_penalty != 0]
    if pf:
        r, t = _index([rows[i].output_token_ids for i in pf], range(len(pf)), vocab, dev)
        counts = torch.zeros(len(pf), vocab, dtype=dt, device=dev)
        counts.index_put_((r, t), torch.ones_like(t, dtype=dt), accumulate=True)
        freq = column([rows[i].params.frequency_penalty for i in pf])
        pres = column([rows[i].params.presence_penalty for i in pf])
        idx = torch.tensor(pf, device=dev)
        logits[idx] -= freq * counts + pres * (counts > 0).to(dt)
    bias = [i for i in which if rows[i].params.logit_bias]
    if bias:
        pairs = [(i, t, b) for i in bias for t, b in rows[i].params.logit_bias if t < vocab]
        if pairs:
            ri, ti, bi = zip(*pairs, strict=True)
            logits.index_put_(
                (torch.tensor(ri, device=dev), torch.tensor(ti, device=dev)),
                torch.tensor(bi, dtype=dt, device=dev),
                accumulate=True,
            )
    return logits


def min_p_mask(x: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """``x [R, V]``: temperature-scaled logits whose row max is 0. Masks (to -inf) tokens whose
    probability is below ``min_p`` times the row's top probability (``min_p`` 0: no change)."""
    if not any(p > 0 for p in min_p):
        return x
    floor = torch.tensor([math.log(p) if p > 0 else -math.inf for p in min_p], dtype=x.dtype, device=x.device)
    return x.masked_fill(x < floor[:, None], -torch.inf)
