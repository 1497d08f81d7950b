"""When a request stops: the one stop rule, per request and in its vectorised form.

After sampling output number n (counting from 1), a request stops with
- STOP: n >= ``min_tokens`` and the token is an EOS id (unless ``ignore_eos``) or one of
  ``stop_token_ids``; or its grammar (structured output) rejected the token or is complete;
- LENGTH: n reaches ``length_limit`` (``max_tokens``, or a context full at ``max_model_len``).
STOP wins when both hold. While fewer than ``min_tokens`` outputs exist the same stop ids are
banned from sampling (``banned_tokens``), so a stop is never sampled and then ignored. Stop
strings are found later, in the text (``tokenizer.IncrementalDetokenizer``).

A decode batch applies the rule in two passes: ``may_stop`` flags, with array operations, every
row that can stop now (a superset), and only those rows get the exact ``stop_reason``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from replica.request import FinishReason, Request, SamplingParams


def length_limit(params: SamplingParams, prompt_len: int, max_model_len: int) -> int:
    """The output count at which LENGTH ends a request."""
    return min(params.max_tokens, max_model_len - prompt_len)


def length_limits(max_tokens: np.ndarray, prompt_lens: np.ndarray, max_model_len: int) -> np.ndarray:
    """``length_limit`` of many requests at once."""
    return np.minimum(max_tokens, max_model_len - prompt_lens)


def stop_reason(req: Request, token: int, max_model_len: int) -> FinishReason | None:
    """Why ``req`` stops now that ``token`` is its last output, or None."""
    p = req.params
    n_out = len(req.output_token_ids)
    if n_out >= p.min_tokens and ((not p.ignore_eos and token in req.eos_token_ids) or token in p.stop_token_ids):
        return FinishReason.STOP
    g = req.grammar
    if g is not None and (g.rejected or g.is_terminated()):
        return FinishReason.STOP
    # n_out >= length_limit(...), written out: this runs once per sampled row of a step of chunks.
    if n_out >= p.max_tokens or len(req.prompt_token_ids) + n_out >= max_model_len:
        return FinishReason.LENGTH
    return None


def banned_tokens(params: SamplingParams, num_output_tokens: int, eos_token_ids: Iterable[int]) -> tuple[int, ...]:
    """Token ids that may not be sampled as output number ``num_output_tokens + 1`` (min_tokens)."""
    if num_output_tokens >= params.min_tokens:
        return ()
    eos = () if params.ignore_eos else tuple(eos_token_ids)
    return eos + tuple(params.stop_token_ids)


def may_stop(
    num_outputs: np.ndarray, limit: np.ndarray, check_stop_ids: np.ndarray, tokens: np.ndarray, eos_ids: np.ndarray
) -> np.ndarray:
    """Rows of a decode batch that may stop after sampling ``tokens`` (bool ``[B]``): at their
    ``limit`` (``length_limits``) with ``num_outputs`` outputs, a row with stop ids or a grammar
    (``check_stop_ids``), or a token in ``eos_ids`` (the union over rows). Exact per row with
    ``stop_reason``."""
    return (num_outputs >= limit) | check_stop_ids | np.isin(tokens, eos_ids)
