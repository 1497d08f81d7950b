"""What the Serve data path costs: the bare AsyncEngine and the Serve app on the same GPU and workload.

    python -m bench.serve_overhead --config deployments.gpu.yaml --streams 256 --duration 30 \
        --out results/serve_overhead

Two phases in one process, one after the other on the same GPU:

1. ``engine``: an ``AsyncEngine`` built from the config's engine settings, driven in-process by
   asyncio tasks (no Ray, no HTTP): the ceiling.
2. ``serve``: the application exactly as the config file builds it (``deployments.app:build_app``
   with its ``args``; only ``--model`` overrides the model), driven over HTTP by
   ``--client-procs`` processes of streaming ``/v1/chat/completions`` clients (aiohttp).

The workload (both phases): chat requests of ``--prompt-words`` random words (about 200 tokens
after the chat template), exactly ``--output-len`` tokens (``ignore_eos``), greedy. Figures:

- idle TTFT p50: ``--idle-requests`` sequential requests, time to the first token. In both phases
  "first token" is the first one with text, as an SSE client sees it: with dummy weights a token
  that decodes to no text yet (part of a UTF-8 character) sends no event;
- one stream: the p50 gap between a single stream's token events vs the engine's ms per step;
- ``--streams`` closed-loop streams for ``--warmup`` + ``--duration`` s: output tok/s in the
  window (a request's tokens spread evenly between its first token and its end), TTFT p50/p99
  of requests started in the window, gaps between token events p50/p99 (ITL), tokens per event,
  and the engine's ms per step during the window.

Writes ``results.json`` and ``table.md`` under ``--out``; prints the table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadtest.workload import _WORDS

ROOT = Path(__file__).resolve().parents[1]
WORDS = _WORDS  # one token each: prompt length in tokens ~ words


@dataclass
class Req:
    start: float
    first: float | None = None
    end: float | None = None
    events: list[float] = field(default_factory=list)  # arrival time of each event with text
    tokens: int = 0
    error: str | None = None


@dataclass
class Phase:
    name: str
    idle_ttft_ms: list[float] = field(default_factory=list)
    one_stream_gap_ms: float = 0.0
    one_stream_step_ms: float = 0.0
    tok_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    itl_p50_ms: float = 0.0
    itl_p99_ms: float = 0.0
    tokens_per_event: float = 0.0
    step_ms: float = 0.0
    requests: int = 0
    failed: int = 0
    cpu: dict[str, Any] = field(default_factory=dict)  # cores per process group (Serve phase)

    def row(self) -> str:
        return (
            f"| {self.name} | {self.tok_s:,.0f} | {_pct(self.idle_ttft_ms, 50):.1f} | {self.ttft_p50_ms:.0f} / "
            f"{self.ttft_p99_ms:.0f} | {self.itl_p50_ms:.2f} / {self.itl_p99_ms:.2f} | {self.tokens_per_event:.2f} | "
            f"{self.one_stream_gap_ms:.2f} / {self.one_stream_step_ms:.2f} | {self.step_ms:.2f} | "
            f"{self.requests} ({self.failed}) |"
        )


HEADER = (
    "| path | output tok/s | idle TTFT p50 (ms) | TTFT p50 / p99 under load (ms) | ITL p50 / p99 (ms) | "
    "tokens per event | one stream: event gap / engine step (ms) | engine ms/step under load | requests (failed) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def messages(rng: random.Random, words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))}]


def summarize(phase: Phase, reqs: list[Req], t0: float, t1: float) -> None:
    """Window [t0, t1]: tokens spread evenly over each request's first-token..end span."""
    tokens = 0.0
    ttft, gaps, per_event = [], [], []
    for r in reqs:
        if r.error or r.first is None or r.end is None:
            continue
        span = max(r.end - r.first, 1e-9)
        overlap = max(0.0, min(r.end, t1) - max(r.first, t0))
        tokens += (r.tokens - 1) * overlap / span + (1 if t0 <= r.first <= t1 else 0)
        if t0 <= r.start <= t1:
            ttft.append((r.first - r.start) * 1e3)
            gaps += [(b - a) * 1e3 for a, b in zip(r.events, r.events[1:])]
            per_event.append(r.tokens / max(1, len(r.events)))
    phase.tok_s = tokens / (t1 - t0)
    phase.ttft_p50_ms, phase.ttft_p99_ms = _pct(ttft, 50), _pct(ttft, 99)
    phase.itl_p50_ms, phase.itl_p99_ms = _pct(gaps, 50), _pct(gaps, 99)
    phase.tokens_per_event = statistics.fmean(per_event) if per_event else 0.0
    phase.requests = sum(1 for r in reqs if t0 <= r.start <= t1)
    phase.failed = sum(1 for r in reqs if r.error)


