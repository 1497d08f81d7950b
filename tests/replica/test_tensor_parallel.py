"""Sharding a model for tensor parallelism (in one process): what splits how, what is refused
and the row-parallel sum. The two-process runs are in test_tp_executor.py."""

from __future__ import annotations

import copy

import pytest
import torch

from replica.kv_sizing import block_bytes, kv_shape
from replica.model_check import UnsupportedModelError
from replica.models import TINY_CONFIGS, build_random_model, tiny_model
from replica.tensor_parallel import RowParallelLinear, check_shardable, shard_model, tensor_parallel_size


def _model(arch: str = "llama", **overrides):
    cfg = {**TINY_CONFIGS[arch], **overrides}
    return build_random_model(cfg, seed=0, dtype=torch.float64, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "overrides, n, words",
    [
        ({}, 3, "num_attention_heads 4 is not divisible by tensor_parallel_size 3"),
        ({}, 4, "num_key_value_heads 2 is not divisible by tensor_parallel_size 4"),
        ({"intermediate_size": 129}, 2, "intermediate_size 129 is not divisible by tensor_parallel_size 2"),
    ],
)
def test_sizes_that_do_not_divide_are_refused_naming_the_numbers(overrides, n, words):
    with pytest.raises(UnsupportedModelError, match=words):
        check_shardable(_model(**overrides), n)


def test_models_without_a_plan_or_with_other_styles_are_refused():
    model = _model()
    check_shardable(model, 2)  # the tiny models split
    model.config.base_model_tp_plan = None
    with pytest.raises(UnsupportedModelError, match="no tensor-parallel plan"):
        check_shardable(model, 2)
    model.config.base_model_tp_plan = {"layers.*.mlp.experts.gate_up_proj": "packed_colwise"}
    with pytest.raises(UnsupportedModelError, match="packed_colwise; only colwise and rowwise"):
        check_shardable(model, 2)


def test_shard_splits_heads_and_columns_of_every_layer():
    model = tiny_model("qwen2", seed=0, dtype=torch.float64).model  # q/k/v with biases
    full = copy.deepcopy(model)
    assert shard_model(model, 1, 2) == 7 * model.config.num_hidden_layers
    for layer, ref in zip(model.model.layers, full.model.layers):
        attn, r = layer.self_attn, ref.self_attn
        assert torch.equal(attn.q_proj.weight, r.q_proj.weight[32:])  # heads 2, 3 of 4 (head_dim 16)
        assert torch.equal(attn.k_proj.bias, r.k_proj.bias[16:])  # KV head 1 of 2
        assert isinstance(attn.o_proj, RowParallelLinear)
        assert torch.equal(attn.o_proj.weight, r.o_proj.weight[:, 32:])
        assert torch.equal(layer.mlp.up_proj.weight, ref.mlp.up_proj.weight[64:])
        assert torch.equal(layer.mlp.down_proj.weight, ref.mlp.down_proj.weight[:, 64:])
    assert tensor_parallel_size(model.config) == 2
    assert kv_shape(model.config) == (2, 1, 16)  # each rank's paged cache: half the KV heads
    assert block_bytes(model.config, 16, torch.float64) * 2 == block_bytes(full.config, 16, torch.float64)


class _Recorder:
    """Stands in for the process group of rank 1: keeps its partial sum."""

    def __init__(self) -> None:
        self.partial: torch.Tensor | None = None

    def allreduce(self, tensors):
        self.partial = tensors[0].clone()
        return self

    def wait(self) -> None:
        pass


class _Adder(_Recorder):
    """Rank 0's group: adds rank 1's partial, as the all-reduce would."""

    def __init__(self, other: torch.Tensor) -> None:
        super().__init__()
        self.other = other

    def allreduce(self, tensors):
        tensors[0].add_(self.other)
        return self


def test_row_parallel_partial_sums_plus_bias_once_equal_the_whole_layer():
    torch.manual_seed(0)
    whole = torch.nn.Linear(8, 4, bias=True).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    ranks = []
    for r in range(2):
        holder = torch.nn.Module()
        holder.model = torch.nn.Module()
        holder.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        holder.model.layers[0].down = copy.deepcopy(whole)
        holder.base_model_prefix = "model"
        holder.config = type("C", (), {"base_model_tp_plan": {"layers.*.down": "rowwise"}})()
        shard_model(holder, r, 2)
        ranks.append(holder.model.layers[0].down)
    recorder = _Recorder()
    ranks[1].group = recorder
    ranks[1](x[:, 4:])  # a row-parallel layer reads its rank's columns (the column-parallel output)
    assert recorder.partial is not None
    ranks[0].group = _Adder(recorder.partial)
    assert torch.allclose(ranks[0](x[:, :4]), whole(x), rtol=0, atol=1e-12)
