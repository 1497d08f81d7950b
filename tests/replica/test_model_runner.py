"""ModelRunner against Hugging Face on tiny seeded models: ragged batches, chunked prefill, shared
prefix blocks, sliding windows, and the runner's input validation."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from replica.config import CacheConfig, RunnerConfig
from replica.kv_sizing import block_bytes
from replica.model_runner import ModelRunner
from replica.request import SamplingParams
from replica.step import ScheduledChunk, SchedulerOutput

VOCAB = 128
BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(1234)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif arch == "qwen2":  # layer 0 full attention, layer 1 sliding window: per-layer windows
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1))
    elif arch == "mistral":  # a window shorter than the prompts, so it matters
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=7))
    else:
        raise ValueError(arch)
    # Larger-than-default weights make logits spread out, so greedy ties are not a concern.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.to(torch.float64).eval()


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF generate on this prompt alone: n greedy tokens, and their logits [n, V] from one plain
    forward over prompt + tokens (generate's own logits are float32)."""
    model.generation_config.eos_token_id = None  # ref copies only; the model default would win
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        # Pure greedy for n tokens: no EOS stop (the runner does not stop; the scheduler does).
        generation_config=GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0),
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[1] == len(prompt) + n
    with torch.no_grad():
        logits = model(out.sequences).logits[0, len(prompt) - 1 : -1]
    return out.sequences[0, len(prompt) :].tolist(), logits


@dataclass
class Seq:
    """A request as the test's hand-rolled scheduler sees it."""

    rid: str
    tokens: list[int]
    num_prompt: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def outputs(self) -> list[int]:
        return self.tokens[self.num_prompt :]


class Driver:
    """Builds SchedulerOutputs by hand: random, scattered block ids; chunks of chosen sizes."""

    def __init__(self, runner: ModelRunner, seed: int = 0):
        self.runner = runner
        self.free = list(np.random.default_rng(seed).permutation(runner.num_blocks))

    def chunk(self, s: Seq, n: int | None = None, params: SamplingParams = GREEDY) -> ScheduledChunk:
        n = len(s.tokens) - s.computed if n is None else n
        end = s.computed + n
        while len(s.blocks) * BLOCK < end:
            s.blocks.append(int(self.free.pop()))
        c = ScheduledChunk(
            request_id=s.rid,
            token_ids=tuple(s.tokens[s.computed : end]),
            start_pos=s.computed,
            block_table=tuple(s.blocks),
            sample=end == len(s.tokens),
            params=params,
            num_output_tokens=len(s.outputs),
            prompt_len=s.num_prompt,
        )
        return c

    def step(self, seqs_and_chunks: list[tuple[Seq, ScheduledChunk]]) -> None:
        out = SchedulerOutput(
            chunks=tuple(c for _, c in seqs_and_chunks),
            num_batched_tokens=sum(c.num_tokens for _, c in seqs_and_chunks),
        )
        logits = self.runner.compute_logits(out)
        res = self.runner.run(out)  # rewrites the same KV (idempotent) and samples
        i = 0
        for s, c in seqs_and_chunks:
            s.computed += c.num_tokens
            if c.sample:
                s.logits.append(logits[i])
                assert res.sampled[s.rid] == int(torch.argmax(logits[i]))
                s.tokens.append(res.sampled[s.rid])
                i += 1
            else:
                assert s.rid not in res.sampled
        assert i == len(res.sampled) == logits.shape[0]


def make(arch: str, num_blocks: int = 64) -> tuple[ModelRunner, torch.nn.Module]:
    model = tiny(arch)
    ref = copy.deepcopy(model)  # the runner switches its model's attention implementation
    runner = ModelRunner(model, CacheConfig(block_size=BLOCK), RunnerConfig(attention_backend="torch"), num_blocks)
    return runner, ref


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def assert_matches_hf(ref, s: Seq, prompt_tokens: list[int]) -> None:
    n = len(s.outputs)
    tokens, logits = hf_greedy(ref, prompt_tokens, n)
    assert s.outputs == tokens
    torch.testing.assert_close(torch.stack(s.logits), logits, rtol=1e-7, atol=1e-7)


