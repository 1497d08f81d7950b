"""The host arrays of one eager step, built from its chunks with array operations over tokens.

Every step is one flat ragged batch: the chunks' tokens concatenated, with each token's position
and KV slot (from its request's block table), the query start of each chunk and the rows whose
logits are needed: the last token of each chunk that samples, and for a request that asks for
prompt logprobs (echo) the prompt positions of its chunk. ``ModelRunner.prepare`` moves them to
the device; tensor-parallel ranks receive the same ``HostStep`` (``tp_executor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np

from replica.step import ScheduledChunk, pack_block_tables


class HostStep(NamedTuple):
    """Host arrays of one eager step (what tensor-parallel ranks receive, ``tp_executor``)."""

    ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T]
    qsl: np.ndarray  # [B+1] query start of each chunk
    seq_lens: np.ndarray  # [B]
    block_tables: np.ndarray  # [B, W]
    max_query_len: int
    max_seq_len: int


class HostInputs(NamedTuple):
    """A ``HostStep`` and the logits rows rank 0 keeps: the sampled ones, then the prompt targets'."""

    step: HostStep
    logits_indices: np.ndarray  # [S + P] token index of each sampling chunk's last token, then prompt rows
    # Prompt logprobs (echo): logits rows after the sampled ones score ``prompt_targets`` (the prompt
    # token after each position); per request (id, index of its first target, count, alternatives).
    prompt_spans: tuple[tuple[str, int, int, int], ...] = ()
    prompt_targets: np.ndarray | None = None


def host_step(chunks: Sequence[ScheduledChunk], block_size: int, num_blocks: int, vocab_size: int) -> HostInputs:
    """The arrays of a step of ``chunks``; a ValueError names what is inconsistent in it."""
    b = len(chunks)
    if b == 0:
        raise ValueError("cannot prepare an empty SchedulerOutput")
    bs = block_size
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, b)
    starts = np.fromiter((c.start_pos for c in chunks), np.int64, b)
    bt_lens = np.fromiter((len(c.block_table) for c in chunks), np.int64, b)
    if (q_lens <= 0).any():
        raise ValueError("every scheduled chunk needs at least one token")
    if (starts < 0).any():
        raise ValueError("start_pos must be >= 0")
    seq_lens = starts + q_lens
    if (bt_lens * bs < seq_lens).any():
        i = int(np.flatnonzero(bt_lens * bs < seq_lens)[0])
        raise ValueError(
            f"request {chunks[i].request_id}: block_table of {bt_lens[i]} blocks cannot hold "
            f"{seq_lens[i]} tokens at block_size {bs}"
        )
    if len({c.request_id for c in chunks}) != b:
        raise ValueError("a request appears twice in one SchedulerOutput")
    t = int(q_lens.sum())
    ids = np.fromiter(chain.from_iterable(c.token_ids for c in chunks), np.int64, t)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {ids.min()} max {ids.max()}")

    qsl = np.zeros(b + 1, np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    seq_of_tok = np.repeat(np.arange(b), q_lens)
    positions = np.arange(t) - np.repeat(qsl[:-1] - starts, q_lens)

    block_tables, _ = pack_block_tables([c.block_table for c in chunks], num_blocks)
    slots = block_tables[seq_of_tok, positions // bs].astype(np.int64) * bs + positions % bs

    sample_mask = np.fromiter((c.sample for c in chunks), bool, b)
    logits_indices = qsl[1:][sample_mask] - 1
    step = HostStep(ids, positions, slots, qsl, seq_lens, block_tables, int(q_lens.max()), int(seq_lens.max()))
    if any(c.params.prompt_logprobs is not None for c in chunks):
        spans, extra, targets = _prompt_positions(chunks, qsl)
        if spans:
            return HostInputs(step, np.concatenate([logits_indices, extra]), spans, targets)
    return HostInputs(step, logits_indices)


def _prompt_positions(
    chunks: Sequence[ScheduledChunk], qsl: np.ndarray
) -> tuple[tuple[tuple[str, int, int, int], ...], np.ndarray, np.ndarray]:
    """Prompt logprobs of a step: for each chunk of a request that asks (before its first output),
    the flat token indices whose logits score the next prompt token, and those tokens. A chunk at
    prompt positions s..e-1 scores prompt tokens s+1..min(e, P-1) (the logits at P-1 sample)."""
    spans: list[tuple[str, int, int, int]] = []
    idx: list[np.ndarray] = []
    targets: list[int] = []
    for i, c in enumerate(chunks):
        k = c.params.prompt_logprobs
        if k is None or c.num_output_tokens or not c.prompt_token_ids:
            continue
        p = len(c.prompt_token_ids)
        first, last = c.start_pos + 1, min(c.start_pos + len(c.token_ids), p - 1)
        if last < first:
            continue
        spans.append((c.request_id, first, last - first + 1, k))
        idx.append(np.arange(first, last + 1) - c.start_pos - 1 + qsl[i])
        targets.extend(c.prompt_token_ids[first : last + 1])
    if not spans:
        return (), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(spans), np.concatenate(idx), np.asarray(targets, np.int64)
