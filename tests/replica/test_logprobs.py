"""Logprobs (replica/logprobs.py) through the real engine on tiny float64 models: every sampled and
prompt token's logprob and top alternatives equal a float64 log_softmax of Hugging Face's own logits
at the same positions (under the request's temperature), whatever the batch, chunking or preemption."""

from __future__ import annotations

import copy

import pytest
import torch

from replica import models
from replica.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from replica.engine import LLMEngine
from replica.errors import InvalidRequestError
from replica.logprobs import compute
from replica.outputs import Delta, TokenLogprobs
from replica.request import MAX_LOGPROBS, FinishReason, SamplingParams
from replica.sampler import Sampler, SamplingRow


def _config(arch: str, *, num_blocks: int = 64, budget: int = 32, async_scheduling: bool = True) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=f"tiny:{arch}", dtype="float64", device="cpu", max_model_len=256),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks, watermark=0.0),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, async_scheduling=async_scheduling),
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    loaded = models.tiny_model(request.param, seed=7, dtype=torch.float64)
    reference = copy.deepcopy(loaded.model)  # the engine installs its own attention on `loaded`
    return request.param, loaded, reference


def hf_log_softmax(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[len(ids), V]: row i is the float64 log_softmax of HF's logits after ids[: i + 1], / temperature."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    return torch.log_softmax(logits / temperature, dim=-1)


def check(entry: TokenLogprobs, row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(row[token]), abs=1e-9)
    top = row.topk(k)
    assert len(entry.top_ids) == len(entry.top_logprobs) == k
    assert list(entry.top_logprobs) == pytest.approx(top.values.tolist(), abs=1e-9)
    # Ids: equal up to exact ties (random weights make none, but say so if it happens).
    assert list(entry.top_ids) == top.indices.tolist()


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, list[Delta]]:
    out: dict[str, list[Delta]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault(d.request_id, []).append(d)
    return out


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_sampled_and_prompt_logprobs_equal_hf_log_softmax(tiny, async_scheduling):
    arch, loaded, reference = tiny
    engine = LLMEngine(_config(arch, async_scheduling=async_scheduling), loaded=loaded)
    vocab = int(loaded.model.config.vocab_size)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (45, 9, 20, 1)]  # 45 > budget: chunked
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=5),
        SamplingParams(max_tokens=5, temperature=0.7, seed=11, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),  # asks nothing: gets nothing
        SamplingParams(max_tokens=4, temperature=1.3, seed=2, ignore_eos=True, logprobs=0, prompt_logprobs=2),
    ]
    got = run(engine, prompts, params)
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        deltas = got[f"r{i}"]
        tokens = [t for d in deltas for t in d.token_ids]
        assert len(tokens) == sp.max_tokens
        if sp.logprobs is None:
            assert all(d.logprobs is None and d.prompt_logprobs is None for d in deltas)
            continue
        ref = hf_log_softmax(reference, prompt + tokens, sp.temperature or 1.0)
        entries = [e for d in deltas for e in d.logprobs]
        assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
        for j, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
            check(entry, ref[len(prompt) - 1 + j], token, sp.logprobs)
        with_prompt = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
        if sp.prompt_logprobs is None:
            assert not with_prompt
            continue
        assert len(with_prompt) == 1 and deltas[0].prompt_logprobs is not None  # once, with the first token
        (plp,) = with_prompt
        assert len(plp) == len(prompt) and plp[0] is None
        raw = hf_log_softmax(reference, prompt)  # prompt tokens: the model's raw distribution
        for j in range(1, len(prompt)):
            check(plp[j], raw[j - 1], prompt[j], sp.prompt_logprobs)


def test_a_stop_token_has_no_logprob(tiny):
    arch, loaded, _ = tiny
    engine = LLMEngine(_config(arch), loaded=loaded)
    prompt = [5, 6, 7, 8]
    (free,) = run(engine, [prompt], [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)]).values()
    first = free[0].token_ids[0]
    (deltas,) = run(
        engine, [prompt], [SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=(first,), logprobs=2)]
    ).values()
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].token_ids == (first,)
    assert deltas[-1].logprobs == ()


def test_prompt_logprobs_survive_preemption_and_skip_the_prefix_cache(tiny):
    arch, loaded, reference = tiny
    engine = LLMEngine(_config(arch, num_blocks=14, budget=16), loaded=loaded)
    prompt = list(range(10, 34))
    run(engine, [prompt], [SamplingParams(max_tokens=2, temperature=0.0)])  # fills the prefix cache
    prompts = [prompt, list(range(40, 60)), list(range(70, 86))]
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1)] * 3
    got = run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        deltas = got[f"r{i}"]
        plps = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
        assert len(plps) == 1 and len(plps[0]) == len(prompt)
        raw = hf_log_softmax(reference, prompt)
        for j in range(1, len(prompt)):
            check(plps[0][j], raw[j - 1], prompt[j], 1)
        assert deltas[-1].usage is not None and deltas[-1].usage.cached_tokens == 0


