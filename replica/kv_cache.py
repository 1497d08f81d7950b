"""The paged KV block pool: fixed-size blocks, per-request block tables, reference
counts, and a prefix cache of full blocks with LRU eviction. No tensors here: the
model runner owns the memory, this only decides which block ids hold what.

Prefix cache. A full block is registered under the chained hash of its prefix
(``replica.prefix_hash``). Hashes are 64 bits and can collide, so a hit is also
checked against the block's own tokens and against the identity of its parent:
every registration gets a fresh ``gen`` number and remembers its parent's. A
lookup walks the chain from the root and accepts block ``i`` only when its tokens
match and its parent is exactly the block accepted at ``i - 1``; by induction the
whole prefix is then token-for-token equal, whatever the hashes do.

Freed blocks that hold a registered prefix are not wiped: they wait in an LRU list
and are reused by a later request with the same prefix, or evicted (least recently
freed first) only when a fresh block is needed and no never-cached block is left.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from replica.prefix_hash import ROOT_HASH, hash_block
from replica.request import Request

_ROOT_GEN = 0  # the parent "registration" of every first block


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    # Prefix-cache registration; hash None means "not cached".
    hash: int | None = None
    gen: int = 0
    parent_gen: int = _ROOT_GEN
    token_ids: tuple[int, ...] = ()
    last_used: int = 0  # logical clock, for "most recently used first"


@dataclass
class _ReqCacheState:
    """Per-request prefix bookkeeping (lives from first lookup until ``free``)."""

    hashes: list[int]  # chained hashes of the request's full blocks computed so far
    gens: list[int]  # gen of the cached block equal to each of the first len(gens) blocks
    broken: bool = False  # a collision stopped registration; later blocks stay uncached


class KVCacheManager:
    """Block pool + per-request block tables (``Request.block_table``) + prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free_plain: deque[int] = deque(range(num_blocks))  # ref 0, nothing cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; LRU first
        self._cached: dict[int, int] = {}  # hash -> block id
        self._live_gens: dict[int, int] = {}  # gen -> block id, for every registered block
        self._gen_counter = itertools.count(1)
        self._clock = itertools.count(1)
        self._requests: dict[str, Request] = {}  # requests that hold blocks
        self._state: dict[str, _ReqCacheState] = {}

    # ----- sizes -------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: never-cached ones plus evictable cached ones."""
        return len(self._free_plain) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix, in use or evictable."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_unreferenced(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` (prefix hits) sit in the free pool and would leave it."""
        return sum(1 for b in blocks if self._blocks[b].ref_count == 0)

    # ----- prefix lookup -------------------------------------------------------------

    def get_computed_prefix(self, request: Request) -> tuple[list[int], int]:
        """Cached full blocks equal to the start of ``request`` (not yet referenced) and
        the number of tokens they cover. Never covers the last known token: it must be
        computed to produce logits."""
        if not self.enable_prefix_caching or request.block_table:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        if max_blocks <= 0:
            return [], 0
        tokens = request.all_token_ids
        hashes = self._hashes(request, tokens, max_blocks)
        hits: list[int] = []
        parent_gen = _ROOT_GEN
        bs = self.block_size
        for i in range(max_blocks):
            bid = self._cached.get(hashes[i])
            if bid is None:
                break
            blk = self._blocks[bid]
            if blk.parent_gen != parent_gen or blk.token_ids != tuple(tokens[i * bs : (i + 1) * bs]):
                break  # hash collision or a stale chain: not our prefix
            hits.append(bid)
            parent_gen = blk.gen
        return hits, len(hits) * bs

    # ----- allocation -------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Grow ``request.block_table`` to hold its computed tokens, ``computed_blocks``
        (prefix hits, only on a request holding no blocks) and ``num_new_tokens`` more.

        Returns the blocks appended (hits first), or None without changing anything
        when the pool cannot supply them now. The caller sets
        ``num_computed_tokens`` for the hits.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        computed = list(computed_blocks)
        if computed and request.block_table:
            raise ValueError("computed_blocks can only be given to a request that holds no blocks")
        for bid in computed:  # checked before any ref count changes: a refusal leaks nothing
            if self._blocks[bid].hash is None:
                raise ValueError(f"block {bid} is not a cached block")
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.blocks_for(total) - len(request.block_table) - len(computed))
        # Hits that sit in the evictable list leave the free pool when referenced.
        reclaimed = self.num_unreferenced(computed)
        if num_new_blocks + reclaimed > self.num_free_blocks:
            return None
        tick = next(self._clock)
        for bid in computed:
            blk = self._blocks[bid]
            if blk.ref_count == 0:
                del self._evictable[bid]
            blk.ref_count += 1
            blk.last_used = tick
        new = [self._take_free_block() for _ in range(num_new_blocks)]
        if computed:
            state = self._state_of(request)
            state.gens = [self._blocks[b].gen for b in computed]
        request.block_table.extend(computed)
        request.block_table.extend(new)
        self._requests[request.request_id] = request
        return computed + new

    def _take_free_block(self) -> int:
        if self._free_plain:
            bid = self._free_plain.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)  # least recently freed
            self._uncache(bid)
        blk = self._blocks[bid]
        assert blk.ref_count == 0 and blk.hash is None
        blk.ref_count = 1
        return bid

    def free(self, request: Request) -> None:
        """Drop ``request``'s references. Cached blocks become evictable (LRU, the tail
        of the request first, since later blocks are less likely to be shared)."""
        tick = next(self._clock)
        for bid in reversed(request.block_table):
            blk = self._blocks[bid]
            if blk.ref_count <= 0:
                raise AssertionError(f"double free of block {bid} by request {request.request_id}")
            blk.ref_count -= 1
            if blk.ref_count == 0:
                if blk.hash is not None:
                    blk.last_used = tick
                    self._evictable[bid] = None
                else:
                    self._free_plain.append(bid)
        request.block_table.clear()
        self._requests.pop(request.request_id, None)
        self._state.pop(request.request_id, None)

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` (holding no blocks) a reference to each of ``parent``'s blocks, which
        must all be full of computed tokens: the n choices of a request share its prompt's KV.
        Nothing is ever written into a shared block (each child's later tokens go to blocks of
        its own), so there is nothing to copy on write. The child inherits the parent's
        prefix-cache registration of those blocks."""
        if child.block_table:
            raise ValueError(f"fork into {child.request_id}, which already holds blocks")
        if parent.num_computed_tokens != len(parent.block_table) * self.block_size:
            raise ValueError(f"fork of {parent.request_id}: its last block is not full of computed tokens")
        if not parent.block_table:
            return
        self.cache_full_blocks(parent)
        tick = next(self._clock)
        for bid in parent.block_table:
            blk = self._blocks[bid]
            blk.ref_count += 1
            blk.last_used = tick
        child.block_table.extend(parent.block_table)
        self._requests[child.request_id] = child
        state = self._state.get(parent.request_id)
        if state is not None:
            self._state[child.request_id] = _ReqCacheState(list(state.hashes), list(state.gens), state.broken)

    # ----- registration -------------------------------------------------------------------

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(request.block_table))
        state = self._state_of(request)
        if state.broken or len(state.gens) >= num_full:
            return
        tokens = request.all_token_ids
        hashes = self._hashes(request, tokens, num_full)
        tick = next(self._clock)
        for i in range(len(state.gens), num_full):
            parent_gen = state.gens[i - 1] if i else _ROOT_GEN
            toks = tuple(tokens[i * bs : (i + 1) * bs])
            bid = request.block_table[i]
            blk = self._blocks[bid]
            assert blk.hash is None, f"block {bid} registered twice"
            existing = self._cached.get(hashes[i])
            if existing is not None:
                other = self._blocks[existing]
                if other.parent_gen == parent_gen and other.token_ids == toks:
                    # Same prefix computed twice (e.g. two requests in flight): keep the
                    # registered copy, ours stays private and is freed as a plain block.
                    state.gens.append(other.gen)
                    continue
                if other.parent_gen == _ROOT_GEN or other.parent_gen in self._live_gens:
                    state.broken = True  # a genuine 64-bit collision: never share it
                    return
                # The other's parent was evicted, so nobody can reach it: replace it.
                self._uncache(existing)
                if other.ref_count == 0:
                    del self._evictable[existing]
                    self._free_plain.append(existing)
            blk.hash = hashes[i]
            blk.gen = next(self._gen_counter)
            blk.parent_gen = parent_gen
            blk.token_ids = toks
            blk.last_used = tick
            self._cached[blk.hash] = bid
            self._live_gens[blk.gen] = bid
            state.gens.append(blk.gen)

    def _uncache(self, bid: int) -> None:
        blk = self._blocks[bid]
        assert blk.hash is not None
        del self._cached[blk.hash]
        del self._live_gens[blk.gen]
        blk.hash = None
        blk.gen = 0
        blk.parent_gen = _ROOT_GEN
        blk.token_ids = ()

    def reset_prefix_cache(self) -> int:
        """Forget every cached block nobody holds (e.g. after a warm-up); returns how many."""
        dropped = list(self._evictable)
        for bid in dropped:
            self._uncache(bid)
            self._free_plain.append(bid)
        self._evictable.clear()
        return len(dropped)

    def cached_block_hashes(self, limit: int) -> list[int]:
        """Hashes of cached blocks, most recently used first (what the router matches)."""
        if limit <= 0:
            return []
        blocks = sorted((self._blocks[b] for b in self._cached.values()), key=lambda b: -b.last_used)
        return [b.hash for b in blocks[:limit]]  # type: ignore[misc]

    # ----- helpers ---------------------------------------------------------------------

    def _state_of(self, request: Request) -> _ReqCacheState:
        state = self._state.get(request.request_id)
        if state is None:
            state = self._state[request.request_id] = _ReqCacheState(hashes=[], gens=[])
        return state

    def _hashes(self, request: Request, tokens: list[int], num_blocks: int) -> list[int]:
        """Chained hashes of the first ``num_blocks`` full blocks, extended incrementally
        (a request's known tokens never change, they only grow)."""
        hashes = self._state_of(request).hashes
        bs = self.block_size
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_blocks):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    def check_invariants(self) -> None:
        """Raise AssertionError on a leaked, double-owned or miscounted block."""
        refs: Counter[int] = Counter()
        for rid, req in self._requests.items():
            assert req.request_id == rid
            assert len(set(req.block_table)) == len(req.block_table), f"{rid}: a block twice in its table"
            assert req.block_table, f"{rid} is registered but holds no blocks"
            refs.update(req.block_table)
        plain = set(self._free_plain)
        assert len(plain) == len(self._free_plain), "a block is twice in the free list"
        assert plain.isdisjoint(self._evictable), "a block is both free and evictable"
        num_hashed = 0
        for blk in self._blocks:
            assert blk.ref_count == refs[blk.block_id], (
                f"block {blk.block_id}: ref_count {blk.ref_count} but {refs[blk.block_id]} owners"
            )
            if blk.hash is not None:
                num_hashed += 1
                assert self._cached.get(blk.hash) == blk.block_id, f"block {blk.block_id} hash not mapped"
                assert self._live_gens.get(blk.gen) == blk.block_id, f"block {blk.block_id} gen not live"
                assert len(blk.token_ids) == self.block_size
            if blk.ref_count == 0:
                in_plain = blk.block_id in plain
                in_evict = blk.block_id in self._evictable
                assert in_plain != in_evict, f"free block {blk.block_id} is lost or listed twice"
                assert in_evict == (blk.hash is not None), f"block {blk.block_id} in the wrong free list"
            else:
                assert blk.block_id not in plain and blk.block_id not in self._evictable, (
                    f"block {blk.block_id} in use and free"
                )
        assert num_hashed == len(self._cached) == len(self._live_gens), "prefix map out of sync"
