"""Paged attention for Hugging Face decoders: metadata, the KV pool, backends and their registry.

How it fits together
--------------------
``ModelRunner`` owns one ``PagedKVCache`` (``[layers, 2, num_blocks, block_size, kv_heads,
head_dim]``), picks a backend with ``resolve_backend(RunnerConfig.attention_backend, device)`` and
switches the HF model to it with ``install`` (``model.set_attn_implementation("cbserve_paged_<name>")``;
no mask function is registered, so HF builds no dense mask). Each step it calls::

    model(input_ids=[1, T], position_ids=[1, T], use_cache=False, logits_to_keep=<index tensor>,
          attn_metadata=AttentionMetadata, kv_cache=PagedKVCache)

transformers passes the two extra kwargs unchanged to every attention layer; the adapter in
``registry`` takes ``query [1, H, T, D]``, ``key/value [1, KVH, T, D]`` (RoPE applied), picks the
layer's ``(k_cache, v_cache)`` by ``module.layer_idx``, reads ``scaling`` and ``sliding_window``
(kwarg, else ``module.sliding_window``) and ``softcap``, calls ``backend.forward`` with
``[T, H, D]`` / ``[T, KVH, D]`` views, and returns ``(out[None], None)`` with out ``[T, H, D]``.

Semantics every backend must reproduce (``torch_ref`` is the definition)
-------------------------------------------------------------------------
1. Write the new K/V: token ``t`` goes to flat slot ``slot_mapping[t]`` (= ``block * block_size +
   offset``) of this layer's caches; a negative slot is a padding token and is not written.
2. Attend: sequence ``i`` owns queries ``query_start_loc[i]:query_start_loc[i+1]`` at positions
   ``seq_lens[i] - q_len_i .. seq_lens[i] - 1``; the query at position ``p`` sees cached keys
   ``j`` with ``max(0, p - window + 1) <= j <= p`` (no window: ``0 <= j <= p``), read through
   ``block_tables[i, j // block_size]``. Softmax in fp32 (fp64 for fp64 models), scores
   ``scale * q.k``, optionally ``softcap * tanh(s / softcap)``. GQA: query head ``h`` uses kv
   head ``h // (H // KVH)``. Block-table padding (zeros past the sequence's blocks) and slots past
   ``seq_lens`` may hold anything (stale data, NaN) and must never reach the output.

How the Triton backend plugs in
-------------------------------
- ``triton_backend.TritonAttentionBackend`` implements the ``AttentionBackend`` protocol
  (``name = "triton"``, ``supports(device)``, ``forward(...)``). ``registry._OPTIONAL`` imports
  and registers it on first resolve, so that module (and anything it imports at top level) must
  import without Triton; import kernels inside ``forward``. ``attention_backend="auto"`` takes
  triton when it supports the device, else torch; ``"triton"`` on CPU is a clear error.
- Inputs arrive as views, not contiguous tensors: ``query`` ``[T, H, D]`` has strides
  ``(D, T*D, 1)``; kernels take strides or call ``.contiguous()``. The per-layer caches are
  contiguous ``[num_blocks, block_size, KVH, D]``.
- Device tensors in ``AttentionMetadata`` are what kernels read (``slot_mapping`` int64,
  ``query_start_loc``/``seq_lens``/``block_tables`` int32). The numpy host mirrors and the
  ``max_*`` ints exist so host code never syncs with the device; a decode kernel meant for CUDA
  graphs should depend only on tensor contents (grid from the batch size), so the graph runner
  can replay it with metadata that points at persistent buffers.
- Test a backend against ``torch_ref`` on the same metadata (``tests/replica/attention`` builds
  random block tables, prefixes and GQA; ``tests/replica/gpu`` runs on CUDA).
"""

from replica.attention.metadata import AttentionMetadata, PagedKVCache
from replica.attention.registry import (
    AttentionBackend,
    available_backends,
    install,
    register_backend,
    resolve_backend,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PagedKVCache",
    "available_backends",
    "install",
    "register_backend",
    "resolve_backend",
]
