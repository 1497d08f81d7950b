"""Which Hugging Face decoders the engine serves: checked once when a model loads.

The engine runs any HF model through its own paged attention (``replica.attention``): one flat
ragged batch of all requests' tokens, explicit positions, no HF cache object, no dense mask. That
is exact for the attention features in ``SUPPORTED`` and silently wrong (or a crash on the first
request) for the ones in ``REFUSED``. So before the step loop ever runs:

1. ``inspect_model`` reads the config and the module tree, lists the supported features in use and
   raises ``UnsupportedModelError`` naming the first refused one; some supported features narrow
   the context (``ModelVerdict.max_model_len``: LongRoPE is served with its short factors only).
2. ``dry_run`` runs two requests through the runner's paged path (prefill, then a decode beside a
   chunk over a cached prefix) and compares their logits with the model's own eager forward on
   each request alone; a crash or a difference is a refusal. It catches what the config does not
   say: decoder layers that drop the engine's per-step kwargs, recurrent layers, custom masks.

``python -m replica --check-model MODEL`` prints the verdict (``check_model``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from replica.models import ModelLoadError

if TYPE_CHECKING:
    from replica.config import RunnerConfig
    from replica.model_runner import ModelRunner
    from replica.models import LoadedModel

logger = logging.getLogger(__name__)

# What the paged path reproduces exactly (token-exact against HF generate in the tests).
SUPPORTED: dict[str, str] = {
    "causal self-attention": "multi-head attention over the request's own cached prefix",
    "GQA/MQA": "fewer KV heads than query heads",
    "sliding window": "a window for the whole model or per layer (layer_types)",
    "attention softcap": "scores become softcap * tanh(score / softcap)",
    "final logit softcap": "inside the HF model's head",
    "QK norm": "norms on queries and keys before RoPE, inside the HF attention module",
    "partial rotary": "RoPE on part of each head",
    "rotary scaling": "linear, dynamic NTK (within max_position_embeddings), llama3, yarn: position-only",
    "LongRoPE": "short factors only: max_model_len capped at original_max_position_embeddings",
    "no positional encoding": "NoPE layers or models without rotary",
    "learned absolute positions": "position embeddings indexed by the explicit position_ids",
    "mixture of experts": "token-wise routing is independent of the batch",
    "chunked local attention": "Llama 4's attention_chunk_size, in the paged kernels (layer_types says which layers)",
    "attention temperature tuning": "Llama 4 NoPE layers: each token's query scale from its own position; the "
    "step budget below floor_scale - 1, where transformers' scale of the flat batch index is exactly 1",
}

# Features the engine refuses at load, and why.
REFUSED: dict[str, str] = {
    "encoder-decoder": "the engine serves decoder-only models",
    "multi-head latent attention (MLA)": "keys and values of different head sizes / a compressed latent KV "
    "(DeepSeek V2/V3 style); the paged cache holds K and V of one head size",
    "attention sinks": "learned per-head sink logits (gpt-oss); the paged kernels have no sink term",
    "chunked local attention": "chunked layers without attention_chunk_size",
    "attention temperature tuning": "Llama 4 NoPE layers scale queries by positions taken from "
    "arange(q_len) + cache length, which are batch indices on the engine's flat cache-less batch; the engine "
    "corrects them only while every step holds fewer than floor_scale - 1 tokens",
    "ALiBi": "position biases passed as a dense attention mask",
    "cross-attention": "layers attending to another modality's states",
    "per-layer attention shapes": "head sizes or KV head counts that vary across layers; the paged cache "
    "has one shape for all layers",
    "dual chunk attention": "a second attention pattern the paged kernels do not implement",
    "recurrent or convolution layers": "their state (SSM, linear attention, short conv) is not kept in "
    "the paged KV cache and would mix requests of one flat batch",
    "AttentionInterface": "the model does not declare custom attention backends (_supports_attention_backend): "
    "its layers do not route attention, or the forward's kwargs, through transformers' AttentionInterface",
    "per-step attention kwargs": "decoder layers that do not pass attn_metadata/kv_cache through to attention",
    "paged path differs from HF": "the one-step dry run's logits differ from the model's own forward",
}

# Layer kinds the paged path serves (config.layer_types); anything else has state of its own.
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local"}
# Module class names of layers whose state lives outside the KV cache.
_STATEFUL_MODULE = re.compile(r"Mamba|SSM|Mixer2|LinearAttention|GatedDeltaNet|ShortConv|RWKV|xLSTM|Recurrent")


class UnsupportedModelError(ModelLoadError):
    """The model uses an attention feature the engine cannot serve exactly; ``feature`` is a
    key of ``REFUSED``."""

    def __init__(self, feature: str, detail: str) -> None:
        super().__init__(f"unsupported model: {feature}: {detail}")
        self.feature = feature
        self.detail = detail


@dataclass(frozen=True)
class ModelVerdict:
    """A model the engine serves: what it uses, and the context cap some features impose."""

    architecture: str
    model_type: str
    features: tuple[str, ...]
    max_model_len: int | None = None  # a cap below max_position_embeddings, if any
    cap_reason: str = ""
    max_step_tokens: int | None = None  # most tokens one step (one flat batch) may hold, if limited

    def cap(self, max_model_len: int, max_num_batched_tokens: int | None = None) -> int:
        """``max_model_len`` within this model's cap (logged when it shrinks); refuses a step
        budget above ``max_step_tokens``."""
        if self.max_step_tokens is not None and (max_num_batched_tokens or 0) > self.max_step_tokens:
            raise _refuse(
                "attention temperature tuning",
                f"max_num_batched_tokens {max_num_batched_tokens} > {self.max_step_tokens}: Llama 4 NoPE layers "
                "take the query scale's positions from the flat batch index; set max_num_batched_tokens "
                f"<= {self.max_step_tokens} (floor_scale - 1), where that scale is 1 and the engine's own applies",
            )
        if self.max_model_len is None or max_model_len <= self.max_model_len:
            return max_model_len
        logger.warning("max_model_len %d capped at %d: %s", max_model_len, self.max_model_len, self.cap_reason)
        return self.max_model_len

    def report(self) -> str:
        lines = [f"supported: {self.architecture} ({self.model_type})", "features: " + ", ".join(self.features)]
        if self.max_model_len is not None:
            lines.append(f"max_model_len capped at {self.max_model_len}: {self.cap_reason}")
        if self.max_step_tokens is not None:
            lines.append(f"max_num_batched_tokens at most {self.max_step_tokens}")
        return "\n".join(lines)


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_parameters(cfg: Any) -> list[dict[str, Any]]:
    """The rotary parameter sets of a config: one, or one per layer type."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not isinstance(rp, dict):
        return []
    if all(isinstance(v, dict) for v in rp.values()):
        return list(rp.values())
    return [rp]


