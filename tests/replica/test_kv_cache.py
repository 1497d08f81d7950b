"""KVCacheManager: allocation, ref counts, prefix cache (verified against tokens), LRU eviction."""

from __future__ import annotations

import pytest

from replica import kv_cache as kv_mod
from replica.kv_cache import KVCacheManager
from replica.prefix_hash import block_hashes
from replica.request import Request, SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def compute_all(kv: KVCacheManager, r: Request) -> list[int]:
    """Admit ``r`` with its prefix hits, 'compute' every token, register full blocks."""
    hits, n = kv.get_computed_prefix(r)
    got = kv.allocate_slots(r, r.num_tokens - n, hits)
    assert got is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    kv.check_invariants()
    return hits


def test_allocate_and_free_counts_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = req("a", list(range(10)))
    blocks = kv.allocate_slots(r, 10)
    assert blocks is not None and len(blocks) == 3 and r.block_table == blocks
    assert kv.num_free_blocks == 5
    # Growing within the last block needs nothing; crossing into a new one needs one.
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) == []
    assert len(kv.allocate_slots(r, 3)) == 1
    kv.check_invariants()
    kv.free(r)
    assert r.block_table == [] and kv.num_free_blocks == 8
    kv.check_invariants()


def test_allocation_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is not None
    b = req("b", list(range(8)))
    assert kv.allocate_slots(b, 8) is None
    assert b.block_table == [] and kv.num_free_blocks == 1
    kv.check_invariants()


def test_prefix_hit_reuses_blocks_and_counts_references():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 111))  # 2 full blocks + 3 tokens
    a = req("a", prompt)
    assert compute_all(kv, a) == []
    assert kv.num_cached_blocks == 2
    b = req("b", prompt + [7, 8])
    hits, n = kv.get_computed_prefix(b)
    assert hits == a.block_table[:2] and n == 8
    assert kv.allocate_slots(b, b.num_tokens - n, hits) is not None
    assert b.block_table[:2] == a.block_table[:2]
    assert kv._blocks[hits[0]].ref_count == 2
    kv.check_invariants()
    kv.free(a)
    assert kv._blocks[hits[0]].ref_count == 1  # still held by b
    kv.check_invariants()
    kv.free(b)
    kv.check_invariants()
    assert kv.num_free_blocks == 16 and kv.num_cached_blocks == 2  # freed but still reusable


def test_prefix_hit_never_covers_the_last_prompt_token():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(8))  # exactly two full blocks
    compute_all(kv, req("a", prompt))
    hits, n = kv.get_computed_prefix(req("b", prompt))
    assert n == 4 and len(hits) == 1  # the last token must still be computed for logits
    hits, n = kv.get_computed_prefix(req("c", prompt[:4]))
    assert (hits, n) == ([], 0)


def test_prefix_mismatch_stops_at_first_differing_block():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    compute_all(kv, req("a", list(range(13))))
    other = list(range(13))
    other[5] = 99  # second block differs
    hits, n = kv.get_computed_prefix(req("b", other))
    assert n == 4 and len(hits) == 1


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    compute_all(kv, req("a", list(range(13))))
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_prefix(req("b", list(range(13)))) == ([], 0)


def test_freed_cached_blocks_survive_until_their_slots_are_needed():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = req("a", list(range(9)))  # 2 full blocks cached, 3 blocks held
    compute_all(kv, a)
    cached = a.block_table[:2]
    kv.free(a)
    # A request that needs the 4 never-cached blocks leaves the cached ones alone.
    b = req("b", [50 + i for i in range(16)])
    assert kv.allocate_slots(b, 16) is not None
    assert not set(b.block_table) & set(cached)
    assert kv.get_computed_prefix(req("x", list(range(9))))[1] == 8
    # One more block must evict the least recently freed cached block: a's tail block
    # (freed first, since a request frees its tail first).
    c = req("c", [70])
    assert kv.allocate_slots(c, 1) == [cached[1]]
    assert kv.get_computed_prefix(req("y", list(range(9))))[1] == 4
    kv.check_invariants()
    assert kv.num_cached_blocks == 1


def test_cached_block_hashes_are_the_routers_hashes_most_recent_first():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    p1 = list(range(8)) + [0]
    p2 = list(range(50, 58)) + [0]
    compute_all(kv, req("a", p1))
    compute_all(kv, req("b", p2))
    hashes = kv.cached_block_hashes(10)
    assert set(hashes) == set(block_hashes(p1, BS)) | set(block_hashes(p2, BS))
    assert set(hashes[:2]) == set(block_hashes(p2, BS))  # b's blocks were touched last
    assert len(kv.cached_block_hashes(3)) == 3 and kv.cached_block_hashes(0) == []


