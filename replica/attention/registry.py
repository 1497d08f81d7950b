"""The seam between Hugging Face models and our paged-attention backends.

Each backend is registered with ``transformers.AttentionInterface`` under
``"cbserve_paged_<backend>"``; ``install(model, backend)`` switches the model to it. No mask function
is registered with ``AttentionMaskInterface`` on purpose: for an implementation missing from that
mapping, ``masking_utils`` returns ``None`` without building any dense mask, which is what we want
(causality, sequence boundaries and sliding windows come from the metadata).

Contract of the HF attention call (transformers 5.x, Llama/Qwen2/Mistral and friends)::

    fn(module, query, key, value, attention_mask, *, scaling, dropout, sliding_window?, softcap?,
       position_ids, use_cache, attn_metadata, kv_cache, ...) -> (out, None)
    query [1, H, T, D], key/value [1, KVH, T, D] (RoPE applied), attention_mask None,
    out [1, T, H, D]; module.layer_idx selects the cache layer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers import AttentionInterface, PreTrainedModel

from replica.attention.metadata import AttentionMetadata, PagedKVCache
from replica.attention.torch_ref import TorchAttentionBackend

_PREFIX = "cbserve_paged_"


class AttentionBackend(Protocol):
    name: str

    def supports(self, device: torch.device) -> bool: ...

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, KVH, D] new tokens only
        value: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] (this layer)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        chunk_size: int | None = None,  # chunked local attention: keys of the query's chunk only
    ) -> torch.Tensor:  # [T, H, D]
        """Write the new K/V into the cache by ``meta.slot_mapping``, then attend."""
        ...


# Process-wide table of backend *implementations* (like AttentionInterface itself); no per-step state.
_BACKENDS: dict[str, AttentionBackend] = {}
# Backends in optional modules, registered on first resolve. The modules must import without
# Triton/CUDA (import triton inside functions) so CPU-only installs can still list them.
_OPTIONAL: dict[str, tuple[str, str]] = {
    "triton": ("replica.attention.triton_backend", "TritonAttentionBackend"),
}


def _make_hf_function(backend: AttentionBackend) -> Callable[..., tuple[torch.Tensor, None]]:
    def paged_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        meta = kwargs.get("attn_metadata")
        kv_cache = kwargs.get("kv_cache")
        if not isinstance(meta, AttentionMetadata) or not isinstance(kv_cache, PagedKVCache):
            raise RuntimeError(
                f"attention implementation {_PREFIX}{backend.name} needs attn_metadata= and kv_cache= "
                "in the model forward's kwargs (run the model through replica.model_runner.ModelRunner)"
            )
        if attention_mask is not None:
            raise RuntimeError("paged attention got a dense attention_mask; it only supports causal LMs")
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError("attention sinks (s_aux) are not supported by paged attention")
        if not getattr(module, "is_causal", True):
            raise NotImplementedError("paged attention supports causal (decoder) attention only")
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise RuntimeError(f"{type(module).__name__} has no layer_idx; cannot find its KV cache layer")
        if query.shape[0] != 1:
            raise ValueError(f"paged attention expects one flat ragged batch [1, T], got batch {query.shape[0]}")
        sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
        k_cache, v_cache = kv_cache.layer(layer_idx)
        chunk_size, query = layer_chunk_size(module), temperature_tuned_query(module, query, meta)
        out = backend.forward(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            k_cache,
            v_cache,
            meta,
            scale=scale,
            sliding_window=sliding_window or None,
            softcap=kwargs.get("softcap"),
            chunk_size=chunk_size,
        )
        return out.unsqueeze(0), None

    paged_attention_forward.__name__ = f"{_PREFIX}{backend.name}"
    return paged_attention_forward


def layer_chunk_size(module: torch.nn.Module) -> int | None:
    """The chunk of a chunked-local-attention layer (Llama 4), else None. transformers applies it
    as a mask, which the paged path never builds, so the layer's type says it here."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None) or ()
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None or layer_idx >= len(types) or types[layer_idx] != "chunked_attention":
        return None
    return int(config.attention_chunk_size)  # type: ignore[union-attr]


def temperature_tuned_query(module: torch.nn.Module, query: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Llama 4's NoPE layers scale queries by ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``
    with ``pos = arange(q_len) + cache length``: on the flat cache-less batch that is the token's
    index in the step, whose scale is exactly 1 while the step holds fewer than ``floor_scale - 1``
    tokens (``replica.model_check`` caps the step budget there). Apply the scale of each token's
    own position, as transformers computes it for a request alone."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return query
    # Each token's position from the device metadata (no host arrays: CUDA graphs replay this).
    qsl, lens = meta.query_start_loc.long(), meta.seq_lens.long()
    tok = torch.arange(query.shape[2], device=query.device)
    seq = torch.searchsorted(qsl[1:], tok, right=True).clamp_(max=lens.shape[0] - 1)
    pos = tok - qsl[seq] + (lens - (qsl[1:] - qsl[:-1]))[seq]
    floor_scale, attn_scale = float(getattr(module, "floor_scale")), float(getattr(module, "attn_scale"))  # noqa: B009
    scales = torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (query * scales.view(1, 1, -1, 1)).to(query.dtype)


def register_backend(backend: AttentionBackend) -> None:
    """Make ``backend`` selectable by name and known to transformers."""
    _BACKENDS[backend.name] = backend
    AttentionInterface.register(_PREFIX + backend.name, _make_hf_function(backend))


def _load_optional_backends() -> None:
    for name, (module_name, class_name) in _OPTIONAL.items():
        if name in _BACKENDS:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        register_backend(getattr(module, class_name)())


def available_backends() -> list[str]:
    _load_optional_backends()
    return sorted(_BACKENDS)


def resolve_backend(requested: str, device: torch.device) -> AttentionBackend:
    """``auto``: the fastest registered backend that supports ``device`` (triton on CUDA when
    present), else torch. A named backend must exist and support the device."""
    _load_optional_backends()
    if requested == "auto":
        for name in ("triton", "torch"):
            b = _BACKENDS.get(name)
            if b is not None and b.supports(device):
                return b
        raise RuntimeError(f"no attention backend supports device {device}")
    b = _BACKENDS.get(requested)
    if b is None:
        raise ValueError(
            f"attention backend {requested!r} is not available; registered: {', '.join(available_backends())}"
        )
    if not b.supports(device):
        raise ValueError(f"attention backend {requested!r} does not support device {device}")
    return b


def install(model: PreTrainedModel, backend: AttentionBackend) -> str:
    """Switch ``model`` (and its sub-models) to ``backend``; returns the implementation name."""
    name = _PREFIX + backend.name
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface; "
            "it cannot run with the paged KV cache"
        )
    return name


register_backend(TorchAttentionBackend())
