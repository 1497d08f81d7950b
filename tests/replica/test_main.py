"""The command line: python -m replica."""

from __future__ import annotations

import torch

from replica.__main__ import main
from replica.models import tiny_model


def _greedy(prompt_ids, n):
    model = tiny_model("llama", seed=0).model
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_streams_one_prompt_and_reports_tokens(capsys):
    rc = main(
        [
            "--model",
            "tiny:llama",
            "--no-chat",
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "--kv-cache-gib",
            "0.01",
            "--max-model-len",
            "256",
            "Hello there",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    tok = tiny_model("llama", seed=0).tokenizer
    expected_ids = _greedy(tok.encode("Hello there"), 6)
    if 2 in expected_ids:  # EOS: the engine stops after it
        expected_ids = expected_ids[: expected_ids.index(2) + 1]
    assert out.rstrip("\n") == tok.decode(expected_ids, skip_special_tokens=True)
    assert f"[{len(expected_ids)} tokens" in err


def test_several_prompts_run_as_a_batch_with_chat_template(capsys):
    rc = main(
        [
            "--model",
            "tiny:qwen2",
            "--temperature",
            "0",
            "--max-tokens",
            "3",
            "--kv-cache-gib",
            "0.01",
            "--max-model-len",
            "256",
            "first",
            "second",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert "--- [0] 'first'" in out and "--- [1] 'second'" in out
    assert "tokens in" in err


def test_bad_arguments_exit_with_a_message(capsys):
    assert main(["--model", "tiny:llama", "--max-tokens", "0", "hi"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["--model", "tiny:nope", "hi"]) == 2
    assert "unknown tiny model" in capsys.readouterr().err