def test_duplicate_prefix_computed_twice_stays_private_and_is_freed():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(9))
    a, b = req("a", prompt), req("b", prompt)
    # Both admitted before either registered its blocks (same step).
    assert kv.allocate_slots(a, 9) is not None and kv.allocate_slots(b, 9) is not None
    for r in (a, b):
        r.num_computed_tokens = 9
        kv.cache_full_blocks(r)
    kv.check_invariants()
    assert kv.num_cached_blocks == 2
    registered = a.block_table[:2]  # a registered first; b's equal blocks stayed private
    kv.free(a)
    kv.free(b)
    kv.check_invariants()
    assert kv.num_free_blocks == 16 and kv.num_cached_blocks == 2
    hits, _ = kv.get_computed_prefix(req("c", prompt))
    assert hits == registered


def test_hash_collisions_never_give_a_wrong_prefix(monkeypatch):
    # Every block hashes alike: lookups must rely on the token and parent checks.
    monkeypatch.setattr(kv_mod, "hash_block", lambda parent, toks: 12345)
    kv = KVCacheManager(num_blocks=12, block_size=BS)
    a = req("a", list(range(9)))
    compute_all(kv, a)
    assert kv.num_cached_blocks == 1  # block 1 collides with block 0: left uncached
    b = req("b", [1, 2, 3, 4] + list(range(4, 9)))
    assert kv.get_computed_prefix(b) == ([], 0)  # same hash, other tokens: no hit
    c = req("c", list(range(9)))
    hits, n = kv.get_computed_prefix(c)
    assert n == 4 and hits == a.block_table[:1]


def test_collision_after_parent_eviction_does_not_reach_a_stale_child(monkeypatch):
    # Hash depends on the block's first token only: distinct blocks collide often.
    monkeypatch.setattr(kv_mod, "hash_block", lambda parent, toks: (parent * 31 + toks[0]) % (1 << 61))
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    x = req("x", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    compute_all(kv, x)
    kv.free(x)  # cached: X0=[1,2,3,4], X1=[5,6,7,8]
    # Y0 collides with X0 (same first token, same root parent). Admitting y evicts...
    y = req("y", [1, 9, 9, 9, 5, 6, 7, 8, 0])
    assert kv.get_computed_prefix(y) == ([], 0)
    compute_all(kv, y)
    kv.check_invariants()
    # Whatever survived, a lookup of x's prompt must never return a block holding y's data
    # and vice versa: check hits against the tokens they stand for.
    for tokens in (x.prompt_token_ids, y.prompt_token_ids):
        hits, n = kv.get_computed_prefix(req("q", tokens))
        for i, bid in enumerate(hits):
            assert kv._blocks[bid].token_ids == tuple(tokens[i * BS : (i + 1) * BS])
        if n >= 8:  # a 2-block hit needs the first block to be its true parent
            assert kv._blocks[hits[1]].parent_gen == kv._blocks[hits[0]].gen


def test_check_invariants_catches_corruption():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    r = req("a", list(range(5)))
    kv.allocate_slots(r, 5)
    kv._blocks[r.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"):
        kv.check_invariants()
    kv._blocks[r.block_table[0]].ref_count -= 1
    kv._free_plain.append(r.block_table[0])
    with pytest.raises(AssertionError):
        kv.check_invariants()


def test_double_free_is_detected():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    r = req("a", list(range(5)))
    kv.allocate_slots(r, 5)
    table = list(r.block_table)
    kv.free(r)
    r.block_table.extend(table)
    with pytest.raises(AssertionError, match="double free"):
        kv.free(r)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=4)
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    r = req("a", list(range(5)))
    with pytest.raises(ValueError):
        kv.allocate_slots(r, -1)
    kv.allocate_slots(r, 5)
    with pytest.raises(ValueError, match="holds no blocks"):
        kv.allocate_slots(r, 1, [0])


def test_a_refused_prefix_hit_list_changes_no_ref_count():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(9)))
    compute_all(kv, a)
    kv.free(a)
    hits, _ = kv.get_computed_prefix(req("b", list(range(9))))
    assert len(hits) == 2
    plain = next(b for b in range(8) if b not in hits)
    with pytest.raises(ValueError, match=f"block {plain} is not a cached block"):
        kv.allocate_slots(req("c", list(range(9))), 1, [hits[0], plain])
    kv.check_invariants()  # hits[0] was not left referenced by nobody
    assert kv.num_free_blocks == 8


