"""The runner a loaded model gets: checked before any request (``model_check``: refuse what the
paged path cannot serve exactly), its KV pool sized (``kv_sizing``), on one device or over a
tensor-parallel group (``tp_executor``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from replica.config import EngineConfig
from replica.kv_sizing import kv_cache_num_blocks
from replica.model_check import dry_run, inspect_model
from replica.model_runner import ModelRunner

if TYPE_CHECKING:
    from replica.models import LoadedModel


def build_runner(
    config: EngineConfig, loaded: LoadedModel, max_model_len: int, eos_token_ids: Iterable[int]
) -> tuple[ModelRunner, int]:
    """The checked runner, and the ``max_model_len`` it serves (a model's features may cap it)."""
    verdict = inspect_model(loaded.model)
    max_model_len = verdict.cap(max_model_len, config.scheduler.max_num_batched_tokens)
    if config.parallel.tensor_parallel_size > 1:
        from replica.tp_executor import tp_runner

        runner, reference = tp_runner(config, loaded, max_model_len)
        try:
            dry_run(runner, reference)
        except BaseException:
            runner.close()  # the other ranks are processes of their own
            raise
        return runner, max_model_len
    runner = ModelRunner(
        loaded.model,
        config.cache,
        config.runner,
        kv_cache_num_blocks(config, loaded.model, max_model_len),
        seed=config.model.seed,
        eos_token_ids=eos_token_ids,
        max_model_len=max_model_len,
    )
    dry_run(runner)
    return runner, max_model_len