# ---------------------------------------------------------------- phase 1: the bare engine


async def engine_phase(a: argparse.Namespace, app_args: dict[str, Any]) -> Phase:
    from deployments.app import AppArgs
    from replica.async_engine import AsyncEngine
    from replica.models import load_model
    from replica.request import SamplingParams

    cfg = AppArgs.model_validate(app_args).engine_config()
    engine = AsyncEngine(cfg, loaded=load_model(cfg.model))
    await engine.start()
    tok = engine.tokenizer
    rng = random.Random(a.seed)
    phase = Phase("AsyncEngine in-process")
    params = SamplingParams(max_tokens=a.output_len, ignore_eos=True, temperature=0.0)
    n = 0

    async def one(prompt: list[int], max_tokens: int = a.output_len) -> Req:
        nonlocal n
        n += 1
        r = Req(time.perf_counter())
        p = params if max_tokens == a.output_len else SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for d in engine.add_request(f"e{n}", prompt, p):
            now = time.perf_counter()
            r.tokens += len(d.token_ids)
            if d.text:  # as the HTTP client counts: a token that decodes to no text yet sends no event
                r.first = r.first or now
                r.events.append(now)
            if d.finished:
                r.end = now
                if d.error:
                    r.error = d.error
        return r

    def prompt() -> list[int]:
        return tok.apply_chat_template(messages(rng, a.prompt_words))

    for _ in range(3):  # warm-up
        await one(prompt(), 8)
    for _ in range(a.idle_requests):
        r = await one(prompt(), 4)
        if r.first is not None:  # (4 tokens that decode to no text: no first token to time)
            phase.idle_ttft_ms.append((r.first - r.start) * 1e3)
    s0 = engine.stats()
    r = await one(prompt())
    s1 = engine.stats()
    phase.one_stream_gap_ms = _pct([(y - x) * 1e3 for x, y in zip(r.events, r.events[1:])], 50)
    phase.one_stream_step_ms = (r.end - r.first) * 1e3 / max(1, s1.num_steps - s0.num_steps)

    reqs: list[Req] = []
    stop_at = time.perf_counter() + a.warmup + a.duration

    async def loop() -> None:
        while time.perf_counter() < stop_at:
            reqs.append(await one(prompt()))

    steps: list[tuple[float, int]] = []

    async def sample_steps() -> None:
        while time.perf_counter() < stop_at:
            steps.append((time.perf_counter(), engine.stats().num_steps))
            await asyncio.sleep(0.5)

    t0 = time.perf_counter() + a.warmup
    await asyncio.gather(sample_steps(), *(loop() for _ in range(a.streams)))
    summarize(phase, reqs, t0, stop_at)
    phase.step_ms = _step_ms(steps, t0, stop_at)
    await engine.shutdown(drain_timeout_s=0)
    engine.engine.runner = None  # type: ignore[assignment]  # free the GPU for the Serve phase
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return phase


def _step_ms(samples: list[tuple[float, int]], t0: float, t1: float) -> float:
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 2 or inside[-1][1] == inside[0][1]:
        return float("nan")
    return (inside[-1][0] - inside[0][0]) * 1e3 / (inside[-1][1] - inside[0][1])


# ---------------------------------------------------------------- phase 2: the Serve app over HTTP


async def _http_one(session: Any, url: str, body: dict[str, Any]) -> Req:
    r = Req(time.perf_counter())
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                now = time.perf_counter()
                if data == b"[DONE]":
                    r.end = r.end or now
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = str(chunk["error"])[:200]
                    break
                if chunk.get("usage"):
                    r.tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", ()):
                    if c.get("delta", {}).get("content"):
                        r.first = r.first or now
                        r.events.append(now)
                    if c.get("finish_reason"):
                        r.end = now
    except Exception as e:  # recorded, not fatal: failures are part of the figure
        r.error = repr(e)[:200]
    return r


