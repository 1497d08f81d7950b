"""Tensor parallelism inside one replica: one model sharded over N ranks (Megatron style).

Every decoder layer's attention heads and MLP columns are split over the ranks:
q/k/v and gate/up are column-parallel (rank r keeps rows ``r/N .. (r+1)/N`` of the output
features), o_proj and down_proj row-parallel (the matching input columns; their partial sums
meet in one all-reduce, then the bias is added once). Embeddings, norms and lm_head stay
replicated, so every rank's hidden state is the full one after each all-reduce and rank 0 alone
samples. The HF attention modules reshape projections with ``view(..., -1, head_dim)``, so each
rank's attention sees only its ``H/N`` query and ``KVH/N`` KV heads, and its paged KV cache holds
only those (``local_kv_heads``).

Which modules split how comes from the model's own ``base_model_tp_plan`` (transformers):
"colwise", "rowwise" and the replicated styles are applied here; a plan with any other style
(packed or expert-parallel MoE weights, sequence parallel, ...) or no plan is refused at load, as
are head or MLP sizes that ``N`` does not divide. ``check_shardable`` says why before any rank
loads a byte more.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from replica.model_check import UnsupportedModelError, text_config

if TYPE_CHECKING:
    from replica.config import EngineConfig, ModelConfig
    from replica.models import LoadedModel

_COLWISE, _ROWWISE = "colwise", "rowwise"
_REPLICATED = {"replicated_with_grad_allreduce"}  # inference: nothing to split (q_norm/k_norm over head_dim)


def _refuse(detail: str) -> UnsupportedModelError:
    return UnsupportedModelError("tensor parallelism", detail)


def tp_plan(model: Any) -> dict[str, str]:
    """The base model's tensor-parallel plan, ``{"layers.*.self_attn.q_proj": "colwise", ...}``."""
    plan = getattr(text_config(model.config), "base_model_tp_plan", None) or getattr(
        model.config, "base_model_tp_plan", None
    )
    return dict(plan or {})


def check_shardable(model: Any, world_size: int) -> None:
    """Raise ``UnsupportedModelError`` (naming the numbers) unless ``model`` splits exactly over
    ``world_size`` ranks."""
    if world_size == 1:
        return
    cfg = text_config(model.config)
    arch = type(model).__name__
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    inter = getattr(cfg, "intermediate_size", None)
    if inter is not None:
        sizes["intermediate_size"] = int(inter)
    for name, n in sizes.items():
        if n % world_size:
            raise _refuse(f"{arch}: {name} {n} is not divisible by tensor_parallel_size {world_size}")
    plan = tp_plan(model)
    if not plan:
        raise _refuse(f"{arch} has no tensor-parallel plan (base_model_tp_plan): its layers cannot be split")
    other = sorted({s for s in plan.values() if s not in (_COLWISE, _ROWWISE, *_REPLICATED)})
    if other:
        raise _refuse(f"{arch}'s tensor-parallel plan uses {', '.join(other)}; only colwise and rowwise are supported")
    base = model.get_submodule(model.base_model_prefix)
    targets = _targets(base, plan)
    if not any(style == _ROWWISE for _, _, style in targets):
        raise _refuse(f"{arch}: no module of the model matches its tensor-parallel plan")
    for name, module, style in targets:
        if style in _REPLICATED:
            continue
        if type(module) is not torch.nn.Linear:
            raise _refuse(f"{arch}: {name} is a {type(module).__name__}, not a Linear layer; cannot split it")
        dim = module.out_features if style == _COLWISE else module.in_features
        if dim % world_size:
            raise _refuse(f"{arch}: {name} has {dim} features, not divisible by tensor_parallel_size {world_size}")


def _targets(base: torch.nn.Module, plan: dict[str, str]) -> list[tuple[str, torch.nn.Module, str]]:
    patterns = [(re.compile(re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in plan.items()]
    found = []
    for name, module in base.named_modules():
        for pat, style in patterns:
            if pat.match(name):
                found.append((name, module, style))
                break
    return found


class RowParallelLinear(torch.nn.Linear):
    """This rank's input columns of a Linear; the partial products of all ranks are summed by
    one all-reduce, then the (unsplit) bias is added once."""

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        try:
            self.group.allreduce([y]).wait()
        except RuntimeError as e:  # a rank is gone: say so first (the backend's own text is long)
            raise RuntimeError(f"tensor-parallel rank lost: {e}") from e
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def shard_model(model: Any, rank: int, world_size: int, group: Any = None) -> int:
    """Split ``model`` in place for ``rank`` of ``world_size`` (after ``check_shardable``);
    returns the number of modules split."""
    base = model.get_submodule(model.base_model_prefix)
    count = 0
    for _name, found, style in _targets(base, tp_plan(model)):
        module: Any = found
        if style == _COLWISE:
            rows = module.out_features // world_size
            sl = slice(rank * rows, (rank + 1) * rows)
            module.weight = torch.nn.Parameter(module.weight[sl].clone(), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias[sl].clone(), requires_grad=False)
            module.out_features = rows
        elif style == _ROWWISE:
            cols = module.in_features // world_size
            w = module.weight[:, rank * cols : (rank + 1) * cols].clone()
            module.__class__ = RowParallelLinear
            module.weight = torch.nn.Parameter(w, requires_grad=False)
            module.in_features = cols
            module.group = group
        else:
            continue
        count += 1
    model.config.tensor_parallel_size = world_size  # the paged KV cache's head count reads it
    return count


def tensor_parallel_size(hf_config: Any) -> int:
    return int(getattr(hf_config, "tensor_parallel_size", 1) or 1)


def host_model_config(cfg: ModelConfig) -> ModelConfig:
    """Where a rank loads the whole model before keeping its shard: host memory, in the dtype the
    accelerator would use (a model larger than one GPU never lands on one whole)."""
    from replica.models import DTYPES, resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    name = next(k for k, v in DTYPES.items() if v == dtype)
    return replace(cfg, device="cpu", dtype=name)


def load_engine_model(config: EngineConfig) -> LoadedModel:
    """Rank 0's model as the engine wants it: on its device, or whole on the host to be sharded."""
    from replica.models import load_model

    return load_model(config.model) if config.parallel.tensor_parallel_size == 1 else load_unsharded(config.model)


def load_unsharded(cfg: ModelConfig) -> LoadedModel:
    """The whole model on the host (see ``host_model_config``); ``to_device`` moves a shard."""
    from replica.models import load_model

    return load_model(host_model_config(cfg))
