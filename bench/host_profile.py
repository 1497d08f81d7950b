"""Where the host's time goes in a decode step at full batch, with the real model runner on
the GPU: per-phase wall times over steady-state decode steps (schedule_next, launch, waiting
for the device, update, and the rest: detokenizing and building deltas), then the top
functions by self time under cProfile (which slows Python down: read it for shares, not
absolute times).

    python -m bench.host_profile --model qwen2.5-0.5b [--batch 256] [--steps 300] [--out r.json]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import numpy as np
import torch

from bench.throughput import _tokenizer, build_model, time_result
from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from replica.models import DUMMY_CONFIGS, SMOLLM2_VOCAB, LoadedModel
from replica.request import SamplingParams


class PhaseTimer:
    """Wraps the engine's components to time each phase of ``engine.step`` without changing it."""

    def __init__(self, engine) -> None:
        self.acc: collections.Counter[str] = collections.Counter()
        self._wrap(engine.scheduler, "schedule_next")
        self._wrap(engine.scheduler, "update")
        launch = engine.runner.launch

        def timed_launch(out, prev):
            t = time.perf_counter()
            handle = launch(out, prev)
            self.acc["launch"] += time.perf_counter() - t
            time_result(handle, self._waited)
            return handle

        engine.runner.launch = timed_launch

    def _waited(self, seconds: float) -> None:
        self.acc["wait_for_device"] += seconds

    def _wrap(self, obj, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[name] += time.perf_counter() - t

        setattr(obj, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(DUMMY_CONFIGS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300, help="timed decode steps (then as many under cProfile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir", default=os.environ.get("CBSERVE_TOKENIZER_DIR"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.host_profile needs a CUDA GPU")
    from replica.engine import LLMEngine

    n = args.batch
    cfg = EngineConfig(
        model=ModelConfig(model=f"dummy:{args.model}", dtype="bfloat16", device="cuda", max_model_len=4096),
        cache=CacheConfig(block_size=256, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=8192, max_waiting=max(1024, n)),
        runner=RunnerConfig(attention_backend="auto", max_graph_batch_size=n),
    )
    model = build_model(args.model, args.seed)
    loaded = LoadedModel(
        model=model, tokenizer=_tokenizer(args.tokenizer_dir), name=f"dummy:{args.model}", max_model_len=4096
    )
    engine = LLMEngine(cfg, loaded=loaded)  # includes the engine's warm-up on CUDA
    rng = np.random.default_rng(args.seed)
    warm = 40  # decode steps before timing: every request decoding, the steady state
    params = SamplingParams(max_tokens=warm + 2 * args.steps + 50, temperature=0.0, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{i}", rng.integers(3, SMOLLM2_VOCAB, args.prompt_len).tolist(), params)
    while engine.scheduler.num_waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(warm):
        engine.step()
    timer = PhaseTimer(engine)
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    assert engine.scheduler.num_running == n, "a request ended during the timed steps"
    phases = {k: 1e3 * v / args.steps for k, v in timer.acc.items()}
    wall_ms = 1e3 * statistics.mean(walls)
    host_ms = wall_ms - phases.get("wait_for_device", 0.0)
    phases["deltas_and_rest"] = host_ms - sum(v for k, v in phases.items() if k != "wait_for_device")
    timer.acc.clear()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        engine.step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(22)
    dev = torch.cuda.get_device_name()
    result = dict(
        model=args.model,
        device=dev,
        batch=n,
        steps=args.steps,
        step_wall_ms_mean=wall_ms,
        host_ms_mean=host_ms,
        phases_ms=phases,
        step_wall_ms_median=1e3 * statistics.median(walls),
        profile=buf.getvalue(),
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(buf.getvalue())
    print(f"=== host per decode step, {args.model} at batch {n} on {dev} (mean of {args.steps} steps) ===")
    print(
        f"step wall {wall_ms:.3f} ms = host {host_ms:.3f} ms + waiting for the device "
        f"{phases.get('wait_for_device', 0.0):.3f} ms"
    )
    for k in ("schedule_next", "launch", "update", "deltas_and_rest"):
        print(f"  {k:18s} {phases.get(k, 0.0):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