ARCHS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_prefill_then_decode_matches_hf(arch):
    runner, ref = make(arch)
    d = Driver(runner, seed=1)
    prompts = [prompt(10, 5), prompt(11, 11), prompt(12, 17)]
    seqs = [Seq(f"r{i}", list(p), len(p)) for i, p in enumerate(prompts)]
    late = Seq("late", prompt(13, 9), 9)
    d.step([(s, d.chunk(s)) for s in seqs])  # three prefills in one ragged batch
    for step in range(7):
        batch = [(s, d.chunk(s)) for s in seqs]
        if step == 2:  # a prefill joins running decodes
            batch.insert(1, (late, d.chunk(late)))
        elif step > 2:
            batch.append((late, d.chunk(late)))
        d.step(batch)
    for s, p in zip([*seqs, late], [*prompts, late.tokens[:9]]):
        assert_matches_hf(ref, s, p)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_matches_hf(arch):
    runner, ref = make(arch)
    d = Driver(runner, seed=2)
    p_long, p_other = prompt(20, 19), prompt(21, 6)
    long, other = Seq("long", list(p_long), 19), Seq("other", list(p_other), 6)
    d.step([(other, d.chunk(other)), (long, d.chunk(long, 5))])  # chunk ends mid-block
    assert long.computed == 5 and not long.logits
    d.step([(long, d.chunk(long, 8)), (other, d.chunk(other))])
    d.step([(other, d.chunk(other)), (long, d.chunk(long, 6))])  # last chunk: samples
    for _ in range(5):
        d.step([(long, d.chunk(long)), (other, d.chunk(other))])
    assert_matches_hf(ref, long, p_long)
    assert_matches_hf(ref, other, p_other)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_blocks_match_hf(arch):
    runner, ref = make(arch)
    d = Driver(runner, seed=3)
    prefix = prompt(30, 3 * BLOCK)  # three full blocks
    p_a, p_b = prefix + prompt(31, 3), prefix + prompt(32, 5)
    a = Seq("a", list(p_a), len(p_a))
    d.step([(a, d.chunk(a))])
    for _ in range(3):
        d.step([(a, d.chunk(a))])
    # b reuses a's first three blocks (a prefix-cache hit) and computes only its own tail.
    b = Seq("b", list(p_b), len(p_b), blocks=a.blocks[:3], computed=len(prefix))
    d.step([(a, d.chunk(a)), (b, d.chunk(b))])
    for _ in range(4):
        d.step([(b, d.chunk(b)), (a, d.chunk(a))])
    assert b.blocks[:3] == a.blocks[:3]
    assert_matches_hf(ref, a, p_a)
    assert_matches_hf(ref, b, p_b)


