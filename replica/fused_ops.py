"""Fused Triton kernels patched into a Hugging Face decoder on CUDA: RMSNorm, SiLU(gate) * up, and
the rotary embedding of queries and keys.

Why: a decode step replayed from a CUDA graph is bound by kernel count, not bytes (bench/GPU_NOTES.md):
HF's RMSNorm is ~7 elementwise kernels (cast, pow, mean, add, rsqrt, mul, cast, mul) and the MLP's
activation two. One kernel each removes ~15 of the ~40 kernels per layer; HF's rotary embedding
(``q * cos + rotate_half(q) * sin`` for q and k: slices, negation, concatenation, products, sums)
is ~10 more, one kernel here (bf16 models, where it is bit-exact: see ``rope``). The math follows HF's
rounding steps (normalize in fp32, round to the input dtype, then multiply by the weight; SiLU in
fp32 rounded, then the product rounded), so results match eager up to the order of one fp32 sum.

``patch_model`` swaps the ``forward`` of matching module instances only (never the classes), and only
for CUDA models; CPU models and every other module keep HF's code.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ENV_DISABLE = "CBSERVE_FUSED_OPS"  # "0" turns the patch off (A/B measurements)
# Above this many tokens (prefill chunks) HF's own kernels run: there the step is bound by
# bytes and FLOPs, not kernel count, and the fused kernels measured slower (W1: 48 vs 27 ms).
MAX_FUSED_ROWS = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton DSL
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
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton DSL
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


@triton.jit
def _round_bf16(x):  # type: ignore[no-untyped-def]  # Triton DSL
    # Round-to-nearest-even of fp32 to bf16 (kept in fp32), by integer arithmetic: the compiler
    # turned x.to(bf16).to(fp32) plus a sum into a fused operation that rounds differently
    # (~18 % of outputs one ulp off HF), which bit operations prevent.
    b = x.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _rope_half(x_ptr, out_ptr, c1, c2, s1, s2, offs, HALF: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton DSL
    # HF: (x * cos) + (rotate_half(x) * sin), rotate_half(x) = cat(-x2, x1); every product and
    # the sum rounded to bf16, as PyTorch's bf16 elementwise ops do (fp32 math, rounded result).
    x1 = tl.load(x_ptr + offs).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + offs).to(tl.float32)
    o1 = _round_bf16(_round_bf16(x1 * c1) + _round_bf16(-x2 * s1))
    o2 = _round_bf16(_round_bf16(x2 * c2) + _round_bf16(x1 * s2))
    tl.store(out_ptr + offs, o1.to(tl.bfloat16))
    tl.store(out_ptr + HALF + offs, o2.to(tl.bfloat16))


@triton.jit
def _rope_kernel(  # type: ignore[no-untyped-def]  # Triton DSL
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    scs_t,
    so_qt,
    so_kt,
    n_q_heads,
    HALF: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)  # query heads first, then key heads: one launch for both
    offs = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + t * scs_t + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + t * scs_t + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + t * scs_t + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + t * scs_t + HALF + offs).to(tl.float32)
    if h < n_q_heads:
        _rope_half(q_ptr + t * sq_t + h * sq_h, qo_ptr + t * so_qt + h * 2 * HALF, c1, c2, s1, s2, offs, HALF)
    else:
        hk = h - n_q_heads
        _rope_half(k_ptr + t * sk_t + hk * sk_h, ko_ptr + t * so_kt + hk * 2 * HALF, c1, c2, s1, s2, offs, HALF)


def rope_supported(q: torch.Tensor, cos: torch.Tensor) -> bool:
    """bf16 q ``[1, H, T, D]`` with D/2 a power of two and cos ``[1, T, D]`` (full rotary).
    bf16 only: its rounding is done by integer arithmetic, bit-exact against HF (fp32 and
    fp16 models keep HF's kernels)."""
    d = q.shape[-1]
    half = d // 2
    return (
        q.dtype == torch.bfloat16
        and q.dim() == 4
        and q.shape[0] == 1
        and d % 2 == 0
        and half >= 1
        and half & (half - 1) == 0
        and cos.dim() == 3
        and cos.shape[-1] == d
        and cos.dtype == q.dtype
        and cos.stride(-1) == 1
        and q.stride(-1) == 1
    )


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` for q ``[1, Hq, T, D]``, k ``[1, Hk, T, D]``
    (any strides with unit last stride, e.g. the transposed view of a projection's output) and
    cos/sin ``[1, T, D]``; the results are views ``[1, H, T, D]`` of ``[1, T, H, D]`` tensors,
    laid out as HF's are. Bit-exact against HF in bf16 (same rounding steps)."""
    _, hq, t, d = q.shape
    hk = k.shape[1]
    qo = torch.empty((1, t, hq, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((1, t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        cos2, sin2 = cos[0], sin[0]
        if sin2.stride() != cos2.stride():
            cos2, sin2 = cos2.contiguous(), sin2.contiguous()
        _rope_kernel[(t, hq + hk)](
            q,
            k,
            cos2,
            sin2,
            qo,
            ko,
            q.stride(2),
            q.stride(1),
            k.stride(2),
            k.stride(1),
            cos2.stride(0),
            qo.stride(1),
            ko.stride(1),
            hq,
            HALF=d // 2,
            num_warps=1,
        )
    return qo.transpose(1, 2), ko.transpose(1, 2)


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


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if _rows(hidden_states) > MAX_FUSED_ROWS:
        return self._hf_forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if _rows(x) > MAX_FUSED_ROWS:
        return self._hf_forward(x)
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """HF's Qwen2 / Llama attention forward (transformers 5.x) with the rotary embedding fused;
    HF's own forward where the fused kernel doesn't apply (prefill chunks, not bf16, partial rotary)."""
    input_shape = hidden_states.shape[:-1]
    cos, sin = position_embeddings
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)  # type: ignore[arg-type]
    if (
        _rows(hidden_states) > MAX_FUSED_ROWS
        or past_key_values is not None
        or self.training
        or attention_interface is None
        or hidden_states.dtype != torch.bfloat16
    ):
        return self._hf_forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if not rope_supported(q, cos):  # partial rotary, an odd head size: q is computed again (rare)
        return self._hf_forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    if self._sliding_kwarg:
        kwargs["sliding_window"] = self.sliding_window
    attn_output, attn_weights = attention_interface(
        self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


# The attention classes whose forward _attention_forward reproduces, and whether HF passes
# ``sliding_window=self.sliding_window`` to the attention function.
_ATTENTION_CLASSES = {"Qwen2Attention": True, "LlamaAttention": False}


def _is_known_attention(m: torch.nn.Module) -> bool:
    return (
        type(m).__name__ in _ATTENTION_CLASSES
        and all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and isinstance(getattr(m, "head_dim", None), int)
    )


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
    return all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and (
        isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
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
        fused: Callable[..., Any] | None = (
            _norm_forward if _is_rms_norm(m) else _mlp_forward if _is_silu_mlp(m) else None
        )
        if fused is None and _is_known_attention(m):
            fused = _attention_forward
            m._sliding_kwarg = _ATTENTION_CLASSES[type(m).__name__]  # type: ignore[assignment]
        if fused is not None and "_hf_forward" not in m.__dict__:  # patch once
            m._hf_forward = m.forward  # type: ignore[assignment]
            m.forward = types.MethodType(fused, m)
            n += 1
    return n
