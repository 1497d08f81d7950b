"""loadtest/workload.py: length specs, prompt sets, and the workload draws."""

from __future__ import annotations

import json
import random

import pytest

from loadtest.workload import DEFAULT_PROMPT_FILE, LengthSpec, Workload, load_prompt_set, synthetic_prompt


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fixed:128", LengthSpec("fixed", 128, 128)),
        ("uniform:8:64", LengthSpec("uniform", 8, 64)),
        ("dataset", LengthSpec("dataset")),
        (" Fixed:1 ", LengthSpec("fixed", 1, 1)),
    ],
)
def test_parse(spec, expected):
    assert LengthSpec.parse(spec) == expected


@pytest.mark.parametrize(
    "spec", ["fixed", "fixed:0", "uniform:9:3", "uniform:4", "normal:3:1", "fixed:x", "dataset:7", ""]
)
def test_parse_rejects(spec):
    with pytest.raises(ValueError, match="--input-len"):
        LengthSpec.parse(spec, what="--input-len")


def test_samples_stay_in_range():
    rng = random.Random(1)
    xs = [LengthSpec.parse("uniform:3:6").sample(rng) for _ in range(400)]
    assert set(xs) == {3, 4, 5, 6}
    assert LengthSpec.parse("fixed:7").sample(rng) == 7
    with pytest.raises(ValueError):
        LengthSpec.parse("dataset").sample(rng)


def test_bundled_prompt_set_is_valid():
    entries = load_prompt_set()
    assert DEFAULT_PROMPT_FILE.name == "prompts.json" and len(entries) >= 40
    assert len({e.prompt for e in entries}) == len(entries)
    assert all(e.output_len and 16 <= e.output_len <= 512 for e in entries)


@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", "non-empty JSON list"),
        ("{", "cannot read"),
        ('[{"text": "x"}]', "non-empty string 'prompt'"),
        ('[{"prompt": "x", "output_len": 0}]', "positive int"),
        ('[{"prompt": "x", "extra": 1}]', "unknown keys"),
    ],
)
def test_bad_prompt_sets(tmp_path, content, match):
    p = tmp_path / "p.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompt_set(p)


def test_synthetic_prompt_has_the_asked_word_count_and_varies():
    rng = random.Random(0)
    a, b = synthetic_prompt(50, rng), synthetic_prompt(50, rng)
    assert len(a.split()) == len(b.split()) == 50
    assert a != b


def test_workload_dataset_lengths(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": "alpha", "output_len": 5}, {"prompt": "beta"}]))
    w = Workload(
        LengthSpec.parse("dataset"), LengthSpec.parse("dataset"), prompt_set=load_prompt_set(p), default_output_len=9
    )
    items = {w.sample(random.Random(i)) for i in range(30)}
    assert {(i.prompt, i.max_tokens, i.target_input_len) for i in items} == {("alpha", 5, None), ("beta", 9, None)}
    fixed_out = Workload(LengthSpec.parse("dataset"), LengthSpec.parse("fixed:3"), prompt_set=load_prompt_set(p))
    assert fixed_out.sample(random.Random(0)).max_tokens == 3


def test_workload_synthetic_with_shared_prefix():
    w = Workload(LengthSpec.parse("fixed:10"), LengthSpec.parse("uniform:2:4"), shared_prefix_len=6, seed=3)
    rng = random.Random(0)
    items = [w.sample(rng) for _ in range(20)]
    prefixes = {" ".join(i.prompt.split()[:6]) for i in items}
    assert len(prefixes) == 1  # the same prefix everywhere ...
    assert len({i.prompt for i in items}) == 20  # ... and different tails
    assert all(len(i.prompt.split()) == 16 and i.target_input_len == 10 and 2 <= i.max_tokens <= 4 for i in items)


def test_workload_rejects_inconsistent_specs():
    with pytest.raises(ValueError, match="needs a prompt set"):
        Workload(LengthSpec.parse("dataset"), LengthSpec.parse("fixed:3"))
    with pytest.raises(ValueError, match="needs input length 'dataset'"):
        Workload(LengthSpec.parse("fixed:3"), LengthSpec.parse("dataset"))
