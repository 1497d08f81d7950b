"""Paged attention for Hugging Face decoders: metadata, the KV pool, backends and their registry.

See ``registry`` for how a backend plugs into transformers, and ``torch_ref`` for the reference
semantics every backend must reproduce.
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
