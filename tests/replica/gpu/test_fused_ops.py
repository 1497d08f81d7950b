"""Fused RMSNorm / SiLU-mul kernels (replica.fused_ops) against HF's eager math on CUDA, and a
patched model's logits against the unpatched model's."""

from __future__ import annotations

import pytest
import torch

from replica.models import TINY_CONFIGS, build_random_model

pytest.importorskip("triton")  # CPU-only installs may lack it; the patch is CUDA-only anyway
from replica import fused_ops


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
    tol = 2**-7 if dtype is torch.bfloat16 else 1e-5
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
    tol = 2**-7 if dtype is torch.bfloat16 else 1e-5
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


def _hf_rope(q, k, cos, sin):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("t", [1, 37, 256])
def test_rope_is_bit_exact_against_hf(device, t):
    """q and k as the attention forward has them (transposed views of the projections' outputs),
    cos/sin as HF's rotary embedding makes them: the same bits as HF's apply_rotary_pos_emb."""
    g = torch.Generator(device=device).manual_seed(t)
    hq, hk, d = 14, 2, 64
    q = (torch.randn(1, t, hq * d, device=device, generator=g) * 4).to(torch.bfloat16)
    k = (torch.randn(1, t, hk * d, device=device, generator=g) * 4).to(torch.bfloat16)
    q, k = q.view(1, t, hq, d).transpose(1, 2), k.view(1, t, hk, d).transpose(1, 2)
    pos = torch.randint(0, 4096, (1, t), device=device, generator=g).float()
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
    emb = torch.cat([pos[0, :, None] * inv[None]] * 2, dim=-1)[None]
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    assert fused_ops.rope_supported(q, cos)
    ref_q, ref_k = _hf_rope(q, k, cos, sin)
    got_q, got_k = fused_ops.rope(q, k, cos, sin)
    assert got_q.shape == ref_q.shape and got_k.shape == ref_k.shape
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)


def test_rope_is_not_used_where_it_would_not_be_exact():
    q = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)
    cos = torch.zeros(1, 3, 16, dtype=torch.bfloat16)
    assert fused_ops.rope_supported(q, cos)
    assert not fused_ops.rope_supported(q.float(), cos.float())  # fp32 / fp16 keep HF's kernels
    assert not fused_ops.rope_supported(q.half(), cos.half())
    assert not fused_ops.rope_supported(q, cos[..., :8])  # partial rotary
    assert not fused_ops.rope_supported(
        torch.zeros(1, 2, 3, 12, dtype=torch.bfloat16), torch.zeros(1, 3, 12, dtype=torch.bfloat16)
    )  # half of 12 is 6


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_patched_attention_is_bit_exact_in_bf16(device, arch):
    """The patched attention forward (fused rotary) returns the same bits as HF's forward."""
    model = build_random_model(TINY_CONFIGS[arch], seed=0, dtype=torch.bfloat16, device=device).eval()
    model.set_attn_implementation("sdpa")
    attn = model.model.layers[0].self_attn
    t = 29
    x = torch.randn(1, t, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    pos = torch.arange(7, 7 + t, device=device)[None]
    with torch.inference_mode():
        emb = model.model.rotary_emb(x, pos)
        ref, _ = attn(x, emb, None)
        n = fused_ops.patch_model(model)
        assert n >= 3 * TINY_CONFIGS[arch]["num_hidden_layers"]  # two norms + MLP + attention per layer
        assert "_hf_forward" in attn.__dict__
        got, _ = attn(x, emb, None)
        assert torch.equal(got, ref)
        assert torch.equal(attn._hf_forward(x, emb, None)[0], ref)  # HF's path is still there
