"""Running one replica's model on N tensor-parallel ranks (``replica.tensor_parallel`` shards it).

Rank 0 is the engine's own ``ModelRunner``: it keeps the one scheduler, block table, sampler and
detokenizer. Ranks 1..N-1 are ``serve_steps`` loops holding a shard and a paged KV cache of their
own KV heads, with the same block ids. Per step rank 0 broadcasts the step's host arrays once
(one header, one int64 payload: token ids, positions, slots, query starts, lengths, block
tables) on a gloo group; every rank uploads them and runs the same forward, whose row-parallel
layers all-reduce on the device group (NCCL on CUDA, gloo on CPU). Only rank 0 computes logits.
A CUDA-graph decode step is one header naming the batch size: the graphs themselves broadcast the
staged rows and the input ids on the device group (captured), so a replay is one message.

Process groups are built from a ``TCPStore`` directly (no ``torch.distributed`` default group),
so a process may hold several engines, and every collective carries ``ParallelConfig.timeout_s``.
A dead rank breaks the gloo connections: rank 0's next broadcast or all-reduce raises at once, the
engine fails that step's requests and ``ModelRunner.alive`` turns False (the replica is unhealthy).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist

from replica.config import EngineConfig
from replica.host_step import HostStep

if TYPE_CHECKING:
    from replica.model_runner import ModelRunner
    from replica.models import LoadedModel

logger = logging.getLogger(__name__)

# Header: [kind, payload length, T, B, W (block-table width), S (sampling rows), max query len, max seq len]
_HEADER = 8
STEP, GRAPH, STOP = 1, 2, 3


@dataclass
class TPGroup:
    """This process's place in a replica's tensor-parallel group."""

    rank: int
    world_size: int
    device_group: Any  # all-reduce of the row-parallel layers (NCCL on CUDA, gloo on CPU)
    control: Any  # gloo: step headers and payloads, host to host
    store: Any
    workers: Sequence[Any] = field(default_factory=tuple)  # local worker processes started by rank 0
    broken: str | None = None

    def alive(self) -> bool:
        return self.broken is None and all(p.is_alive() for p in self.workers)

    def _bcast(self, t: torch.Tensor) -> None:
        try:
            self.control.broadcast(t, 0).wait()
        except Exception as e:
            self.broken = f"tensor-parallel rank lost: {e}"
            raise RuntimeError(self.broken) from e

    def send(self, header: np.ndarray, payload: np.ndarray | None = None) -> None:
        """Rank 0: one message to every other rank."""
        self._bcast(torch.from_numpy(header))
        if payload is not None and len(payload):
            self._bcast(torch.from_numpy(payload))

    def recv(self) -> tuple[np.ndarray, np.ndarray]:
        h = torch.zeros(_HEADER, dtype=torch.int64)
        self.control.broadcast(h, 0).wait()
        header = h.numpy()
        payload = torch.zeros(int(header[1]), dtype=torch.int64)
        if len(payload):
            self.control.broadcast(payload, 0).wait()
        return header, payload.numpy()

    def send_step(self, s: HostStep, num_samples: int) -> None:
        t, b, w = len(s.ids), len(s.seq_lens), s.block_tables.shape[1]
        payload = np.concatenate([s.ids, s.positions, s.slots, s.qsl, s.seq_lens, s.block_tables.reshape(-1)])
        header = np.array([STEP, len(payload), t, b, w, num_samples, s.max_query_len, s.max_seq_len], np.int64)
        self.send(header, payload.astype(np.int64))

    def send_graph(self, batch_size: int) -> None:
        self.send(np.array([GRAPH, 0, 0, batch_size, 0, 0, 0, 0], np.int64))

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (the KV pool every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        self.control.allreduce([t], _min_opts()).wait()
        return int(t.item())

    def share(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.int64)
        self.control.broadcast(t, 0).wait()
        return int(t.item())

    def close(self, timeout_s: float = 10.0) -> None:
        """Rank 0: stop the other ranks and wait for local ones to exit."""
        if self.rank == 0 and self.broken is None:
            try:
                self.send(np.array([STOP, 0, 0, 0, 0, 0, 0, 0], np.int64))
            except Exception:
                logger.warning("tensor-parallel workers were already gone at shutdown")
        self.broken = self.broken or "closed"
        for p in self.workers:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join(timeout_s)


def _min_opts() -> Any:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]
    return opts


def unpack_step(header: np.ndarray, payload: np.ndarray) -> HostStep:
    """The step ``send_step`` packed."""
    t, b, w = (int(x) for x in header[2:5])
    ids, positions, slots, qsl, seq_lens, tables = np.split(payload, np.cumsum([t, t, t, b + 1, b]))
    return HostStep(ids, positions, slots, qsl, seq_lens, tables.reshape(b, w), int(header[6]), int(header[7]))


def init_group(rank: int, world_size: int, init_method: str, device: torch.device, timeout_s: float) -> TPGroup:
    """Join the rendezvous at ``init_method`` (``tcp://host:port``; rank 0 hosts the store)."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or url.port is None:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
    return _groups(store, rank, world_size, device, timeout)


def _groups(store: Any, rank: int, world_size: int, device: torch.device, timeout: datetime.timedelta) -> TPGroup:
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world_size, timeout)
    device_group: Any
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        device_group = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world_size, opts)
    else:
        device_group = dist.ProcessGroupGloo(dist.PrefixStore("device", store), rank, world_size, timeout)
    return TPGroup(rank, world_size, device_group, control, store)


