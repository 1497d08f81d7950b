"""Backend selection and the HF adapter's guard rails."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from replica.attention import available_backends, install, resolve_backend


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(cfg).eval()


def test_auto_on_cpu_is_torch_and_triton_needs_cuda():
    cpu = torch.device("cpu")
    assert "torch" in available_backends()
    assert resolve_backend("auto", cpu).name == "torch"
    assert resolve_backend("torch", cpu).name == "torch"
    with pytest.raises(ValueError, match="not available"):
        resolve_backend("flash", cpu)
    if "triton" in available_backends():
        with pytest.raises(ValueError, match="does not support device cpu"):
            resolve_backend("triton", cpu)


def test_install_switches_attention_and_forward_needs_metadata():
    model = tiny_llama()
    name = install(model, resolve_backend("torch", torch.device("cpu")))
    assert name == "cbserve_paged_torch"
    assert model.config._attn_implementation == name
    with pytest.raises(RuntimeError, match="attn_metadata= and kv_cache="):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