def test_float32_greedy_tokens_match_hf():
    model = tiny("llama").float()
    ref = copy.deepcopy(model)
    runner = ModelRunner(model, CacheConfig(block_size=BLOCK), RunnerConfig(attention_backend="torch"), 32)
    assert runner.kv_cache.data.dtype == torch.float32
    d = Driver(runner)
    p1, p2 = prompt(40, 7), prompt(41, 13)
    s1, s2 = Seq("x", list(p1), 7), Seq("y", list(p2), 13)
    d.step([(s1, d.chunk(s1)), (s2, d.chunk(s2))])
    for _ in range(5):
        d.step([(s1, d.chunk(s1)), (s2, d.chunk(s2))])
    for s, p in ((s1, p1), (s2, p2)):
        tokens, logits = hf_greedy(ref, p, len(s.outputs))
        assert s.outputs == tokens
        torch.testing.assert_close(torch.stack(s.logits), logits, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_independent_of_batch():
    runner, _ = make("llama")
    params = SamplingParams(temperature=1.5, seed=7, max_tokens=8)
    p = prompt(50, 9)

    def generate(with_neighbours: bool) -> list[int]:
        d = Driver(runner, seed=5 if with_neighbours else 6)
        s = Seq("s", list(p), 9)
        others = [Seq(f"o{i}", prompt(60 + i, 4 + 3 * i), 4 + 3 * i) for i in range(3)] if with_neighbours else []
        for _ in range(6):
            batch = [(o, d.chunk(o, params=SamplingParams(temperature=1.0))) for o in others]
            batch.insert(len(batch) // 2, (s, d.chunk(s, params=params)))
            out = SchedulerOutput(chunks=tuple(c for _, c in batch), num_batched_tokens=0)
            res = runner.run(out)
            for q, c in batch:
                q.computed += c.num_tokens
                q.tokens.append(res.sampled[q.rid])
        return s.outputs

    alone, crowded = generate(False), generate(True)
    assert alone == crowded
    assert len(set(alone)) > 1  # it really sampled (greedy on a random model would also repeat rarely)


def test_runner_shapes_and_block_bytes():
    runner, _ = make("llama", num_blocks=10)
    assert runner.kv_cache.data.shape == (2, 2, 10, BLOCK, 2, 16)
    k, v = runner.kv_cache.layer(1)
    assert k.shape == (10, BLOCK, 2, 16) and k.is_contiguous() and v.is_contiguous()
    cfg = runner.model.config
    assert block_bytes(cfg, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 16 * 2
    assert block_bytes(cfg, 16, "float32") == 2 * 2 * 16 * 2 * 16 * 4
    assert runner.model.config._attn_implementation == "cbserve_paged_torch"


def test_chunks_without_sampling_return_nothing():
    runner, _ = make("llama")
    c = ScheduledChunk("a", tuple(prompt(1, 6)), 0, (0, 1), False, GREEDY, 0)
    assert runner.run(SchedulerOutput(chunks=(c,), num_batched_tokens=6)).sampled == {}
    assert runner.run(SchedulerOutput(chunks=(), num_batched_tokens=0)).sampled == {}


def test_min_tokens_bans_eos_and_stop_tokens():
    runner, _ = make("llama")  # EOS comes from the model config: id 2
    assert runner.eos_token_ids == (2,)
    # A bias on the head makes EOS win by far, and token 9 come second.
    bias = torch.zeros(VOCAB, dtype=torch.float64)
    bias[2], bias[9] = 1e3, 5e2
    runner.model.lm_head.bias = torch.nn.Parameter(bias)

    def sample(num_output_tokens: int, params: SamplingParams) -> int:
        c = ScheduledChunk("a", (5, 6, 7), 0, (0,), True, params, num_output_tokens)
        return runner.run(SchedulerOutput(chunks=(c,), num_batched_tokens=3)).sampled["a"]

    banned = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4, stop_token_ids=(9,))
    assert sample(0, GREEDY) == 2
    first = sample(1, banned)
    assert first not in (2, 9)
    logits = runner.compute_logits(
        SchedulerOutput(chunks=(ScheduledChunk("a", (5, 6, 7), 0, (0,), True, GREEDY, 0),), num_batched_tokens=3)
    )[0]
    assert first == int(torch.argmax(logits.index_fill(0, torch.tensor([2, 9]), -torch.inf)))
    assert sample(2, banned) == 2  # min_tokens reached
    assert sample(0, SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)) == 2  # EOS is no stop then


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        (ScheduledChunk("a", (1, 2, 3, 4, 5), 0, (0,), True, GREEDY, 0), "cannot hold"),
        (ScheduledChunk("a", (1, 2), 0, (99,), True, GREEDY, 0), "block ids"),
        (ScheduledChunk("a", (1, VOCAB), 0, (0,), True, GREEDY, 0), "token ids"),
        (ScheduledChunk("a", (), 0, (0,), True, GREEDY, 0), "at least one token"),
        (ScheduledChunk("a", (1,), -1, (0,), True, GREEDY, 0), "start_pos"),
    ],
)
def test_bad_chunks_raise_clear_errors(chunk, match):
    runner, _ = make("llama", num_blocks=8)
    with pytest.raises(ValueError, match=match):
        runner.run(SchedulerOutput(chunks=(chunk,), num_batched_tokens=chunk.num_tokens))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="triton"):
        ModelRunner(tiny("llama"), CacheConfig(block_size=BLOCK), RunnerConfig(attention_backend="triton"), 8)
