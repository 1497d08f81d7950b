"""The worker ranks of a tensor-parallel LLMReplica, as Ray actors in the replica's placement group.

build_app gives a replica with ``tensor_parallel_size`` N a placement group of N bundles; the
replica actor sits in bundle 0 and is rank 0 (its engine). ``TPWorkers.start`` puts one actor in
each of bundles 1..N-1 (so each gets its own GPU, or fake_gpu in tests) running
``replica.tp_executor.worker_main`` against a rendezvous on the replica's node. A worker whose
``run`` call returns or fails is dead: ``check`` raises, the replica's health check fails and
Serve replaces the replica with its whole placement group.
"""

from __future__ import annotations

import logging
import socket
import uuid
from dataclasses import replace
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from replica.config import EngineConfig

logger = logging.getLogger(__name__)


class _TPWorker:
    def run(self, config: EngineConfig, rank: int, init_method: str) -> None:
        from replica.tp_executor import worker_main

        worker_main(config, rank, init_method)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TPWorkers:
    """Ranks 1..N-1 of one replica; ``config`` carries the rendezvous rank 0 must join."""

    def __init__(self, actors: list[Any], runs: list[Any], config: EngineConfig) -> None:
        self.actors = actors
        self.runs = runs
        self.config = config

    @classmethod
    def start(cls, config: EngineConfig) -> TPWorkers | None:
        """Start the workers when this replica runs in a placement group of N bundles; None
        outside one (then the engine starts local worker processes itself)."""
        n = config.parallel.tensor_parallel_size
        pg = ray.util.get_current_placement_group() if ray.is_initialized() else None
        if n == 1 or pg is None or config.parallel.init_method is not None:
            return None
        specs = pg.bundle_specs
        if len(specs) < n:
            raise ValueError(
                f"tensor_parallel_size {n} needs {n} placement group bundles, this replica has {len(specs)}"
            )
        host = ray.util.get_node_ip_address()
        config = replace(config, parallel=replace(config.parallel, init_method=f"tcp://{host}:{_free_port(host)}"))
        actors, runs = [], []
        group_id = uuid.uuid4().hex[:8]
        for rank in range(1, n):
            b = dict(specs[rank])
            actor = (
                ray.remote(_TPWorker)
                .options(
                    num_cpus=b.pop("CPU", 0),
                    num_gpus=b.pop("GPU", 0),
                    resources={k: v for k, v in b.items() if not k.startswith(("memory", "bundle_group"))},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                    name=f"cbserve_tp_{group_id}_rank{rank}",  # findable: ray list actors, dashboards
                )
                .remote()
            )
            actors.append(actor)
            runs.append(actor.run.remote(config, rank, config.parallel.init_method))
        logger.info("started %d tensor-parallel worker rank(s) at %s", n - 1, config.parallel.init_method)
        return cls(actors, runs, config)

    def check(self) -> None:
        """Raise if a worker rank ended (its ``run`` returned or failed, or its actor died)."""
        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if done:
            rank = self.runs.index(done[0]) + 1
            try:
                ray.get(done[0])
                why = "it exited"
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            raise RuntimeError(f"tensor-parallel worker rank {rank} is gone: {why}")

    def stop(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                logger.warning("could not kill a tensor-parallel worker", exc_info=True)
