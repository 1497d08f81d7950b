"""KV-cache-aware admission: can a request ever fit, may it start now, whom to preempt.

Three separate questions, so the scheduler reads as policy:
- ``check_fits``: a request whose prompt plus ``max_tokens`` exceeds the context or the
  whole KV cache can never finish; refuse it at once, before any work. For n > 1 the n
  sequences at full length (sharing the prompt's full blocks) must fit the cache together,
  and the n must fit ``max_num_seqs``.
- ``can_start``: a waiting request starts only when its blocks plus a small watermark
  are free, so running requests can still grow a little before anyone is preempted.
- ``pick_victim``: when a running request cannot get its next block, preempt (by
  recompute) the newest running request; the oldest ones keep making progress.
"""

from __future__ import annotations

from collections.abc import Sequence

from replica.errors import InvalidRequestError, RequestTooLongError
from replica.kv_cache import KVCacheManager
from replica.request import Request


class AdmissionController:
    def __init__(
        self, kv: KVCacheManager, *, max_model_len: int, watermark: float, max_num_seqs: int | None = None
    ) -> None:
        if max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {max_model_len}")
        self.kv = kv
        self.num_blocks = kv.num_total_blocks
        self.block_size = kv.block_size
        self.max_model_len = max_model_len
        self.watermark_blocks = int(watermark * self.num_blocks)
        self.max_num_seqs = max_num_seqs

    @property
    def cache_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def check_fits(self, request: Request) -> None:
        """Raise RequestTooLongError if ``request`` can never run to its ``max_tokens``."""
        prompt = request.num_prompt_tokens
        max_tokens = request.params.max_tokens
        total = prompt + max_tokens
        param = "prompt" if prompt >= self.max_model_len else "max_tokens"
        if total > self.max_model_len:
            raise RequestTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the request "
                f"needs {total} tokens ({prompt} in the prompt, {max_tokens} for max_tokens). "
                f"Shorten the prompt or lower max_tokens.",
                param=param,
            )
        if total > self.cache_capacity_tokens:
            raise RequestTooLongError(
                f"The request needs {total} tokens of KV cache ({prompt} in the prompt, {max_tokens} for "
                f"max_tokens) but this replica's whole KV cache holds {self.cache_capacity_tokens} tokens "
                f"({self.num_blocks} blocks of {self.block_size}). Shorten the prompt or lower max_tokens.",
                param=param,
            )
        n = request.params.n
        if n > 1:
            self._check_group_fits(n, prompt, total)

    def _check_group_fits(self, n: int, prompt: int, total: int) -> None:
        if self.max_num_seqs is not None and n > self.max_num_seqs:
            raise InvalidRequestError(
                f"n={n} sequences cannot run together on this replica (max_num_seqs {self.max_num_seqs}); lower n",
                param="n",
            )
        shared = self.num_shared_blocks(prompt)
        needed = shared + n * (-(-total // self.block_size) - shared)
        if needed > self.num_blocks:
            raise RequestTooLongError(
                f"n={n} sequences of up to {total} tokens need {needed} KV blocks ({shared} prompt blocks shared) "
                f"but this replica's whole KV cache holds {self.num_blocks} blocks of {self.block_size}. "
                f"Lower n or max_tokens.",
                param="n",
            )

    def num_shared_blocks(self, num_prompt_tokens: int) -> int:
        """Full blocks of the prompt before its last token: what the n choices of a request
        share. The last token (and the partial block it ends) is computed by each choice."""
        return (num_prompt_tokens - 1) // self.block_size

    def can_start(self, num_needed_blocks: int, *, idle: bool = False) -> bool:
        """May a waiting request that needs ``num_needed_blocks`` fresh blocks start now?

        With nothing running (``idle``) the watermark is waived: nobody would use the
        headroom, and a request needing the whole cache must still be able to run.
        """
        reserve = 0 if idle else self.watermark_blocks
        return self.kv.num_free_blocks - num_needed_blocks >= reserve

    @staticmethod
    def pick_victim(running: Sequence[Request]) -> Request:
        """The newest running request (latest arrival; on ties the later in ``running``)."""
        if not running:
            raise ValueError("no running request to preempt")
        idx = max(range(len(running)), key=lambda k: (running[k].arrival_time, k))
        return running[idx]
