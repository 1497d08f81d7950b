"""replica/step.py: a step's two kinds; DecodeBatch, the array form of a decode step."""

from __future__ import annotations

import numpy as np
import pytest

from replica.request import Request, RequestStatus, SamplingParams
from replica.step import PLACEHOLDER_TOKEN, DecodeBatch, SchedulerOutput, pack_block_tables
from tests.replica.fakes import make_req


def _req(rid, blocks, prompt_len=3, **params):
    r = make_req(rid, list(range(1, prompt_len + 1)), **params)
    r.block_table = list(blocks)
    r.status = RequestStatus.RUNNING
    return r


def test_pack_block_tables_pads_rows_with_zero():
    arr, lens = pack_block_tables([[5, 6, 7], [9], []])
    assert arr.dtype == np.int32 and arr.tolist() == [[5, 6, 7], [9, 0, 0], [0, 0, 0]]
    assert lens.tolist() == [3, 1, 0]


@pytest.mark.parametrize("tables", [[[3, 8]], [[-1]], [[2], [2**40]]])
def test_pack_block_tables_refuses_ids_outside_the_pool(tables):
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 8\)"):
        pack_block_tables(tables, num_blocks=8)


def test_build_successor_and_chunks_view():
    a = _req("a", [3, 4], max_tokens=10)
    b = _req("b", [8], prompt_len=2, max_tokens=5, temperature=0.7, seed=1)
    d = DecodeBatch.build([a, b], prev_rows=[1, 0], positions=[5, 2], num_output_tokens=[1, 1], max_model_len=64)
    assert len(d) == 2 and d.request_ids == ("a", "b")
    assert d.block_tables.tolist() == [[3, 4], [8, 0]] and d.num_blocks.tolist() == [2, 1]
    assert d.limit.tolist() == [10, 5]
    assert not d.plain_greedy  # b samples with a temperature
    chunks = d.as_chunks()  # built on demand
    assert [c.request_id for c in chunks] == ["a", "b"]
    assert chunks[1].token_ids == (PLACEHOLDER_TOKEN,) and chunks[1].start_pos == 2
    assert chunks[1].block_table == (8,) and chunks[1].num_output_tokens == 1 and chunks[1].prompt_len == 2
    assert chunks[0].params is a.params and all(c.sample for c in chunks)

    nxt = d.successor(np.array([1]))
    assert nxt.request_ids == ("b",) and nxt.requests == (b,)
    assert nxt.positions.tolist() == [3] and nxt.num_output_tokens.tolist() == [2]
    assert nxt.prev_rows.tolist() == [1]
    nxt.set_blocks(0, [8, 11, 12])  # a new block widens the table; d's arrays are untouched
    assert nxt.block_tables.tolist() == [[8, 11, 12]] and nxt.num_blocks.tolist() == [3]
    assert d.block_tables.tolist() == [[3, 4], [8, 0]] and d.num_blocks.tolist() == [2, 1]


def test_plain_greedy_waits_for_min_tokens():
    a = _req("a", [1], max_tokens=10, min_tokens=3)
    d = DecodeBatch.build([a], [3], [2], 64, prev_rows=[0])
    assert not d.plain_greedy  # output 2 of min 3: EOS still banned, the sampler must run
    assert d.successor(np.array([0])).plain_greedy


def test_eos_ids_are_the_union_over_rows_that_check_eos():
    a = Request("a", [1], SamplingParams(max_tokens=4), eos_token_ids=frozenset({2}))
    b = Request("b", [1], SamplingParams(max_tokens=4, ignore_eos=True), eos_token_ids=frozenset({7}))
    c = Request("c", [1], SamplingParams(max_tokens=4), eos_token_ids=frozenset({2, 5}))
    d = DecodeBatch.build([a, b, c], [1, 1, 1], [1, 1, 1], 64, prev_rows=[0, 1, 2])
    assert d.eos_ids.tolist() == [2, 5]


def test_a_step_is_chunks_or_a_decode_batch_never_both():
    a = _req("a", [3], max_tokens=10)
    d = DecodeBatch.build([a], [2], [0], 64, token_ids=[7])
    out = SchedulerOutput(num_batched_tokens=1, decode=d)
    assert out.kind == "decode" and not out.is_empty and out.request_ids == ("a",)
    (chunk,) = out.as_chunks()
    assert chunk.token_ids == (7,) and chunk.start_pos == 2 and chunk.block_table == (3,) and chunk.sample
    assert SchedulerOutput((chunk,), 1).kind == "chunks" and SchedulerOutput().is_empty
    with pytest.raises(ValueError, match="not both"):
        SchedulerOutput((chunk,), 1, decode=d)
    for kwargs in (dict(), dict(token_ids=[7], prev_rows=[0])):
        with pytest.raises(ValueError, match="token_ids or from prev_rows"):
            DecodeBatch.build([a], [2], [0], 64, **kwargs)


def test_a_successor_where_no_row_leaves_shares_the_constant_rows_and_copies_the_rest():
    a = _req("a", [3, 4], max_tokens=10, min_tokens=2, stop_token_ids=(5,))
    b = _req("b", [8], max_tokens=5, logprobs=2)
    d = DecodeBatch.build([a, b], [5, 2], [1, 1], 64, token_ids=[9, 9])
    nxt = d.successor(np.arange(2))
    assert nxt.token_ids is None and nxt.prev_rows.tolist() == [0, 1]
    assert nxt.limit is d.limit and nxt.num_logprobs is d.num_logprobs and nxt.requests is d.requests
    assert nxt.min_tokens.tolist() == [2, 0] and nxt.check_stop_ids.tolist() == [True, False]
    assert nxt.num_logprobs.tolist() == [-1, 2]
    nxt.set_blocks(1, [8, 12])
    assert d.block_tables.tolist() == [[3, 4], [8, 0]] and d.num_blocks.tolist() == [2, 1]
