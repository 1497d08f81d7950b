"""replica/host_step.py: the flat ragged arrays of an eager step (positions, KV slots through the
block tables, query starts, logits rows) and the prompt positions of an echo request."""

from __future__ import annotations

import pytest

from replica.host_step import host_step
from replica.request import SamplingParams
from replica.step import ScheduledChunk

P = SamplingParams(temperature=0.0)


def test_positions_slots_and_logits_rows_of_a_mixed_step():
    # "a": a 3-token prefill chunk at 0 that does not sample; "b": one decode token at 5.
    a = ScheduledChunk("a", (11, 12, 13), 0, (7, 2), False, P, 0)
    b = ScheduledChunk("b", (14,), 5, (4, 9), True, P, 2)
    got = host_step([a, b], block_size=4, num_blocks=10, vocab_size=100)
    s = got.step
    assert s.ids.tolist() == [11, 12, 13, 14]
    assert s.positions.tolist() == [0, 1, 2, 5]
    assert s.slots.tolist() == [28, 29, 30, 9 * 4 + 1]  # block 7 offsets 0-2; b's position 5: block 9 offset 1
    assert s.qsl.tolist() == [0, 3, 4] and s.seq_lens.tolist() == [3, 6]
    assert (s.max_query_len, s.max_seq_len) == (3, 6)
    assert got.logits_indices.tolist() == [3] and got.prompt_spans == ()


def test_prompt_logprobs_rows_follow_the_sampled_ones():
    echo = SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1)
    prompt = [21, 22, 23, 24, 25]
    first = ScheduledChunk("e", tuple(prompt[:3]), 0, (0, 1), False, echo, 0, 5, prompt)
    last = ScheduledChunk("e", tuple(prompt[3:]), 3, (0, 1), True, echo, 0, 5, prompt)
    got = host_step([first], 4, 10, 100)
    assert got.prompt_spans == (("e", 1, 3, 1),)  # positions 0-2 score prompt tokens 1-3
    assert got.logits_indices.tolist() == [0, 1, 2] and got.prompt_targets.tolist() == [22, 23, 24]
    got = host_step([last], 4, 10, 100)
    assert got.prompt_spans == (("e", 4, 1, 1),)  # position 3 scores token 4; position 4 samples
    assert got.logits_indices.tolist() == [1, 0] and got.prompt_targets.tolist() == [25]


@pytest.mark.parametrize(
    "chunk,message",
    [
        (ScheduledChunk("a", (1, 2, 3, 4, 5), 0, (0,), True, P, 0), "cannot hold"),
        (ScheduledChunk("a", (1, 2), 0, (99,), True, P, 0), "block ids"),
        (ScheduledChunk("a", (1, 100), 0, (0,), True, P, 0), "token ids"),
    ],
)
def test_inconsistent_chunks_are_refused_with_the_reason(chunk, message):
    with pytest.raises(ValueError, match=message):
        host_step([chunk], 4, 10, 100)
