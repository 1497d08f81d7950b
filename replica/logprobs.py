"""Log-probabilities of tokens, computed on the logits' device for the rows that ask only.

What they are (README, "Logprobs"): for a sampled token, ``log_softmax(processed / T)`` over the
vocabulary, where ``processed`` are the logits the sampler drew from (after penalties, logit_bias,
the min_tokens ban and the grammar mask) and ``T`` the request's temperature (1 for greedy); the
top-k / top-p / min-p truncation is not applied (a token it cut still has its probability under
the temperature). For a prompt token (echo), ``log_softmax`` of the model's raw logits at the
position before it. Masked tokens have ``-inf``.

The work is one ``log_softmax``, a gather and a ``topk`` over the asking rows; what reaches the
host is ``[R, 1 + K]`` values and ``[R, K]`` ids (K <= ``MAX_LOGPROBS``), never a vocabulary row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replica.outputs import TokenLogprobs

_PROMPT_SLICE = 512  # prompt rows per log_softmax: bounds the float copy of a long prefill's logits


@dataclass(frozen=True)
class DeviceLogprobs:
    """Logprobs of R rows of one step, still on the device (or in pinned memory on their way)."""

    rows: tuple[int, ...]  # the rows (of the step's sampled tokens, or of its prompt targets) they belong to
    num_top: tuple[int, ...]  # alternatives each row asked for (<= K)
    values: torch.Tensor  # [R, 1 + K] float: the token's logprob, then the top K, most likely first
    top_ids: torch.Tensor  # [R, K] int64

    def to_pinned(self) -> DeviceLogprobs:
        """Start copying to pinned host memory without waiting (CUDA); the caller records an event
        after it and reads ``to_host`` once the event completed. On the CPU, itself."""
        if self.values.device.type != "cuda":
            return self
        values = torch.empty(self.values.shape, dtype=self.values.dtype, pin_memory=True)
        ids = torch.empty(self.top_ids.shape, dtype=self.top_ids.dtype, pin_memory=True)
        values.copy_(self.values, non_blocking=True)
        ids.copy_(self.top_ids, non_blocking=True)
        return DeviceLogprobs(self.rows, self.num_top, values, ids)

    def to_host(self, token_ids: Sequence[int]) -> list[TokenLogprobs]:
        """One ``TokenLogprobs`` per row; ``token_ids[i]`` is row i's token (the one scored)."""
        values = self.values.tolist()
        ids = self.top_ids.tolist()
        return [
            TokenLogprobs(int(token_ids[i]), v[0], tuple(t[:k]), tuple(v[1 : 1 + k]))
            for i, k, v, t in zip(range(len(self.rows)), self.num_top, values, ids)
        ]


def compute(x: torch.Tensor, tokens: torch.Tensor, num_top: Sequence[int], rows: Sequence[int]) -> DeviceLogprobs:
    """``x [R, V]`` (float, already scaled), ``tokens [R]``: each row's token logprob and top alternatives."""
    k = min(max(num_top, default=0), x.shape[-1])
    values = []
    ids = []
    for lo in range(0, x.shape[0], _PROMPT_SLICE):
        lp = torch.log_softmax(x[lo : lo + _PROMPT_SLICE], dim=-1)
        chosen = lp.gather(1, tokens[lo : lo + _PROMPT_SLICE, None].to(torch.int64))
        top = lp.topk(k, dim=-1)
        values.append(torch.cat([chosen, top.values], dim=1))
        ids.append(top.indices)
    if not values:
        values.append(x.new_empty((0, 1 + k)))
        ids.append(torch.empty((0, k), dtype=torch.int64, device=x.device))
    return DeviceLogprobs(
        tuple(rows),
        tuple(min(n, k) for n in num_top),
        torch.cat(values) if len(values) > 1 else values[0],
        torch.cat(ids) if len(ids) > 1 else ids[0],
    )


def of_prompt(
    logits: torch.Tensor, spans: Sequence[tuple[str, int, int, int]], targets: np.ndarray | None
) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    """Raw-logit logprobs of an eager step's prompt targets (``host_step.HostInputs``: the logits
    rows after the sampled ones), per request: (index of its first target, one entry per target)."""
    assert targets is not None
    ks = [k for _, _, n, k in spans for _ in range(n)]
    host = compute(
        logits.to(float_dtype(logits)), to_device(targets.tolist(), torch.int64, logits.device), ks, range(len(ks))
    ).to_host(targets.tolist())
    out, at = {}, 0
    for rid, first, n, _ in spans:
        out[rid] = (first, host[at : at + n])
        at += n
    return out


def of_greedy(
    logits: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, asking: np.ndarray, num_top: np.ndarray
) -> DeviceLogprobs:
    """Logprobs of plain greedy rows ``asking`` (``idx`` on the device; no processing, temperature 1)
    for the graph's own argmax."""
    x = logits.index_select(0, idx).to(float_dtype(logits))
    return compute(x, tokens.index_select(0, idx), num_top[asking].tolist(), asking.tolist())


def to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a stream sync: a pageable host-to-device copy waits for
    the work queued before it (the CUDA-graph step in flight); a pinned, non-blocking one does not."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def float_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits; float64 logits stay float64 (exact tests)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32
