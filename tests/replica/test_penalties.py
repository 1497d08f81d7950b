"""Penalties, logit bias and min-p: the batched sampler against a plain reference, and greedy
generation with penalties against a loop of HF forward + reference penalty + argmax on a tiny
float64 model (sync and async scheduling, chunked prefill, mixed with plain rows)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from replica.engine import LLMEngine
from replica.errors import InvalidRequestError
from replica.penalties import apply_penalties
from replica.request import SamplingParams
from replica.sampler import Sampler, SamplingRow

models = pytest.importorskip("replica.models")


def reference(logits: torch.Tensor, prompt: list[int], outs: list[int], p: SamplingParams) -> torch.Tensor:
    """One row, the obvious way: HF's repetition processor, then OpenAI's penalties, then the bias."""
    x = logits.clone()
    if p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + outs]), x[None].clone())[0]
    for t in set(outs):
        x[t] -= p.frequency_penalty * outs.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        if t < x.shape[0]:
            x[t] += b
    return x


PARAMS = [
    SamplingParams(temperature=0.0),  # plain: untouched
    SamplingParams(temperature=0.0, repetition_penalty=1.7),
    SamplingParams(temperature=0.0, presence_penalty=1.5),
    SamplingParams(temperature=0.0, frequency_penalty=-0.7),
    SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=2.0),
    SamplingParams(temperature=0.0, logit_bias={3: 4.5, 49: -100, 10_000: 1}),  # an id beyond the vocabulary
    SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4, logit_bias={0: 1.0}),
]


def random_rows(rng: random.Random, vocab: int) -> list[SamplingRow]:
    rows = []
    for p in PARAMS:
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
        outs = [rng.randrange(vocab // 4) for _ in range(rng.randrange(0, 30))]  # repeats likely
        history = (prompt, outs) if p.uses_penalties else ((), ())
        rows.append(SamplingRow(p, len(outs), (), *history))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_batched_penalties_match_the_reference_row_by_row(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vocab = 50
    logits = torch.randn(len(PARAMS), vocab, dtype=torch.float64) * 3
    rows = random_rows(rng, vocab)
    got = apply_penalties(logits.clone(), rows, [i for i, r in enumerate(rows) if r.params.processes_logits])
    for i, r in enumerate(rows):
        want = reference(logits[i], list(r.prompt_token_ids), list(r.output_token_ids), r.params)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)
    assert torch.equal(got[0], logits[0])
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    out = Sampler(0)(logits, rows)
    assert out[greedy].tolist() == got[greedy].argmax(-1).tolist()


def test_plain_rows_cost_no_copy_and_bf16_logits_are_processed_in_float32():
    logits = torch.randn(2, 32).to(torch.bfloat16)
    rows = [SamplingRow(SamplingParams(temperature=0.0), 0), SamplingRow(SamplingParams(temperature=0.0), 0)]
    assert torch.equal(Sampler(0)(logits, rows), logits.argmax(-1))
    rows[1] = SamplingRow(
        SamplingParams(temperature=0.0, repetition_penalty=2.0), 1, (), [5], [int(logits[1].argmax())]
    )
    out = Sampler(0)(logits, rows)
    assert out.dtype == torch.long and int(out[0]) == int(logits[0].argmax())


def test_logit_bias_forces_and_bans_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    top = logits.argmax(-1)
    s = Sampler(1)
    for step in range(20):
        rows = [
            SamplingRow(SamplingParams(temperature=0.0, logit_bias={17: 100}), step),
            SamplingRow(SamplingParams(temperature=1.5, logit_bias={17: 100}, seed=step), step),
            SamplingRow(SamplingParams(temperature=1.5, logit_bias={42: 100}), step),
            SamplingRow(SamplingParams(temperature=0.0, logit_bias={int(top[3]): -100}), step),
        ]
        out = s(logits, rows).tolist()
        assert out[:3] == [17, 17, 42]
        assert out[3] == int(logits[3].topk(2).indices[1])  # the banned argmax gives way to the second


def test_min_p_keeps_tokens_above_a_share_of_the_top_probability():
    # Probabilities 0.5, 0.3, 0.15, 0.05: min_p=0.5 keeps p >= 0.25, i.e. {0, 1}; min_p=0.9 keeps {0}.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(3, 1)
    s = Sampler(0)
    seen: list[set[int]] = [set(), set(), set()]
    for step in range(300):
        rows = [
            SamplingRow(SamplingParams(temperature=1.0, min_p=0.5), step),
            SamplingRow(SamplingParams(temperature=1.0, min_p=0.9, seed=3), step),
            SamplingRow(SamplingParams(temperature=1.0), step),
        ]
        for i, t in enumerate(s(logits, rows).tolist()):
            seen[i].add(t)
    assert seen == [{0, 1}, {0}, {0, 1, 2, 3}]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 11.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ],
)
def test_ranges_are_validated(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_what_uses_the_history():
    assert not SamplingParams().processes_logits
    assert not SamplingParams(repetition_penalty=1.0, presence_penalty=0, logit_bias={4: 0}).processes_logits
    assert SamplingParams(logit_bias={4: 1}).processes_logits and not SamplingParams(logit_bias={4: 1}).uses_penalties
    assert SamplingParams(min_p=0.1).processes_logits and SamplingParams(frequency_penalty=0.1).uses_penalties


# ----------------------------------------------------------------------------- end to end


def engine_config(async_: bool) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="tiny:llama", dtype="float64", device="cpu", max_model_len=256),
        cache=CacheConfig(block_size=8, num_blocks=64, watermark=0.0),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24, async_scheduling=async_),
        runner=RunnerConfig(attention_backend="torch", use_cuda_graphs=False),
    )


def hf_penalized_greedy(model, prompt: list[int], p: SamplingParams) -> list[int]:
    outs: list[int] = []
    with torch.no_grad():
        for _ in range(p.max_tokens):
            logits = model(torch.tensor([prompt + outs])).logits[0, -1].to(torch.float64)
            outs.append(int(reference(logits, prompt, outs, p).argmax()))
    return outs


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, **kw)  # type: ignore[arg-type]


# The tiny random model never repeats itself unprompted, so each penalty here changes its output:
E2E = [
    greedy(repetition_penalty=0.2),  # strong, towards repetition: the prompt's tokens count
    greedy(presence_penalty=1.0, frequency_penalty=1.0, logit_bias={7: 6.0}),  # the bias repeats 7, until...
    greedy(),  # plain greedy in the same batch
    greedy(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.5, logit_bias={7: 3.0, 9: -2.0}),
]


@pytest.mark.parametrize("async_", [False, True])
def test_greedy_with_penalties_equals_hf_forward_plus_reference_penalty(async_):
    loaded = models.tiny_model("llama", seed=1234, dtype=torch.float64)
    ref_model = copy.deepcopy(loaded.model)
    engine = LLMEngine(engine_config(async_), loaded=loaded)
    vocab = int(loaded.model.config.vocab_size)
    rng = random.Random(7)
    # Short repetitive prompts (penalties bite) and one longer than the step budget (chunked prefill).
    prompts = [[rng.randrange(3, 12) for _ in range(n)] for n in (5, 9, 40, 7)]
    outs = engine.generate(prompts, E2E, use_tqdm=False)
    for prompt, p, out in zip(prompts, E2E, outs, strict=True):
        assert all(0 <= t < vocab for t in out.token_ids)
        assert list(out.token_ids) == hf_penalized_greedy(ref_model, prompt, p), p
        if p.processes_logits:  # the processing really changed the output
            assert list(out.token_ids) != hf_penalized_greedy(ref_model, prompt, greedy()), p
