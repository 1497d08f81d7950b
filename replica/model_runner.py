"""Runs one engine step on a Hugging Face decoder with the engine's own paged KV cache.

Every step is one flat ragged batch: all scheduled chunks concatenated into ``input_ids [1, T]``
with explicit ``position_ids`` (no padding, no HF cache object). Attention goes through a backend
registered with ``transformers.AttentionInterface`` (see ``replica.attention``); the per-step
``AttentionMetadata`` and the ``PagedKVCache`` reach it as forward kwargs. Logits are computed only
for the last token of each chunk that samples, and for the prompt positions of a request that asks
for prompt logprobs (echo).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from replica import logprobs as lp
from replica.attention import AttentionMetadata, PagedKVCache, install, resolve_backend
from replica.config import CacheConfig, RunnerConfig
from replica.cuda_graphs import DecodeGraphs, DecodeInputs
from replica.host_step import HostInputs, HostStep, host_step
from replica.kv_sizing import kv_shape
from replica.outputs import RunnerOutput
from replica.pending_step import DeferredStep, PendingStep
from replica.prefill_graphs import PrefillGraphs, prefill_graph_sizes
from replica.sampler import Sampler, SamplingRow
from replica.step import DecodeBatch, ScheduledChunk, SchedulerOutput
from replica.stopping import banned_tokens

if TYPE_CHECKING:
    from replica.tp_executor import TPGroup


def _text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


@dataclass(frozen=True)
class StepInputs:
    """Device inputs of one forward, built from a SchedulerOutput."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_indices: torch.Tensor  # [S + P] as HostInputs'
    attn_metadata: AttentionMetadata
    sample_rows: tuple[SamplingRow, ...]
    sample_request_ids: tuple[str, ...]
    prompt_spans: tuple[tuple[str, int, int, int], ...] = ()
    prompt_targets: np.ndarray | None = None


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        cache: CacheConfig,
        runner: RunnerConfig,
        num_blocks: int,
        *,
        seed: int = 0,
        eos_token_ids: Iterable[int] | None = None,
        max_model_len: int | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.model = model.eval()
        self.config = runner
        # Tensor parallelism (replica.tp_executor): rank 0 sends each step to the other ranks.
        self.tp = tp
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = cache.block_size
        self.num_blocks = num_blocks
        self.backend = resolve_backend(runner.attention_backend, self.device)
        self.attn_implementation = install(model, self.backend)
        # Fused RMSNorm / SiLU-mul kernels (CUDA only; a no-op on CPU).
        self.num_fused_modules = _patch_fused(model) if self.device.type == "cuda" else 0
        num_layers, num_kv_heads, head_dim = kv_shape(model.config)
        self.kv_cache = PagedKVCache(
            torch.zeros(
                (num_layers, 2, num_blocks, self.block_size, num_kv_heads, head_dim),
                dtype=self.dtype,
                device=self.device,
            )
        )
        self.vocab_size = int(_text_config(model.config).vocab_size)
        self.eos_token_ids = tuple(sorted(set(eos_token_ids if eos_token_ids is not None else _model_eos(model))))
        self.sampler = Sampler(seed, self.device)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self._last_graph_step: PendingStep | None = None  # its tokens are in graphs.last_tokens
        if self.device.type == "cuda" and runner.use_cuda_graphs and getattr(self.backend, "cuda_graph_safe", False):
            self.graphs = self._capture_graphs(runner.max_graph_batch_size, max_model_len)
            # Tensor-parallel ranks would need the step broadcast inside the graph: eager there.
            if tp is None and prefill_graph_sizes(runner.max_prefill_graph_tokens):
                self.prefill_graphs = self._capture_prefill_graphs(runner.max_prefill_graph_tokens)

    def _capture_graphs(self, max_batch_size: int, max_model_len: int | None) -> DecodeGraphs:
        cfg = _text_config(self.model.config)
        # Block tables as wide as the engine's longest sequence: each replay copies them.
        max_len = max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 8192)
        graphs = DecodeGraphs(
            self._graph_forward,
            device=self.device,
            block_size=self.block_size,
            max_batch_size=max_batch_size,
            max_blocks_per_seq=min(self.num_blocks, -(-max_len // self.block_size)),
            tp=self.tp,
        )
        graphs.capture()
        return graphs

    def _capture_prefill_graphs(self, max_tokens: int) -> PrefillGraphs:
        graphs = PrefillGraphs(
            self._graph_forward,
            device=self.device,
            block_size=self.block_size,
            max_tokens=max_tokens,
            max_blocks_per_seq=self._graphs.max_blocks_per_seq,
        )
        graphs.capture()
        return graphs

    def _graph_forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        meta: AttentionMetadata,
        keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """The captured forward: every row's logits for a decode step (``keep`` 0 means all), the
        rows of ``keep`` (a device index) for a prefill graph."""
        result = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
            attn_metadata=meta,
            kv_cache=self.kv_cache,
        )
        return result.logits[0]

    # -- one step ------------------------------------------------------------------------------

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step to completion (no placeholders allowed)."""
        return self.launch(out, None).result()

    def launch(self, out: SchedulerOutput, prev: PendingStep | None) -> PendingStep:
        """Start one step. Rows of a decode step without a token (``DecodeBatch.prev_rows``)
        take the token ``prev`` sampled for the same request. A decode step that fits a CUDA
        graph is enqueued on the device now and its tokens copied back asynchronously; any
        other step is computed at ``result()`` (see ``DeferredStep``)."""
        if out.is_empty:
            return DeferredStep((), lambda: RunnerOutput(sampled={}))
        if out.decode is not None and self.graphs is not None:
            step = self._launch_decode_graph(out.decode, prev)
            if step is not None:
                self._last_graph_step = step
                return step
        if out.decode is not None:  # the eager path reads chunks, with every token on the host
            d = out.decode
            chunks = replace(d, token_ids=self._input_tokens(d, prev), prev_rows=None).as_chunks()
            out = SchedulerOutput(chunks, out.num_batched_tokens, out.preempted_ids)
        return DeferredStep(tuple(c.request_id for c in out.chunks if c.sample), lambda: self._run_eager(out))

    def _input_tokens(self, d: DecodeBatch, prev: PendingStep | None) -> np.ndarray:
        """Each row's input token on the host: its own, or the one ``prev`` sampled for its request."""
        if d.token_ids is not None:
            return d.token_ids
        if prev is None:
            raise ValueError("a step with placeholder tokens needs the previous step")
        try:
            return np.asarray(prev.result().tokens_for(d.request_ids), np.int64)
        except KeyError as e:
            raise ValueError(f"request {e.args[0]}: the previous step sampled no token for it") from None

    def _run_eager(self, out: SchedulerOutput) -> RunnerOutput:
        host, rows, rids = self._plan(out)
        g = self.prefill_graphs
        if g is not None and len(rows) == 1 and not host.prompt_spans and g.fits(host.step):
            logits, prompt = g.replay(host.step), None  # a lone prompt: its last token's logits
        else:
            inputs = self._send_inputs(host, rows, rids)
            logits = self.forward(inputs)
            prompt = (
                lp.of_prompt(logits[len(rows) :], host.prompt_spans, host.prompt_targets) if host.prompt_spans else None
            )
        n = len(rows)
        if not n:
            return RunnerOutput(sampled={}, prompt_logprobs=prompt)
        ids, dev_lp = self.sampler.sample(logits[:n], rows)
        tokens = self._host_ids(ids)  # the step's one host sync (a second small one only for logprobs)
        logprobs = None
        if dev_lp is not None:
            logprobs = {rids[r]: x for r, x in zip(dev_lp.rows, dev_lp.to_host([tokens[r] for r in dev_lp.rows]))}
        return RunnerOutput(request_ids=rids, token_ids=tokens, logprobs=logprobs, prompt_logprobs=prompt)

    def _host_ids(self, ids: torch.Tensor) -> list[int]:
        if ids.device.type != "cuda":
            return ids.tolist()
        # Through pinned memory and a blocking event: the host sleeps while the device works
        # (.tolist() alone would spin a core in cudaMemcpy).
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()
        return host.tolist()

    @property
    def _graphs(self) -> DecodeGraphs:
        if self.graphs is None:
            raise RuntimeError("no CUDA graphs were captured on this runner")
        return self.graphs

    @torch.inference_mode()
    def _launch_decode_graph(self, d: DecodeBatch, prev: PendingStep | None) -> PendingStep | None:
        """A decode step replayed from a CUDA graph; None when it doesn't fit one (then the
        eager path runs)."""
        graphs = self._graphs
        if not d.plain_greedy and d.needs_host.any():
            # Penalties need the previous token on the host, a grammar its matcher to have accepted
            # it first: the eager path reads it (and runs after the previous step's update).
            return None
        inp = self._graph_inputs(d, prev)
        if inp is None:
            return None
        logits, greedy = graphs.replay(inp)
        rids = d.request_ids
        if d.plain_greedy:
            # The graph's argmax; rows asking for logprobs score it (one vectorised check per step).
            asking = np.flatnonzero(d.num_logprobs >= 0)
            if not len(asking):
                return graphs.emit(rids)
            idx = graphs.rows_on_device(asking)
            return graphs.emit(rids, logprobs=lp.of_greedy(logits, greedy, idx, asking, d.num_logprobs))
        # Plain greedy rows (no min_tokens ban left) take the graph's argmax: no rows to build.
        rows = [
            SamplingRow(p, n, banned_tokens(p, n, self.eos_token_ids))
            for p, n in zip([r.params for r in d.requests], d.num_output_tokens.tolist())
        ]
        if all(
            r.params.greedy and not r.banned_token_ids and not r.params.processes_logits and r.params.logprobs is None
            for r in rows
        ):
            return graphs.emit(rids)  # the graph's argmax
        tokens, dev_lp = self.sampler.sample(logits, rows)
        return graphs.emit(rids, tokens, dev_lp)

    def _graph_inputs(self, d: DecodeBatch, prev: PendingStep | None) -> DecodeInputs | None:
        """Graph inputs of a ``DecodeBatch``: its arrays as they are. Rows without a token take
        ``prev``'s on the device when ``prev`` is the last replay, else from the host."""
        graphs = self._graphs
        b = len(d)
        if not graphs.fits(b, d.block_tables.shape[1]):
            return None
        if (d.num_blocks * self.block_size <= d.positions).any():
            return None  # let prepare() raise its precise error
        if d.block_tables.size and (d.block_tables.max() >= self.num_blocks or d.block_tables.min() < 0):
            raise ValueError(f"block ids must be in [0, {self.num_blocks})")
        if d.prev_rows is not None and prev is not None and prev is self._last_graph_step:
            if len(d.prev_rows) and int(d.prev_rows.max()) >= len(prev.request_ids):
                raise ValueError("the previous step sampled no token for a placeholder row")
            return DecodeInputs(np.zeros(b, np.int64), d.positions, d.block_tables, d.prev_rows)
        return DecodeInputs(self._checked_ids(self._input_tokens(d, prev)), d.positions, d.block_tables)

    def _checked_ids(self, ids: np.ndarray) -> np.ndarray:
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got min {ids.min()} max {ids.max()}")
        return ids

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Run the model; returns logits ``[S, V]`` for the sampling chunks, in chunk order."""
        result = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            logits_to_keep=inputs.logits_indices,
            attn_metadata=inputs.attn_metadata,
            kv_cache=self.kv_cache,
        )
        logits = result.logits[0]
        if logits.shape[0] != inputs.logits_indices.shape[0]:
            # A model whose forward ignores logits_to_keep returned logits for every token.
            logits = logits.index_select(0, inputs.logits_indices)
        return logits

    def compute_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step without sampling (tests, scoring): logits of the sampling chunks."""
        return self.forward(self.prepare(out))

    # -- host-side preparation (vectorised over tokens) -----------------------------------------

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        return self._send_inputs(*self._plan(out))

    def _plan(self, out: SchedulerOutput) -> tuple[HostInputs, tuple[SamplingRow, ...], tuple[str, ...]]:
        """A step's host arrays, its sampling rows and the ids of the requests that sample."""
        chunks = out.as_chunks()
        host = host_step(chunks, self.block_size, self.num_blocks, self.vocab_size)
        sampled = [c for c in chunks if c.sample]
        rows = tuple(
            SamplingRow(
                c.params,
                c.num_output_tokens,
                banned_tokens(c.params, c.num_output_tokens, self.eos_token_ids),
                grammar=c.grammar,
            )
            if not c.params.uses_penalties
            else self._row_with_history(c)
            for c in sampled
        )
        return host, rows, tuple(c.request_id for c in sampled)

    def _send_inputs(self, host: HostInputs, rows: tuple[SamplingRow, ...], request_ids: tuple[str, ...]) -> StepInputs:
        if self.tp is not None:  # the other ranks start the same forward now
            self.tp.send_step(host.step, len(rows))
        return self._inputs(host, rows, request_ids)

    def _inputs(
        self, inputs: HostInputs, rows: tuple[SamplingRow, ...] = (), request_ids: tuple[str, ...] = ()
    ) -> StepInputs:
        host = inputs.step
        meta = AttentionMetadata(
            slot_mapping=self._to_device(host.slots),
            query_start_loc=self._to_device(host.qsl, torch.int32),
            seq_lens=self._to_device(host.seq_lens, torch.int32),
            block_tables=self._to_device(host.block_tables, torch.int32),
            query_start_loc_host=host.qsl,
            seq_lens_host=host.seq_lens,
            max_query_len=host.max_query_len,
            max_seq_len=host.max_seq_len,
            block_size=self.block_size,
        )
        return StepInputs(
            input_ids=self._to_device(host.ids)[None],
            position_ids=self._to_device(host.positions)[None],
            logits_indices=self._to_device(inputs.logits_indices),
            attn_metadata=meta,
            sample_rows=rows,
            sample_request_ids=request_ids,
            prompt_spans=inputs.prompt_spans,
            prompt_targets=inputs.prompt_targets,
        )

    # -- tensor parallelism: ranks 1..N-1 (replica.tp_executor.serve_steps) -------------------

    def worker_inputs(self, host: HostStep) -> StepInputs:
        """A worker's inputs of the step rank 0 sent (``tp_executor.unpack_step``): the same
        forward without logits (rank 0 alone samples)."""
        return self._inputs(HostInputs(host, np.zeros(0, np.int64)))

    def replay_graph_as_worker(self, batch_size: int) -> None:
        """A worker's half of rank 0's graph replay; the graph receives its inputs itself."""
        self._graphs.replay_as_worker(batch_size)

    @property
    def alive(self) -> bool:
        """False once a tensor-parallel rank is lost (then no step can run)."""
        return self.tp is None or self.tp.alive()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without them)."""
        if self.tp is not None:
            self.tp.close()

    def _row_with_history(self, c: ScheduledChunk) -> SamplingRow:
        """A sampling row with the token history that penalties need: the request's tokens before
        this chunk (on the host by now) and the chunk's own (placeholders already resolved)."""
        prompt, outs, before = c.prompt_token_ids, c.output_token_ids, c.start_pos
        if not prompt and before > 0:
            raise ValueError(f"request {c.request_id}: penalties need the chunk's token history")
        seq = [*prompt[:before], *outs[: max(0, before - len(prompt))], *c.token_ids]
        p = len(prompt) if prompt else (c.prompt_len or len(seq))
        if len(seq) != before + len(c.token_ids) or len(seq) != p + c.num_output_tokens:
            raise ValueError(f"request {c.request_id}: its token history is not complete on the host")
        banned = banned_tokens(c.params, c.num_output_tokens, self.eos_token_ids)
        return SamplingRow(c.params, c.num_output_tokens, banned, seq[:p], seq[p:], c.grammar)

    def _to_device(self, a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)


def _patch_fused(model: PreTrainedModel) -> int:
    from replica.fused_ops import patch_model  # imports Triton: CUDA only

    return patch_model(model)


def _model_eos(model: PreTrainedModel) -> tuple[int, ...]:
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()
