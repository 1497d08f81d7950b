"""Sampler: greedy is argmax, top-k/top-p stay inside their sets, seeds are batch-independent."""

from __future__ import annotations

import pytest
import torch

from replica.request import SamplingParams
from replica.sampler import Sampler, SamplingRow


def row(seed=None, n=0, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(seed=seed, **kw), n)


def test_greedy_is_exact_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 1000, dtype=torch.float64)
    logits[3, 7] = logits[3, 9] = 1e3  # a tie: argmax's first index, like HF
    out = Sampler(0)(logits, [row(temperature=0.0, seed=i) for i in range(16)])
    assert torch.equal(out, logits.argmax(-1))
    assert int(out[3]) == 7


@pytest.mark.parametrize("top_k", [1, 3, 20])
def test_top_k_never_leaves_the_top_k(top_k):
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    allowed = logits.topk(top_k, dim=-1).indices
    s = Sampler(3)
    seen = set()
    for step in range(60):
        out = s(logits, [row(temperature=2.0, top_k=top_k, seed=None if i % 2 else i, n=step) for i in range(8)])
        assert bool((allowed == out[:, None]).any(-1).all())
        seen.update((i, int(t)) for i, t in enumerate(out))
    if top_k > 1:  # it really samples within the set, not just its argmax
        assert all(len({t for i, t in seen if i == r}) > 1 for r in range(8))


def test_a_top_k_beyond_int64_is_the_whole_vocabulary():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(300, 1)
    out = Sampler(0)(logits, [row(temperature=1.0, top_k=2**70, seed=i) for i in range(300)])
    assert set(out.tolist()) == {0, 1, 2}  # no error, and nothing cut


def test_top_p_never_leaves_the_nucleus():
    # Row probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 allows {0, 1}; top_p=0.45 allows {0}.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(2, 1)
    s = Sampler(0)
    seen = [set(), set()]
    for step in range(200):
        out = s(logits, [row(top_p=0.7, temperature=1.0), row(top_p=0.45, seed=5, n=step)])
        seen[0].add(int(out[0]))
        seen[1].add(int(out[1]))
    assert seen[0] == {0, 1}
    assert seen[1] == {0}


def test_top_k_and_top_p_combine():
    logits = torch.tensor([[4.0, 3.9, 3.8, 0.0, -1.0]])
    s = Sampler(0)
    picks = {int(s(logits, [row(top_k=2, top_p=0.99, seed=9, n=i)])[0]) for i in range(100)}
    assert picks == {0, 1}


def test_seeded_rows_ignore_batch_composition_and_position():
    torch.manual_seed(2)
    target = torch.randn(1, 500)
    others = torch.randn(5, 500)
    r = row(seed=1234, n=3, temperature=1.3, top_p=0.95)
    alone = Sampler(0)(target, [r])
    for pos in range(6):
        batch = torch.cat([others[:pos], target, others[pos:]])
        rows = [row(temperature=1.0) for _ in range(pos)] + [r] + [row(seed=7) for _ in range(5 - pos)]
        assert int(Sampler(pos + 100)(batch, rows)[pos]) == int(alone[0])


def test_seeded_stream_depends_on_seed_and_token_index():
    logits = torch.zeros(1, 1000)  # uniform: the draw is all noise
    s = Sampler(0)
    by_index = [int(s(logits, [row(seed=42, n=n)])[0]) for n in range(20)]
    assert by_index == [int(s(logits, [row(seed=42, n=n)])[0]) for n in range(20)]  # reproducible
    assert len(set(by_index)) > 10  # a fresh draw per token index
    by_seed = {int(s(logits, [row(seed=seed, n=0)])[0]) for seed in range(20)}
    assert len(by_seed) > 10


def test_unseeded_sampling_differs_across_engine_seeds():
    logits = torch.zeros(4, 1000)
    rows = [row(temperature=0.8) for _ in range(4)]
    a = Sampler(0)(logits, rows)
    b = Sampler(1)(logits, rows)
    assert not torch.equal(a, b)
    assert torch.equal(a, Sampler(0)(logits, rows))  # the engine seed makes runs reproducible


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].repeat(4000, 1)
    out = Sampler(0)(logits, [row(temperature=1.0) for _ in range(4000)])
    freq = torch.bincount(out, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # A lower temperature sharpens it.
    cold = Sampler(0)(logits, [row(temperature=0.25) for _ in range(4000)])
    assert torch.bincount(cold, minlength=3)[0] / 4000 > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tiny_temperature_samples_the_argmax_not_garbage(dtype):
    torch.manual_seed(4)
    logits = torch.randn(6, 50, dtype=dtype)
    for t in (1e-20, 1e-38, 1e-44, 1e-300, 5e-324):
        rows = [row(temperature=t, seed=i if i % 2 else None, n=i, top_p=0.9 if i < 3 else 1.0) for i in range(6)]
        assert torch.equal(Sampler(0)(logits, rows), logits.argmax(-1)), t


def test_banned_tokens_are_never_sampled():
    logits = torch.tensor([[0.0, 10.0, 0.0, 9.0]])
    rows = [SamplingRow(SamplingParams(temperature=0.0), 0, banned_token_ids=(1,))]
    assert int(Sampler(0)(logits, rows)[0]) == 3
    rows = [SamplingRow(SamplingParams(temperature=5.0), i, banned_token_ids=(1, 3)) for i in range(50)]
    assert set(Sampler(0)(logits.repeat(50, 1), rows).tolist()) <= {0, 2}


def test_row_count_mismatch_raises():
    with pytest.raises(ValueError, match="rows"):
        Sampler(0)(torch.zeros(2, 5), [row()])
