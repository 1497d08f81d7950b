"""replica/prefill_graphs.py on the CPU: bucket sizes, which steps a graph holds, and the staged
inputs the captured graph reads (capture and replay themselves need CUDA: tests/replica/gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replica.host_step import host_step
from replica.prefill_graphs import PrefillGraphs, prefill_graph_sizes
from replica.request import SamplingParams
from replica.step import ScheduledChunk

P = SamplingParams(temperature=0.0)


def _graphs(max_tokens: int = 64, max_blocks: int = 8) -> PrefillGraphs:
    def forward(*_a: object) -> torch.Tensor:
        raise AssertionError("not called on the CPU")

    return PrefillGraphs(
        forward, device=torch.device("cpu"), block_size=4, max_tokens=max_tokens, max_blocks_per_seq=max_blocks
    )


def _chunk(rid: str, n: int, start: int, blocks: tuple[int, ...]) -> ScheduledChunk:
    return ScheduledChunk(rid, tuple(range(100, 100 + n)), start, blocks, True, P, 0)


def test_sizes_are_powers_of_two_from_16_capped_at_1024():
    assert prefill_graph_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_graph_sizes(300) == [16, 32, 64, 128, 256]
    assert prefill_graph_sizes(4096)[-1] == 1024  # above it the fused kernels hand over to HF's
    assert prefill_graph_sizes(15) == [] and prefill_graph_sizes(0) == []
    with pytest.raises(ValueError, match="max_tokens >= 16"):
        _graphs(max_tokens=8)


def test_bucket_is_the_smallest_size_that_holds_the_tokens():
    g = _graphs(max_tokens=100)  # sizes 16, 32, 64
    assert [g.bucket(n) for n in (2, 16, 17, 32, 33, 64, 65)] == [16, 16, 32, 32, 64, 64, None]


def test_only_one_chunk_of_two_or_more_tokens_within_the_sizes_is_held():
    g = _graphs()
    g.graphs[16] = object()  # type: ignore[assignment]  # as if captured
    one = host_step([_chunk("a", 10, 0, (1, 2, 3))], 4, 32, 1000).step
    assert g.fits(one)
    assert not g.fits(host_step([_chunk("a", 1, 10, (1, 2, 3))], 4, 32, 1000).step)  # a decode token
    assert not g.fits(host_step([_chunk("a", 65, 0, tuple(range(17)))], 4, 32, 1000).step)  # > 64 tokens
    assert not g.fits(host_step([_chunk("a", 3, 0, (1,)), _chunk("b", 3, 0, (2,))], 4, 32, 1000).step)
    assert not g.fits(host_step([_chunk("a", 10, 0, tuple(range(9)))], 4, 32, 1000).step)  # table too wide
    assert not _graphs().fits(one)  # nothing captured (no CUDA)


def test_staged_inputs_are_the_step_padded_with_unwritten_tokens():
    g = _graphs()
    # A prefix hit: 6 cached tokens, 5 new ones at positions 6..10, in blocks 3, 5, 7.
    host = host_step([_chunk("a", 5, 6, (3, 5, 7))], 4, 32, 1000).step
    size = g.stage(host)
    assert size == 16
    g._dev.copy_(g._stage)
    g._unpack()
    ids, pos, keep, meta = g._views(size)
    assert ids.shape == pos.shape == (1, 16)
    assert ids[0].tolist() == [100, 101, 102, 103, 104] + [0] * 11
    assert pos[0].tolist() == [6, 7, 8, 9, 10] + [0] * 11
    slots = meta.slot_mapping.tolist()
    assert slots[:5] == host.slots.tolist() == [5 * 4 + 2, 5 * 4 + 3, 7 * 4, 7 * 4 + 1, 7 * 4 + 2]
    assert slots[5:] == [-1] * 11  # padding writes no KV
    assert meta.query_start_loc.tolist() == [0, 5] and meta.seq_lens.tolist() == [11]
    assert meta.block_tables.tolist() == [[3, 5, 7, 0, 0, 0, 0, 0]]
    assert keep.tolist() == [4]  # the last real token's logits
    assert meta.max_query_len == 16  # the grid of the bucket; the kernel stops at the real length


def test_a_shorter_step_after_a_longer_one_leaves_no_stale_inputs():
    g = _graphs()
    g.stage(host_step([_chunk("a", 30, 0, tuple(range(1, 9)))], 4, 32, 1000).step)
    host = host_step([_chunk("b", 3, 0, (9,))], 4, 32, 1000).step
    size = g.stage(host)
    g._dev.copy_(g._stage)
    g._unpack()
    ids, _pos, keep, meta = g._views(size)
    assert ids[0, 3:].eq(0).all() and meta.slot_mapping[3:].eq(-1).all()
    assert meta.block_tables.tolist() == [[9, 0, 0, 0, 0, 0, 0, 0]] and keep.tolist() == [2]
    with pytest.raises(ValueError, match="no prefill graph"):
        g.stage(host_step([_chunk("c", 1, 0, (9,))], 4, 32, 1000).step)
    assert np.array_equal(g._stage.numpy()[:3], [100, 101, 102])  # a refused step staged nothing
