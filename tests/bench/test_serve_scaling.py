"""bench/serve_scaling.py: the steady-window numbers, efficiency and table (no Ray, no locust)."""

from __future__ import annotations

import os

import pytest

from bench.serve_scaling import add_efficiency, app_args, parse_engine, table, window_stats


def rec(ts, ttft, e2e, tokens=100, ok=True, tpot=0.01):
    return {"type": "request", "ts": ts, "ttft": ttft, "e2e": e2e, "output_tokens": tokens, "ok": ok, "tpot": tpot}


def test_window_counts_only_the_tokens_made_inside_it():
    records = [
        rec(0.0, 1.0, 11.0),  # tokens over [1, 11]: half of them inside [6, 16]
        rec(6.0, 1.0, 5.0),  # [7, 11]: all inside
        rec(20.0, 0.5, 2.0),  # after the window: nothing, and not a started request
        rec(8.0, None, 1.0, ok=False),  # failed: no tokens, but started in the window
    ]
    s = window_stats(records, 6.0, 16.0)
    assert s["output_tokens_per_s"] == pytest.approx((50 + 100) / 10.0)
    assert (s["requests_started"], s["requests_failed"]) == (2, 1)
    assert s["ttft_ms"]["p50"] == pytest.approx(1000.0)  # only the ok request started inside


def test_efficiency_is_relative_to_n_times_one_replica():
    results = [{"replicas": 1, "output_tokens_per_s": 100.0}, {"replicas": 2, "output_tokens_per_s": 180.0}]
    add_efficiency(results)
    assert [r["efficiency"] for r in results] == [1.0, pytest.approx(0.9)]
    no_base = [{"replicas": 2, "output_tokens_per_s": 180.0}]
    add_efficiency(no_base)
    assert no_base[0]["efficiency"] is None


def test_table_has_one_row_per_run():
    lat = {"p50": 10.0, "p99": 20.0, "mean": 12.0}
    results = [
        {
            "replicas": n,
            "users": 32 * n,
            "output_tokens_per_s": 1000.0 * n,
            "ttft_ms": lat,
            "tpot_ms": lat,
            "requests_started": 10,
            "requests_failed": 0,
        }
        for n in (1, 2)
    ]
    add_efficiency(results)
    rows = table(results).splitlines()
    assert len(rows) == 4 and rows[3].startswith("| 2 | 64 | 2,000 |") and rows[3].endswith("| 1.000 |")


def test_app_args_scale_ingress_with_replicas_and_parse_engine_values():
    class A:
        model, num_gpus, replica_num_cpus, ingress_per_replica, ingress_num_cpus = "tiny:llama", 1.0, 1.0, 2.0, 1.0
        engine = ["max_num_seqs=64", "use_cuda_graphs=false", "dtype=bfloat16"]  # noqa: RUF012
        accelerator_resource = ""
        stream_interval = 4

    args = app_args(A(), 4)
    assert args["num_replicas"] == 4 and args["ingress_replicas"] == 8
    assert args["replica"]["stream_interval"] == 4
    assert args["engine"] == {"max_num_seqs": 64, "use_cuda_graphs": False, "dtype": "bfloat16"}
    with pytest.raises(SystemExit):
        parse_engine(["no-equals-sign"])


def test_cpu_sampler_attributes_a_busy_child_process():
    import subprocess
    import sys
    import time

    from bench.serve_scaling import CpuSampler

    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass\n# locust"])
    try:
        with CpuSampler(interval=0.5) as cpu:
            time.sleep(2.0)
    finally:
        busy.wait()
    got = cpu.summary(0, float("inf"))
    # The busy child's command line names "locust": it counts there, at most one core.
    assert 0.3 < got["locust"]["cores"] <= 1.1 and got["locust"]["processes"] >= 1