def start_local_workers(config: EngineConfig, device: torch.device) -> TPGroup:
    """Rank 0 with ranks 1..N-1 as local processes (tests, a single machine without Ray)."""
    n = config.parallel.tensor_parallel_size
    timeout = datetime.timedelta(seconds=config.parallel.timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, n, True, timeout=timeout, wait_for_workers=False)
    init_method = f"tcp://127.0.0.1:{store.port}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(config, r, init_method), name=f"cbserve-tp-{r}", daemon=True)
        for r in range(1, n)
    ]
    for p in procs:
        p.start()
    group = _groups(store, 0, n, device, timeout)
    group.workers = procs
    return group


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """This rank's device: with every GPU visible (local processes) rank r takes GPU r; a Ray
    actor sees only its own GPU (index 0). An explicit ``cuda:N`` is kept."""
    from replica.models import resolve_device

    device = resolve_device(config.model.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)  # NCCL's communicator and the default CUDA stream of this process
    return device


def _place(loaded: LoadedModel, device: torch.device) -> None:
    if next(loaded.model.parameters()).device != device:
        loaded.model.to(device)


def _build_runner(config: EngineConfig, loaded: LoadedModel, group: TPGroup, max_model_len: int) -> ModelRunner:
    """Shard, place, size the KV pool over all ranks, build this rank's runner (every rank
    alike: the runners' CUDA-graph captures meet in the same collectives)."""
    from replica.kv_sizing import kv_cache_num_blocks
    from replica.model_runner import ModelRunner
    from replica.tensor_parallel import shard_model

    shard_model(loaded.model, group.rank, group.world_size, group.device_group)
    _place(loaded, rank_device(config, group.rank))
    max_model_len = group.share(max_model_len)
    num_blocks = group.agree_min(kv_cache_num_blocks(config, loaded.model, max_model_len))
    return ModelRunner(
        loaded.model,
        config.cache,
        config.runner,
        num_blocks,
        seed=config.model.seed,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        max_model_len=max_model_len,
        tp=group,
    )


def tp_runner(config: EngineConfig, loaded: LoadedModel, max_model_len: int) -> tuple[ModelRunner, torch.Tensor]:
    """Rank 0's runner over a group of ``config.parallel.tensor_parallel_size`` ranks, and the
    dry run's reference logits from the unsharded model (see ``model_check.dry_run``).
    ``loaded`` must be ``load_model`` of ``config.model`` (every rank loads the same weights);
    ranks 1..N-1 are started here unless ``config.parallel.init_method`` names a rendezvous
    whose workers someone else started."""
    from replica.model_check import reference_logits
    from replica.tensor_parallel import check_shardable

    check_shardable(loaded.model, config.parallel.tensor_parallel_size)
    reference = reference_logits(loaded.model, int(loaded.model.config.get_text_config().vocab_size))
    device = rank_device(config, 0)
    p = config.parallel
    if p.init_method is None:
        group = start_local_workers(config, device)
    else:
        group = init_group(0, p.tensor_parallel_size, p.init_method, device, p.timeout_s)
    try:
        runner = _build_runner(config, loaded, group, max_model_len)
    except BaseException:
        group.broken = "start failed"
        group.close(timeout_s=1.0)
        raise
    # An engine dropped without close() still stops its ranks (at collection or interpreter exit).
    weakref.finalize(runner, group.close, 1.0)
    return runner, reference


def worker_main(config: EngineConfig, rank: int, init_method: str) -> None:
    """Rank ``rank`` (>= 1): load, shard, then run the steps rank 0 sends until it stops."""
    from replica.tensor_parallel import check_shardable, load_unsharded

    loaded = load_unsharded(config.model)
    check_shardable(loaded.model, config.parallel.tensor_parallel_size)
    device = rank_device(config, rank)
    group = init_group(rank, config.parallel.tensor_parallel_size, init_method, device, config.parallel.timeout_s)
    runner = _build_runner(config, loaded, group, 0)
    serve_steps(runner, group)


@torch.inference_mode()
def serve_steps(runner: ModelRunner, group: TPGroup) -> None:
    """A worker's loop: each message from rank 0 is one forward of this rank's shard."""
    while True:
        header, payload = group.recv()
        kind = int(header[0])
        if kind == STOP:
            return
        if kind == GRAPH:
            runner.replay_graph_as_worker(int(header[3]))
        elif kind == STEP:
            runner.forward(runner.worker_inputs(unpack_step(header, payload)))
        else:
            raise RuntimeError(f"unknown tensor-parallel message {kind}")
