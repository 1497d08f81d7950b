"""Seeded offline workloads."""

from __future__ import annotations

import pytest

from bench.workload import WorkloadSpec, make_workload, useful_tokens


def test_same_spec_same_requests_and_ranges_hold():
    spec = WorkloadSpec(num_requests=50, prompt_len=(3, 9), output_len=(2, 5), vocab_size=1000, seed=4)
    a, b = make_workload(spec), make_workload(spec)
    assert a == b and len(a) == 50
    assert all(3 <= len(r.prompt_token_ids) <= 9 and 2 <= r.max_tokens <= 5 for r in a)
    assert all(100 <= t < 1000 for r in a for t in r.prompt_token_ids)  # no special-token ids
    assert {len(r.prompt_token_ids) for r in a} == set(range(3, 10))  # the whole range is used
    assert useful_tokens(a) == sum(r.max_tokens for r in a)
    assert (
        make_workload(WorkloadSpec(num_requests=50, prompt_len=(3, 9), output_len=(2, 5), vocab_size=1000, seed=5)) != a
    )


@pytest.mark.parametrize(
    "kwargs", [dict(num_requests=0), dict(prompt_len=(5, 4)), dict(output_len=(0, 3)), dict(vocab_size=50)]
)
def test_bad_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        WorkloadSpec(**kwargs)
