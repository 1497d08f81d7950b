"""Offline throughput on one GPU: static batching (HF generate), transformers' continuous
batching, and this engine, in one run, on the same seeded workload.

Workload W1: N requests (default 256), prompt and output lengths uniform in [100, 1024]
(seeded), random prompt token ids, EOS ignored, greedy. Models: real shapes with dummy bf16
weights (``dummy:qwen2.5-0.5b``, ``dummy:llama-3.2-1b``).

    python -m bench.throughput --model qwen2.5-0.5b [--baseline-requests 32] [--out r.json]

The baselines are slow (~1k tok/s), so they run on the first ``--baseline-requests``
requests of the same workload and report tok/s over that subset; the engine runs all N.
Printed last: output tok/s of each, ratios, host time per decode step, and the roofline of
the engine run (weights + KV bytes per step over the measured copy bandwidth, prefill
FLOPs over the measured matmul rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from replica.models import DUMMY_CONFIGS, SMOLLM2_VOCAB, LoadedModel, build_random_model
from replica.request import SamplingParams


def workload(n: int, seed: int, lo: int = 100, hi: int = 1024) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    p_lens = rng.integers(lo, hi + 1, n)
    o_lens = rng.integers(lo, hi + 1, n)
    prompts = [rng.integers(3, SMOLLM2_VOCAB, int(p)).tolist() for p in p_lens]
    return prompts, [int(o) for o in o_lens]


def build_model(name: str, seed: int, attn: str | None = None):
    model = build_random_model(DUMMY_CONFIGS[name], seed=seed, dtype=torch.bfloat16, device=torch.device("cuda"))
    if attn:
        model.set_attn_implementation(attn)
    return model


def free_cuda() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ baselines


def run_static(name: str, seed: int, prompts, outs, batch: int) -> dict:
    """transformers ``generate`` in padded static batches; useful tokens = each request's own
    output length (a batch runs until its longest request is done)."""
    from transformers import GenerationConfig

    model = build_model(name, seed, "sdpa")
    pad = 0
    useful, t_total = 0, 0.0
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i : i + batch], outs[i : i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=model.device)
        n_new = max(os_)
        cfg = GenerationConfig(
            max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=pad
        )
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        torch.cuda.synchronize()
        t_total += time.perf_counter() - t
        useful += sum(os_)
    del model
    free_cuda()
    return dict(requests=len(prompts), output_tokens=useful, seconds=t_total, tok_s=useful / t_total, batch=batch)


def run_hf_continuous(name: str, seed: int, prompts, outs, args_timeout: float = 60.0) -> dict:
    """transformers' own continuous batching (``init_continuous_batching``, default settings)."""
    from transformers import GenerationConfig

    model = build_model(name, seed)
    cfg = GenerationConfig(max_new_tokens=max(outs), do_sample=False, eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=cfg)
    manager.start()
    try:
        t = time.perf_counter()
        for i, (p, o) in enumerate(zip(prompts, outs)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o, eos_token_id=-1)
        got, tokens = 0, 0
        while got < len(prompts):
            res = manager.get_result(timeout=args_timeout)
            if res is None:
                raise RuntimeError("transformers continuous batching produced no result in 60 s")
            if not res.is_finished():
                continue
            got += 1
            tokens += len(res.generated_tokens)
        dt = time.perf_counter() - t
    finally:
        manager.stop(block=True)
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
    del manager, model
    free_cuda()
    return dict(requests=len(prompts), output_tokens=tokens, seconds=dt, tok_s=tokens / dt)


# ------------------------------------------------------------------------------ engine


def _tokenizer(tok_dir: str | None):
    from replica.tokenizer import Tokenizer

    try:
        from replica.models import load_tokenizer

        return load_tokenizer("dummy:x")
    except Exception:
        pass
    from transformers import AutoTokenizer

    if tok_dir is None or not Path(tok_dir).is_dir():
        raise SystemExit("no SmolLM2 tokenizer here: pass --tokenizer-dir (a converted tokenizer folder)")
    return Tokenizer(AutoTokenizer.from_pretrained(tok_dir), eos_token_ids=[2], name="smollm2")


