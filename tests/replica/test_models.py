"""Where weights come from: tiny/dummy seeded models, HF paths (the embedded default: test_default_model.py)."""

from __future__ import annotations

import pytest
import torch

from replica.config import ModelConfig
from replica.models import (
    DUMMY_CONFIGS,
    TINY_CONFIGS,
    ModelLoadError,
    build_random_model,
    load_model,
    load_tokenizer,
    tiny_model,
)


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _fresh_inv_freq(module) -> torch.Tensor:
    return type(module)(config=module.config).inv_freq


# ----------------------------------------------------------------------------- tiny


@pytest.mark.parametrize(
    "arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")]
)
def test_tiny_models_are_seeded_and_usable(arch, cls):
    a = tiny_model(arch, seed=3)
    m = a.model
    assert type(m).__name__ == cls
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert c.vocab_size == a.tokenizer.vocab_size  # text round-trips through the model's vocab
    assert a.name == f"tiny:{arch}" and a.max_model_len == c.max_position_embeddings
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.dtype == torch.float32 and m.device.type == "cpu"

    same, other = _params(tiny_model(arch, seed=3).model), _params(tiny_model(arch, seed=4).model)
    for name, p in _params(m).items():
        assert torch.equal(p, same[name]), name
        if "norm" in name:
            assert torch.all(p == 1), name
    assert not torch.equal(_params(m)["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    std = _params(m)["model.layers.0.mlp.up_proj.weight"].std().item()
    assert 0.015 < std < 0.025

    rotary = m.model.rotary_emb
    assert torch.allclose(rotary.inv_freq, _fresh_inv_freq(rotary))

    ids = a.tokenizer.encode("Hello there")
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), c.vocab_size) and torch.isfinite(logits).all()


def test_tiny_via_load_model_honours_seed_dtype_and_max_len():
    a = load_model(ModelConfig(model="tiny:qwen2", seed=7, dtype="bfloat16", max_model_len=256))
    b = tiny_model("qwen2", seed=7, dtype=torch.bfloat16)
    assert a.model.dtype == torch.bfloat16 and a.max_model_len == 256 and a.name == "tiny:qwen2"
    assert torch.equal(a.model.lm_head.weight, b.model.lm_head.weight)
    assert load_model(ModelConfig(model="tiny:qwen2", served_name="my-model")).name == "my-model"


def test_max_model_len_beyond_the_models_positions_is_refused():
    native = tiny_model("qwen2").max_model_len
    with pytest.raises(ModelLoadError, match=f"exceeds the model's context length {native}"):
        load_model(ModelConfig(model="tiny:qwen2", max_model_len=native + 1))
    assert load_model(ModelConfig(model="tiny:qwen2", max_model_len=native)).max_model_len == native


@pytest.mark.parametrize("name", ["tiny:gpt5", "dummy:llama-70b", "tiny:"])
def test_unknown_builtin_names_raise_clear_errors(name):
    with pytest.raises(ModelLoadError, match=r"unknown|does not exist"):
        load_model(ModelConfig(model=name))


def test_tiny_model_rejects_unknown_arch():
    with pytest.raises(ModelLoadError, match="unknown tiny"):
        tiny_model("gpt2", seed=0)


# ----------------------------------------------------------------------------- dummy shapes


@pytest.mark.parametrize(
    "shape,cls,n_params,vocab",
    [
        ("qwen2.5-0.5b", "Qwen2ForCausalLM", 494_032_768, 151936),
        ("llama-3.2-1b", "LlamaForCausalLM", 1_235_814_400, 128256),
    ],
)
def test_dummy_shapes_match_the_real_models(shape, cls, n_params, vocab):
    # Built on the meta device: shapes without memory (the real build is the same code path).
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(DUMMY_CONFIGS[shape])
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf_config)
    assert type(m).__name__ == cls
    assert m.config.vocab_size == vocab and m.config.tie_word_embeddings
    assert sum(p.numel() for p in m.parameters()) == n_params  # the published sizes


def test_random_build_with_scaled_rope_recomputes_inv_freq_and_ties_embeddings():
    # The llama-3.2-1b recipe (llama3 rope scaling, tied embeddings) at a size a test can afford.
    cfg = {
        **DUMMY_CONFIGS["llama-3.2-1b"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 1000,
    }
    m = build_random_model(cfg, seed=0, dtype=torch.float32, device=torch.device("cpu"))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rotary = m.model.rotary_emb
    fresh = _fresh_inv_freq(rotary)
    assert torch.allclose(rotary.inv_freq, fresh) and torch.allclose(rotary.original_inv_freq, fresh)
    # llama3 scaling divides the low frequencies by `factor`: not the plain RoPE table.
    plain = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float) / 32))
    assert not torch.allclose(fresh, plain)
    assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()


def test_load_tokenizer_for_builtin_names_needs_no_weights():
    for name in ("default", "dummy:qwen2.5-0.5b", "tiny:llama"):
        tok = load_tokenizer(name)
        assert tok.vocab_size == 49152 and tok.has_chat_template


# ----------------------------------------------------------------------------- HF ids and paths


def test_local_checkpoint_path_round_trips(tmp_path):
    a = tiny_model("mistral", seed=11)
    a.model.save_pretrained(tmp_path)
    a.tokenizer.hf.save_pretrained(tmp_path)
    b = load_model(ModelConfig(model=str(tmp_path), device="cpu", max_model_len=512))
    assert type(b.model).__name__ == "MistralForCausalLM" and b.max_model_len == 512
    assert b.model.dtype == torch.float32  # auto on CPU
    for name, p in _params(a.model).items():
        assert torch.equal(p, _params(b.model)[name]), name
    assert b.tokenizer.encode("round trip") == a.tokenizer.encode("round trip")


def test_missing_path_and_offline_hub_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(model=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):  # conftest sets it
        load_model(ModelConfig(model="some-org/not-downloadable"))
    with pytest.raises(ModelLoadError):
        load_tokenizer("some-org/not-downloadable")


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(ModelConfig(model="tiny:llama", device="cuda"))


def test_tiny_configs_share_the_tokenizer_vocab():
    assert {c["vocab_size"] for c in TINY_CONFIGS.values()} == {load_tokenizer("tiny:llama").vocab_size}