def _client_proc(url: str, n_streams: int, a: dict[str, Any], seed: int, t_stop: float, out: Any) -> None:
    import aiohttp

    async def main() -> list[Req]:
        rng = random.Random(seed)
        reqs: list[Req] = []
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

            async def loop() -> None:
                while time.time() < t_stop:
                    body = _body(rng, a)
                    reqs.append(await _http_one(session, url, body))

            await asyncio.gather(*(loop() for _ in range(n_streams)))
        return reqs

    reqs = asyncio.run(main())
    out.put([asdict(r) for r in reqs])


def _body(rng: random.Random, a: dict[str, Any], max_tokens: int | None = None) -> dict[str, Any]:
    return {
        "model": a["served_name"],
        "messages": messages(rng, a["prompt_words"]),
        "max_tokens": max_tokens or a["output_len"],
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def serve_phase(a: argparse.Namespace, app_args: dict[str, Any], url: str) -> Phase:
    import aiohttp
    from ray.serve.handle import DeploymentHandle

    phase = Phase(f"Serve app ({Path(a.config).name}) over HTTP")
    rng = random.Random(a.seed)
    opts = {"served_name": app_args.get("served_model_name") or app_args["model"], **vars(a)}
    handle = DeploymentHandle("LLMReplica", "cbserve")

    async def steps_now() -> int:
        return (await handle.stats.remote()).engine.num_steps

    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await _http_one(session, url, _body(rng, opts, 8))
        for _ in range(a.idle_requests):
            r = await _http_one(session, url, _body(rng, opts, 4))
            if r.first is not None:
                phase.idle_ttft_ms.append((r.first - r.start) * 1e3)
        s0 = await steps_now()
        r = await _http_one(session, url, _body(rng, opts))
        s1 = await steps_now()
        phase.one_stream_gap_ms = _pct([(y - x) * 1e3 for x, y in zip(r.events, r.events[1:])], 50)
        if r.first and r.end:
            phase.one_stream_step_ms = (r.end - r.first) * 1e3 / max(1, s1 - s0)

    t_start = time.time()
    t_stop = t_start + a.warmup + a.duration
    q: Any = mp.get_context("spawn").Queue()
    procs = []
    for i in range(a.client_procs):
        k = a.streams // a.client_procs + (1 if i < a.streams % a.client_procs else 0)
        p = mp.get_context("spawn").Process(target=_client_proc, args=(url, k, opts, a.seed + 1 + i, t_stop, q))
        p.start()
        procs.append(p)
    steps: list[tuple[float, int]] = []
    perf_minus_wall = time.perf_counter() - time.time()
    from bench.serve_scaling import CpuSampler

    with CpuSampler() as cpu:
        while time.time() < t_stop:
            steps.append((time.perf_counter(), await steps_now()))
            await asyncio.sleep(0.5)
    phase.cpu = cpu.summary(t_start + a.warmup, t_stop + 1)
    reqs: list[Req] = []
    for _ in procs:
        reqs += [Req(**r) for r in q.get(timeout=600)]
    for p in procs:
        p.join(60)
    # Client times are perf_counter of other processes: same clock (CLOCK_MONOTONIC) on Linux.
    t0 = t_start + perf_minus_wall + a.warmup
    summarize(phase, reqs, t0, t_stop + perf_minus_wall)
    phase.step_ms = _step_ms(steps, t0, t_stop + perf_minus_wall)
    return phase


# ---------------------------------------------------------------- main


def load_app_args(path: str, model: str | None, sets: list[str] = ()) -> dict[str, Any]:
    """The config's app args; ``sets`` are ``dotted.key=value`` overrides (values parsed as YAML)."""
    cfg = yaml.safe_load(Path(path).read_text())
    args = dict(cfg["applications"][0]["args"])
    if model:
        args["model"] = model
    for item in sets:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = args
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return args


FRONTS = ("haproxy", "serve-proxy")


async def serve_with_front(a: argparse.Namespace, app_args: dict[str, Any], front: str) -> Phase:
    """One Serve phase on a fresh local Ray cluster, with ``front`` ("haproxy": what ./dev serve
    and the KubeRay manifest start; "serve-proxy": Serve's Python proxy) before the ingress."""
    import ray
    from ray import serve

    from bench.serve_scaling import wait_healthy
    from deployments.app import build_app
    from deployments.front_proxy import front_env
    from deployments.limits import RequestLimits

    # Runs in a process of its own (amain), so the environment is set for good here.
    env = front_env(RequestLimits.model_validate(app_args.get("limits") or {}))
    if front == "haproxy":
        os.environ.update(env)  # read by the controller and proxies Ray starts below
    else:
        for k in env:
            os.environ.pop(k, None)
    ray.init(include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    serve.run(build_app(app_args), name="cbserve", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{a.port}"
    await asyncio.to_thread(wait_healthy, url, 600)
    phase = await serve_phase(a, app_args, url)
    phase.name += f", {front} front"
    serve.shutdown()
    ray.shutdown()
    return phase


def _serve_phase_process(a: argparse.Namespace, app_args: dict[str, Any], front: str, q: Any) -> None:
    """Puts the phase's fields on ``q``, or the traceback's text if it failed."""
    import traceback

    try:
        if a.tokenizer_dir:
            from bench.serve_scaling import provide_tokenizer

            provide_tokenizer(Path(a.tokenizer_dir))
        q.put(asdict(asyncio.run(serve_with_front(a, app_args, front))))
    except BaseException:
        q.put(traceback.format_exc())


async def amain(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    app_args = load_app_args(a.config, a.model, a.set)
    phases: list[Phase] = []
    if "engine" in a.phases:
        phases.append(await engine_phase(a, app_args))
        print(HEADER + "\n" + phases[-1].row(), flush=True)
    if "serve" in a.phases:
        # Each front on its own Ray cluster in a fresh process: Ray reads the front's settings when
        # it starts, and a driver's Serve handle can restart Ray on its own after ray.shutdown().
        ctx = mp.get_context("spawn")
        for front in a.fronts.split(","):
            q: Any = ctx.Queue()
            proc = ctx.Process(target=_serve_phase_process, args=(a, app_args, front, q))  # not a daemon: it has
            proc.start()  # client processes of its own
            result = await asyncio.to_thread(q.get)
            proc.join()
            if isinstance(result, str):
                raise SystemExit(f"Serve phase with the {front} front failed:\n{result}")
            phases.append(Phase(**result))
            print(HEADER + "\n" + phases[-1].row(), flush=True)
    table = HEADER + "\n" + "\n".join(p.row() for p in phases)
    for p in phases:
        if p.cpu:
            table += (
                "\n\ncores busy ("
                + p.name
                + "): "
                + ", ".join(
                    f"{k} {v['cores']:.2f} (max process {v['max_process_cores']:.2f})" for k, v in p.cpu.items()
                )
            )
    if len(phases) >= 2 and phases[0].tok_s and "engine" in a.phases:
        e = phases[0]
        for s in phases[1:]:
            table += (
                f"\n\n{s.name} / engine: output tok/s {s.tok_s / e.tok_s:.1%}; idle TTFT +"
                f"{_pct(s.idle_ttft_ms, 50) - _pct(e.idle_ttft_ms, 50):.1f} ms; TTFT p50 under load "
                f"{s.ttft_p50_ms / e.ttft_p50_ms:.2f}x; one-stream event gap - engine step "
                f"{s.one_stream_gap_ms - s.one_stream_step_ms:+.2f} ms"
            )
    meta = {"args": vars(a), "app_args": app_args, "phases": [asdict(p) for p in phases]}
    (out / "results.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "deployments.gpu.yaml"))
    ap.add_argument("--model", default=None, help="override the config's model")
    ap.add_argument("--phases", default="engine,serve")
    ap.add_argument(
        "--fronts", default="haproxy", help="HTTP fronts to run the Serve phase with, in order: haproxy,serve-proxy"
    )
    ap.add_argument("--set", action="append", default=[], help="override an app arg: replica.stream_interval=8")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="HTTP client processes (default: one per 20 streams, at least 4); a client process near one "
        "core delays its own sends and reads, which inflates the Serve phase's TTFT",
    )
    ap.add_argument("--prompt-words", type=int, default=190)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--idle-requests", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=8)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir", default=os.environ.get("CBSERVE_TOKENIZER_DIR"))
    ap.add_argument("--out", default="results/serve_overhead")
    a = ap.parse_args(argv)
    if a.client_procs is None:
        a.client_procs = max(4, -(-a.streams // 20))
    if unknown := set(a.fronts.split(",")) - set(FRONTS):
        ap.error(f"--fronts: unknown {sorted(unknown)} (known: {', '.join(FRONTS)})")
    if a.tokenizer_dir:
        from bench.serve_scaling import provide_tokenizer

        provide_tokenizer(Path(a.tokenizer_dir))
    asyncio.run(amain(a))


if __name__ == "__main__":
    main()