def time_result(handle, record: Callable[[float], None]) -> None:
    """Wrap a launched step's ``result()`` so that the seconds it blocks go to ``record``."""
    inner = handle.result

    def result():
        t = time.perf_counter()
        try:
            return inner()
        finally:
            record(time.perf_counter() - t)

    handle.result = result


class StepProbe:
    """Times the engine without touching it, by wrapping the runner.

    Per ``engine.step`` call: wall time and the time spent blocked in a step's ``result()``
    (waiting for the device, or computing an eager step); host time = wall - blocked. Per
    launched step: its shape, and for CUDA-graph steps two device events (before the input
    copies, after the output copy), whose gaps show how long the GPU sat idle waiting for
    the host between consecutive graph steps (the host time that async scheduling did not
    hide)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        runner = engine.runner
        self.records: list[dict] = []  # one per launched step
        self.calls: list[dict] = []  # one per engine.step()
        self._launch = runner.launch
        runner.launch = self._wrapped_launch
        self._cur: dict | None = None
        self._blocked = 0.0
        self._last_end: float | None = None
        self._applied: dict | None = None
        if runner.graphs is not None:
            self._replay, self._emit = runner.graphs.replay, runner.graphs.emit
            runner.graphs.replay = self._wrapped_replay
            runner.graphs.emit = self._wrapped_emit

    def _wrapped_replay(self, inp):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._cur["ev_start"] = ev
        return self._replay(inp)

    def _wrapped_emit(self, ids, tokens=None):
        handle = self._emit(ids, tokens)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._cur["ev_end"] = ev
        return handle

    def _wrapped_launch(self, out, prev):
        d = out.decode
        if d is not None:  # a DecodeBatch: read its arrays (iterating would build chunks)
            pos = d.positions.astype(float)
            rec = dict(
                decode=True,
                batch=len(d),
                tokens=len(d),
                ctx=int((pos + 1).sum()),
                attn_pairs=float((pos + 1).sum()),
                sampled=len(d),
            )
        else:
            rec = dict(
                decode=all(ch.num_tokens == 1 for ch in out.chunks),
                batch=len(out.chunks),
                tokens=out.num_batched_tokens,
                ctx=int(sum(ch.start_pos + ch.num_tokens for ch in out.chunks)),
                attn_pairs=float(
                    sum(ch.num_tokens * ch.start_pos + ch.num_tokens * (ch.num_tokens + 1) / 2 for ch in out.chunks)
                ),
                sampled=sum(1 for ch in out.chunks if ch.sample),
            )
        self._cur = rec
        handle = self._launch(out, prev)
        rec["graph"] = "ev_end" in rec
        self.records.append(rec)

        def blocked(seconds: float) -> None:
            self._blocked += seconds
            self._applied = rec

        time_result(handle, blocked)
        return handle

    def step(self):
        self._blocked, self._applied = 0.0, None
        t0 = time.perf_counter()
        # The caller's own time since the last step (consuming deltas) is host time per step too.
        between = t0 - self._last_end if self._last_end is not None else 0.0
        deltas = self.engine.step()
        self._last_end = end = time.perf_counter()
        wall = end - t0
        if self._applied is not None:
            r = self._applied
            self.calls.append(
                dict(
                    wall=wall,
                    blocked=self._blocked,
                    host=wall - self._blocked,
                    loop_host=wall - self._blocked + between,
                    batch=r["batch"],
                    graph=r["graph"],
                    decode=r["decode"],
                )
            )
        return deltas

    def finish(self) -> None:
        """Resolve the device events (after a synchronize) into per-step GPU times."""
        prev = None
        for r in self.records:
            if r["graph"]:
                r["gpu_ms"] = r["ev_start"].elapsed_time(r["ev_end"])
                if prev is not None:
                    r["gap_ms"] = prev["ev_end"].elapsed_time(r["ev_start"])
                prev = r
            else:
                prev = None  # an eager step in between: no graph-to-graph gap
        for r in self.records:
            r.pop("ev_start", None)
            r.pop("ev_end", None)


# A schema whose random-weight outputs stay long (an open array of strings), so the JSON variant's
# requests run for about as many tokens as W1's; they end when the grammar does, or at max_tokens.
W1_SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string", "maxLength": 64}}},
    "required": ["notes"],
}


def variant_params(variant: str) -> dict:
    """W1 variants (issue 14): every request uses the feature. ``plain``: none (the W1 figure)."""
    if variant == "plain":
        return {}
    if variant == "penalties":
        return dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)
    if variant == "json_schema":
        from replica.grammar import GrammarSpec

        return dict(guided=GrammarSpec("json_schema", json.dumps(W1_SCHEMA)))
    raise SystemExit(f"unknown --variant {variant!r}")


def run_engine(name: str, seed: int, prompts, outs, args) -> tuple[dict, list[dict], object]:
    from replica.engine import LLMEngine

    model = build_model(name, seed)
    tok = _tokenizer(args.tokenizer_dir)
    loaded = LoadedModel(model=model, tokenizer=tok, name=f"dummy:{name}", max_model_len=args.max_model_len)
    cfg = EngineConfig(
        model=ModelConfig(model=f"dummy:{name}", dtype="bfloat16", device="cuda", max_model_len=args.max_model_len),
        cache=CacheConfig(block_size=args.block_size, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_batched_tokens,
            max_waiting=max(1024, len(prompts)),
            async_scheduling=not args.no_async,
        ),
        runner=RunnerConfig(
            attention_backend="auto",
            max_graph_batch_size=args.max_num_seqs,
            use_cuda_graphs=not args.no_graphs,
            warmup=False,
        ),
    )
    t = time.perf_counter()
    engine = LLMEngine(cfg, loaded=loaded)
    init_s = time.perf_counter() - t
    # The engine's own warm-up (a full-budget prefill chunk, mixed and decode steps), not timed.
    warmup_s = engine.warmup() if not args.no_warmup else 0.0
    probe = StepProbe(engine)
    extra = variant_params(args.variant)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True, **extra))
    torch.cuda.synchronize()
    t = time.perf_counter()
    n_tok = 0
    while engine.has_unfinished():
        for d in probe.step():
            n_tok += len(d.token_ids)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    probe.finish()
    res = dict(
        requests=len(prompts),
        output_tokens=n_tok,
        seconds=dt,
        tok_s=n_tok / dt,
        init_s=init_s,
        warmup_s=warmup_s,
        async_scheduling=cfg.scheduler.async_scheduling,
        num_blocks=engine.num_blocks,
        backend=engine.runner.backend.name,
        graphs=engine.runner.graphs is not None,
        fused_modules=engine.runner.num_fused_modules,
    )
    recs, calls = probe.records, probe.calls
    del probe, engine, loaded, model
    free_cuda()
    return res, recs, calls


def roofline(name: str, recs: list[dict], bw: float, peak: float) -> dict:
    cfg = DUMMY_CONFIGS[name]
    h, L, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    inter = cfg["intermediate_size"]
    layer_params = h * (hq * d) + 2 * h * (hkv * d) + (hq * d) * h + 3 * h * inter
    body = L * layer_params
    weight_bytes = 2 * (body + v * h)  # bf16; embedding/lm_head read once per step
    kv_tok = 2 * L * hkv * d * 2  # K and V, all layers, bf16
    t_floor = 0.0
    for r in recs:
        bytes_ = weight_bytes + r["ctx"] * kv_tok
        flops = 2 * body * r["tokens"] + 2 * v * h * r["sampled"] + 4 * L * hq * d * r["attn_pairs"]
        t_floor += max(bytes_ / bw, flops / peak)
    return dict(weight_bytes=weight_bytes, kv_bytes_per_token=kv_tok, floor_s=t_floor)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(DUMMY_CONFIGS))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--baseline-requests", type=int, default=32, help="0 skips the baselines")
    ap.add_argument("--static-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument(
        "--variant",
        default="plain",
        choices=["plain", "penalties", "json_schema"],
        help="every request with penalties or a JSON schema (issue 14's W1 variants)",
    )
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-async", action="store_true", help="synchronous steps (no host/device overlap)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--no-fused", action="store_true", help="HF's RMSNorm / MLP instead of replica.fused_ops")
    ap.add_argument("--tokenizer-dir", default=os.environ.get("CBSERVE_TOKENIZER_DIR"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.no_fused:
        from replica.fused_ops import ENV_DISABLE

        os.environ[ENV_DISABLE] = "0"
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from bench.kernels import copy_bandwidth, matmul_tflops

    dev = torch.cuda.get_device_name(0)
    bw, peak = copy_bandwidth(1.0), matmul_tflops(8192) * 1e12
    prompts, outs = workload(args.requests, args.seed)
    result: dict = dict(
        device=dev,
        model=args.model,
        args=vars(args),
        copy_GBps=bw / 1e9,
        matmul_TFLOPs=peak / 1e12,
        prompt_tokens=sum(map(len, prompts)),
        output_tokens=sum(outs),
    )
    nb = min(args.baseline_requests, args.requests)
    if nb:
        for key, fn in (
            ("static", lambda: run_static(args.model, args.seed, prompts[:nb], outs[:nb], args.static_batch)),
            ("hf_continuous", lambda: run_hf_continuous(args.model, args.seed, prompts[:nb], outs[:nb])),
        ):
            try:
                result[key] = fn()
                print(f"{key}:", result[key], flush=True)
            except Exception as e:  # report the failure, still measure the engine
                result[key + "_error"] = repr(e)[:500]
                print(f"{key} FAILED: {e!r}", flush=True)
                free_cuda()
        nb = nb if "static" in result and "hf_continuous" in result else 0
    eng, recs, calls = run_engine(args.model, args.seed, prompts, outs, args)
    result["engine"] = eng

    def med(xs):
        xs = list(xs)
        return statistics.median(xs) if xs else None

    dec = [r for r in recs if r["decode"]]
    graph = [r for r in dec if r["graph"]]
    gcalls = [c for c in calls if c["graph"]]
    big = lambda rows: [r for r in rows if r["batch"] >= 192]
    full = [c for c in gcalls if c["batch"] == args.max_num_seqs]
    result["steps"] = dict(
        total=len(recs),
        decode=len(dec),
        graph=len(graph),
        mixed_or_prefill=len(recs) - len(dec),
        mean_decode_batch=statistics.mean(r["batch"] for r in dec) if dec else None,
        # Host work of an engine.step call that applied a graph step (wall minus time blocked on the device).
        host_ms_per_graph_call_median=1e3 * med(c["host"] for c in gcalls) if gcalls else None,
        host_ms_per_graph_call_batch_ge192_median=1e3 * med(c["host"] for c in big(gcalls)) if big(gcalls) else None,
        call_wall_ms_batch_ge192_median=1e3 * med(c["wall"] for c in big(gcalls)) if big(gcalls) else None,
        # The figure: host work per step at batch max_num_seqs (256), in engine.step and
        # in the whole loop (engine.step plus the caller consuming the deltas).
        full_batch_calls=len(full),
        host_ms_full_batch_median=1e3 * med(c["host"] for c in full) if full else None,
        loop_host_ms_full_batch_median=1e3 * med(c["loop_host"] for c in full) if full else None,
        # Device side of graph steps: busy time and the idle gap before each (host not hidden).
        gpu_ms_per_graph_step_median=med(r["gpu_ms"] for r in graph),
        gpu_ms_batch_ge192_median=med(r["gpu_ms"] for r in big(graph)),
        gap_ms_median=med(r["gap_ms"] for r in graph if "gap_ms" in r),
        gap_ms_batch_ge192_median=med(r["gap_ms"] for r in big(graph) if "gap_ms" in r),
        gap_s_total=sum(r.get("gap_ms", 0.0) for r in graph) / 1e3,
        gpu_s_graph_total=sum(r["gpu_ms"] for r in graph) / 1e3,
        eager_call_s_total=sum(c["wall"] for c in calls if not c["graph"]),
    )
    rl = roofline(args.model, recs, bw, peak)
    result["roofline"] = rl | dict(tok_s_ceiling=eng["output_tokens"] / rl["floor_s"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(result, step_records=recs, step_calls=calls), fh, indent=1)

    s = result["steps"]
    print(
        f"\n=== W1 {args.model} on {dev}: {args.requests} requests, {result['prompt_tokens']} prompt / "
        f"{result['output_tokens']} output tokens ==="
    )
    print(f"{'system':28s} {'requests':>8s} {'out tok':>9s} {'seconds':>8s} {'tok/s':>9s}")
    for key in ("static", "hf_continuous", "engine"):
        if key in result:
            r = result[key]
            print(f"{key:28s} {r['requests']:8d} {r['output_tokens']:9d} {r['seconds']:8.2f} {r['tok_s']:9.0f}")
    if nb:
        print(
            f"engine / static: {eng['tok_s'] / result['static']['tok_s']:.1f}x   "
            f"engine / hf_continuous: {eng['tok_s'] / result['hf_continuous']['tok_s']:.1f}x "
            f"(baselines on the first {nb} requests)"
        )
    f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"
    print(
        f"steps: {s['total']} ({s['decode']} decode, {s['graph']} from graphs, {s['mixed_or_prefill']} with "
        f"prefill); async scheduling {'on' if eng['async_scheduling'] else 'off'}; fused modules "
        f"{eng['fused_modules']}; warm-up {eng['warmup_s']:.1f} s (untimed)"
    )
    print(
        f"graph decode steps (mean batch {f(s['mean_decode_batch'], 0)}): GPU busy {f(s['gpu_s_graph_total'])} s, "
        f"GPU idle between them {f(s['gap_s_total'])} s; eager (prefill/mixed) calls {f(s['eager_call_s_total'])} s"
    )
    print(
        f"per graph step, median (batch >= 192): GPU {f(s['gpu_ms_per_graph_step_median'])} "
        f"({f(s['gpu_ms_batch_ge192_median'])}) ms; host work per engine.step "
        f"{f(s['host_ms_per_graph_call_median'], 3)} ({f(s['host_ms_per_graph_call_batch_ge192_median'], 3)}) ms; "
        f"GPU idle waiting for the host {f(s['gap_ms_median'], 3)} ({f(s['gap_ms_batch_ge192_median'], 3)}) ms"
    )
    print(
        f"host work per decode step at batch {args.max_num_seqs} (median of {s['full_batch_calls']} steps): "
        f"engine.step {f(s['host_ms_full_batch_median'], 3)} ms, whole loop {f(s['loop_host_ms_full_batch_median'], 3)} ms"
    )
    print(
        f"roofline: weights {rl['weight_bytes'] / 1e9:.2f} GB/step, KV {rl['kv_bytes_per_token'] / 1e3:.1f} kB/token, "
        f"copy {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s -> floor {rl['floor_s']:.2f} s = "
        f"{result['roofline']['tok_s_ceiling']:.0f} tok/s; engine at {rl['floor_s'] / eng['seconds']:.0%} of it"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