def test_sampler_logprobs_follow_processing_and_temperature():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, dtype=torch.float64)
    rows = [
        SamplingRow(SamplingParams(temperature=0.5, seed=1, logprobs=4, logit_bias=((7, 5.0),)), 0),
        SamplingRow(SamplingParams(temperature=0.0), 0),
        SamplingRow(SamplingParams(temperature=0.0, logprobs=2), 0, banned_token_ids=(int(logits[2].argmax()),)),
    ]
    tokens, dev = Sampler(0).sample(logits, rows)
    assert dev is not None and dev.rows == (0, 2)
    host = dev.to_host([int(tokens[0]), int(tokens[2])])
    biased = logits[0].clone()
    biased[7] += 5.0
    check(host[0], torch.log_softmax(biased / 0.5, -1), int(tokens[0]), 4)
    banned = logits[2].clone()
    banned[int(logits[2].argmax())] = -torch.inf
    check(host[1], torch.log_softmax(banned, -1), int(tokens[2]), 2)
    assert Sampler(0).sample(logits, [SamplingRow(SamplingParams(), 0)] * 3)[1] is None  # nobody asked


def test_a_tiny_temperature_gives_finite_logprob_for_the_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    tokens, dev = Sampler(0).sample(logits, [SamplingRow(SamplingParams(temperature=1e-30, seed=0, logprobs=2), 0)])
    (entry,) = dev.to_host([int(tokens[0])])
    assert entry.token_id == 1 and entry.logprob == 0.0 and entry.top_ids == (1, 2)
    assert entry.top_logprobs[0] == 0.0 and entry.top_logprobs[1] < -1e20  # never NaN


def test_compute_caps_alternatives_at_the_vocabulary():
    x = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    (entry,) = compute(x, torch.tensor([1]), [20], [0]).to_host([1])
    assert entry.logprob == pytest.approx(torch.tensor(0.25).log().item()) and len(entry.top_ids) == 3


@pytest.mark.parametrize(
    "kw, param",
    [
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        (dict(logprobs=True), "logprobs"),
        (dict(logprobs=1, prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=1), "prompt_logprobs"),
    ],
)
def test_out_of_range_logprobs_are_refused(kw, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


@pytest.mark.parametrize(("num_blocks", "budget"), [(64, 8), (20, 16)])  # chunked prefill; preemption of choices
def test_n_choices_carry_their_own_logprobs_and_the_whole_prompts(tiny, num_blocks, budget):
    """n = 3 forks after the prompt's shared blocks (the parent scores those prompt tokens, each
    choice the tail it computes): every choice has the whole prompt's logprobs with its first token
    and its own tokens' logprobs, equal to HF's and to the single request with seed + i."""
    arch, loaded, reference = tiny
    engine = LLMEngine(_config(arch, num_blocks=num_blocks, budget=budget), loaded=loaded)
    # 23 tokens: 5 shared blocks of 4, a tail of 3 (2 prompt tokens scored by each choice);
    # 21: a tail of 1 (the parent scores every prompt token).
    prompts = [list(range(10, 33)), list(range(40, 61))]
    sp = SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True, n=3, logprobs=3, prompt_logprobs=2)
    # First, a request of 20 + 20 tokens that leaves too few blocks for a group's choices to grow.
    filler = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    got = run(engine, [list(range(70, 90)), *prompts], [filler, sp, sp])
    for r, prompt in enumerate(prompts, start=1):
        deltas = got[f"r{r}"]
        assert all(not d.token_ids and d.logprobs is None and d.prompt_logprobs is None for d in deltas)
        parts = [c for d in deltas for c in d.choices]
        raw = hf_log_softmax(reference, prompt)
        for i in range(3):
            mine = [c for c in parts if c.index == i]
            tokens = [t for c in mine for t in c.token_ids]
            (single,) = run(engine, [prompt], [sp.for_choice(i)]).values()
            assert tokens == [t for d in single for t in d.token_ids]  # the seed + i request's tokens
            assert [len(c.logprobs) for c in mine] == [len(c.token_ids) for c in mine]
            entries = [e for c in mine for e in c.logprobs]
            ref = hf_log_softmax(reference, prompt + tokens, sp.temperature)
            for j, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
                check(entry, ref[len(prompt) - 1 + j], token, 3)
            assert [e.logprob for e in entries] == pytest.approx([e.logprob for d in single for e in d.logprobs])
            plps = [c.prompt_logprobs for c in mine if c.prompt_logprobs is not None]
            assert len(plps) == 1 and mine[0].prompt_logprobs is not None  # once, with its first token
            assert len(plps[0]) == len(prompt) and plps[0][0] is None
            for j in range(1, len(prompt)):
                check(plps[0][j], raw[j - 1], prompt[j], 2)
    if num_blocks == 20:
        assert engine.scheduler.num_preemptions > 0
