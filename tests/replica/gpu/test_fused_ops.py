"""Fused RMSNorm / SiLU-mul kernels (replica.fused_ops) against HF's eager math on CUDA, and a
patched model's logits against the unpatched model's."""

from __future__ import annotations

import pytest
import torch

from replica.models import TINY_CONFIGS, build_random_model

pytest.importorskip("triton")  # CPU-only installs may lack it; the patch is CUDA-only anyway
from replica import fused_ops  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,n", [(1, 896), (37, 2048), (256, 64)])
def test_rms_norm_matches_hf(device, dtype, rows, n):
    g = torch.Generator(device=device).manual_seed(rows + n)
    x = torch.randn(1, rows, n, device=device, dtype=dtype, generator=g) * 3
    w = torch.randn(n, device=device, dtype=dtype, generator=g)
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = fused_ops.rms_norm(x, w, 1e-6)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # Same rounding steps; only the fp32 sum order differs: at most one ulp of the output dtype.
    tol = 2 ** -7 if dtype is torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    if dtype is torch.bfloat16:  # the fp32 rounding is almost always absorbed by the bf16 one
        assert (got == ref).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_matches_hf(device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    gate = torch.randn(3, 5, 4864, device=device, dtype=dtype, generator=g)
    up = torch.randn(3, 5, 4864, device=device, dtype=dtype, generator=g)
    ref = torch.nn.functional.silu(gate) * up
    got = fused_ops.silu_mul(gate, up)
    tol = 2 ** -7 if dtype is torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_patched_model_logits_match(device):
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=0, dtype=torch.float32, device=device).eval()
    ids = torch.randint(3, TINY_CONFIGS["qwen2"]["vocab_size"], (2, 17), device=device)
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        assert fused_ops.patch_model(model) > 0
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_patch_is_a_noop_on_cpu_and_when_disabled(monkeypatch):
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=0, dtype=torch.float32, device=torch.device("cpu"))
    assert fused_ops.patch_model(model) == 0
    monkeypatch.setenv(fused_ops.ENV_DISABLE, "0")
    assert fused_ops.patch_model(model) == 0


def test_long_inputs_take_hf_path_and_patching_is_idempotent(device):
    model = build_random_model(TINY_CONFIGS["qwen2"], seed=0, dtype=torch.float32, device=device).eval()
    ids = torch.randint(3, TINY_CONFIGS["qwen2"]["vocab_size"], (1, fused_ops.MAX_FUSED_ROWS + 5), device=device)
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        n = fused_ops.patch_model(model)
        assert n > 0 and fused_ops.patch_model(model) == 0
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
