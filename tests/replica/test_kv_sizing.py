"""KV pool sizing: bytes per block, and blocks per memory budget."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from replica.config import CacheConfig, EngineConfig, SchedulerConfig
from replica.kv_sizing import block_bytes, kv_cache_num_blocks

HF = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def test_block_bytes():
    assert block_bytes(HF, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 16 * 2
    assert block_bytes(HF, 16, "float32") == 2 * 2 * 16 * 2 * 16 * 4
    with pytest.raises(ValueError, match="unknown dtype"):
        block_bytes(HF, 16, "float8")


def test_kv_pool_size_from_memory_budget():
    model = torch.nn.Linear(2, 2).to(torch.float32)
    model.config = HF
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block, kv heads, head dim, float32
    base = EngineConfig(cache=CacheConfig(block_size=16, cpu_cache_gib=per_block * 10 / 2**30))
    assert kv_cache_num_blocks(base, model, max_model_len=4096) == 10
    capped = EngineConfig(
        cache=CacheConfig(block_size=16, cpu_cache_gib=1.0), scheduler=SchedulerConfig(max_num_seqs=2)
    )
    assert kv_cache_num_blocks(capped, model, max_model_len=64) == 2 * 4
    fixed = EngineConfig(cache=CacheConfig(num_blocks=7))
    assert kv_cache_num_blocks(fixed, model, max_model_len=64) == 7
    tiny = EngineConfig(cache=CacheConfig(block_size=16, cpu_cache_gib=1e-9))
    with pytest.raises(ValueError, match="no room"):
        kv_cache_num_blocks(tiny, model, max_model_len=64)
