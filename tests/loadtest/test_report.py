"""loadtest/report.py: numbers on hand-made records, and the full report on a real locust run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from loadtest.report import Slo, load_run, main, summarize, windowed
from tests.loadtest.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _req(ts, ttft, tpot, e2e, tokens, ok=True):
    return {
        "type": "request",
        "ts": ts,
        "ok": ok,
        "ttft": ttft,
        "tpot": tpot,
        "e2e": e2e,
        "output_tokens": tokens,
        "itl_stats": {"mean": tpot} if tpot else None,
    }


def test_goodput_counts_only_requests_within_both_limits():
    reqs = [
        _req(0.0, 0.1, 0.01, 1.0, 10),  # good
        _req(0.0, 0.5, 0.01, 1.0, 10),  # TTFT too slow
        _req(0.0, 0.1, 0.05, 1.0, 10),  # TPOT too slow
        _req(0.0, 0.1, None, 0.2, 1),  # one token: no TPOT, still good
        _req(0.0, None, None, 0.1, 0, ok=False),  # failed
    ]
    s = summarize(reqs, Slo(ttft_ms=200, tpot_ms=20))
    assert (s["requests"], s["ok"], s["failed"]) == (5, 4, 1)
    assert s["duration_s"] == pytest.approx(1.0)
    g = s["goodput"]
    assert g["good_requests"] == 2 and g["fraction_of_requests"] == pytest.approx(0.4)
    assert g["requests_per_s"] == pytest.approx(2.0) and g["output_tokens_per_s"] == pytest.approx(11.0)
    assert summarize(reqs, Slo())["goodput"]["good_requests"] == 4  # no limits: every success counts
    assert s["latency_ms"]["ttft"]["count"] == 4 and s["latency_ms"]["ttft"]["max"] == pytest.approx(500)
    with pytest.raises(ValueError, match="no request records"):
        summarize([], Slo())


def test_windows_spread_tokens_over_the_stream():
    # 20 tokens streamed from t=1 (first token) to t=3: 10 land in window [0,2) and 10 in [2,4).
    win = windowed([_req(0.0, 1.0, 0.1, 3.0, 20), _req(0.5, 0.2, 0.1, 0.5, 4)], t0=0.0, window=2.0)
    assert list(win["t"]) == [1.0, 3.0]
    tokens_per_window = win["tokens_per_s"] * np.array([2.0, 1.0])  # the last window is 1 s long
    assert tokens_per_window == pytest.approx([14.0, 10.0])
    assert win["lat"]["ttft"][50][0] == pytest.approx(200)  # the short request finished in window 0
    assert win["lat"]["e2e"][50][1] == pytest.approx(3000)


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--csv"):
        load_run(None, None)
    assert main(["--csv", str(tmp_path / "nothing")]) == 2
    assert "no per-request records" in capsys.readouterr().err
    (tmp_path / "x_requests.jsonl").write_text(json.dumps({"type": "mystery"}) + "\n")
    assert main(["--csv", str(tmp_path / "x")]) == 2


def test_report_on_a_locust_run(locust_run, tmp_path):
    locust_run.check()
    out = tmp_path / "plots"
    # As a user runs it: a separate process (matplotlib Agg, no display).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.report",
            "--csv",
            str(locust_run.prefix),
            "--out",
            str(out),
            "--ttft-ms",
            "10000",
            "--tpot-ms",
            "10000",
            "--window",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("latency.png", "throughput.png", "replicas.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    text = proc.stdout
    for row in ("TTFT", "TPOT", "ITL", "E2E", "goodput (TTFT <= 10000 ms, TPOT <= 10000 ms)", "locust stats"):
        assert row in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["ok"] > 0
    # Generous limits: every request is good.
    assert summary["goodput"]["good_requests"] == summary["requests"]
    assert summary["latency_ms"]["ttft"]["p50"] > 0


def test_default_output_folder_is_next_to_the_csv(locust_run, tmp_path):
    locust_run.check()
    prefix = tmp_path / "copy"
    for suffix in ("_stats.csv", "_stats_history.csv", "_requests.jsonl"):
        (tmp_path / f"copy{suffix}").write_bytes((locust_run.prefix.parent / f"run{suffix}").read_bytes())
    assert main(["--csv", str(prefix)]) == 0
    assert (tmp_path / "copy_plots" / "replicas.png").exists()


def test_analysis_modules_do_not_import_locust():
    """locust monkey-patches the whole process with gevent on import; the report, options and
    parsing modules must stay importable without it (pytest, notebooks)."""
    code = (
        "import sys, loadtest.report, loadtest.options, loadtest.stream, loadtest.workload, "
        "loadtest.replicas, loadtest.step_plan; assert 'locust' not in sys.modules and 'gevent' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