def _refuse(feature: str, detail: str = "") -> UnsupportedModelError:
    return UnsupportedModelError(feature, detail or REFUSED[feature])


def inspect_model(model: Any) -> ModelVerdict:
    """Config and module inspection: the verdict, or ``UnsupportedModelError``."""
    config = model.config
    cfg = text_config(config)
    model_type = str(getattr(cfg, "model_type", "") or getattr(config, "model_type", ""))
    arch = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse("encoder-decoder")
    try:  # one cache shape for every layer (replica.model_runner.kv_shape)
        for a in ("head_dim", "num_key_value_heads", "num_attention_heads"):
            getattr(cfg, a, None)
    except Exception as e:  # transformers' AmbiguousGlobalPerLayerAttributeError and the like
        raise _refuse("per-layer attention shapes", f"{e}") from e
    # MLA: a latent KV rank, or value heads of another width than key heads.
    qk_dim = getattr(cfg, "qk_head_dim", None) or getattr(cfg, "head_dim", None)
    v_dim = getattr(cfg, "v_head_dim", None)
    if getattr(cfg, "kv_lora_rank", None) or (v_dim is not None and qk_dim is not None and v_dim != qk_dim):
        raise _refuse("multi-head latent attention (MLA)")
    chunk = getattr(cfg, "attention_chunk_size", None)
    if not chunk and "chunked_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise _refuse("chunked local attention")
    if getattr(cfg, "alibi", False) or model_type in ("bloom", "mpt"):
        raise _refuse("ALiBi")
    if getattr(cfg, "cross_attention_layers", None):
        raise _refuse("cross-attention")
    if getattr(cfg, "dual_chunk_attention_config", None):
        raise _refuse("dual chunk attention")
    layer_types = set(getattr(cfg, "layer_types", None) or ())
    other = sorted(layer_types - _ATTENTION_LAYER_TYPES)
    if other:
        raise _refuse(
            "recurrent or convolution layers", f"layer types {other}: " + REFUSED["recurrent or convolution layers"]
        )
    stateful = sorted({type(m).__name__ for m in model.modules() if _STATEFUL_MODULE.search(type(m).__name__)})
    if stateful:
        raise _refuse("recurrent or convolution layers", f"{stateful}: " + REFUSED["recurrent or convolution layers"])
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters()):
        raise _refuse("attention sinks")
    if not getattr(model, "_supports_attention_backend", True):
        raise _refuse("AttentionInterface", f"{arch}: " + REFUSED["AttentionInterface"])

    features = ["causal self-attention"]
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "multi_query_group_num", None)
    if getattr(cfg, "multi_query", False) or (heads and kv_heads and kv_heads < heads):
        features.append("GQA/MQA")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
        features.append("sliding window")
    if getattr(cfg, "attn_logit_softcapping", None):
        features.append("attention softcap")
    if getattr(cfg, "final_logit_softcapping", None):
        features.append("final logit softcap")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if names & {"q_norm", "k_norm", "q_layernorm", "k_layernorm"}:
        features.append("QK norm")
    if any(0 < float(getattr(cfg, a, 1.0) or 1.0) < 1.0 for a in ("partial_rotary_factor", "rotary_pct")):
        features.append("partial rotary")
    rope_types = {str(p.get("rope_type", p.get("type", "default"))) for p in _rope_parameters(cfg)}
    if rope_types - {"default"}:
        features.append("rotary scaling")
    learned = bool(names & {"wpe", "embed_positions", "position_embeddings"})
    if learned:
        features.append("learned absolute positions")
    if getattr(cfg, "no_rope_layers", None) or not (rope_types or learned):
        features.append("no positional encoding")
    if any(getattr(cfg, a, None) for a in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")):
        features.append("mixture of experts")

    caps: list[tuple[int, str]] = []
    step_cap = None
    if chunk:
        features.append("chunked local attention")
    if getattr(cfg, "attn_temperature_tuning", False):
        # replica.attention.registry.temperature_tuned_query rescales by the real positions.
        features.append("attention temperature tuning")
        step_cap = int(getattr(cfg, "floor_scale", 8192)) - 1
    if "longrope" in rope_types:
        # HF switches all positions to the long factors once max(position_ids) crosses the original
        # length, and the engine's step is one batch of all requests: below it, only the short ones.
        given = [p.get("original_max_position_embeddings") for p in _rope_parameters(cfg)]
        omax = min([int(x) for x in given if x] or [int(getattr(cfg, "original_max_position_embeddings", 0) or 0)])
        native = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if omax and (not native or omax < native):
            caps.append(
                (
                    omax,
                    "LongRoPE picks its long factors from the longest position of the whole batch; "
                    "the engine serves it exactly with the short factors only (original_max_position_embeddings)",
                )
            )
        features.append("LongRoPE")
    cap, reason = min(caps) if caps else (None, "")
    return ModelVerdict(arch, model_type, tuple(features), cap, reason, step_cap)


# Logits of the paged path vs the eager forward: max |diff| <= tol * max(1, max |ref|).
_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
_HALF_TOLERANCE = 5e-2


def _dry_run_prompts(vocab: int) -> tuple[list[int], list[int]]:
    a = [3 + (17 + 131 * i) % max(1, min(vocab, 4096) - 3) for i in range(6)]
    b = [3 + (5 + 71 * i) % max(1, min(vocab, 4096) - 3) for i in range(5)]
    return a, b


@torch.inference_mode()
def reference_logits(model: Any, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """The logits ``dry_run`` expects, from the model's own eager forward on each request alone.
    A tensor-parallel engine takes them from the whole model before it is sharded."""
    a, b = _dry_run_prompts(vocab)
    device = device or next(model.parameters()).device
    name = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        ref_a = model(input_ids=torch.tensor([a], device=device), use_cache=False).logits[0]
        ref_b = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(name)
    return torch.stack([ref_a[4], ref_b[2], ref_a[5], ref_b[4]]).double()


@torch.inference_mode()
def dry_run(runner: ModelRunner, reference: torch.Tensor | None = None) -> None:
    """Two requests through ``runner``'s paged path vs the eager forward (or ``reference``, its
    logits computed earlier); raises ``UnsupportedModelError`` on a crash or a difference. Writes
    only the first blocks of the runner's cache, so call it before any request is served."""
    from replica.attention import install
    from replica.request import SamplingParams
    from replica.step import ScheduledChunk, SchedulerOutput

    model = runner.model
    vocab = runner.vocab_size
    bs = runner.block_size
    need = -(-6 // bs) * 2
    if runner.num_blocks < need:
        raise ValueError(f"the dry run needs {need} KV blocks, the runner has {runner.num_blocks}")
    a, b = _dry_run_prompts(vocab)
    table_a, table_b = tuple(range(need // 2)), tuple(range(need // 2, need))
    p = SamplingParams(max_tokens=1, temperature=0.0)

    def chunk(rid: str, ids: list[int], start: int, table: tuple[int, ...]) -> ScheduledChunk:
        return ScheduledChunk(rid, tuple(ids), start, table, True, p, 0, len(ids))

    steps = [
        # Both prefills in one step, then a decode beside a chunk over a cached prefix.
        SchedulerOutput((chunk("a", a[:5], 0, table_a), chunk("b", b[:3], 0, table_b)), 8),
        SchedulerOutput((chunk("a", a[5:], 5, table_a), chunk("b", b[3:], 3, table_b)), 3),
    ]
    try:
        got = torch.cat([runner.compute_logits(s) for s in steps]).double()
    except Exception as e:  # the model's first request would crash the same way
        if "needs attn_metadata=" in str(e):
            raise _refuse(
                "per-step attention kwargs", f"{type(model).__name__}: " + REFUSED["per-step attention kwargs"]
            ) from e
        raise _refuse(
            "paged path differs from HF", f"the dry run through the paged path failed: {type(e).__name__}: {e}"
        ) from e
    if reference is None:
        reference = reference_logits(model, vocab, runner.device)
        if model.config._attn_implementation != runner.attn_implementation:
            install(model, runner.backend)
    want = reference.to(got.device)
    tol = _TOLERANCE.get(runner.dtype, _HALF_TOLERANCE) * max(1.0, float(want.abs().max()))
    diff = float((got - want).abs().max())
    if not diff <= tol:  # NaN fails too
        raise _refuse(
            "paged path differs from HF",
            f"the paged path's logits differ from {type(model).__name__}'s own forward by {diff:.3g} "
            f"(tolerance {tol:.3g}): it uses an attention feature the engine does not implement",
        )


def check_model(loaded: LoadedModel, runner_config: RunnerConfig | None = None) -> ModelVerdict:
    """The whole load-time check on a small runner of its own (``--check-model``)."""
    from dataclasses import replace

    from replica.config import CacheConfig, RunnerConfig
    from replica.model_runner import ModelRunner

    verdict = inspect_model(loaded.model)
    rc = replace(runner_config or RunnerConfig(), use_cuda_graphs=False)
    dry_run(ModelRunner(loaded.model, CacheConfig(block_size=16), rc, num_blocks=2))
    return verdict
