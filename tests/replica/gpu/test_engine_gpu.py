"""The engine on CUDA (Triton attention, CUDA-graph decode) generates what transformers'
``generate`` generates, greedy, float32, on a tiny seeded model: token for token, up to the
first step whose top-two logit margin in the reference is within rounding (there either
token is a correct argmax)."""

from __future__ import annotations

import pytest
import torch

from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from replica.engine import LLMEngine
from replica.model_runner import ModelRunner
from replica.models import TINY_CONFIGS, build_random_model
from replica.request import SamplingParams

MARGIN = 1e-4  # float32 logits of a tiny model: differences below this are rounding


class _StubTokenizer:
    """The engine needs eos ids and a vocab size; prompts are token ids here (the real SmolLM2
    tokenizer is not available on the GPU machine)."""

    eos_token_ids = frozenset({2})
    vocab_size = TINY_CONFIGS["qwen2"]["vocab_size"]

    def decode(self, ids) -> str:
        return ""


class _NoDetok:
    def add(self, ids):
        return "", False

    def flush(self):
        return ""


def _engine(model, *, block_size: int, graphs: bool, max_num_seqs: int = 8) -> LLMEngine:
    cfg = EngineConfig(
        model=ModelConfig(model="tiny:qwen2", dtype="float32", device="cuda", max_model_len=512),
        cache=CacheConfig(block_size=block_size, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=96),
        runner=RunnerConfig(attention_backend="triton", use_cuda_graphs=graphs, max_graph_batch_size=8),
    )
    runner = ModelRunner(model, cfg.cache, cfg.runner, 64, eos_token_ids=[2])
    assert runner.backend.name == "triton"
    assert (runner.graphs is not None) == graphs
    return LLMEngine(cfg, runner=runner, tokenizer=_StubTokenizer(), detokenizer_factory=lambda *a: _NoDetok())


def _reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    toks = out.sequences[0, len(prompt) :].tolist()
    margins = []
    for lg in out.logits:
        top2 = torch.topk(lg[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return toks, margins


@pytest.mark.parametrize("graphs,block_size", [(True, 16), (False, 32)])
def test_engine_greedy_matches_transformers_generate(device, graphs, block_size):
    torch.manual_seed(0)
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=1, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(2)
    lens = [5, 17, 40, 33, 64, 9]  # more requests than graph sizes 1/2/4: padded batches; chunked prefill (budget 96)
    prompts = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in lens]
    # Different lengths: rows leave the decode batch at different steps, so the rows that stay
    # must keep reading their own previous token (the batch's row remapping on the device).
    n_new = [24, 9, 30, 17, 24, 4]
    refs = []
    for p, n in zip(prompts, n_new):
        refs.append(_reference(model, p, n))
    model.set_attn_implementation("eager")  # the runner installs its own below

    engine = _engine(model, block_size=block_size, graphs=graphs)
    outs = engine.generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in n_new], use_tqdm=False
    )
    compared = 0
    for out, (ref, margins), n in zip(outs, refs, n_new):
        got = list(out.token_ids)
        assert len(got) == n
        for i, (a, b) in enumerate(zip(got, ref)):
            if margins[i] < MARGIN:
                break  # a near-tie: both are right, and later tokens depend on the choice
            assert a == b, f"token {i}: engine {a} vs transformers {b} (margin {margins[i]:.3g})"
            compared += 1
    assert compared >= sum(n_new) // 2, "too few tokens compared to mean anything"


def test_sampled_rows_in_graph_decode_batches_are_seeded_and_respect_min_tokens(device):
    """Non-greedy rows (temperature, top-p, seeds, a min_tokens EOS ban) go through the
    sampler on the graph's logits; the same batch run twice gives the same tokens."""
    torch.manual_seed(0)
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=3, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (7, 20, 12, 31)]
    params = [
        SamplingParams(max_tokens=20, temperature=0.9, seed=11),
        SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=12),
        SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0),  # EOS (id 2) banned throughout
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    ]
    runs = []
    for _ in range(2):
        engine = _engine(model, block_size=16, graphs=True)
        replays = 0
        real = engine.runner.graphs.replay

        def counting(inp, real=real):
            nonlocal replays
            replays += 1
            return real(inp)

        engine.runner.graphs.replay = counting
        runs.append([list(o.token_ids) for o in engine.generate(prompts, params, use_tqdm=False)])
        assert replays > 10
    assert runs[0] == runs[1]
    vocab = TINY_CONFIGS["qwen2"]["vocab_size"]
    for toks, p in zip(runs[0], params):
        assert all(0 <= t < vocab for t in toks)
        assert len(toks) <= p.max_tokens
    assert len(runs[0][2]) == 20 and 2 not in runs[0][2]


@pytest.mark.parametrize("graphs,block_size", [(True, 16), (False, 32)])
def test_n_choices_share_the_prompt_and_each_matches_transformers_generate(device, graphs, block_size):
    """n > 1 on CUDA: the choices fork from the prompt's shared blocks, then decode in graph
    batches like any request; every greedy choice is transformers' greedy output, and seeded
    choices differ from each other and repeat run to run. Every block is free at the end."""
    torch.manual_seed(0)
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=1, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (40, 70)]  # > 1 block: shared
    n_new = [20, 12]
    refs = [_reference(model, p, n) for p, n in zip(prompts, n_new)]
    model.set_attn_implementation("eager")  # the runner installs its own below

    engine = _engine(model, block_size=block_size, graphs=graphs)
    greedy = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, n=3) for n in n_new]
    outs = engine.generate(prompts, greedy, use_tqdm=False)
    compared = 0
    for out, (ref, margins), n in zip(outs, refs, n_new):
        assert [len(c.token_ids) for c in out.choices] == [n] * 3
        for choice in out.choices:
            for i, (a, b) in enumerate(zip(choice.token_ids, ref)):
                if margins[i] < MARGIN:
                    break  # a near-tie: both are right, and later tokens depend on the choice
                assert a == b, f"token {i}: engine {a} vs transformers {b} (margin {margins[i]:.3g})"
                compared += 1
    assert compared >= 3 * sum(n_new) // 2, "too few tokens compared to mean anything"
    seeded = [SamplingParams(max_tokens=16, temperature=0.9, seed=21, n=4)] * 2
    runs = [[[c.token_ids for c in o.choices] for o in engine.generate(prompts, seeded, use_tqdm=False)] for _ in "ab"]
    assert runs[0] == runs[1] and all(len(set(choices)) > 1 for choices in runs[0])
    s = engine.stats()
    assert s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0
