"""Fused Triton kernels patched into a Hugging Face decoder on CUDA: RMSNorm and SiLU(gate) * up.

Why: a decode step replayed from a CUDA graph is bound by kernel count, not bytes (bench/GPU_NOTES.md):
HF's RMSNorm is ~7 elementwise kernels (cast, pow, mean, add, rsqrt, mul, cast, mul) and the MLP's
activation two. One kernel each removes ~15 of the ~40 kernels per layer. The math follows HF's
rounding steps (normalize in fp32, round to the input dtype, then multiply by the weight; SiLU in
fp32 rounded, then the product rounded), so results match eager up to the order of one fp32 sum.

``patch_model`` swaps the ``forward`` of matching module instances only (never the classes), and only
for CUDA models; CPU models and every other module keep HF's code.
"""

from __future__ import annotations

import os
import types

import torch
import triton
import triton.language as tl

ENV_DISABLE = "CBSERVE_FUSED_OPS"  # "0" turns the patch off (A/B measurements)
# Above this many tokens (prefill chunks) HF's own kernels run: there the step is bound by
# bytes and FLOPs, not kernel count, and the fused kernels measured slower (W1: 48 vs 27 ms).
MAX_FUSED_ROWS = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, out, x2.stride(0), out.stride(0), n, eps, BLOCK=block, num_warps=4 if block <= 2048 else 8
        )
    return out.reshape(shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with HF's rounding (both in gate's dtype)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _rows(hidden_states) > MAX_FUSED_ROWS:
        return self._hf_forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _rows(x) > MAX_FUSED_ROWS:
        return self._hf_forward(x)
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and isinstance(getattr(m, "variance_epsilon", None), float)
        and not getattr(m, "with_scale", False)
    )


def _is_silu_mlp(m: torch.nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (
        all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation")
    )


def patch_model(model: torch.nn.Module) -> int:
    """Swap in the fused forwards on a CUDA model; returns how many modules were patched
    (0 on CPU, or with ``CBSERVE_FUSED_OPS=0``)."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return 0
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda":
        return 0
    n = 0
    for m in model.modules():
        fused = _norm_forward if _is_rms_norm(m) else _mlp_forward if _is_silu_mlp(m) else None
        if fused is not None and "_hf_forward" not in m.__dict__:  # patch once
            m._hf_forward = m.forward
            m.forward = types.MethodType(fused, m)
            n += 1
    return n
