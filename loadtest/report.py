"""Plots and a summary of one load test: locust's CSVs plus the per-request JSONL.

    python -m loadtest.report --csv results/run --ttft-ms 500 --tpot-ms 50

Reads ``<prefix>_stats.csv`` and ``<prefix>_stats_history.csv`` (locust ``--csv <prefix>``) and
``<prefix>_requests.jsonl`` (the locustfile's records; ``--jsonl`` to point elsewhere). Writes
into ``<prefix>_plots/`` (or ``--out``):

- ``latency.png``     TTFT, TPOT, ITL and E2E percentiles (p50/p90/p99) per time window
- ``throughput.png``  output tokens/s and finished requests/s per window, with the user count
- ``replicas.png``    running (and target) replicas per deployment over time, with the user count
- ``summary.json``    the numbers of the printed summary

Latencies over time come from the JSONL (exact per request); locust's own stats table is printed
from ``_stats.csv``. Goodput counts requests that succeeded within the ``--ttft-ms`` and
``--tpot-ms`` limits (a limit left out is not checked).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2e")
LOCUST_ROW_TYPES = ("TTFT", "TPOT", "ITL", "E2E", "POST")


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, r: dict[str, Any]) -> bool:
        if not r["ok"]:
            return False
        if self.ttft_ms is not None and (r["ttft"] is None or r["ttft"] * 1000 > self.ttft_ms):
            return False
        # A one-token answer has no TPOT; it cannot break a TPOT limit.
        return not (self.tpot_ms is not None and r["tpot"] is not None and r["tpot"] * 1000 > self.tpot_ms)


@dataclass(frozen=True)
class RunData:
    requests: list[dict[str, Any]]
    replicas: list[dict[str, Any]]
    stats: list[dict[str, str]]  # locust _stats.csv rows
    history: list[dict[str, str]]  # locust _stats_history.csv rows


# ---------------------------------------------------------------- reading


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    requests, replicas = [], []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            kind = rec.get("type")
            if kind == "request":
                requests.append(rec)
            elif kind == "replicas":
                replicas.append(rec)
            else:
                raise ValueError(f"{path}:{n}: unknown record type {kind!r}")
    return requests, replicas


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load_run(csv_prefix: str | None, jsonl: str | None) -> RunData:
    if not csv_prefix and not jsonl:
        raise ValueError("give --csv PREFIX and/or --jsonl PATH")
    jsonl_path = Path(jsonl) if jsonl else Path(f"{csv_prefix}_requests.jsonl")
    if not jsonl_path.exists():
        raise FileNotFoundError(f"no per-request records at {jsonl_path} (the locustfile writes them; see --jsonl)")
    requests, replicas = read_jsonl(jsonl_path)
    stats = _read_csv(Path(f"{csv_prefix}_stats.csv")) if csv_prefix else []
    history = _read_csv(Path(f"{csv_prefix}_stats_history.csv")) if csv_prefix else []
    if csv_prefix and not stats:
        raise FileNotFoundError(f"no locust stats at {csv_prefix}_stats.csv (run locust with --csv {csv_prefix})")
    return RunData(requests, replicas, stats, history)


# ---------------------------------------------------------------- numbers


def metric_values(requests: list[dict[str, Any]], metric: str) -> list[float]:
    """Seconds. ITL uses every gap when the JSONL has them (--itl-list), else per-request means."""
    ok = [r for r in requests if r["ok"]]
    if metric != "itl":
        return [r[metric] for r in ok if r.get(metric) is not None]
    out: list[float] = []
    for r in ok:
        if r.get("itl"):
            out.extend(r["itl"])
        elif r.get("itl_stats"):
            out.append(r["itl_stats"]["mean"])
    return out


def _stats_ms(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"count": 0}
    a = np.asarray(xs) * 1000
    return {
        "count": len(xs),
        "mean": float(a.mean()),
        **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)},
        "max": float(a.max()),
    }


def summarize(requests: list[dict[str, Any]], slo: Slo) -> dict[str, Any]:
    if not requests:
        raise ValueError("no request records: did the load test send any request?")
    ok = [r for r in requests if r["ok"]]
    start = min(r["ts"] for r in requests)
    end = max(r["ts"] + (r["e2e"] or 0.0) for r in requests)
    duration = max(end - start, 1e-9)
    good = [r for r in requests if slo.met_by(r)]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {
        "requests": len(requests),
        "ok": len(ok),
        "failed": len(requests) - len(ok),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration,
        "latency_ms": {m: _stats_ms(metric_values(requests, m)) for m in METRICS},
        "goodput": {
            "ttft_limit_ms": slo.ttft_ms,
            "tpot_limit_ms": slo.tpot_ms,
            "good_requests": len(good),
            "fraction_of_requests": len(good) / len(requests),
            "requests_per_s": len(good) / duration,
            "output_tokens_per_s": sum(r["output_tokens"] for r in good) / duration,
        },
    }


def windowed(requests: list[dict[str, Any]], t0: float, window: float) -> dict[str, Any]:
    """Per-window latency percentiles (by completion time) and token/request rates."""
    ok = [r for r in requests if r["ok"]]
    if not ok:
        return {"t": np.array([]), "lat": {}, "tokens_per_s": np.array([]), "requests_per_s": np.array([])}
    t_end = max(r["ts"] + r["e2e"] for r in ok) - t0
    n = max(1, math.ceil(t_end / window))
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    tokens = np.zeros(n)
    for r in ok:
        done = r["ts"] + r["e2e"] - t0
        buckets[min(n - 1, int(done // window))].append(r)
        # Spread the output tokens evenly from the first token to the end of the stream.
        a, b = r["ts"] + r["ttft"] - t0, done
        if b - a <= 1e-9:
            tokens[min(n - 1, int(b // window))] += r["output_tokens"]
            continue
        for w in range(int(a // window), min(n - 1, int(b // window)) + 1):
            lo, hi = max(a, w * window), min(b, (w + 1) * window)
            if hi > lo:
                tokens[w] += r["output_tokens"] * (hi - lo) / (b - a)
    lat: dict[str, dict[int, np.ndarray]] = {}
    for m in METRICS:
        per_q: dict[int, list[float]] = {50: [], 90: [], 99: []}
        for w in range(n):
            vals = metric_values(buckets.get(w, []), m)
            for q in per_q:
                per_q[q].append(float(np.percentile(vals, q)) * 1000 if vals else math.nan)
        lat[m] = {q: np.asarray(v) for q, v in per_q.items()}
    counts = np.array([len(buckets.get(w, [])) for w in range(n)], dtype=float)
    widths = np.full(n, window)
    widths[-1] = max(t_end - (n - 1) * window, 1e-3)  # the last window is cut short by the end of the run
    return {
        "t": (np.arange(n) + 0.5) * window,
        "lat": lat,
        "tokens_per_s": tokens / widths,
        "requests_per_s": counts / widths,
    }


def user_counts(history: list[dict[str, str]], t0: float) -> tuple[np.ndarray, np.ndarray]:
    rows = [h for h in history if h.get("Name") == "Aggregated"]
    t = np.array([float(h["Timestamp"]) - t0 for h in rows])
    u = np.array([float(h["User Count"]) for h in rows])
    return t, u


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _users_twin(ax: Any, users: tuple[np.ndarray, np.ndarray]) -> None:
    t, u = users
    if len(t):
        twin = ax.twinx()
        twin.step(t, u, where="post", color="grey", alpha=0.5, label="users")
        twin.set_ylabel("users", color="grey")
        twin.set_ylim(bottom=0)


def plot_latency(win: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E latency"}
    for ax, m in zip(axes, METRICS):
        for q, style in ((50, "-"), (90, "--"), (99, ":")):
            if m in win["lat"]:
                ax.plot(win["t"], win["lat"][m][q], style, marker=".", label=f"p{q}")
        ax.set_ylabel(f"{names[m]} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("time since first request (s)")
    fig.suptitle("Latency percentiles per window (by completion time)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(win: dict[str, Any], users: tuple[np.ndarray, np.ndarray], path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax1.plot(win["t"], win["tokens_per_s"], marker=".", color="tab:blue")
    ax1.set_ylabel("output tokens/s")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    _users_twin(ax1, users)
    ax2.plot(win["t"], win["requests_per_s"], marker=".", color="tab:green")
    ax2.set_ylabel("finished requests/s")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("time since first request (s)")
    ax2.grid(alpha=0.3)
    fig.suptitle("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_replicas(replicas: list[dict[str, Any]], users: tuple[np.ndarray, np.ndarray], t0: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series: dict[str, tuple[list[float], list[int], list[int]]] = defaultdict(lambda: ([], [], []))
    for s in replicas:
        for name, c in s["deployments"].items():
            ts, running, target = series[name]
            ts.append(s["ts"] - t0)
            running.append(c["running"])
            target.append(c["target"])
    for name, (ts, running, target) in sorted(series.items()):
        line = ax.step(ts, running, where="post", label=f"{name} running")[0]
        ax.step(ts, target, where="post", linestyle="--", color=line.get_color(), alpha=0.6, label=f"{name} target")
    if not series:
        ax.text(
            0.5,
            0.5,
            "no replica samples in the JSONL\n(see --replica-source)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    from matplotlib.ticker import MaxNLocator

    ax.set_ylabel("replicas")
    ax.set_xlabel("time since first request (s)")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="upper left", fontsize=8)
    _users_twin(ax, users)
    fig.suptitle("Serve replicas over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- text


def format_summary(summary: dict[str, Any], stats: list[dict[str, str]]) -> str:
    lines = [
        f"requests: {summary['requests']} ({summary['ok']} ok, {summary['failed']} failed) "
        f"in {summary['duration_s']:.1f} s: {summary['requests_per_s']:.2f} req/s, "
        f"{summary['output_tokens_per_s']:.1f} output tokens/s",
        "",
        f"{'metric':<8}{'count':>8}{'mean':>10}{'p50':>10}{'p90':>10}{'p95':>10}{'p99':>10}{'max':>10}  (ms)",
    ]
    for m in METRICS:
        s = summary["latency_ms"][m]
        if not s["count"]:
            lines.append(f"{m.upper():<8}{0:>8}")
            continue
        lines.append(
            f"{m.upper():<8}{s['count']:>8}"
            + "".join(f"{s[k]:>10.1f}" for k in ("mean", "p50", "p90", "p95", "p99", "max"))
        )
    g = summary["goodput"]
    limits = (
        ", ".join(
            f"{k} <= {v:g} ms" for k, v in (("TTFT", g["ttft_limit_ms"]), ("TPOT", g["tpot_limit_ms"])) if v is not None
        )
        or "no limits"
    )
    lines += [
        "",
        f"goodput ({limits}): {g['good_requests']}/{summary['requests']} requests "
        f"({100 * g['fraction_of_requests']:.1f}%), {g['requests_per_s']:.2f} req/s, "
        f"{g['output_tokens_per_s']:.1f} output tokens/s",
    ]
    rows = [r for r in stats if r.get("Type") in LOCUST_ROW_TYPES]
    if rows:
        lines += [
            "",
            "locust stats (_stats.csv, ms):",
            f"{'type':<6}{'name':<24}{'reqs':>8}{'fails':>7}{'median':>9}{'p95':>9}{'p99':>9}",
        ]
        for r in rows:
            lines.append(
                f"{r['Type']:<6}{r['Name']:<24}{r['Request Count']:>8}{r['Failure Count']:>7}"
                f"{r['Median Response Time']:>9}{r['95%']:>9}{r['99%']:>9}"
            )
    return "\n".join(lines)


def make_report(data: RunData, out_dir: Path, slo: Slo, window: float) -> dict[str, Any]:
    """Write the plots and summary.json into ``out_dir``; return the summary."""
    if window <= 0:
        raise ValueError("--window must be > 0")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(data.requests, slo)
    t0 = min(r["ts"] for r in data.requests)
    win = windowed(data.requests, t0, window)
    users = user_counts(data.history, t0)
    plot_latency(win, out_dir / "latency.png")
    plot_throughput(win, users, out_dir / "throughput.png")
    plot_replicas(data.replicas, users, t0, out_dir / "replicas.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", dest="csv_prefix", help="locust --csv prefix (reads <prefix>_stats*.csv)")
    p.add_argument("--jsonl", help="per-request JSONL (default <prefix>_requests.jsonl)")
    p.add_argument("--out", help="output folder (default <prefix>_plots, or next to the JSONL)")
    p.add_argument("--ttft-ms", type=float, help="goodput: TTFT limit in ms")
    p.add_argument("--tpot-ms", type=float, help="goodput: TPOT limit in ms")
    p.add_argument("--window", type=float, default=5.0, help="seconds per time window in the plots (default 5)")
    args = p.parse_args(argv)
    try:
        data = load_run(args.csv_prefix, args.jsonl)
        if args.out:
            out = Path(args.out)
        elif args.csv_prefix:
            out = Path(f"{args.csv_prefix}_plots")
        else:
            out = Path(args.jsonl).with_suffix("").parent / (Path(args.jsonl).stem + "_plots")
        summary = make_report(data, out, Slo(args.ttft_ms, args.tpot_ms), args.window)
    except (ValueError, FileNotFoundError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, data.stats))
    print(f"\nplots: {out}/latency.png, throughput.png, replicas.png; numbers: {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
