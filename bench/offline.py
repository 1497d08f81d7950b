"""Offline throughput: static batching vs transformers' continuous batching vs this engine.

All three run the same seeded requests (random token-id prompts, EOS ignored, greedy) on
the same weights, and are scored by useful output tokens per second: each request's own
``max_tokens``, never the padding a static batch decodes while waiting for its longest
member. Warm-up runs are not timed. Results go to stdout and to a JSON file.

    # CPU smoke run (minutes on 2 cores)
    python -m bench.offline --model tiny:llama --num-requests 16 --prompt-len 8 48 \\
        --output-len 8 48 --batch-size 8
    # GPU, real shapes with random weights
    python -m bench.offline --model dummy:qwen2.5-0.5b --num-requests 1024 \\
        --prompt-len 128 1024 --output-len 64 512 --batch-size 64
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.hf_continuous import blocks_needed, run_hf_continuous
from bench.static_batching import run_static
from bench.workload import BenchRequest, RunResult, WorkloadSpec, make_workload, useful_tokens

METHODS = ("static", "hf_cb", "engine")


def run_engine(
    loaded, requests: list[BenchRequest], args: argparse.Namespace, *, progress: bool = True
) -> tuple[RunResult, dict]:
    """This engine, through ``LLMEngine.generate`` on the already-loaded model."""
    from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
    from replica.engine import LLMEngine
    from replica.request import SamplingParams

    max_len = max(len(r.prompt_token_ids) + r.max_tokens for r in requests)
    config = EngineConfig(
        model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=max_len),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_cache_gib=args.cpu_cache_gib,
            enable_prefix_caching=False,
        ),  # random prompts share nothing; keep it equal
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=len(requests),
        ),
        runner=RunnerConfig(use_cuda_graphs=not args.no_cuda_graphs),
    )
    engine = LLMEngine(config, loaded=loaded)
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in requests]
    prompts = [list(r.prompt_token_ids) for r in requests]
    if args.warmup:
        engine.generate(
            prompts[:4],
            [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)] * len(prompts[:4]),
            use_tqdm=False,
        )
    _sync(loaded.model.device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=progress)
    _sync(loaded.model.device)
    elapsed = time.perf_counter() - start
    for o, r in zip(outs, requests, strict=True):
        if len(o.token_ids) != r.max_tokens:
            raise RuntimeError(f"engine produced {len(o.token_ids)} tokens for a request of {r.max_tokens}")
    stats = engine.stats()
    result = RunResult(
        "engine",
        elapsed,
        useful_tokens(requests),
        sum(len(o.token_ids) for o in outs),
        tuple(tuple(o.token_ids) for o in outs),
    )
    del engine
    return result, {
        "num_blocks": stats.num_total_blocks,
        "num_preemptions": stats.num_preemptions,
        "num_steps": stats.num_steps,
    }


def agreement(a: RunResult, b: RunResult, prefix: int = 8) -> float:
    """Fraction of requests whose first ``prefix`` greedy tokens agree: a sanity check that
    the methods computed the same thing (bf16 batching noise can flip a late near-tie)."""
    same = sum(x[:prefix] == y[:prefix] for x, y in zip(a.outputs, b.outputs, strict=True))
    return same / max(1, len(a.outputs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.offline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny:llama", help="tiny:* | dummy:* | default | HF id/path")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0, help="workload and dummy-weight seed")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 48), metavar=("LO", "HI"))
    p.add_argument("--output-len", type=int, nargs=2, default=(8, 48), metavar=("LO", "HI"))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=8, help="static batching: requests per padded batch")
    # engine (and, where the knob exists, HF continuous batching: same token budget)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="engine KV blocks (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--cpu-cache-gib", type=float, default=1.0)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--hf-block-size", type=int, default=256, help="HF continuous batching KV block size")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", default="results/offline.json", help="JSON results file")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")

    from replica.config import ModelConfig
    from replica.models import load_model

    loaded = load_model(ModelConfig(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed))
    model = loaded.model
    vocab = min(loaded.tokenizer.vocab_size, model.config.vocab_size)
    spec = WorkloadSpec(
        num_requests=args.num_requests,
        prompt_len=tuple(args.prompt_len),
        output_len=tuple(args.output_len),
        vocab_size=vocab,
        seed=args.seed,
    )
    requests = make_workload(spec)
    warm = requests[: min(4, len(requests))]
    warm = [BenchRequest(r.prompt_token_ids, min(4, r.max_tokens)) for r in warm]
    pad_id = next(iter(sorted(loaded.tokenizer.eos_token_ids)), 0)
    on_cpu = model.device.type == "cpu"
    print(
        f"model {args.model} ({type(model).__name__}, {model.dtype}) on {model.device}; "
        f"{len(requests)} requests, {useful_tokens(requests)} useful output tokens",
        file=sys.stderr,
    )

    results: dict[str, RunResult] = {}
    extra: dict[str, dict] = {}
    # The HF baselines first: the engine switches the model's attention to its paged kernels.
    if "static" in methods:
        if args.warmup:
            run_static(model, warm, batch_size=args.batch_size, pad_token_id=pad_id, progress=False)
        results["static"] = run_static(
            model, requests, batch_size=args.batch_size, pad_token_id=pad_id, progress=args.progress
        )
        _free_memory()
    if "hf_cb" in methods:
        hf_kwargs = dict(
            block_size=args.hf_block_size,
            max_batch_tokens=args.max_num_batched_tokens,
            max_memory_percent=args.gpu_memory_utilization,
            num_blocks=blocks_needed(requests, args.hf_block_size) if on_cpu else None,
        )
        results["hf_cb"] = run_hf_continuous(model, requests, warmup=args.warmup, progress=args.progress, **hf_kwargs)
        _free_memory()
    if "engine" in methods:
        results["engine"], extra["engine"] = run_engine(loaded, requests, args, progress=args.progress)
        _free_memory()

    report = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "workload": spec.to_dict(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "results": {m: {**r.summary(), **extra.get(m, {})} for m, r in results.items()},
        "ratios": {},
        "agreement_first8": {},
    }
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            report["ratios"][f"{b}/{a}"] = round(
                results[b].useful_tokens_per_s / max(results[a].useful_tokens_per_s, 1e-9), 3
            )
            report["agreement_first8"][f"{b}~{a}"] = round(agreement(results[a], results[b]), 3)

    _print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return report


def _print_table(report: dict) -> None:
    print(f"\n{report['model']} [{report['dtype']}] on {report['device']}")
    print(f"{'method':<8} {'useful tok/s':>13} {'elapsed s':>10} {'useful':>8} {'computed':>9} {'waste':>6}")
    for m, r in report["results"].items():
        print(
            f"{m:<8} {r['useful_tokens_per_s']:>13.1f} {r['elapsed_s']:>10.2f} {r['useful_tokens']:>8} "
            f"{r['computed_tokens']:>9} {r['waste_fraction']:>6.1%}"
        )
    for k, v in report["ratios"].items():
        print(f"ratio {k}: {v:.2f}x   (first-8-token agreement {report['agreement_first8'][k.replace('/', '~')]:.0%})")


if __name__ == "__main__":
    main()