def test_child_of_an_evicted_parent_is_replaced_not_reused():
    kv = KVCacheManager(num_blocks=7, block_size=BS)
    shared, tail_a, tail_d = [1, 2, 3, 4], [5, 5, 5, 5], [6, 6, 6, 6]
    a, d = req("a", shared + tail_a + [0]), req("d", shared + tail_d + [0])
    # Admitted in the same step: d computes its own copy of the shared block.
    assert kv.allocate_slots(a, 9) is not None and kv.allocate_slots(d, 9) is not None
    for r in (a, d):
        r.num_computed_tokens = 9
        kv.cache_full_blocks(r)
    d_block1 = d.block_table[1]
    assert kv._blocks[d_block1].hash is not None  # registered under a's copy of block 0
    kv.free(a)  # a's blocks 0 and 1 become evictable; d keeps its private copy
    filler = req("f", [9] * 16)
    assert kv.allocate_slots(filler, 16) is not None  # evicts a's cached blocks
    kv.check_invariants()
    assert kv.get_computed_prefix(req("q", d.prompt_token_ids)) == ([], 0)
    kv.free(filler)
    # A new request with d's prompt registers a fresh chain; d's stale block 1 is dropped
    # from the map (it stays in use by d, just no longer shareable).
    e = req("e", d.prompt_token_ids)
    compute_all(kv, e)
    assert kv._blocks[d_block1].hash is None
    hits, n = kv.get_computed_prefix(req("g", d.prompt_token_ids))
    assert n == 8 and hits == e.block_table[:2]
    kv.free(d)
    kv.free(e)
    kv.check_invariants()
    assert kv.num_free_blocks == 7


def test_reset_prefix_cache_drops_only_unheld_blocks():
    from replica.kv_cache import KVCacheManager
    from replica.request import Request, SamplingParams

    kv = KVCacheManager(8, 2)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(), arrival_time=0.0)
    b = Request("b", [9, 8, 7, 6], SamplingParams(), arrival_time=0.0)
    for r in (a, b):
        kv.allocate_slots(r, len(r.prompt_token_ids))
        r.num_computed_tokens = len(r.prompt_token_ids)
        kv.cache_full_blocks(r)
    kv.free(a)  # a's two full blocks become evictable; b still holds its two
    assert kv.num_cached_blocks == 4
    assert kv.reset_prefix_cache() == 2
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 6
    kv.check_invariants()
    assert kv.get_computed_prefix(Request("c", [1, 2, 3, 4, 5], SamplingParams(), arrival_time=0.0)) == ([], 0)


@pytest.mark.parametrize("caching", [True, False])
def test_fork_shares_full_blocks_by_reference_and_free_drops_only_its_own(caching):
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=caching)
    parent = req("p", list(range(1, 10)))
    kv.allocate_slots(parent, 8)  # the 2 full blocks before the last prompt token
    parent.num_computed_tokens = 8
    kids = [req(f"c{i}", list(range(1, 10))) for i in range(3)]
    for kid in kids:
        kv.fork(parent, kid)
        kid.num_computed_tokens = 8
    kv.free(parent)
    kv.check_invariants()
    assert all(k.block_table == kids[0].block_table for k in kids) and kv.num_free_blocks == 8
    for kid in kids:  # each writes the rest of its sequence into blocks of its own
        assert len(kv.allocate_slots(kid, 3)) == 1
        kid.num_computed_tokens = 11
        kid.output_token_ids.append(100 + int(kid.request_id[1:]))
        kv.cache_full_blocks(kid)
    kv.check_invariants()
    assert kv.num_free_blocks == 10 - 2 - 3
    kv.free(kids[1])  # preempted or finished: the shared blocks stay with the others
    kv.check_invariants()
    assert kv.num_free_blocks == 10 - 2 - 2
    kv.free(kids[0])
    kv.free(kids[2])
    kv.check_invariants()
    assert kv.num_free_blocks == 10
    assert kv.num_cached_blocks == (2 if caching else 0)  # the shared prompt blocks stay cached


def test_fork_refuses_a_partial_block_or_a_child_holding_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    parent = req("p", list(range(1, 10)))
    kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    with pytest.raises(ValueError, match="not full"):
        kv.fork(parent, req("c", list(range(1, 10))))
    other = req("o", [1, 2])
    kv.allocate_slots(other, 2)
    parent.num_computed_tokens = 8
    kv.allocate_slots(parent, 2)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.fork(parent, other)
