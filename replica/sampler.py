"""Token sampling on the logits' device: greedy, temperature, top-k, top-p, min-p, per-request
seeds; penalties and logit bias first (``replica/penalties.py``), only for the rows that ask.

Sampling is the exponential race (equivalently Gumbel-max): the token is
``argmax(log p_i - log E_i)`` with ``E_i ~ Exp(1)`` i.i.d., which draws exactly from ``p``. The noise
of a seeded request comes from a generator seeded by ``(seed, num_output_tokens)`` alone, so its
tokens do not depend on what else shares the batch or in which step it runs (up to the logits
themselves). Unseeded requests share the engine's generator. Greedy is exactly ``argmax(logits)``.
Rows whose request asks for logprobs also get them (``sample``; replica/logprobs.py), from the
same processed logits, on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replica import logprobs as lp
from replica.grammar import GrammarState, apply_grammar_masks
from replica.penalties import apply_penalties, min_p_mask
from replica.request import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): unrelated streams for neighbouring seeds and token indices."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass(frozen=True)
class SamplingRow:
    """One row of logits to sample from."""

    params: SamplingParams
    num_output_tokens: int  # index of the token being sampled: seeds the per-request RNG
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS before min_tokens is reached
    # The token history, for penalties only (empty unless ``params.uses_penalties``): the prompt,
    # and the outputs before the one sampled now.
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    grammar: GrammarState | None = None  # structured output: the request's matcher masks this row


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed & _MASK64)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """``logits [N, V]`` -> sampled token ids ``[N]`` (int64, on the logits' device)."""
        return self.sample(logits, rows)[0]

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[torch.Tensor, lp.DeviceLogprobs | None]:
        """Sampled ids ``[N]`` and, if a row's request asks for them, those rows' logprobs."""
        n = logits.shape[0]
        if n != len(rows):
            raise ValueError(f"got {n} logit rows for {len(rows)} sampling rows")
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=logits.device), None
        asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logits, tokens = self._sample(logits, rows)
        if not asking:
            return tokens, None
        # The processed logits the tokens were drawn from, under each row's temperature. Shifted by
        # the row max first, like the draw, so that a tiny temperature gives -inf, never NaN.
        idx = lp.to_device(asking, torch.int64, logits.device)
        x = logits.index_select(0, idx).to(lp.float_dtype(logits))
        temp = lp.to_device([rows[i].params.temperature or 1.0 for i in asking], x.dtype, x.device)
        temp = temp.clamp_min(torch.finfo(x.dtype).tiny)
        x = (x - x.amax(dim=-1, keepdim=True)) / temp[:, None]
        return tokens, lp.compute(
            x, tokens.index_select(0, idx), [rows[i].params.logprobs or 0 for i in asking], asking
        )

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the processed logits, the sampled ids)."""
        vocab = logits.shape[1]
        processed = False
        if any(r.params.processes_logits for r in rows):
            # A float copy (float32 unless the logits are float64): penalties divide and subtract.
            logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32, copy=True)
            which = [i for i, r in enumerate(rows) if r.params.processes_logits]
            logits = apply_penalties(logits, rows, which)
            processed = True
        if any(r.banned_token_ids for r in rows):
            logits = logits if processed else logits.clone()
            for i, r in enumerate(rows):
                if r.banned_token_ids:
                    ids = [t for t in r.banned_token_ids if 0 <= t < vocab]
                    logits[i, ids] = -torch.inf
        guided = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        if guided:
            if not processed:  # a grammar row processes logits: the float copy exists; kept safe anyway
                logits = logits.clone()
                processed = True
            apply_grammar_masks(logits, guided, [rows[i].num_output_tokens for i, _ in guided])
        out = torch.argmax(logits, dim=-1)
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not rand:
            return logits, out
        ridx = torch.tensor(rand, device=logits.device)
        rrows = [rows[i] for i in rand]
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.index_select(0, ridx).to(cdt)
        temp = torch.tensor([r.params.temperature for r in rrows], dtype=cdt, device=x.device)
        # Shifted by the row max first (softmax is shift-invariant) and the temperature kept
        # above 0 in ``cdt``: a tiny temperature then sends the other logits to -inf instead
        # of overflowing the max to inf (inf - inf = NaN, which sampled token 0).
        x = (x - x.amax(dim=-1, keepdim=True)) / temp.clamp_min(torch.finfo(cdt).tiny)[:, None]
        if processed:
            x = min_p_mask(x, [r.params.min_p for r in rrows])
        x = _apply_top_k_top_p(
            x,
            # Capped at the vocabulary here: an unbounded int would overflow int64 and fail the whole batch.
            np.array([min(r.params.top_k, vocab) if r.params.top_k > 0 else 0 for r in rrows], dtype=np.int64),
            np.array([r.params.top_p for r in rrows], dtype=np.float64),
        )
        logp = torch.log_softmax(x, dim=-1)
        noise = self._exponential(rrows, vocab, cdt, x.device)
        out[ridx] = torch.argmax(logp - noise.log(), dim=-1)
        return logits, out

    def _exponential(
        self, rows: Sequence[SamplingRow], vocab: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        e = torch.empty(len(rows), vocab, dtype=dtype, device=device)
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            # Generated on the generator's device, then moved (a no-op when they match).
            u = torch.empty(len(unseeded), vocab, dtype=dtype, device=self.device)
            u.exponential_(generator=self.generator)
            e[torch.tensor(unseeded, device=device)] = u.to(device)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed(_mix_seed(r.params.seed, r.num_output_tokens))
                e[i].exponential_(generator=g)
        # Exp(1) can round to 0 in finite precision; clamp so log() stays finite.
        return e.clamp_min_(torch.finfo(dtype).tiny)


def _apply_top_k_top_p(x: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k and then its top-p nucleus.

    top-k keeps tokens whose logit is >= the k-th largest (ties at the boundary stay); top-p keeps
    the smallest prefix of the sorted distribution whose mass reaches ``top_p`` (always >= 1 token).
    """
    need_k = top_k > 0
    need_p = top_p < 1.0
    if not need_k.any() and not need_p.any():
        return x
    vocab = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    if need_k.any():
        k = torch.from_numpy(np.where(need_k, np.minimum(top_k, vocab), vocab)).to(x.device)
        kth = sorted_x.gather(1, (k - 1)[:, None])
        sorted_x = sorted_x.masked_fill(sorted_x < kth, -torch.inf)
    if need_p.any():
        # Rows without top-p get +inf so float rounding of the cumsum never trims their tail.
        p = torch.from_numpy(np.where(need_p, top_p, np.inf)).to(device=x.device, dtype=x.dtype)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= p[:, None]
        drop[:, 0] = False
        sorted_x = sorted_x.masked_fill(drop, -torch.inf)
    return torch.full_like(x, -torch.inf).scatter(1, order, sorted_x)
