"""Chained hashes of full KV blocks, shared by the engine's prefix cache and the router.

Block ``i``'s hash covers every token of blocks ``0..i``: ``h_i = H(h_{i-1}, tokens_i)``.
Equal hashes therefore mean equal prefixes (the cache still checks the tokens, since
64-bit hashes can collide). Stdlib only: the router imports this without torch, and
the value must not depend on the process (no ``hash()`` of str, no PYTHONHASHSEED).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given the hash of the block before it (ROOT_HASH for the first)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    out: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out
