"""The load-time check: served exactly, or refused naming the feature before the step loop."""

from __future__ import annotations

import shutil

import pytest
import torch

from replica.__main__ import main
from replica.attention.torch_ref import TorchAttentionBackend
from replica.config import CacheConfig, RunnerConfig
from replica.default_model import default_tokenizer_dir
from replica.engine import LLMEngine
from replica.errors import RequestTooLongError
from replica.model_check import REFUSED, SUPPORTED, UnsupportedModelError, check_model, dry_run, inspect_model
from replica.model_runner import ModelRunner
from replica.models import tiny_model
from replica.request import SamplingParams
from tests.replica.test_engine_exact import hf_greedy, loaded_of, table_engine_config, table_model


def test_verdict_lists_the_supported_features_in_use():
    v = inspect_model(table_model("gemma2"))
    assert {"GQA/MQA", "sliding window", "attention softcap", "final logit softcap"} <= set(v.features)
    assert set(v.features) <= set(SUPPORTED)
    assert v.max_model_len is None and v.cap(4096) == 4096
    assert "Gemma2ForCausalLM" in v.report()


@pytest.mark.parametrize(
    "name,feature",
    [
        ("deepseek_v3", "multi-head latent attention (MLA)"),
        ("gpt_oss", "attention sinks"),
        ("bloom", "ALiBi"),
        ("minimax", "recurrent or convolution layers"),
    ],
)
def test_config_inspection_names_the_refused_feature(name, feature):
    with pytest.raises(UnsupportedModelError) as info:
        inspect_model(table_model(name))
    assert info.value.feature == feature and feature in REFUSED
    assert str(info.value).startswith(f"unsupported model: {feature}: ")


def test_llama4_chunked_attention_and_temperature_tuning_are_served():
    model = table_model("llama4_text")  # attention_chunk_size 8, floor_scale 16
    v = inspect_model(model)
    assert {"chunked local attention", "attention temperature tuning"} <= set(v.features)
    assert (v.max_model_len, v.max_step_tokens) == (None, 15)
    assert LLMEngine(table_engine_config(), loaded=loaded_of(model)).max_model_len == 256  # no cap
    with pytest.raises(UnsupportedModelError, match="max_num_batched_tokens 16 > 15"):
        v.cap(256, 16)  # a step of 16 flat tokens: transformers scales the last query by its index
    model.config.attention_chunk_size = None  # chunked layers without a chunk size
    with pytest.raises(UnsupportedModelError, match="chunked local attention"):
        inspect_model(model)


def test_dry_run_catches_a_paged_path_that_drops_a_feature(monkeypatch):
    model = table_model("gemma2")  # attention softcap 2.0
    runner = ModelRunner(
        model, CacheConfig(block_size=4), RunnerConfig(attention_backend="torch", use_cuda_graphs=False), num_blocks=4
    )
    dry_run(runner)  # the real path agrees with HF
    forward = TorchAttentionBackend.forward

    def without_softcap(self, *args, **kwargs):
        return forward(self, *args, **{**kwargs, "softcap": None})

    monkeypatch.setattr(TorchAttentionBackend, "forward", without_softcap)
    with pytest.raises(UnsupportedModelError, match="paged path's logits differ from Gemma2ForCausalLM"):
        dry_run(runner)
    # The check leaves the model on the paged implementation.
    assert model.config._attn_implementation == "cbserve_paged_torch"


def test_decoder_layers_dropping_the_step_kwargs_are_refused_by_the_dry_run(monkeypatch):
    model = table_model("nemotron")
    inspect_model(model)  # nothing in the config says so
    with pytest.raises(UnsupportedModelError) as info:
        check_model(loaded_of(model), RunnerConfig(attention_backend="torch"))
    assert info.value.feature == "per-step attention kwargs"
    # In the engine: refused while it is built, so no step (and no replica loop) ever runs it.
    steps = []
    monkeypatch.setattr(ModelRunner, "run", lambda *a: steps.append(a))
    monkeypatch.setattr(ModelRunner, "launch", lambda *a: steps.append(a))
    with pytest.raises(UnsupportedModelError, match="per-step attention kwargs"):
        LLMEngine(table_engine_config(), loaded=loaded_of(model))
    assert steps == []


# ----------------------------------------------------------------------------- LongRoPE


def test_longrope_is_capped_at_its_original_length_and_longer_requests_refused():
    engine = LLMEngine(table_engine_config(num_blocks=64), loaded=loaded_of(table_model("phi3-longrope")))
    assert engine.max_model_len == 64  # original_max_position_embeddings, not max_model_len 256
    with pytest.raises(RequestTooLongError):
        engine.add_request("long", list(range(3, 63)), SamplingParams(max_tokens=8))


def test_a_short_request_is_the_same_alone_and_beside_the_longest_one():
    # HF picks LongRoPE's factors from the longest position of the whole forward; the engine's step is
    # one batch of all requests, so a short request must not see the long request's positions.
    model = table_model("phi3-longrope")
    reference = hf_greedy(model, [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine = LLMEngine(table_engine_config(num_blocks=64), loaded=loaded_of(model))
    short, greedy = [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    (alone,) = engine.generate([short], greedy, use_tqdm=False)
    longest = list(range(3, 3 + engine.max_model_len - 8))  # reaches the engine's last position
    beside, _ = engine.generate([short, longest], greedy, use_tqdm=False)
    assert list(alone.token_ids) == list(beside.token_ids) == reference


# ----------------------------------------------------------------------------- command line


def _saved(tmp_path, name: str) -> str:
    """A tiny ``name`` model as a local checkpoint folder with the SmolLM2 tokenizer."""
    model = table_model(name)
    model.save_pretrained(tmp_path)
    for f in default_tokenizer_dir().iterdir():
        shutil.copy2(f, tmp_path / f.name)
    return str(tmp_path)


def test_check_model_prints_the_verdict(capsys):
    assert main(["--check-model", "tiny:llama", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny:llama: supported: LlamaForCausalLM (llama)" in out and "GQA/MQA" in out


def test_check_model_refuses_naming_the_feature(tmp_path, capsys):
    path = _saved(tmp_path, "gpt_oss")
    assert main(["--check-model", path, "--device", "cpu"]) == 1
    assert f"refused: {path}: attention sinks: " in capsys.readouterr().out


def test_a_refused_model_never_reaches_the_step_loop(tmp_path, capsys, monkeypatch):
    path = _saved(tmp_path, "gpt_oss")
    calls = []
    monkeypatch.setattr(LLMEngine, "step", lambda self: calls.append("step") or [])
    monkeypatch.setattr(ModelRunner, "__init__", lambda *a, **k: calls.append("runner"))
    assert main(["--model", path, "--device", "cpu", "--no-chat", "--max-model-len", "64", "hello"]) == 2
    assert "error: unsupported model: attention sinks" in capsys.readouterr().err
    assert calls == []  # refused before the KV cache, the runner or any step


def test_tiny_llama_passes_the_whole_check():
    loaded = tiny_model("llama", dtype=torch.float64)
    assert check_model(loaded, RunnerConfig(attention_backend="torch")).features[0] == "causal self-attention"
