"""How big the paged KV pool is: the shape of one token's KV (``kv_shape``), the bytes of one
block (``block_bytes``), how many blocks a replica's runner gets (``kv_cache_num_blocks``), and
how many of them the scheduler hands out (``scheduler_blocks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from replica.config import CacheConfig, EngineConfig
from replica.model_check import text_config
from replica.models import DTYPES
from replica.tensor_parallel import tensor_parallel_size

if TYPE_CHECKING:
    from replica.interfaces import Runner


def kv_shape(hf_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config; the KV heads of one rank when
    the model is sharded for tensor parallelism."""
    cfg = text_config(hf_config)
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    return cfg.num_hidden_layers, num_kv_heads // tensor_parallel_size(hf_config), head_dim


def block_bytes(hf_config: Any, block_size: int, dtype: torch.dtype | str) -> int:
    """Bytes of one KV block across all layers (K and V)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = DTYPES[dtype]
    num_layers, num_kv_heads, head_dim = kv_shape(hf_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def kv_cache_num_blocks(config: EngineConfig, model: Any, max_model_len: int) -> int:
    """KV pool size: ``cache.num_blocks`` if set, else free CUDA memory times
    ``gpu_memory_utilization`` (CUDA) or ``cpu_cache_gib`` (CPU), divided by the size of a
    block; capped at what ``max_num_seqs`` full-length sequences could ever use (a tiny
    model would otherwise get millions of blocks it can never fill)."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    param = next(model.parameters())
    per_block = block_bytes(model.config, cache.block_size, param.dtype)
    if param.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(param.device)
        budget = free * cache.gpu_memory_utilization
        where = f"{free / 2**30:.2f} GiB free on {param.device} x gpu_memory_utilization {cache.gpu_memory_utilization}"
    else:
        budget = cache.cpu_cache_gib * 2**30
        where = f"cpu_cache_gib {cache.cpu_cache_gib}"
    n = int(budget // per_block)
    if n < 1:
        raise ValueError(f"no room for a single KV block of {per_block} bytes ({where})")
    blocks_per_seq = -(-max_model_len // cache.block_size)
    return min(n, config.scheduler.max_num_seqs * blocks_per_seq)


def scheduler_blocks(cache: CacheConfig, runner: Runner) -> int:
    """The blocks the scheduler hands out: ``cache.num_blocks``, else the runner's pool. Its
    block ids and slots index the runner's pool, so a pool too small or a block size that
    differs is refused."""
    num_blocks = int(cache.num_blocks or runner.num_blocks or 0)
    if not num_blocks:
        raise ValueError("set CacheConfig.num_blocks (or runner.num_blocks) with an injected runner")
    if runner.num_blocks and num_blocks > runner.num_blocks:
        raise ValueError(f"CacheConfig.num_blocks {num_blocks} exceeds the runner's {runner.num_blocks} blocks")
    if runner.block_size != cache.block_size:
        raise ValueError(f"CacheConfig.block_size {cache.block_size} differs from the runner's {runner.block_size}")
    return num_blocks
