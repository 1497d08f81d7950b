"""replica/stopping.py: the stop rule per request, the min_tokens ban, and the vectorised pre-filter
that must flag every row the exact rule stops."""

from __future__ import annotations

import random

import numpy as np

from replica.request import FinishReason, Request, SamplingParams
from replica.step import DecodeBatch
from replica.stopping import banned_tokens, length_limit, length_limits, may_stop, stop_reason

EOS = frozenset({2, 9})


def _req(outputs, prompt_len=3, **params) -> Request:
    r = Request("r", list(range(10, 10 + prompt_len)), SamplingParams(**params), eos_token_ids=EOS)
    r.output_token_ids = list(outputs)
    return r


def test_stop_reason_follows_eos_stop_ids_min_tokens_and_length():
    assert stop_reason(_req([5, 2], max_tokens=9), 2, 64) is FinishReason.STOP
    assert stop_reason(_req([5, 2], max_tokens=9, min_tokens=3), 2, 64) is None  # EOS before min_tokens
    assert stop_reason(_req([5, 2], max_tokens=9, ignore_eos=True), 2, 64) is None
    assert stop_reason(_req([5, 7], max_tokens=9, ignore_eos=True, stop_token_ids=(7,)), 7, 64) is FinishReason.STOP
    assert stop_reason(_req([5, 6], max_tokens=2), 6, 64) is FinishReason.LENGTH
    assert stop_reason(_req([5, 6], max_tokens=9), 6, 5) is FinishReason.LENGTH  # 3 prompt + 2 fill 5
    assert stop_reason(_req([5, 2], max_tokens=2), 2, 64) is FinishReason.STOP  # STOP wins over LENGTH


def test_banned_tokens_until_min_tokens():
    p = SamplingParams(min_tokens=2, stop_token_ids=(7,))
    assert banned_tokens(p, 1, EOS) == (*EOS, 7)
    assert banned_tokens(p, 2, EOS) == ()
    assert banned_tokens(SamplingParams(min_tokens=2, ignore_eos=True), 0, EOS) == ()


def test_length_limits_is_length_limit_per_row():
    params = [SamplingParams(max_tokens=n) for n in (1, 50, 200)]
    prompt_lens = np.array([5, 100, 20])
    got = length_limits(np.array([p.max_tokens for p in params]), prompt_lens, 120)
    assert got.tolist() == [length_limit(p, int(n), 120) for p, n in zip(params, prompt_lens)]


def test_may_stop_flags_every_row_that_stops():
    rng = random.Random(0)
    flagged_only = 0
    for _ in range(300):
        reqs, tokens = [], []
        for i in range(8):
            max_tokens = rng.randint(1, 12)
            params = SamplingParams(
                max_tokens=max_tokens,
                min_tokens=min(max_tokens, rng.choice([0, 0, 3])),
                ignore_eos=rng.random() < 0.3,
                stop_token_ids=rng.choice([(), (7,), (4, 8)]),
            )
            r = Request(f"r{i}", [1] * rng.randint(1, 30), params, eos_token_ids=EOS)
            n_out = rng.randint(0, min(params.max_tokens, 40 - len(r.prompt_token_ids)) - 1)
            r.output_token_ids = [5] * n_out
            reqs.append(r)
            tokens.append(rng.choice([2, 4, 5, 7, 9, 11]))
        d = DecodeBatch.build(
            reqs,
            [r.num_tokens for r in reqs],
            [len(r.output_token_ids) for r in reqs],
            40,
            token_ids=[0] * len(reqs),
        )
        toks = np.array(tokens)
        maybe = may_stop(d.num_output_tokens + 1, d.limit, d.check_stop_ids, toks, d.eos_ids)
        for i, (r, t) in enumerate(zip(reqs, tokens)):
            r.output_token_ids.append(t)
            stops = stop_reason(r, t, 40) is not None
            assert maybe[i] or not stops, (r.params, r.output_token_ids)
            flagged_only += bool(maybe[i]) and not stops
    assert flagged_only > 0  # a superset, not the rule itself


def test_stop_reason_ends_by_length_exactly_at_length_limit():
    rng = random.Random(1)
    for _ in range(500):
        prompt_len, max_tokens, max_model_len = rng.randint(1, 40), rng.randint(1, 40), rng.randint(41, 80)
        r = _req([5] * rng.randint(1, 45), prompt_len=prompt_len, max_tokens=max_tokens, ignore_eos=True)
        at_limit = len(r.output_token_ids) >= length_limit(r.params, prompt_len, max_model_len)
        assert (stop_reason(r, 5, max_model_len) is FinishReason.LENGTH) == at_limit
